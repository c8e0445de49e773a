"""Stage II of RL-Co: RL in simulation, regularized by SFT on the real demos.

    python stage2_rl_cotrain.py --task open_drawer --beta 0.1

    L_total = L_RL + beta * L_SFT(real)                                            (Eq. 5)

L_RL is PPO: on the action tokens for an `openvla` policy (as RL4VLA), on the whole stochastic
denoising chain for a `pi05` policy (ReinFlow). The policy kind comes from the Stage I
checkpoint (--init, default: the newest Stage I checkpoint of --task under runs/). Every PPO
minibatch also draws --sft-batch-size samples from the real dataset (--real-data, default
data/<task>/proxy_real) and adds beta times their SFT loss. beta = 0 is the paper's "no real
supervision in Stage II" ablation; --init with a real-only (alpha = 0) Stage I checkpoint is the
Fig. 5 ablation. RL only ever steps the `sim` domain; `proxy_real` is evaluated (monitoring
only) and enters training solely through its fixed demo dataset.

Action chunks. At each decision point the policy returns a chunk of H actions; the first
--exec-horizon of them are executed, with the camera rendered only for the observation of the
next decision. The decision's reward is the discounted sum of the per-step rewards it executed,
R = sum_j gamma^j r_{t+j}, and the next decision is discounted by gamma^n for the n steps
executed, so that the return is exactly Eq. 3's per-step discounted return (an SMDP over
decisions). GAE runs over decisions with that gamma^n and lambda per decision. The per-step
reward is by default the change of the env's dense reward since the previous step (--reward
dense_delta, RL4VLA's potential difference): the envs end an episode at success, so paying the
dense reward itself would make lingering just short of success worth more than succeeding.

Episode ends inside a chunk. Training envs reset a finished sub-env at once (auto_reset). When
any sub-env's episode ends at an inner step, the decision ends there for every sub-env: the
other sub-envs simply re-plan early (a shorter decision, n < exec_horizon), and no sub-env ever
executes a stale chunk in a freshly reset episode. Time-limit truncations bootstrap from
V(final obs); terminations (success) do not.

Each iteration starts from a reset of every sub-env with seeds fixed by (iteration, process):
an iteration depends only on the weights, optimizer and RNG state, so --resume continues a run
exactly. The default rollout length (--num-steps) covers one episode per sub-env.

Runs unchanged under `torchrun --nproc_per_node N` (DistributedDataParallel, gloo on CPU): each
process steps its own envs with its own seeds; gradients are averaged; process 0 logs,
evaluates and saves.

Outputs, under runs/<run_name>/: args.json, metrics.jsonl, TensorBoard events, videos/,
checkpoints/<iteration>/ (the last one kept, with trainer_state.pt for --resume) and
checkpoints/final/. Ctrl-C (or SIGTERM, as a cluster's preemption sends) lets the iteration under
way finish, saves it and exits with code 130; --resume then continues as if never stopped.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import demos
import envs
import policies


@dataclass
class Args:
    """Stage II of RL-Co (Eq. 5). Options whose default is None and say [preset] take their value
    from PRESETS for the Stage I checkpoint's policy kind and size (tiny or full)."""

    task: str = "open_drawer"
    """task to train in (sim) and evaluate (sim and proxy_real): pick_and_place, push_cube, open_drawer, close_drawer"""
    init: Optional[str] = None
    """Stage I checkpoint to start from (default: the newest runs/*/checkpoints/final of a Stage I run on --task)"""
    real_data: Optional[str] = None
    """LeRobot v3.0 folder of real demos for the SFT regularizer (default: data/<task>/proxy_real)"""
    beta: float = 0.1
    """weight of the real-data SFT loss (Eq. 5); 0 = no real supervision in Stage II"""

    total_env_steps: Optional[int] = None
    """executed environment steps to train for, all processes together (the loop stops at the first iteration that reaches it) [preset]"""
    num_envs: Optional[int] = None
    """parallel sim envs per process [preset]"""
    sim_backend: Literal["cpu", "gpu"] = "cpu"
    """cpu: PhysX on the CPU, sub-envs in worker processes; gpu: ManiSkill's GPU-parallel simulation"""
    max_episode_steps: Optional[int] = None
    """episode length in env steps (default: the task's own)"""
    reward: Literal["dense_delta", "dense", "sparse"] = "dense_delta"
    """dense_delta: the step-to-step change of the env's dense reward (a potential difference, as RL4VLA pays it: the return telescopes to the last potential, so reaching success, which ends the episode, beats lingering near it); dense: the env's dense reward itself (lingering at 0.9 per step outpays the 1 of success); sparse: 1 at success"""
    exec_horizon: Optional[int] = None
    """actions of each chunk executed before the next decision (default: the whole chunk, H = 1 for openvla and 4 for pi05 as Stage I makes them; RLinf executes 4 of 8)"""
    num_steps: Optional[int] = None
    """decisions per env per rollout (default: one episode, ceil(max_episode_steps / exec_horizon))"""
    gamma: float = 0.99
    """discount per env step (a decision of n steps is discounted by gamma^n)"""
    gae_lambda: float = 0.95
    """GAE lambda, per decision"""
    norm_adv: bool = True
    """normalize advantages over the rollout"""
    update_epochs: Optional[int] = None
    """passes over the rollout per iteration [preset]"""
    num_minibatches: Optional[int] = None
    """minibatches per pass [preset]"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    clip_vloss: Optional[bool] = None
    """clip the value update around the rollout's value (off in the tiny presets: their dense returns are far larger than the clip range) [preset]"""
    vf_clip_coef: float = 0.2
    """value clip range"""
    huber_delta: Optional[float] = None
    """Huber loss on the value error with this delta (0 = squared error) [preset]"""
    vf_coef: float = 0.5
    """value loss weight"""
    ent_coef: Optional[float] = None
    """entropy bonus weight [preset]"""
    learning_rate: Optional[float] = None
    """actor learning rate (everything trainable except value_head.*) [preset]"""
    value_learning_rate: Optional[float] = None
    """value head learning rate [preset]"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (both optimizers)"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    max_grad_norm: Optional[float] = None
    """gradient clipping (global L2 norm, actor and value head each) [preset]"""
    target_kl: Optional[float] = None
    """stop the iteration's update once the approximate KL exceeds this (0: never) [preset]"""
    critic_warmup_iters: Optional[int] = None
    """first iterations in which only the value head learns [preset]"""
    sft_batch_size: Optional[int] = None
    """real samples drawn for every minibatch (default: the minibatch size)"""

    eval_every: Optional[int] = None
    """evaluate and checkpoint every N iterations (0: only at the start and the end) [preset]"""
    eval_episodes: Optional[int] = None
    """episodes per domain at each evaluation, on the fixed evaluation seeds [preset]"""
    eval_num_envs: int = 4
    """parallel envs per evaluation domain"""
    eval_domains: tuple[str, ...] = ("sim", "proxy_real")
    """domains evaluated (monitoring only: evaluation never feeds gradients)"""
    eval_deterministic: bool = True
    """evaluate the policy's deterministic action (argmax tokens / noise-free denoising)"""
    save_video: bool = True
    """record the first evaluation episodes of each domain under videos/"""

    render_all_steps: bool = False
    """render the camera at every env step, not only at decision points (to measure the saving)"""
    bench_env_steps: int = 0
    """before training, time N raw env steps of the training envs with random actions, rendering every step and only at decision points"""
    gradient_checkpointing: bool = False
    """recompute each transformer layer's activations in the update's backward instead of storing them: less memory, about a third more update compute (also on when the Stage I checkpoint was trained with it)"""

    seed: int = 1
    """seed for sampling, env seeds and real-batch sampling"""
    run_name: Optional[str] = None
    """run folder name under --runs-dir (default: stage2_<task>_beta<beta>_s<seed>)"""
    runs_dir: str = "runs"
    """where runs are written, and where --init is looked for"""
    resume: bool = False
    """continue the run in runs/<run_name> from its last checkpoint"""
    device: str = "auto"
    """auto, cpu or cuda"""


