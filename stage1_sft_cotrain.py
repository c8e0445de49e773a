"""Stage I of RL-Co: supervised fine-tuning co-training on real and simulated demonstrations.

    python stage1_sft_cotrain.py --task open_drawer --policy pi05 --alpha 0.95

Every training sample is drawn from the sim dataset with probability alpha and from the real
dataset with probability 1 - alpha, independently per sample (Eq. 4 of the paper, implemented
by sampling as in its reference [42], not by concatenating the datasets). alpha = 0 is the
real-only baseline and alpha = 1 sim-only: the same script makes every SFT baseline.

Runs unchanged under `torchrun --nproc_per_node N`: every process takes its slice of one seeded
global batch and the gradients are averaged, so N processes take the steps one process would.
--fsdp shards the model instead of replicating it (PyTorch FSDP2, one unit per transformer layer).

Outputs, under runs/<run_name>/: args.json, metrics.jsonl, TensorBoard events, videos/,
checkpoints/<step>/ (the last one, with trainer_state.pt for --resume), checkpoints/best/
(highest proxy_real success, else sim), checkpoints/final/. Ctrl-C or SIGTERM: the step under
way finishes, checkpoints/<step>/ is saved, exit code 130; --resume continues exactly.
--ema-decay d > 0 keeps an exponential moving average of the weights, as openpi does: evaluation
and every checkpoint's model use it, training goes on from its own weights (in trainer_state.pt).
"""
from __future__ import annotations

import ast
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm

import demos
import envs
import plumbing
import policies
from plumbing import fail


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
    """probability that a training sample comes from sim (Eq. 4); 0 = real only, 1 = sim only. The normalization statistics cover both datasets whatever alpha is"""
    image_key: str = demos.IMAGE_KEY
    """dataset feature holding the camera image"""
    wrist_image_key: str = demos.WRIST_IMAGE_KEY
    """dataset feature holding the wrist camera's image (read for a policy with wrist_camera; collect_demos.py --wrist-camera)"""
    state_key: str = demos.STATE_KEY
    """dataset feature holding the robot state"""
    action_key: str = demos.ACTION_KEY
    """dataset feature holding the action"""
    chunk_size: Optional[int] = None
    """action-chunk length H (default: the policy's own, 1 for openvla, 4 for tiny pi05)"""
    start_frames: int = 0
    """with --start-weight: the first N frames of every episode are drawn --start-weight times as often as the others (0: every frame alike, as in the paper)"""
    start_weight: float = 1.0
    """sampling weight of each episode's first --start-frames frames against 1 for the others"""

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
    ema_decay: float = 0.0
    """exponential moving average of the weights, ema = d * ema + (1 - d) * weights after every step (from the initial weights, in float32): evaluation and every checkpoint's model use it, training goes on from its own weights; 0 = off. openpi fine-tunes pi05 with 0.999"""
    augment: bool = True
    """random crop and colour jitter on training images"""

    eval_every: int = 1000
    """evaluate and checkpoint every N steps (0: only at the end)"""
    checkpoint_every: int = 1000
    """also write a resumable checkpoint, without evaluating, every N steps (0: only at evaluations
    and the end), so that a killed run loses at most N steps"""
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
    policy_overrides: dict[str, str] = field(default_factory=dict)
    """extra make_policy options for a new run, each typed like its default, e.g. --policy-overrides num_steps 4 patch_size 8"""
    gradient_checkpointing: bool = False
    """recompute each transformer layer's activations in backward instead of storing them: less memory, about a third more compute"""
    fsdp: bool = False
    """under torchrun: shard parameters, gradients and AdamW state over the processes (FSDP2, one unit per transformer layer) instead of replicating them; for full fine-tuning that does not fit one GPU. Evaluation and checkpoints gather the whole model on process 0, on the CPU"""


