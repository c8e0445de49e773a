"""Stage I of RL-Co: supervised fine-tuning co-training on real and simulated demonstrations.

    python stage1_sft_cotrain.py --task open_drawer --policy pi05 --alpha 0.95

Every training sample is drawn from the sim dataset with probability alpha and from the real
dataset with probability 1 - alpha, independently per sample (Eq. 4 of the paper, implemented
by sampling as in its reference [42], not by concatenating the datasets). alpha = 0 is the
real-only baseline and alpha = 1 sim-only: the same script makes every SFT baseline.

Runs unchanged under `torchrun --nproc_per_node N` (DistributedDataParallel; gloo on CPU). With
--fsdp the processes shard the model instead of replicating it (PyTorch FSDP2, one unit per
transformer layer), for full fine-tuning that does not fit one GPU.
The global batch is drawn once from one seeded generator and every rank takes its own slice, so
N processes see exactly the samples a single process with the same global batch would see.

Outputs, under runs/<run_name>/: args.json, metrics.jsonl, TensorBoard events, videos/,
checkpoints/<step>/ (last one kept, with trainer_state.pt for --resume), checkpoints/best/
(highest proxy_real success, else sim), checkpoints/final/.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

import demos
import envs
import policies


@dataclass
class Args:
    task: str = "open_drawer"
    """task whose demos are used and whose envs evaluate: pick_and_place, push_cube, open_drawer, close_drawer"""
    policy: Literal["openvla", "pi05"] = "pi05"
    """policy family: openvla (action tokens) or pi05 (flow-matching action expert)"""
    size: Literal["tiny", "full"] = "tiny"
    """tiny: random-init model that trains on a CPU; full: the published architecture"""
    pretrained: Optional[str] = None
    """(full size) local folder or hub id of the published checkpoint to start from"""
    sim_data: Optional[str] = None
    """LeRobot v3.0 folder of sim demos (default: data/<task>/sim)"""
    real_data: Optional[str] = None
    """LeRobot v3.0 folder of real demos (default: data/<task>/proxy_real)"""
    alpha: float = 0.95
    """probability that a training sample comes from sim (Eq. 4); 0 = real only, 1 = sim only"""
    image_key: str = demos.IMAGE_KEY
    """dataset feature holding the camera image"""
    state_key: str = demos.STATE_KEY
    """dataset feature holding the robot state"""
    action_key: str = demos.ACTION_KEY
    """dataset feature holding the action"""
    chunk_size: Optional[int] = None
    """action-chunk length H (default: the policy's own, 1 for openvla, 4 for tiny pi05)"""

    total_steps: int = 3000
    """optimizer steps"""
    batch_size: int = 32
    """global batch size (split evenly across torchrun processes)"""
    lr: float = 3e-4
    """peak learning rate (the full models want ~2.5e-5)"""
    warmup_steps: int = 100
    """linear warm-up steps before the cosine decay"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of --lr"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    max_grad_norm: float = 1.0
    """gradient clipping (global L2 norm)"""
    augment: bool = True
    """random crop and colour jitter on training images"""

    eval_every: int = 1000
    """evaluate and checkpoint every N steps (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per domain at each evaluation, on fixed evaluation seeds"""
    eval_domains: tuple[str, ...] = ("sim", "proxy_real")
    """domains evaluated (monitoring only)"""
    eval_num_envs: int = 2
    """parallel envs for evaluation"""
    eval_max_steps: Optional[int] = None
    """override the env's episode length during evaluation"""
    save_video: bool = True
    """record one evaluation episode per domain under videos/"""

    seed: int = 1
    """seed for model init, sampling, augmentation"""
    run_name: Optional[str] = None
    """run folder name under --runs-dir (default: stage1_<task>_<policy>_alpha<alpha>_s<seed>)"""
    runs_dir: str = "runs"
    """where runs are written"""
    resume: bool = False
    """continue the run in runs/<run_name> from its last checkpoint"""
    log_every: int = 20
    """steps between metric log lines"""
    device: str = "auto"
    """auto, cpu or cuda"""
    policy_overrides: dict[str, float] = field(default_factory=dict)
    """extra make_policy overrides for a new run, e.g. --policy-overrides num_steps 4"""
    gradient_checkpointing: bool = False
    """recompute each transformer layer's activations in backward instead of storing them: less memory, about a third more compute"""
    fsdp: bool = False
    """under torchrun: shard parameters, gradients and AdamW state over the processes (FSDP2, one unit per transformer layer) instead of replicating them (DDP); for full fine-tuning that does not fit one GPU. Evaluation and checkpoints gather the whole model on process 0, on the CPU"""


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def open_dataset(path: Optional[str], what: str, args: Args, chunk_size: int):
    if not Path(path).exists():
        fail(f"{what} dataset not found: {path}\n"
             f"  make one with: python collect_demos.py --task {args.task} "
             f"--domain {'sim' if what == 'sim' else 'proxy_real'} --out {path}")
    try:
        ds = demos.LeRobotDataset(path, chunk_size=chunk_size, image_key=args.image_key,
                                  state_key=args.state_key, action_key=args.action_key)
    except (FileNotFoundError, KeyError, ValueError) as e:
        fail(f"cannot read {what} dataset {path}: {e}")
    if len(ds) == 0:
        fail(f"{what} dataset {path} holds no frames")
    return ds


def merge_stats(stats_list: list[dict], weights: list[float]) -> dict:
    """Normalization statistics covering every source: pooled mean/std (weighted by how often a
    source is sampled), and the widest q01/q99/min/max, so that no source's actions are clipped."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    mean = sum(wi * np.asarray(s["mean"]) for wi, s in zip(w, stats_list))
    var = sum(wi * (np.asarray(s["std"]) ** 2 + (np.asarray(s["mean"]) - mean) ** 2)
              for wi, s in zip(w, stats_list))
    out = {"mean": mean, "std": np.sqrt(var),
           "min": np.min([s["min"] for s in stats_list], axis=0),
           "max": np.max([s["max"] for s in stats_list], axis=0),
           "q01": np.min([s["q01"] for s in stats_list], axis=0),
           "q99": np.max([s["q99"] for s in stats_list], axis=0)}
    return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in out.items()}


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The usual VLA recipe: a random crop of 90% of the area resized back, then brightness,
    contrast and saturation jitter. uint8 [B, H, W, 3] in, uint8 out."""
    b, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).float() / 255.0
    scale = math.sqrt(0.9)
    ch, cw = int(round(h * scale)), int(round(w * scale))
    tops = torch.randint(0, h - ch + 1, (b,), generator=generator)
    lefts = torch.randint(0, w - cw + 1, (b,), generator=generator)
    crops = torch.stack([x[i, :, t:t + ch, l:l + cw] for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist()))])
    x = torch.nn.functional.interpolate(crops, size=(h, w), mode="bilinear", align_corners=False)
    brightness = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.4
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.4
    saturation = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.4
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * saturation + gray
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def lr_at(step: int, args: Args) -> float:
    """Linear warm-up to --lr, then cosine decay to min_lr_ratio * --lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


@torch.no_grad()
def evaluate_success(policy, task: str, domain: str, num_episodes: int, image_size: int,
                     num_envs: int, max_steps: Optional[int], video_path: Optional[Path]) -> float:
    """Success rate on the fixed evaluation seeds (identical initial states for every method).
    The policy acts deterministically at each decision point; its chunk of H actions is executed
    with the camera rendered only before the next decision."""
    policy.eval()
    seeds = envs.eval_seeds(num_episodes)
    num_envs = min(num_envs, num_episodes)
    # one env for all batches: starting an env (worker processes, first render) costs far more
    # than an episode
    env = envs.make_env(task, domain=domain, num_envs=num_envs, image_size=image_size,
                        max_episode_steps=max_steps)
    successes, frames = [], []
    for start in range(0, num_episodes, num_envs):
        batch_seeds = seeds[start:start + num_envs]
        n = len(batch_seeds)
        # a short last batch: the spare envs replay the first seed and are not counted
        obs, _ = env.reset(seed=batch_seeds + [batch_seeds[0]] * (num_envs - n))
        done = np.zeros(num_envs, dtype=bool)
        success = np.zeros(num_envs, dtype=bool)
        while not done.all():
            actions = policy.act(obs, deterministic=True)["actions"].cpu().numpy()
            for h in range(actions.shape[1]):
                last = h == actions.shape[1] - 1
                obs, _, terminated, truncated, info = env.step(actions[:, h], render=last)
                # a finished env keeps being stepped with the others; only its first ending counts
                success |= info["success"] & ~done
                done |= terminated | truncated
                if video_path is not None and start == 0:
                    frames.append(env.render_frame()[0])
                if done.all():
                    break
            if obs["image"] is None:
                obs["image"] = env.render_frame()
        successes.extend(success[:n].tolist())
    env.close()
    if video_path is not None and frames:
        import imageio.v2 as imageio
        video_path.parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(str(video_path), frames, fps=10)
    policy.train()
    return float(np.mean(successes))


class SFTLoss(torch.nn.Module):
    """policy.sft_loss as a forward(), so DistributedDataParallel can hook its gradients."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch):
        return self.policy.sft_loss(batch)