# Defaults per (policy kind, size) for the fields of Args left at None. The full-size values
# follow the reference systems (shared/reference/ANCHORS.md): RLinf's ReinFlow co-training for
# pi05 (lr 4e-6, value lr 2e-4, grad clip 1, 64 envs, 2 epochs, Huber delta 10, entropy 0.005)
# and RL4VLA's PPO for openvla (LoRA lr 1e-4, value lr 3e-3, grad clip 10, 1 epoch, Huber
# delta 10, value clip 0.2). Both use gamma 0.99, lambda 0.95, clip 0.2 (the Args defaults).
# The tiny presets start with a critic warm-up (a Stage I policy has no value head worth the
# name) and bound each update by its KL, so that RL refines the Stage I policy instead of
# scrambling it with the advantages of an untrained critic. Their actor learning rate is 1e-5:
# Adam's first step moves every weight by about the learning rate whatever the gradient, and at
# 1e-4 that one step took tiny pi05 on open_drawer to an approximate KL of 0.65, after which its
# rollouts succeeded in 0 of 116 episodes; at 1e-5 the per-update KL stayed at 0.003-0.02 and 4
# of 73 episodes succeeded (in the two critic warm-up iterations before it: 1 of 5).
_FULL = dict(total_env_steps=3_000_000, num_envs=64, num_minibatches=4, clip_vloss=True, huber_delta=10.0,
             target_kl=0.0, critic_warmup_iters=0, eval_every=20, eval_episodes=50)
_TINY = dict(total_env_steps=6_000, num_envs=4, update_epochs=2, num_minibatches=4, clip_vloss=False,
             huber_delta=0.0, target_kl=0.05, critic_warmup_iters=2, learning_rate=1e-5,
             value_learning_rate=1e-3, max_grad_norm=1.0, eval_every=10, eval_episodes=8)