def open_dataset(path: str, what: str, args: Args, chunk_size: int, required: bool, wrist: bool):
    """The dataset at `path`, or None (with a note) when it is missing and not required. wrist: also
    read the wrist camera (for a policy with two views)."""
    if not Path(path).exists():
        if not required:
            print(f"note: no {what} dataset at {path}; normalization statistics from the other one only")
            return None
        fail(f"{what} dataset not found: {path}\n"
             f"  make one with: python collect_demos.py --task {args.task} "
             f"--domain {'sim' if what == 'sim' else 'proxy_real'} --out {path}")
    try:
        ds = demos.LeRobotDataset(path, chunk_size=chunk_size, image_key=args.image_key,
                                  wrist_image_key=args.wrist_image_key if wrist else None,
                                  state_key=args.state_key, action_key=args.action_key)
    except (FileNotFoundError, KeyError, ValueError) as e:
        fail(f"cannot read {what} dataset {path}: {e}"
             + ("\n  the policy reads a wrist camera: collect the demos with collect_demos.py --wrist-camera"
                if wrist and args.wrist_image_key in str(e) else ""))
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


def parse_overrides(kind: str, size: str, raw: dict[str, str]) -> dict:
    """--policy-overrides values, each converted to the type of the policy's default for its key
    (bool: true/false/1/0; tuple/list: e.g. 512,128; a None default: a Python literal, else text)."""
    defaults = policies._model_defaults(kind, size)
    out = {}
    for key, text in raw.items():
        if key not in defaults:
            fail(f"--policy-overrides: {kind} has no option {key!r}; known: {', '.join(sorted(defaults))}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                out[key] = {"true": True, "1": True, "false": False, "0": False}[text.lower()]
            elif isinstance(default, (int, float, str)):
                out[key] = type(default)(text)
            elif isinstance(default, (tuple, list)):
                value = ast.literal_eval(text)
                out[key] = type(default)(value if isinstance(value, (tuple, list)) else [value])
            else:
                try:
                    out[key] = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    out[key] = text
        except (KeyError, ValueError, SyntaxError, TypeError):
            fail(f"--policy-overrides {key} {text!r}: expected a {type(default).__name__} like its default {default!r}")
    return out


def lr_at(step: int, args: Args) -> float:
    """Linear warm-up to --lr, then cosine decay to min_lr_ratio * --lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def success_rate(policy, args: Args, domain: str, image_size: int, video: Optional[Path]) -> float:
    """Success on the fixed evaluation seeds (identical initial states for every method): noise-free
    actions, policy.exec_horizon of each chunk executed, camera at the training resolution."""
    seeds = envs.eval_seeds(args.eval_episodes)
    env = envs.make_env(args.task, domain=domain, num_envs=min(args.eval_num_envs, len(seeds)),
                        image_size=image_size, max_episode_steps=args.eval_max_steps,
                        wrist_camera="wrist_image" in policy.view_keys)
    policy.eval()
    try:
        records, videos = envs.evaluate_success(env, policies.eval_act_fn(policy, deterministic=True), seeds,
                                                policy.exec_horizon, video_seeds=1 if video else 0)
    finally:
        env.close()
        policy.train()
    if videos:  # one frame per decision
        plumbing.save_video(next(iter(videos.values())), video, fps=envs.CONTROL_FREQ / policy.exec_horizon)
    return float(np.mean([r["success"] for r in records]))


def gathered_policy(policy, is_main: bool):
    """(--fsdp) The whole policy, gathered from the shards onto process 0's CPU, for evaluation and
    saving; None on the other processes. Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    whole = policies.empty_policy(policy.config, policy.tokenizer)
    whole.configure_training()
    whole.load_state_dict(state, assign=True)
    return whole


@contextlib.contextmanager
def swapped_in(params: list, values: Optional[list]):
    """Inside the block the parameters hold `values` (the EMA), after it their own values again, bit
    for bit (an extra copy of them meanwhile). values None: nothing changes."""
    if values is None:
        yield
        return
    with torch.no_grad():
        own = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, own):
                p.copy_(v)


def whole_tensor(t: torch.Tensor, is_main: bool) -> Optional[torch.Tensor]:
    """A CPU copy of t on process 0 (None on the others) for the trainer state; (--fsdp) gathered
    from its shards, one tensor at a time. Collective under --fsdp: every process calls it."""
    from torch.distributed.tensor import DTensor
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().to("cpu", copy=True) if is_main else None