def save_checkpoint(policy, ckpt_dir: Path, extra: dict, trainer_state: Optional[dict]):
    """Write to a temporary folder, then rename: an interrupted save never leaves a broken
    checkpoint behind."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp, extra=extra)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tmp.rename(ckpt_dir)


def latest_step_checkpoint(ckpt_root: Path) -> Optional[Path]:
    steps = [p for p in ckpt_root.glob("*") if p.name.isdigit() and (p / "trainer_state.pt").exists()]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def gathered_policy(model, policy, is_main: bool):
    """(--fsdp) The whole policy, gathered from the shards onto process 0's CPU, for evaluation and
    saving; None on the other processes. Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    whole = policies.empty_policy(policy.config, policy.tokenizer)
    whole.configure_training()
    whole.load_state_dict({k.removeprefix("policy."): v for k, v in state.items()}, assign=True)
    return whole


def main(args: Args):
    # ---- distributed set-up (torchrun sets these variables) ---------------------------------
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    is_main = rank == 0

    # ---- arguments --------------------------------------------------------------------------
    if args.task not in envs.TASKS:
        fail(f"unknown task {args.task!r}; choose one of {', '.join(envs.TASKS)}")
    if not 0.0 <= args.alpha <= 1.0:
        fail(f"--alpha must lie in [0, 1], got {args.alpha}")
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} is not divisible by {world_size} processes")
    args.sim_data = args.sim_data or f"data/{args.task}/sim"
    args.real_data = args.real_data or f"data/{args.task}/proxy_real"
    args.run_name = args.run_name or f"stage1_{args.task}_{args.policy}_alpha{args.alpha:g}_s{args.seed}"
    run_dir = Path(args.runs_dir) / args.run_name
    ckpt_root = run_dir / "checkpoints"
    resume_from = None
    if args.resume:
        resume_from = latest_step_checkpoint(ckpt_root)
        if resume_from is None and not (run_dir / "args.json").exists():
            fail(f"--resume: no run in {run_dir}")
        if resume_from is None:  # stopped before its first checkpoint: nothing to lose
            print(f"--resume: {run_dir} stopped before its first checkpoint; starting it from the beginning")
    elif (run_dir / "args.json").exists():
        fail(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-name")

    # ---- seeding ----------------------------------------------------------------------------
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed + rank)  # per-rank stream for the loss's own noise (pi05)

    # ---- data ---------------------------------------------------------------------------------
    # the policy fixes the chunk length H; a resumed run takes it from its checkpoint
    if resume_from is not None:
        chunk_size = policies.load_policy(resume_from).chunk_size
    else:
        chunk_size = args.chunk_size or policies.default_chunk_size(args.policy)
    sim_ds = open_dataset(args.sim_data, "sim", args, chunk_size) if args.alpha > 0 else None
    real_ds = open_dataset(args.real_data, "real", args, chunk_size) if args.alpha < 1 else None
    sources = [(ds, w) for ds, w in ((sim_ds, args.alpha), (real_ds, 1 - args.alpha)) if ds is not None]
    first = sources[0][0]
    for ds, _ in sources[1:]:
        if (ds.action_dim, ds.state_dim) != (first.action_dim, first.state_dim):
            fail(f"sim and real datasets disagree: action/state dims {first.action_dim}/{first.state_dim} "
                 f"vs {ds.action_dim}/{ds.state_dim}")
    norm_stats = {key: merge_stats([ds.stats[k] for ds, _ in sources], [w for _, w in sources])
                  for key, k in (("observation.state", args.state_key), ("action", args.action_key))}
    instructions = sorted({t for ds, _ in sources for t in ds.tasks})
    image_size = int(first.info["features"][args.image_key]["shape"][0])

    # ---- policy -------------------------------------------------------------------------------
    if resume_from is not None:
        policy = policies.load_policy(resume_from)
        if policy.kind != args.policy:
            fail(f"{resume_from} holds a {policy.kind} policy, but --policy is {args.policy}")
    else:
        if args.fsdp:  # one init on every process: DDP broadcasts rank 0's weights, FSDP does not
            torch.manual_seed(args.seed)
        policy = policies.make_policy(args.policy, args.size, args.pretrained, chunk_size=chunk_size,
                                      action_dim=first.action_dim, state_dim=first.state_dim,
                                      instructions=instructions, norm_stats=norm_stats,
                                      **args.policy_overrides)
        if args.fsdp:
            torch.manual_seed(args.seed + rank)
    for ds, _ in sources:
        try:
            demos.check_dims(ds, policy)
        except ValueError as e:
            fail(str(e))
    if args.gradient_checkpointing:
        policy.set_gradient_checkpointing(True)
    policy.train()
    model = SFTLoss(policy)
    if args.fsdp:
        if world_size < 2:
            fail("--fsdp shards the model over torchrun processes: run under torchrun --nproc_per_node N, N >= 2")
        from torch.distributed.fsdp import fully_shard
        # one unit per layer, the rest (embeddings, projector, heads) in the root unit; fully_shard
        # moves each process's shards to its device, so the whole model never sits on one GPU
        for layer in policy.transformer_layers():
            fully_shard(layer)
        fully_shard(model)
    else:
        policy.to(device)
    if world_size > 1 and not args.fsdp:  # the value/noise heads get no SFT gradient, hence find_unused_parameters
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=args.adam_betas,
                                  weight_decay=args.weight_decay)
    # Eq. 4: each sample from sim with probability alpha; the same global batch on every rank
    mixer = demos.AlphaMixer(sim_ds, real_ds, args.alpha, args.batch_size, args.seed,
                             rank=rank, world_size=world_size)
    augment_rng = torch.Generator().manual_seed(args.seed + 1000 * rank)
    start_step, best_score = 0, -1.0

    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        if args.fsdp:  # saved whole (see trainer_state); each process keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            # strict=False: heads that get no SFT gradient (value, noise) never had AdamW state
            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            optimizer.load_state_dict(state["optimizer"])
        mixer.load_state_dict(state["mixer"])
        augment_rng.set_state(state["augment_rng"][rank])
        torch.set_rng_state(state["torch_rng"][rank])
        start_step, best_score = state["step"], state["best_score"]
        if is_main:
            print(f"resuming {run_dir} from step {start_step}")

    def trainer_state(step):
        # every rank's RNG state, so a resumed torchrun run continues exactly
        aug = [augment_rng.get_state()]
        trng = [torch.get_rng_state()]
        if world_size > 1:
            aug, trng = [None] * world_size, [None] * world_size
            dist.all_gather_object(aug, augment_rng.get_state())
            dist.all_gather_object(trng, torch.get_rng_state())
        if args.fsdp:  # the whole AdamW state, gathered onto process 0 (collective)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        else:
            optim_state = optimizer.state_dict()
        return {"optimizer": optim_state, "mixer": mixer.state_dict(),
                "augment_rng": aug, "torch_rng": trng, "step": step, "best_score": best_score}

    extra = {"stage": "stage1", "task": args.task, "alpha": args.alpha, "args": asdict(args)}
    writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir))
        n_params = sum(p.numel() for p in trainable)
        print(f"Stage I: {args.policy}/{args.size} ({n_params / 1e6:.2f}M trainable), task {args.task}, "
              f"alpha {args.alpha} | sim {sim_ds.num_episodes if sim_ds else 0} episodes, "
              f"real {real_ds.num_episodes if real_ds else 0} episodes | {world_size} process(es) on {device}")
    metrics_file = open(run_dir / "metrics.jsonl", "a" if resume_from else "w") if is_main else None

    def log(step, values):
        if not is_main:
            return
        metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        metrics_file.flush()
        for k, v in values.items():
            writer.add_scalar(k, v, step)

    def evaluate_and_save(step, final=False):
        nonlocal best_score
        state = trainer_state(step)  # collective under torchrun: every rank calls it
        whole = gathered_policy(model, policy, is_main) if args.fsdp else policy  # collective too
        if not is_main:
            return
        scores = {}
        for domain in args.eval_domains:
            video = run_dir / "videos" / f"step{step}_{domain}.mp4" if args.save_video else None
            scores[f"eval/success_{domain}"] = evaluate_success(
                whole, args.task, domain, args.eval_episodes, image_size, args.eval_num_envs,
                args.eval_max_steps, video)
        log(step, scores)
        print(f"step {step}: " + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in scores.items()))
        ckpt_dir = ckpt_root / str(step)
        save_checkpoint(whole, ckpt_dir, {**extra, "step": step, **scores}, state)
        score = scores.get("eval/success_proxy_real", scores.get("eval/success_sim", 0.0))
        if score > best_score:
            best_score = score
            save_checkpoint(whole, ckpt_root / "best", {**extra, "step": step, **scores}, None)
        for old in ckpt_root.glob("*"):  # keep the last step checkpoint (and best/, final/)
            if old.name.isdigit() and old != ckpt_dir:
                shutil.rmtree(old)
        if final:
            save_checkpoint(whole, ckpt_root / "final", {**extra, "step": step, **scores}, None)

    # ---- training loop --------------------------------------------------------------------------
    step = start_step
    progress = tqdm(total=args.total_steps, initial=start_step, disable=not is_main, desc="Stage I")
    t_window, n_window, sim_window = time.time(), 0, []
    try:
        while step < args.total_steps:
            batch, from_sim = mixer.next_batch()
            if args.augment:
                batch["image"] = augment_images(batch["image"], augment_rng)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(batch)  # Eq. 2 on this rank's share; DDP averages the gradients
            if not torch.isfinite(loss):
                fail(f"non-finite SFT loss at step {step}; last good checkpoint: "
                     f"{latest_step_checkpoint(ckpt_root)}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            if args.fsdp:
                grad_norm = grad_norm.full_tensor()  # a replicated DTensor under FSDP
            optimizer.step()
            step += 1
            n_window += args.batch_size
            sim_window.append(from_sim.mean())
            progress.update(1)

            if step % args.log_every == 0 or step == 1 or step == args.total_steps:
                elapsed = time.time() - t_window
                values = {"train/loss": loss.item(), "train/lr": optimizer.param_groups[0]["lr"],
                          "train/grad_norm": grad_norm.item(),
                          "train/sim_fraction": float(np.mean(sim_window)),  # realised alpha
                          "perf/samples_per_s": n_window / max(elapsed, 1e-9)}
                if device.type == "cuda":
                    values["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                log(step, values)
                progress.set_postfix(loss=f"{values['train/loss']:.4f}",
                                     sim=f"{values['train/sim_fraction']:.2f}",
                                     sps=f"{values['perf/samples_per_s']:.0f}")
                t_window, n_window, sim_window = time.time(), 0, []
            if args.eval_every and step % args.eval_every == 0 and step < args.total_steps:
                evaluate_and_save(step)
    except KeyboardInterrupt:
        if is_main:
            print(f"\ninterrupted at step {step}: saving a checkpoint; continue with --resume")
        state = trainer_state(step)
        whole = gathered_policy(model, policy, is_main) if args.fsdp else policy
        if is_main:
            save_checkpoint(whole, ckpt_root / str(step), {**extra, "step": step}, state)
        sys.exit(130)
    progress.close()
    evaluate_and_save(step, final=True)
    if is_main:
        print(f"done: {ckpt_root / 'final'}")
        writer.close()
        metrics_file.close()
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(tyro.cli(Args))