PRESETS = {
    ("pi05", "full"): dict(_FULL, update_epochs=2, ent_coef=0.005, learning_rate=4e-6, value_learning_rate=2e-4,
                           max_grad_norm=1.0),
    ("openvla", "full"): dict(_FULL, update_epochs=1, ent_coef=0.0, learning_rate=1e-4, value_learning_rate=3e-3,
                              max_grad_norm=10.0),
    ("pi05", "tiny"): dict(_TINY, ent_coef=0.005),
    ("openvla", "tiny"): dict(_TINY, ent_coef=0.0),
}


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------
# The maths, as small pure functions (tests import them)
# ---------------------------------------------------------------------------------------------
def compute_gae(rewards, values, last_value, dones, bootstrap_values, discounts, gae_lambda):
    """Generalized advantage estimation over T decisions of B envs.

    rewards, values, dones, bootstrap_values, discounts: [T, B]; last_value: [B].
    rewards[t]: the decision's discounted reward sum; values[t] = V(obs_t); dones[t]: an episode
    ended inside decision t; bootstrap_values[t]: V(final obs) where it ended by the time limit
    (truncation), 0 where it ended by termination or did not end; discounts[t] = gamma^n for the
    n env steps decision t executed; last_value = V(obs_T) after the rollout.
    Returns (advantages, returns), both [T, B].
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = last_value, torch.zeros_like(last_value)
    for t in reversed(range(T)):
        not_done = 1.0 - dones[t].float()
        # value of what follows decision t: the next obs of the same episode, V(final obs) after a
        # truncation, nothing after a termination
        following = not_done * next_value + bootstrap_values[t]
        delta = rewards[t] + discounts[t] * following - values[t]
        advantages[t] = delta + discounts[t] * gae_lambda * not_done * next_advantage
        next_value, next_advantage = values[t], advantages[t]
    return advantages, advantages + values


def ppo_losses(new_logprob, old_logprob, advantages, new_value, old_value, returns, entropy,
               clip_coef=0.2, clip_vloss=True, vf_clip_coef=0.2, huber_delta=0.0):
    """PPO's terms on one minibatch (all inputs [N]). Returns a dict of scalar tensors: pg_loss
    (clipped surrogate), v_loss, entropy, approx_kl, clipfrac, and ratio (the per-sample
    ratios, detached)."""
    logratio = new_logprob - old_logprob
    ratio = logratio.exp()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()  # the low-variance k3 estimator
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    pg_loss = torch.max(-advantages * ratio,
                        -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()

    def err(x):  # 0.5 x^2, or Huber: equal near 0, linear beyond delta
        return F.huber_loss(x, torch.zeros_like(x), reduction="none", delta=huber_delta) \
            if huber_delta > 0 else 0.5 * x ** 2
    v_loss = err(new_value - returns)
    if clip_vloss:
        v_clipped = old_value + torch.clamp(new_value - old_value, -vf_clip_coef, vf_clip_coef)
        v_loss = torch.max(v_loss, err(v_clipped - returns))
    return {"pg_loss": pg_loss, "v_loss": v_loss.mean(), "entropy": entropy.mean(),
            "approx_kl": approx_kl, "clipfrac": clipfrac, "ratio": ratio.detach()}


class Stage2Forward(torch.nn.Module):
    """Both passes of one minibatch in one forward, so that DistributedDataParallel averages the
    gradient of the whole Eq. 5 loss: the policy re-evaluated on rollout samples, and its SFT
    loss on real samples (without a graph when beta = 0: the real batch then gives no gradient)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, obs, act_out, real_batch, sft_grad: bool):
        new = self.policy.evaluate(obs, act_out)
        with torch.set_grad_enabled(sft_grad and torch.is_grad_enabled()):
            sft_loss = self.policy.sft_loss(real_batch)
        return new, sft_loss


def minibatch_loss(model, mb: dict, real_batch: dict, args: Args) -> dict:
    """Eq. 5 on one minibatch. mb holds obs, act_out (what policy.act returned), logprob, values,
    advantages, returns of rollout samples; real_batch is a demos.collate batch of real demos."""
    new, sft_loss = model(mb["obs"], mb["act_out"], real_batch, args.beta > 0)
    terms = ppo_losses(new["logprob"], mb["logprob"], mb["advantages"], new["value"], mb["values"],
                       mb["returns"], new["entropy"], args.clip_coef, args.clip_vloss,
                       args.vf_clip_coef, args.huber_delta)
    # L_RL: PPO's clipped surrogate, value loss and entropy bonus
    terms["ppo_loss"] = terms["pg_loss"] + args.vf_coef * terms["v_loss"] - args.ent_coef * terms["entropy"]
    terms["sft_loss"] = sft_loss
    terms["loss"] = terms["ppo_loss"] + args.beta * sft_loss  # Eq. 5: L_total = L_RL + beta * L_SFT(real)
    return terms