def shard_like(t: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The inverse of whole_tensor: whole on t's device, (--fsdp) this process's shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(t, DTensor):
        return distribute_tensor(whole.to(t.device), t.device_mesh, t.placements)
    return whole.to(t.device)


def main(args: Args):
    d = plumbing.setup_distributed(args.device)  # torchrun's variables, if any
    rank, world_size, device, is_main = d.rank, d.world_size, d.device, d.is_main
    args.device = device.type

    # ---- arguments --------------------------------------------------------------------------
    if args.task not in envs.TASKS:
        fail(f"unknown task {args.task!r}; choose one of {', '.join(envs.TASKS)}")
    if not 0.0 <= args.alpha <= 1.0:
        fail(f"--alpha must lie in [0, 1], got {args.alpha}")
    if args.batch_size % world_size:
        fail(f"--batch-size {args.batch_size} is not divisible by {world_size} processes")
    if not 0.0 <= args.ema_decay < 1.0:
        fail(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if args.fsdp and world_size < 2:
        fail("--fsdp shards the model over torchrun processes: run under torchrun --nproc_per_node N, N >= 2")
    sim_given, real_given = args.sim_data is not None, args.real_data is not None
    args.sim_data = args.sim_data or f"data/{args.task}/sim"
    args.real_data = args.real_data or f"data/{args.task}/proxy_real"
    args.run_name = args.run_name or f"stage1_{args.task}_{args.policy}_alpha{args.alpha:g}_s{args.seed}"
    run_dir, resume_from = plumbing.open_run(args.runs_dir, args.run_name, args.resume)
    ckpt_root = run_dir / "checkpoints"

    # ---- seeding ----------------------------------------------------------------------------
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same init on every process (FSDP shards it, unbroadcast)

    # ---- data ---------------------------------------------------------------------------------
    # the policy fixes the chunk length H; a resumed run takes it from its checkpoint
    policy = policies.load_policy(resume_from) if resume_from is not None else None
    if policy is not None and policy.kind != args.policy:
        fail(f"{resume_from} holds a {policy.kind} policy, but --policy is {args.policy}")
    chunk_size = args.chunk_size = (policy.chunk_size if policy is not None else
                                    args.chunk_size or policies.default_chunk_size(args.policy))
    overrides = parse_overrides(args.policy, args.size, args.policy_overrides)
    wrist = bool((policy.config["model"] if policy is not None else overrides).get("wrist_camera"))
    # both datasets whenever they exist, sampled or not: the statistics (and Stage II's clamping of
    # the real SFT targets to them) must cover the real actions' range even at alpha = 1
    sim_ds = open_dataset(args.sim_data, "sim", args, chunk_size, required=args.alpha > 0 or sim_given, wrist=wrist)
    real_ds = open_dataset(args.real_data, "real", args, chunk_size, required=args.alpha < 1 or real_given,
                           wrist=wrist)
    given = [(ds, w) for ds, w in ((sim_ds, args.alpha), (real_ds, 1 - args.alpha)) if ds is not None]
    first = given[0][0]
    for ds, _ in given[1:]:
        if (ds.action_dim, ds.state_dim) != (first.action_dim, first.state_dim):
            fail(f"sim and real datasets disagree: action/state dims {first.action_dim}/{first.state_dim} "
                 f"vs {ds.action_dim}/{ds.state_dim}")
    norm_stats = {key: merge_stats([ds.stats[k] for ds, _ in given], [w for _, w in given])
                  for key, k in (("observation.state", args.state_key), ("action", args.action_key))}
    instructions = sorted({t for ds, _ in given for t in ds.tasks})
    sampled = sim_ds if args.alpha > 0 else real_ds
    image_size = int(sampled.info["features"][args.image_key]["shape"][0])

    # ---- policy -------------------------------------------------------------------------------
    if policy is None:
        try:
            policy = policies.make_policy(args.policy, args.size, args.pretrained, chunk_size=chunk_size,
                                          action_dim=first.action_dim, state_dim=first.state_dim,
                                          instructions=instructions, norm_stats=norm_stats,
                                          **overrides)
        except ValueError as e:  # e.g. an override the architecture cannot take
            fail(f"cannot build the {args.policy} policy: {e}")
    torch.manual_seed(args.seed + rank)  # each process its own stream for the loss's noise (pi05)
    # evaluation (here and eval_real.py) renders at the resolution the policy was trained on;
    # exec_horizon stays unset: Stage I executes whole chunks
    policy.config["camera_image_size"] = image_size
    for ds, _ in given:
        try:
            demos.check_dims(ds, policy)
        except ValueError as e:
            fail(str(e))
    if args.gradient_checkpointing:
        policy.set_gradient_checkpointing(True)
    policy.train()
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        # one unit per layer, the rest (embeddings, projector, heads) in the root unit; fully_shard
        # moves each process's shards to its device, so the whole model never sits on one GPU
        for layer in policy.transformer_layers():
            fully_shard(layer)
        fully_shard(policy)
        register_fsdp_forward_method(policy, "sft_loss")  # the root unit's forward
    else:
        policy.to(device)
        plumbing.broadcast_parameters(policy, world_size)  # every process starts from process 0's weights
    trainable_names = [n for n, p in policy.named_parameters() if p.requires_grad]
    trainable = [p for p in policy.parameters() if p.requires_grad]
    # the EMA starts from the initial weights (sharded like them under --fsdp)
    ema = [p.detach().float().clone() for p in trainable] if args.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=args.adam_betas,
                                  weight_decay=args.weight_decay)
    # Eq. 4: each sample from sim with probability alpha, real with 1 - alpha (a dataset given for
    # the statistics only is never drawn); the same global batch on every process, each its slice
    try:
        mixer = demos.AlphaMixer(sim_ds, real_ds, args.alpha, args.batch_size, args.seed,
                                 rank=rank, world_size=world_size,
                                 start_frames=args.start_frames, start_weight=args.start_weight)
    except ValueError as e:
        fail(str(e))
    augment_rng = torch.Generator().manual_seed(args.seed + 1000 * rank)
    rngs = {"augment": augment_rng}
    start_step, best_score = 0, -1.0

    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        if args.fsdp:  # saved whole (see trainer_state); each process keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            # strict=False: heads that get no SFT gradient (value, noise) never had AdamW state
            set_optimizer_state_dict(policy, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            optimizer.load_state_dict(state["optimizer"])
        mixer.load_state_dict(state["mixer"])
        if "ema" in state:  # that run saved the EMA as the model: its training weights are here
            with torch.no_grad():
                for name, p in zip(trainable_names, trainable):
                    p.copy_(shard_like(p, state["weights"][name]))
                for name, e in zip(trainable_names, ema or []):  # no EMA (now --ema-decay 0): dropped
                    e.copy_(shard_like(e, state["ema"][name]))
        plumbing.restore_rng(state["rng"], rngs, device, rank)
        start_step, best_score = state["step"], state["best_score"]
        if is_main:
            print(f"resuming {run_dir} from step {start_step}")

    def trainer_state(step):  # collective under torchrun
        if args.fsdp:  # the whole AdamW state, gathered onto process 0
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            optim_state = get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        else:
            optim_state = optimizer.state_dict()
        out = {"optimizer": optim_state, "mixer": mixer.state_dict(), "step": step, "best_score": best_score,
               "rng": plumbing.capture_rng(rngs, device, world_size)}  # every process's
        if ema is not None:  # the checkpoint's model is the EMA: both, whole and exact, for --resume
            out["weights"] = {n: whole_tensor(p, is_main) for n, p in zip(trainable_names, trainable)}
            out["ema"] = {n: whole_tensor(e, is_main) for n, e in zip(trainable_names, ema)}
        return out

    protocol = policy.protocol(True)
    extra = {"stage": "stage1", "task": args.task, "alpha": args.alpha, "protocol": protocol,
             "ema_decay": args.ema_decay, "args": asdict(args)}  # ema_decay > 0: the weights are the EMA
    log = plumbing.MetricsLog(run_dir, resume_at=("step", start_step) if resume_from else None, enabled=is_main)
    if is_main:
        plumbing.write_args(run_dir, asdict(args))
        print("args:", json.dumps(asdict(args), default=str))
        n_params = sum(p.numel() for p in trainable)
        used = lambda ds, w: "none" if ds is None else f"{ds.num_episodes} episodes" + ("" if w else " (statistics only)")
        print(f"Stage I: {args.policy}/{args.size} ({n_params / 1e6:.2f}M trainable), task {args.task}, "
              f"alpha {args.alpha} | sim {used(sim_ds, args.alpha)}, real {used(real_ds, 1 - args.alpha)} | "
              f"{world_size} process(es) on {device}\nevaluation: {protocol}, {image_size} px camera"
              + ("" if ema is None else f"; evaluated and saved: the weights' EMA (decay {args.ema_decay})"))

    def save(step, evaluate=True, final=False):
        """checkpoints/<step>/ (resumable) after an evaluation (evaluate=False: without), and
        best/ and final/. Collective under torchrun: every process calls it."""
        nonlocal best_score
        state = trainer_state(step)
        with swapped_in(trainable, ema):  # the EMA, if any, is what is evaluated and saved as the model
            whole = gathered_policy(policy, is_main) if args.fsdp else policy
            if not is_main:
                return
            scores = {}
            for domain in args.eval_domains if evaluate else ():
                video = run_dir / "videos" / f"step{step}_{domain}.mp4" if args.save_video else None
                scores[f"eval/success_{domain}"] = success_rate(whole, args, domain, image_size, video)
            if evaluate:
                log.log({"step": step}, scores, x=step)
                print(f"step {step}: " + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in scores.items()))
            info = {**extra, "step": step, **scores}
            plumbing.save_checkpoint(whole, ckpt_root / str(step), info, state)
            plumbing.prune_checkpoints(ckpt_root, keep=ckpt_root / str(step))  # best/ and final/ stay
            score = scores.get("eval/success_proxy_real", scores.get("eval/success_sim", 0.0))
            if evaluate and score > best_score:
                best_score = score
                plumbing.save_checkpoint(whole, ckpt_root / "best", info)
            if final:
                plumbing.save_checkpoint(whole, ckpt_root / "final", info)

    # ---- training loop --------------------------------------------------------------------------
    step = start_step
    progress = tqdm(total=args.total_steps, initial=start_step, disable=not is_main, desc="Stage I")
    t_window, n_window, sim_window = time.time(), 0, []
    with plumbing.StopFlag("the step under way", verbose=is_main) as stop:
        while step < args.total_steps:
            batch, from_sim = mixer.next_batch()
            if args.augment:
                for key in policy.view_keys:  # each view its own crop and jitter
                    batch[key] = demos.augment_images(batch[key], augment_rng)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = policy.sft_loss(batch)  # Eq. 2 on this process's slice of the global batch
            if not torch.isfinite(loss):
                fail(f"non-finite SFT loss at step {step}; last good checkpoint: "
                     f"{plumbing.latest_checkpoint(ckpt_root)}", code=3)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not args.fsdp:  # data parallel by hand (FSDP reduces its own gradients)
                plumbing.average_gradients(trainable, world_size)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            if args.fsdp:
                grad_norm = grad_norm.full_tensor()  # a replicated DTensor under FSDP
            optimizer.step()
            if ema is not None:  # ema = d * ema + (1 - d) * weights, in float32
                with torch.no_grad():
                    torch._foreach_mul_(ema, args.ema_decay)
                    torch._foreach_add_(ema, trainable, alpha=1 - args.ema_decay)
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
                log.log({"step": step}, values, x=step)
                progress.set_postfix(loss=f"{values['train/loss']:.4f}",
                                     sim=f"{values['train/sim_fraction']:.2f}",
                                     sps=f"{values['perf/samples_per_s']:.0f}")
                t_window, n_window, sim_window = time.time(), 0, []
            evaluated = bool(args.eval_every) and step % args.eval_every == 0 and step < args.total_steps
            checkpointed = evaluated or (bool(args.checkpoint_every) and step % args.checkpoint_every == 0
                                         and step < args.total_steps)
            if checkpointed:
                save(step, evaluate=evaluated)
            # Ctrl-C / SIGTERM on any process: all stop after this same step
            if plumbing.all_sum([float(stop.requested)], world_size)[0]:
                if not checkpointed:  # this step's checkpoint is not written yet
                    save(step, evaluate=False)
                progress.close()
                if is_main:
                    print(f"stopped after step {step}: {ckpt_root / str(step)}; continue with --resume")
                log.close()
                sys.exit(130)
    progress.close()
    save(step, final=True)
    log.close()
    if is_main:
        print(f"done: {ckpt_root / 'final'}")
    if world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(tyro.cli(Args))