# ---------------------------------------------------------------------------------------------
# Checkpoints, envs, evaluation
# ---------------------------------------------------------------------------------------------
def checkpoint_extra(path: Path) -> Optional[dict]:
    """The "extra" block a checkpoint's config.json carries, or None if it is no checkpoint."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("extra") or {}
    except (OSError, json.JSONDecodeError):
        return None


def newest_stage1_checkpoint(runs_dir: str, task: str) -> Optional[Path]:
    """The most recently written runs/*/checkpoints/final of a Stage I run on `task`."""
    found = []
    for config in Path(runs_dir).glob("*/checkpoints/final/config.json"):
        extra = checkpoint_extra(config.parent) or {}
        if extra.get("stage") == "stage1" and extra.get("task") == task:
            found.append(config.parent)
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime) if found else None


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


def latest_iteration_checkpoint(ckpt_root: Path) -> Optional[Path]:
    its = [p for p in ckpt_root.glob("*") if p.name.isdigit() and (p / "trainer_state.pt").exists()]
    return max(its, key=lambda p: int(p.name)) if its else None


def make_train_envs(args: Args, rank: int, image_size: int):
    """The RL envs: sim domain only; a finished sub-env is reset at once."""
    return envs.make_env(args.task, domain="sim", num_envs=args.num_envs, image_size=image_size,
                         sim_backend=args.sim_backend, seed=envs.train_seed(rank * args.num_envs),
                         reward_mode="sparse" if args.reward == "sparse" else "dense",
                         max_episode_steps=args.max_episode_steps,
                         auto_reset=True)


def make_eval_env(args: Args, domain: str, image_size: int):
    return envs.make_env(args.task, domain=domain, num_envs=args.eval_num_envs, image_size=image_size,
                         sim_backend=args.sim_backend, max_episode_steps=args.max_episode_steps)


def to_numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


@torch.no_grad()
def evaluate_success(policy, env, seeds: list[int], exec_horizon: int, deterministic: bool,
                     video_path: Optional[Path]) -> float:
    """Success rate, one episode per evaluation seed (identical initial states for every method
    and every evaluation). Each chunk's first exec_horizon actions are executed, the camera
    rendered at decision points; a finished sub-env is held with zero actions until the batch is
    done. The video tiles the first batch's sub-envs, one frame per decision."""
    B = env.num_envs
    successes, frames = [], []
    for start in range(0, len(seeds), B):
        batch = seeds[start:start + B]
        n = len(batch)
        obs, _ = env.reset(seed=batch + [batch[-1]] * (B - n))  # spare sub-envs repeat a seed
        done = np.zeros(B, bool)
        done[n:] = True
        success = np.zeros(B, bool)
        last_frame = to_numpy(obs["image"]).copy()
        while not done.all():
            if video_path is not None and start == 0:
                last_frame[~done] = to_numpy(obs["image"])[~done]
                frames.append(np.concatenate(list(last_frame[:n]), axis=1))
            chunk = to_numpy(policy.act(obs, deterministic=deterministic)["actions"])[:, :exec_horizon]
            for j in range(chunk.shape[1]):
                action = np.where(done[:, None], 0.0, chunk[:, j]).astype(np.float32)
                obs, _, terminated, truncated, info = env.step(action, render=j == chunk.shape[1] - 1)
                live = ~done
                success |= live & to_numpy(info["success"]).astype(bool)
                done |= live & (to_numpy(terminated) | to_numpy(truncated)).astype(bool)
                if done.all():
                    break
            if obs["image"] is None:
                obs["image"] = env.render_frame()
        if video_path is not None and start == 0:
            last_frame[:n] = np.where(done[:n, None, None, None], to_numpy(env.render_frame())[:n],
                                      last_frame[:n])
            frames.append(np.concatenate(list(last_frame[:n]), axis=1))
        successes.extend(success[:n].tolist())
    if video_path is not None and frames:
        import imageio.v2 as imageio
        video_path.parent.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(str(video_path), frames, fps=4, macro_block_size=1)
    return float(np.mean(successes))


def main(args: Args):
    # ---- distributed set-up (torchrun sets these variables) -----------------------------------
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

    # ---- arguments, checkpoint to start from ---------------------------------------------------
    if args.task not in envs.TASKS:
        fail(f"unknown task {args.task!r}; choose one of {', '.join(envs.TASKS)}")
    if not args.beta >= 0:
        fail(f"--beta must be >= 0 (the weight of the real SFT loss in Eq. 5), got {args.beta}")
    args.real_data = args.real_data or f"data/{args.task}/proxy_real"
    if args.run_name is None:
        args.run_name = f"stage2_{args.task}_beta{args.beta:g}_s{args.seed}"
    run_dir = Path(args.runs_dir) / args.run_name
    ckpt_root = run_dir / "checkpoints"
    resume_from = None
    if args.resume:
        resume_from = latest_iteration_checkpoint(ckpt_root)
        if resume_from is None and not (run_dir / "args.json").exists():
            fail(f"--resume: no run in {run_dir}")
        if resume_from is None:  # stopped before its first checkpoint: nothing to lose
            print(f"--resume: {run_dir} stopped before its first checkpoint; starting it from the beginning")
            args.init = args.init or json.loads((run_dir / "args.json").read_text()).get("init")
        else:
            args.init = checkpoint_extra(resume_from).get("init", args.init)
    elif (run_dir / "args.json").exists():
        fail(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-name")
    if args.init is None:
        newest = newest_stage1_checkpoint(args.runs_dir, args.task)
        if newest is None:
            fail(f"no Stage I checkpoint for task {args.task} under {args.runs_dir}/ "
                 f"(looked for */checkpoints/final with stage 'stage1'); make one with:\n"
                 f"  python stage1_sft_cotrain.py --task {args.task}\n"
                 f"or pass --init <checkpoint folder>")
        args.init = str(newest)
    if resume_from is None:
        extra = checkpoint_extra(args.init)
        if extra is None:
            fail(f"--init {args.init}: not a policy checkpoint (no readable config.json)")
        if extra.get("stage") != "stage1":
            fail(f"--init {args.init}: not a Stage I policy (its config.json says stage "
                 f"{extra.get('stage')!r}); Stage II starts from stage1_sft_cotrain.py's output")
        if extra.get("task") != args.task and is_main:
            print(f"warning: --init {args.init} was trained on task {extra.get('task')!r}, "
                  f"training on {args.task!r}", file=sys.stderr)
    if not Path(args.real_data).exists():
        fail(f"real dataset not found: {args.real_data}\n  make one with: python collect_demos.py "
             f"--task {args.task} --domain proxy_real --out {args.real_data}")

    # ---- seeding --------------------------------------------------------------------------------
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # per-process sampling of actions and of the SFT noise
    real_rng = np.random.default_rng(args.seed + 1000 * rank)  # real-batch indices

    # ---- policy and presets -----------------------------------------------------------------------
    try:
        policy = policies.load_policy(resume_from or args.init)
    except Exception as e:  # a folder that is not a policy checkpoint
        fail(f"cannot load a policy from {resume_from or args.init}: {e}")
    size = policy.config.get("size", "tiny")
    preset = PRESETS[(policy.kind, "full" if size == "full" else "tiny")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.exec_horizon = args.exec_horizon or policy.chunk_size  # default: the whole chunk
    if not 1 <= args.exec_horizon <= policy.chunk_size:
        fail(f"--exec-horizon must lie in [1, {policy.chunk_size}] (the policy's chunk), got {args.exec_horizon}")

    try:
        real_ds = demos.LeRobotDataset(args.real_data, chunk_size=policy.chunk_size)
        demos.check_dims(real_ds, policy)
    except (FileNotFoundError, KeyError, ValueError) as e:
        fail(f"cannot use real dataset {args.real_data}: {e}")
    if len(real_ds) == 0:
        fail(f"real dataset {args.real_data} holds no frames")
    image_size = int(real_ds.info["features"][demos.IMAGE_KEY]["shape"][0])

    # ---- envs (sim only for training) ------------------------------------------------------------
    train_env = make_train_envs(args, rank, image_size)
    B = train_env.num_envs
    max_steps = args.max_episode_steps or train_env.max_episode_steps
    args.num_steps = args.num_steps or math.ceil(max_steps / args.exec_horizon)
    T, H = args.num_steps, args.exec_horizon
    batch_size = T * B  # decisions per process per iteration
    args.num_minibatches = min(args.num_minibatches, batch_size)
    minibatch_size = batch_size // args.num_minibatches
    args.sft_batch_size = args.sft_batch_size or minibatch_size
    eval_envs = {d: make_eval_env(args, d, image_size) for d in args.eval_domains} \
        if is_main and args.eval_episodes > 0 else {}
    eval_seeds = envs.eval_seeds(args.eval_episodes)

    # ---- optimizers: actor and value head, separate learning rates -------------------------------
    if args.gradient_checkpointing:
        policy.set_gradient_checkpointing(True)
    policy.to(device).eval()  # no dropout: rollout and update compute the same log-probs
    model = Stage2Forward(policy)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    actor_params, critic_params = policy.actor_parameters(), policy.critic_parameters()
    if not critic_params:
        fail(f"{args.init}: the policy has no trainable value_head.* parameters")
    actor_opt = torch.optim.Adam(actor_params, lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps)
    critic_opt = torch.optim.Adam(critic_params, lr=args.value_learning_rate, betas=args.adam_betas,
                                  eps=args.adam_eps)

    start_iter, global_step = 0, 0
    last_good = Path(args.init)
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        actor_opt.load_state_dict(state["actor_opt"])
        critic_opt.load_state_dict(state["critic_opt"])
        torch.set_rng_state(state["torch_rng"][rank])
        if device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"][rank], device)
        real_rng.bit_generator.state = state["real_rng"][rank]
        start_iter, global_step = state["iteration"], state["global_step"]
        last_good = resume_from
        if is_main:
            print(f"resuming {run_dir} from iteration {start_iter}")

    def trainer_state(iteration):
        # every process's RNG state, so that a resumed torchrun run continues exactly
        mine = {"torch_rng": torch.get_rng_state(), "real_rng": real_rng.bit_generator.state,
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        every = [mine]
        if world_size > 1:
            every = [None] * world_size
            dist.all_gather_object(every, mine)
        return {"actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict(),
                **{k: [m[k] for m in every] for k in mine}, "iteration": iteration, "global_step": global_step}

    extra = {"stage": "stage2", "task": args.task, "beta": args.beta, "init": args.init, "args": asdict(args)}
    writer, metrics_file = None, None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=2))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir))
        metrics_file = open(run_dir / "metrics.jsonl", "a" if resume_from else "w")
        print(f"Stage II: {policy.kind}/{size} from {args.init}, task {args.task}, beta {args.beta} | "
              f"{world_size} process(es) x {B} sim envs on {device}, chunk {policy.chunk_size} "
              f"executing {H}, {T} decisions per rollout, {args.total_env_steps} env steps | "
              f"real data {args.real_data} ({real_ds.num_episodes} episodes)")

    def log(iteration, values):
        if is_main:
            metrics_file.write(json.dumps({"iteration": iteration, "global_step": global_step, **values}) + "\n")
            metrics_file.flush()
            for k, v in values.items():
                writer.add_scalar(k, v, global_step)

    def evaluate_and_save(iteration, final=False, evaluate=True):
        nonlocal last_good
        state = trainer_state(iteration) if iteration > 0 else None  # collective under torchrun
        ckpt_dir = ckpt_root / str(iteration)
        if iteration > 0:
            last_good = ckpt_dir
        if not is_main:
            return
        t0, scores = time.time(), {}
        policy.eval()
        for domain, env in (eval_envs.items() if evaluate else ()):
            video = run_dir / "videos" / f"iter{iteration}_{domain}.mp4" if args.save_video else None
            scores[f"eval/success_{domain}"] = evaluate_success(
                policy, env, eval_seeds, H, args.eval_deterministic, video)
        scores["perf/eval_time"] = time.time() - t0
        if evaluate:
            log(iteration, scores)
            tqdm.write(f"iteration {iteration}: " + ", ".join(
                f"{k.split('/')[1]} {v:.2f}" for k, v in scores.items() if k.startswith("eval/")))
        if iteration == 0:
            return
        save_checkpoint(policy, ckpt_dir, {**extra, "iteration": iteration, **scores}, state)
        for old in ckpt_root.glob("*"):  # keep the last iteration checkpoint (and final/)
            if old.name.isdigit() and old != ckpt_dir:
                shutil.rmtree(old)
        if final:
            save_checkpoint(policy, ckpt_root / "final", {**extra, "iteration": iteration, **scores}, None)

    def all_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(t)
        return t.tolist()

    def real_batch():
        idx = real_rng.integers(0, len(real_ds), args.sft_batch_size)
        batch = demos.collate([real_ds[int(i)] for i in idx])
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ---- raw env speed: the yardstick for the training loop's steps/s ----------------------------
    if args.bench_env_steps > 0:
        bench = {}
        for name, every in (("render_all_steps", 1), ("render_decision_points", H)):
            train_env.reset(seed=[envs.train_seed(i) for i in range(B)])
            t0 = time.time()
            for i in range(args.bench_env_steps):
                action = np.random.uniform(-1, 1, (B, 7)).astype(np.float32)
                train_env.step(action, render=(i + 1) % every == 0)
            bench[f"perf/raw_env_sps_{name}"] = all_sum([B * args.bench_env_steps / (time.time() - t0)])[0]
        log(0, bench)
        if is_main:
            print("raw env steps/s: " + ", ".join(f"{k.split('sps_')[1]} {v:.1f}" for k, v in bench.items()))

    # ---- rollout storage ------------------------------------------------------------------------------
    images = torch.zeros((T, B, image_size, image_size, 3), dtype=torch.uint8)
    states = torch.zeros((T, B, train_env.state_dim))
    instructions: list[list[str]] = [[""] * B for _ in range(T)]
    act_store: dict[str, torch.Tensor] = {}  # what policy.act returned, per key [T, B, ...]
    logprobs, values, rewards, dones, bootstrap_values, discounts = (torch.zeros((T, B)) for _ in range(6))

    # ---- Ctrl-C / SIGTERM: finish the iteration under way, save it, stop (--resume continues
    # exactly from there); a second Ctrl-C stops at once, losing only that iteration -----------------
    stop_requested = []

    def request_stop(signum, frame):
        if stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_requested.append(signum)
        if is_main:
            tqdm.write(f"\n{signal.Signals(signum).name}: finishing iteration {iteration}, then saving a "
                       f"checkpoint (Ctrl-C again to stop now)")

    if start_iter == 0:
        evaluate_and_save(0)  # the starting point: success before Stage II
    progress = tqdm(total=args.total_env_steps, initial=global_step, disable=not is_main, desc="Stage II",
                    unit="step")
    iteration = start_iter
    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    while global_step < args.total_env_steps:  # the budget counts executed env steps, all processes
        iteration += 1
        # ================= rollout in sim =================
        t_rollout = time.time()
        # seeds of this (iteration, process), with room for the auto-resets (seed + B each) in between
        first_seed = ((iteration - 1) * world_size + rank) * B * (T + 1)
        seeds = [envs.train_seed((first_seed + i) % envs.EVAL_SEED_START) for i in range(B)]
        obs, _ = train_env.reset(seed=seeds)
        ep_return, ep_len = np.zeros(B), np.zeros(B, int)
        potential = np.zeros(B)  # dense_delta: the last dense reward of each episode (0 at its start)
        ended_returns, ended_success, ended_len = [], [], []
        steps_this_iter = 0
        for t in range(T):
            with torch.no_grad():
                out = policy.act(obs)
            images[t] = torch.as_tensor(to_numpy(obs["image"]))
            states[t] = torch.as_tensor(to_numpy(obs["state"]))
            instructions[t] = list(obs["instruction"])
            for k, v in out.items():
                if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == B:
                    if k not in act_store:
                        act_store[k] = torch.zeros((T, *v.shape), dtype=v.dtype)
                    act_store[k][t] = v.detach().cpu()
            logprobs[t], values[t] = out["logprob"].cpu(), out["value"].cpu()

            chunk = to_numpy(out["actions"])[:, :H].astype(np.float32)
            reward, ended = np.zeros(B), np.zeros(B, bool)
            n_exec = H
            for j in range(H):
                render = j == H - 1 or args.render_all_steps
                obs, r, terminated, truncated, info = train_env.step(chunk[:, j], render=render)
                r = to_numpy(r).astype(np.float64)
                ep_return += r  # logged: what the env pays
                if args.reward == "dense_delta":
                    r, potential = r - potential, r
                reward += args.gamma ** j * r  # the decision's reward: sum_j gamma^j r_{t+j}
                ep_len += 1
                steps_this_iter += B
                terminated, truncated = to_numpy(terminated).astype(bool), to_numpy(truncated).astype(bool)
                ended = terminated | truncated
                if ended.any():
                    success = to_numpy(info["final_success"]).astype(bool)
                    for i in np.flatnonzero(ended):
                        ended_returns.append(ep_return[i])
                        ended_success.append(success[i])
                        ended_len.append(ep_len[i])
                    ep_return[ended], ep_len[ended], potential[ended] = 0.0, 0, 0.0
                    # time limit: bootstrap from V(final obs); termination: no bootstrap
                    cut = truncated & ~terminated
                    if cut.any():
                        with torch.no_grad():
                            v_final = policy.act(info["final_obs"], deterministic=True)["value"].cpu()
                        bootstrap_values[t] = torch.where(torch.as_tensor(cut), v_final, 0.0)
                    else:
                        bootstrap_values[t] = 0.0
                    n_exec = j + 1
                    break  # the decision ends here for every sub-env (see the module docstring)
            else:
                bootstrap_values[t] = 0.0
            if obs["image"] is None:  # ended before the chunk's last step: render for the next decision
                obs = {**obs, "image": train_env.render_frame()}
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            dones[t] = torch.as_tensor(ended, dtype=torch.float32)
            discounts[t] = args.gamma ** n_exec
        with torch.no_grad():
            last_value = policy.act(obs, deterministic=True)["value"].cpu()
        iter_steps = int(all_sum([steps_this_iter])[0])  # executed env steps, all processes
        global_step += iter_steps
        rollout_time = time.time() - t_rollout

        # ================= advantages =================
        advantages, returns = compute_gae(rewards, values, last_value, dones, bootstrap_values,
                                          discounts, args.gae_lambda)
        b_adv = advantages.reshape(-1)
        if args.norm_adv:
            b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)
        b_returns, b_values, b_logprobs = returns.reshape(-1), values.reshape(-1), logprobs.reshape(-1)
        b_images, b_states = images.reshape(-1, *images.shape[2:]), states.reshape(-1, states.shape[-1])
        b_instructions = [s for row in instructions for s in row]
        b_act = {k: v.reshape(-1, *v.shape[2:]) for k, v in act_store.items()}

        # ================= update: Eq. 5 on every minibatch =================
        t_update = time.time()
        warmup = iteration <= args.critic_warmup_iters  # only the value head learns
        sums: dict[str, float] = {}
        n_mb, first_ratio_dev, stop = 0, None, False
        for epoch in range(args.update_epochs):
            perm = torch.randperm(batch_size)
            for start in range(0, minibatch_size * args.num_minibatches, minibatch_size):
                idx = perm[start:start + minibatch_size]
                mb = {"obs": {"image": b_images[idx].to(device), "state": b_states[idx].to(device),
                              "instruction": [b_instructions[i] for i in idx.tolist()]},
                      "act_out": {k: v[idx].to(device) for k, v in b_act.items()},
                      "logprob": b_logprobs[idx].to(device), "values": b_values[idx].to(device),
                      "advantages": b_adv[idx].to(device), "returns": b_returns[idx].to(device)}
                terms = minibatch_loss(model, mb, real_batch(), args)
                if first_ratio_dev is None:  # rollout and update must agree: ratio 1 before any step
                    first_ratio_dev = float((terms["ratio"] - 1).abs().max())

                # NaN guard: every process checks every term before backward, and all agree to stop
                names = ("pg_loss", "v_loss", "entropy", "sft_loss")
                check = all_sum([float(not torch.isfinite(terms[k]).item()) for k in names]
                                + [float(terms["approx_kl"])])
                bad = [k for k, flag in zip(names, check[:-1]) if flag > 0]
                if bad:
                    fail(f"non-finite {', '.join(bad)} at iteration {iteration}, epoch {epoch}: "
                         f"stopping without saving; last good checkpoint: {last_good}", code=3)
                approx_kl = check[-1] / world_size

                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                grad_actor = torch.nn.utils.clip_grad_norm_(actor_params, args.max_grad_norm)
                grad_critic = torch.nn.utils.clip_grad_norm_(critic_params, args.max_grad_norm)
                if not (torch.isfinite(grad_actor) and torch.isfinite(grad_critic)):
                    fail(f"non-finite gradient ({'actor' if not torch.isfinite(grad_actor) else 'value head'}) "
                         f"at iteration {iteration}, epoch {epoch}: stopping without saving; "
                         f"last good checkpoint: {last_good}", code=3)
                critic_opt.step()
                if not warmup:
                    actor_opt.step()

                n_mb += 1
                for k in ("loss", "ppo_loss", "pg_loss", "v_loss", "entropy", "sft_loss", "clipfrac"):
                    sums[k] = sums.get(k, 0.0) + terms[k].item()
                sums["approx_kl"] = sums.get("approx_kl", 0.0) + approx_kl
                sums["grad_norm_actor"] = sums.get("grad_norm_actor", 0.0) + float(grad_actor)
                sums["grad_norm_value"] = sums.get("grad_norm_value", 0.0) + float(grad_critic)
                if args.target_kl and approx_kl > args.target_kl:
                    stop = True
                    break
            if stop:
                break
        update_time = time.time() - t_update

        # ================= logging =================
        y_pred, y_true = b_values.numpy(), b_returns.numpy()
        var_y = np.var(y_true)
        explained_var = float("nan") if var_y == 0 else float(1 - np.var(y_true - y_pred) / var_y)
        ep_sums = all_sum([sum(ended_returns), sum(ended_success), sum(ended_len), len(ended_returns)])
        mean = {k: v / n_mb for k, v in sums.items()}
        values_log = {f"losses/{k}": v for k, v in mean.items()}
        values_log.update({
            "losses/sft_over_ppo": args.beta * mean["sft_loss"] / (abs(mean["ppo_loss"]) + 1e-8),
            "losses/explained_variance": explained_var,
            "losses/first_minibatch_ratio_dev": first_ratio_dev,
            "losses/minibatches": n_mb,
            "charts/critic_warmup": float(warmup),
            "charts/decision_reward": float(rewards.mean()),
            "perf/rollout_time": rollout_time, "perf/update_time": update_time,
            "perf/env_sps": iter_steps / (rollout_time + update_time),  # the whole loop
            "perf/rollout_env_sps": iter_steps / rollout_time})
        if ep_sums[3] > 0:
            values_log.update({"charts/episode_return": ep_sums[0] / ep_sums[3],
                               "charts/episode_success": ep_sums[1] / ep_sums[3],
                               "charts/episode_length": ep_sums[2] / ep_sums[3],
                               "charts/episodes": ep_sums[3]})
        if policy.kind == "pi05":  # its entropy is the mean of 0.5 log(2 pi e sigma^2): the noise's geometric mean std
            values_log["charts/noise_sigma"] = math.exp(mean["entropy"] - 0.5 * math.log(2 * math.pi * math.e))
        log(iteration, values_log)
        progress.update(iter_steps)
        progress.set_postfix(ret=f"{values_log.get('charts/episode_return', float('nan')):.2f}",
                             succ=f"{values_log.get('charts/episode_success', float('nan')):.2f}",
                             sps=f"{values_log['perf/env_sps']:.0f}")

        eval_now = bool(args.eval_every) and iteration % args.eval_every == 0
        if global_step >= args.total_env_steps:
            evaluate_and_save(iteration, final=True)
        elif eval_now:
            evaluate_and_save(iteration)
        if global_step < args.total_env_steps and all_sum([float(bool(stop_requested))])[0] > 0:
            if not eval_now:  # else just saved
                evaluate_and_save(iteration, evaluate=False)
            break
    progress.close()
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    stopped = global_step < args.total_env_steps  # by a signal: all processes stop together
    if iteration == start_iter and is_main:
        print(f"nothing to do: the run already took {global_step} of {args.total_env_steps} env steps")

    train_env.close()
    for env in eval_envs.values():
        env.close()
    if is_main:
        print(f"stopped after iteration {iteration} ({global_step} of {args.total_env_steps} env steps): "
              f"{ckpt_root / str(iteration)}; continue with --resume" if stopped else f"done: {ckpt_root / 'final'}")
        writer.close()
        metrics_file.close()
    if world_size > 1:
        dist.destroy_process_group()
    if stopped:
        sys.exit(130)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:  # the second Ctrl-C: stop now; the last saved checkpoint stays
        sys.exit("\ninterrupted: the iteration under way is lost; --resume continues from the last checkpoint")
