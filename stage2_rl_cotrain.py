"""Stage II of RL-Co: RL in simulation, regularized by SFT on the real demos.

    python stage2_rl_cotrain.py --task open_drawer --beta 0.1

    L_total = L_RL + beta * L_SFT(real)                                            (Eq. 5)

L_RL is PPO on the action tokens of an `openvla` policy (as RL4VLA) or on the whole stochastic
denoising chain of a `pi05` policy (ReinFlow); the kind comes from the Stage I checkpoint --init.
Every minibatch adds beta times the SFT loss of --sft-batch-size real samples (beta = 0 runs no
SFT pass). RL only steps the `sim` domain; `proxy_real` is evaluated for monitoring only.

Action chunks (an SMDP over decisions). At each decision every env gets a chunk of H actions and
executes the first --exec-horizon of them. An env whose episode ends inside the chunk idles (no
reward, masked) until the chunk boundary, where it resets; the other envs execute their chunk in
full. The decision's reward is sum_j gamma^j r_{t+j} over the steps the env executed, and the
next decision is discounted by gamma^n for those n steps, so returns are Eq. 3's per-step ones.
The PPO ratio and the entropy count only the executed actions of each chunk. Each iteration
starts from a reset of every env; a rollout covers at least one whole episode of every env, and
the success logged for the rollout is over those first episodes (the later ones are cut short by
the rollout's end, which would favour quick successes).

Reward (--reward shaped, the default): potential-based shaping (Ng et al. 1999) with the env's
dense reward phi in [0, 0.9] before success as the potential, plus a success bonus:
    r_t = success_reward * 1[success at t+1] + gamma * phi(s_{t+1}) * (1 - 1[success]) - phi(s_t)
with phi(s_0) from the reset state. Along any episode the shaping telescopes to -phi(s_0) (plus
gamma^T phi(s_T) at a time-limit cut, which the bootstrap continues), so an episode that succeeds
after T steps out-earns every one that does not by gamma^(T-1) * success_reward: at least 0.37
(gamma 0.99, 100 steps) where paying phi itself would favour hovering at 0.9 forever.

Run with torchrun, Ctrl-C / SIGTERM and the outputs: see the README ("Stage II").
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import demos
import envs
import plumbing
import policies
from plumbing import fail


@dataclass
class Args:
    """Stage II of RL-Co (Eq. 5). Options whose default is None and say [preset] take their value
    from PRESETS for the Stage I checkpoint's policy kind and size (tiny or full)."""

    task: str = "open_drawer"
    """task to train in (sim) and evaluate (sim and proxy_real): pick_and_place, push_cube, open_drawer, close_drawer"""
    init: Optional[str] = None
    """Stage I checkpoint to start from (default: the newest runs/*/checkpoints/final of a Stage I run on --task)"""
    real_data: Optional[str] = None
    """LeRobot v3.0 folder of real demos for the SFT regularizer (default: data/<task>/proxy_real; unused when beta = 0)"""
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
    reward: Literal["shaped", "dense", "sparse"] = "shaped"
    """shaped: success bonus plus potential-based shaping with the dense reward (see the module docstring); dense: the env's dense reward itself (hovering near success outpays success); sparse: 1 at success"""
    success_reward: float = 1.0
    """bonus paid at success with --reward shaped"""
    exec_horizon: Optional[int] = None
    """actions of each chunk executed before the next decision (default: the whole chunk; RLinf executes 4 of 8)"""
    num_steps: Optional[int] = None
    """decisions per env per rollout (default and minimum: one whole episode, ceil(max_episode_steps / exec_horizon))"""
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
    """clip the value update around the rollout's value [preset]"""
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
    temperature: Optional[float] = None
    """openvla: sampling temperature of the action tokens in the rollouts and in PPO's log-probs (default: the checkpoint's, 1.0 as RL4VLA); saved in the checkpoint. Greedy evaluation does not depend on it"""
    sigma_range: Optional[tuple[float, float]] = None
    """pi05: the bounds [sigma_min, sigma_max] of ReinFlow's step noise (default: the checkpoint's, RLinf's 0.08 0.16); saved in the checkpoint. The noisy chain is what Stage II trains, the noise-free one what the protocol scores: a narrower range keeps the two closer"""
    noise_steps: Optional[list[int]] = None
    """pi05: the denoising steps (0..K-1) that draw ReinFlow's noise; the others run noise-free and are recomputed from the current weights in the update, so the log-probability stays exact (default: the checkpoint's, all K). `--noise-steps 3` with K = 4 trains the noise-free chain the protocol scores, with Gaussian noise on its output only; saved in the checkpoint"""
    critic_state: bool = False
    """pi05: the value head also reads the normalised robot state (a new, untrained head; the actor is unchanged): an asymmetric critic for a policy trained without the state (discrete_state_input false), whose value would otherwise be read from the image alone"""
    critic_potential: bool = False
    """pi05, --reward shaped: the value head also reads the shaping potential phi(s) (the task's normalised dense reward: privileged sim state, given to the critic only, as an asymmetric actor-critic does; a new, untrained head). Under shaping the critic must fit V - phi, which the image alone hardly shows"""
    sft_batch_size: Optional[int] = None
    """real samples drawn for every minibatch (default: the minibatch size)"""
    recompute_logprob: Optional[bool] = None
    """recompute the rollout's log-probs with the update's own computation (evaluate) before the update, as RLinf does; needed where act and evaluate differ in precision (bf16) [preset]"""

    eval_every: Optional[int] = None
    """evaluate and checkpoint every N iterations (0: only at the start and the end) [preset]"""
    checkpoint_every: Optional[int] = None
    """also save a resumable checkpoint every N iterations between evaluations (0: only where it
    evaluates), so that a killed run loses at most N iterations; it costs no evaluation [preset]"""
    eval_episodes: Optional[int] = None
    """episodes per domain at each evaluation, on the fixed evaluation seeds [preset]"""
    eval_num_envs: int = 4
    """parallel envs per evaluation domain"""
    eval_domains: tuple[str, ...] = ("sim", "proxy_real")
    """domains evaluated (monitoring only: evaluation never feeds gradients)"""
    eval_sampled: bool = False
    """evaluate the sampling policy (noisy chain / tokens at temperature) instead of the noise-free protocol"""
    save_video: bool = True
    """record the first evaluation episode of each domain under videos/"""
    gradient_checkpointing: bool = False
    """recompute each transformer layer's activations in the update's backward: less memory, about a third more update compute"""

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


# Defaults per (policy kind, size) for the Args left at None. Full size: RLinf's ReinFlow co-training
# for pi05 and RL4VLA's PPO for openvla (both gamma 0.99, lambda 0.95, clip 0.2). Tiny: a critic
# warm-up (a Stage I value head is untrained), a KL bound per update, and actor lr 1e-5 (at 1e-4
# Adam's first step took tiny pi05 on open_drawer to KL 0.65 and 0 of 116 successful rollouts).
_FULL = dict(total_env_steps=3_000_000, num_envs=64, num_minibatches=4, clip_vloss=True, huber_delta=10.0,
             target_kl=0.0, critic_warmup_iters=0, eval_every=20, eval_episodes=50, recompute_logprob=True,
             checkpoint_every=0)  # full size: the trainer state is tens of GB; the evaluations checkpoint
_TINY = dict(total_env_steps=6_000, num_envs=4, update_epochs=2, num_minibatches=4, clip_vloss=False,
             huber_delta=0.0, target_kl=0.05, critic_warmup_iters=2, learning_rate=1e-5,
             value_learning_rate=1e-3, max_grad_norm=1.0, eval_every=10, eval_episodes=8, recompute_logprob=False,
             checkpoint_every=10)
PRESETS = {
    ("pi05", "full"): dict(_FULL, update_epochs=2, ent_coef=0.005, learning_rate=4e-6, value_learning_rate=2e-4,
                           max_grad_norm=1.0),
    ("openvla", "full"): dict(_FULL, update_epochs=1, ent_coef=0.0, learning_rate=1e-4, value_learning_rate=3e-3,
                              max_grad_norm=10.0),
    ("pi05", "tiny"): dict(_TINY, ent_coef=0.005),
    ("openvla", "tiny"): dict(_TINY, ent_coef=0.0),
}


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


def value_error(x, huber_delta: float):
    """0.5 x^2, or the Huber loss (equal near 0, linear beyond delta) when huber_delta > 0."""
    return F.huber_loss(x, torch.zeros_like(x), reduction="none", delta=huber_delta) if huber_delta > 0 else 0.5 * x ** 2


def newest_stage1_checkpoint(runs_dir: str, task: str) -> Optional[Path]:
    """The most recently written runs/*/checkpoints/final of a Stage I run on `task`."""
    extras = {c.parent: plumbing.read_checkpoint_extra(c.parent) or {}
              for c in Path(runs_dir).glob("*/checkpoints/final/config.json")}
    found = [p for p, e in extras.items() if e.get("stage") == "stage1" and e.get("task") == task]
    return max(found, key=lambda p: (p / "config.json").stat().st_mtime) if found else None


def make_train_envs(args: Args, rank: int, image_size: int, wrist_camera: bool):
    """The RL envs: sim domain only; the rollout resets finished sub-envs at chunk boundaries."""
    return envs.make_env(args.task, domain="sim", num_envs=args.num_envs, image_size=image_size,
                         sim_backend=args.sim_backend, seed=envs.train_seed(rank * args.num_envs),
                         reward_mode="sparse" if args.reward == "sparse" else "dense",
                         max_episode_steps=args.max_episode_steps, wrist_camera=wrist_camera)


def make_eval_env(args: Args, domain: str, image_size: int, wrist_camera: bool):
    return envs.make_env(args.task, domain=domain, num_envs=args.eval_num_envs, image_size=image_size,
                         sim_backend=args.sim_backend, max_episode_steps=args.max_episode_steps,
                         wrist_camera=wrist_camera)


@torch.no_grad()
def rollout(policy, env, num_steps: int, exec_horizon: int, args: Args, first_seed: int) -> dict:
    """num_steps decisions of every env from a reset with seeds first_seed + i (later episodes take
    the next seeds). Returns the [T, B, ...] buffers of the update and the rollout's episodes."""
    B, T, H, C = env.num_envs, num_steps, exec_horizon, policy.chunk_size
    next_seed = first_seed
    obs, _ = env.reset(seed=[envs.train_seed((next_seed + i) % envs.EVAL_SEED_START) for i in range(B)])
    next_seed += B
    potential = env.dense_reward() if args.reward == "shaped" else np.zeros(B)  # phi(s_0)
    buf = {"obs": [], "act": [], "step_mask": torch.zeros(T, B, C),
           **{k: torch.zeros(T, B) for k in ("values", "rewards", "dones", "bootstrap", "discounts")}}
    def critic_obs(o):  # --critic-potential: phi(s) of each env's current state goes to the value head
        return {**o, "potential": potential.astype(np.float32)} if args.critic_potential else o

    first_episode = np.ones(B, bool)  # the episode each env began at the iteration's reset
    ep_return, ep_len, episodes, live_steps = np.zeros(B), np.zeros(B, int), [], 0
    for t in range(T):
        decision_obs = critic_obs(obs)
        out = policy.act(decision_obs)
        buf["obs"].append({k: v for k, v in decision_obs.items()
                           if k in ("image", "wrist_image", "state", "instruction", "potential")})
        buf["act"].append({k: v.cpu() for k, v in out.items() if torch.is_tensor(v) and v.shape[:1] == (B,)})
        buf["values"][t] = out["value"].float().cpu()
        chunk = out["actions"].float().cpu().numpy()[:, :H]
        live, n_exec, reward = np.ones(B, bool), np.zeros(B, int), np.zeros(B)  # live: in the decision's episode
        for j in range(H):
            action = np.where(live[:, None], chunk[:, j], np.asarray(envs.HOLD_ACTION, np.float32))
            obs, r, terminated, truncated, info = env.step(action.astype(np.float32), render=j == H - 1)
            r, terminated = np.asarray(r, np.float64), np.asarray(terminated, bool)
            truncated = np.asarray(truncated, bool) & ~terminated
            paid = r  # dense / sparse: what the env pays
            if args.reward == "shaped":  # r is phi(s_{j+1}); phi of a terminal state counts as 0
                paid = args.success_reward * terminated + args.gamma * r * ~terminated - potential
                potential = np.where(live, r, potential)
            reward += live * args.gamma ** n_exec * paid  # sum_j gamma^j r_{t+j}, executed steps only
            ep_return, n_exec, ep_len, live_steps = ep_return + live * paid, n_exec + live, ep_len + live, \
                live_steps + int(live.sum())
            ended = live & (terminated | truncated)
            episodes += [{"success": bool(terminated[i]), "return": float(ep_return[i]), "length": int(ep_len[i]),
                          "first": bool(first_episode[i])} for i in np.flatnonzero(ended)]
            cut = ended & truncated
            if cut.any():  # time limit: bootstrap from V(the observation it was cut at)
                final_obs = obs if obs["image"] is not None else {**obs, **env.render_views()}
                v_cut = policy.act(critic_obs(final_obs), deterministic=True)["value"].float().cpu().numpy()
                buf["bootstrap"][t] = torch.as_tensor(np.where(cut, v_cut, buf["bootstrap"][t].numpy()))
            buf["dones"][t] += torch.as_tensor(ended, dtype=torch.float32)
            live &= ~ended
            if not live.any():
                break  # every env's episode ended: no need to idle to the boundary
        buf["rewards"][t] = torch.as_tensor(reward, dtype=torch.float32)
        buf["discounts"][t] = torch.as_tensor(args.gamma ** n_exec, dtype=torch.float32)
        buf["step_mask"][t] = torch.as_tensor(np.arange(C)[None, :] < n_exec[:, None], dtype=torch.float32)
        # at the chunk boundary the envs whose episode ended start the next one
        ended_rows = np.flatnonzero(~live)
        if len(ended_rows):
            seeds = [envs.train_seed((next_seed + k) % envs.EVAL_SEED_START) for k in range(len(ended_rows))]
            next_seed += len(ended_rows)
            obs, _ = env.reset(seed=seeds, rows=ended_rows)
            if args.reward == "shaped":
                potential[ended_rows] = env.dense_reward()[ended_rows]
            first_episode[ended_rows], ep_return[ended_rows], ep_len[ended_rows] = False, 0.0, 0
        elif obs["image"] is None:
            obs = {**obs, **env.render_views()}
    buf["last_value"] = policy.act(critic_obs(obs), deterministic=True)["value"].float().cpu()
    buf["episodes"], buf["live_steps"] = episodes, live_steps
    return buf


def main(args: Args):
    dist_ = plumbing.setup_distributed(args.device)
    rank, world_size, device, is_main = dist_.rank, dist_.world_size, dist_.device, dist_.is_main

    # ---- arguments, checkpoint to start from --------------------------------------------------
    if args.task not in envs.TASKS:
        fail(f"unknown task {args.task!r}; choose one of {', '.join(envs.TASKS)}")
    if not args.beta >= 0:
        fail(f"--beta must be >= 0 (the weight of the real SFT loss in Eq. 5), got {args.beta}")
    if args.temperature is not None and not args.temperature > 0:
        fail(f"--temperature must be > 0, got {args.temperature}")
    if args.sigma_range is not None and not 0 < args.sigma_range[0] <= args.sigma_range[1]:
        fail(f"--sigma-range must be two numbers 0 < min <= max, got {args.sigma_range}")
    args.real_data = args.real_data or f"data/{args.task}/proxy_real"
    args.run_name = args.run_name or f"stage2_{args.task}_beta{args.beta:g}_s{args.seed}"
    run_dir, resume_from = plumbing.open_run(args.runs_dir, args.run_name, args.resume)
    ckpt_root = run_dir / "checkpoints"
    if resume_from is not None:  # the run's own --init
        args.init = plumbing.read_checkpoint_extra(resume_from).get("init", args.init)
    elif args.resume:  # stopped before its first checkpoint: start it again
        args.init = args.init or json.loads((run_dir / "args.json").read_text()).get("init")
    if args.init is None:
        newest = newest_stage1_checkpoint(args.runs_dir, args.task)
        if newest is None:
            fail(f"no Stage I checkpoint for task {args.task} under {args.runs_dir}/ (looked for "
                 f"*/checkpoints/final with stage 'stage1'); make one with:\n"
                 f"  python stage1_sft_cotrain.py --task {args.task}\nor pass --init <checkpoint folder>")
        args.init = str(newest)
    if resume_from is None:
        extra = plumbing.read_checkpoint_extra(args.init)
        if extra is None:
            fail(f"--init {args.init}: not a policy checkpoint (no readable config.json)")
        if extra.get("stage") != "stage1":
            fail(f"--init {args.init}: not a Stage I policy (its config.json says stage {extra.get('stage')!r}); "
                 f"Stage II starts from stage1_sft_cotrain.py's output")
        if extra.get("task") != args.task and is_main:
            print(f"warning: --init {args.init} was trained on task {extra.get('task')!r}, training on "
                  f"{args.task!r}", file=sys.stderr)
    if args.beta > 0 and not Path(args.real_data).exists():
        fail(f"real dataset not found: {args.real_data}\n  make one with: python collect_demos.py "
             f"--task {args.task} --domain proxy_real --out {args.real_data}")

    # ---- seeding ---------------------------------------------------------------------------------
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # per-process sampling of actions and of the SFT noise
    real_rng = np.random.default_rng(args.seed + 1000 * rank)  # real-batch indices

    # ---- policy, presets, data ---------------------------------------------------------------------
    try:
        policy = policies.load_policy(resume_from or args.init)
    except Exception as e:  # a folder that is not a policy checkpoint
        fail(f"cannot load a policy from {resume_from or args.init}: {e}")
    size = "full" if policy.config.get("size") == "full" else "tiny"
    from_preset = {k: v for k, v in PRESETS[(policy.kind, size)].items() if getattr(args, k) is None}
    for key, value in from_preset.items():
        setattr(args, key, value)
    if args.critic_state and policy.kind != "pi05":
        fail(f"--critic-state is for pi05 policies; {args.init} holds a {policy.kind} policy")
    if args.critic_potential and policy.kind != "pi05":
        fail(f"--critic-potential is for pi05 policies; {args.init} holds a {policy.kind} policy")
    if args.sigma_range is not None and policy.kind != "pi05":
        fail(f"--sigma-range is for pi05 policies (ReinFlow's step noise); {args.init} holds a {policy.kind} policy")
    if args.noise_steps is not None and policy.kind != "pi05":
        fail(f"--noise-steps is for pi05 policies (ReinFlow's step noise); {args.init} holds a {policy.kind} policy")
    if args.noise_steps is not None:
        K = policy.config["model"]["num_steps"]
        try:
            args.noise_steps = policies.reinflow_noisy_steps(args.noise_steps, K)
        except ValueError:
            fail(f"--noise-steps must list denoising steps in 0..{K - 1} (the policy's K = {K}), got {args.noise_steps}")
    if args.temperature is not None and policy.kind != "openvla":
        fail(f"--temperature is for openvla policies (pi05 explores by its noise head); {args.init} holds pi05")
    if resume_from is None:
        if args.critic_state:
            with torch.random.fork_rng():  # the same new head in every process; the sampling streams untouched
                torch.manual_seed(args.seed)
                policy.use_state_in_value_head()  # saved in the config: resume and evaluation rebuild it
        if args.critic_potential:
            with torch.random.fork_rng():
                torch.manual_seed(args.seed + 1)
                policy.use_potential_in_value_head()
        if args.temperature is not None:
            policy.config["model"]["temperature"] = args.temperature  # act and evaluate both read it
        if args.sigma_range is not None:  # noise_std reads them in act and evaluate alike
            policy.config["model"]["sigma_min"], policy.config["model"]["sigma_max"] = map(float, args.sigma_range)
        if args.noise_steps is not None:  # act and evaluate both read it
            policy.config["model"]["noise_steps"] = args.noise_steps
    else:  # the checkpoint's config holds both: a resume may not ask for something else
        if args.critic_state and not policy.config["model"].get("value_state_input", False):
            fail(f"--critic-state: the run in {run_dir} was started without it; resume it without the option")
        if args.critic_potential and not policy.config["model"].get("value_potential_input", False):
            fail(f"--critic-potential: the run in {run_dir} was started without it; resume it without the option")
        if args.temperature is not None and args.temperature != policy.config["model"]["temperature"]:
            fail(f"--temperature {args.temperature:g}: the run in {run_dir} samples at "
                 f"{policy.config['model']['temperature']:g}; resume it with that temperature or without the option")
        m = policy.config["model"]
        if args.sigma_range is not None and tuple(map(float, args.sigma_range)) != (m["sigma_min"], m["sigma_max"]):
            fail(f"--sigma-range {args.sigma_range[0]:g} {args.sigma_range[1]:g}: the run in {run_dir} uses "
                 f"{m['sigma_min']:g} {m['sigma_max']:g}; resume it with that range or without the option")
        saved_steps = policy.noisy_steps(m["num_steps"])
        if args.noise_steps is not None and args.noise_steps != saved_steps:
            fail(f"--noise-steps {' '.join(map(str, args.noise_steps))}: the run in {run_dir} draws noise at steps "
                 f"{saved_steps}; resume it with those or without the option")
    args.critic_potential = bool(policy.config["model"].get("value_potential_input", False))  # rollouts feed phi
    if args.critic_potential and args.reward != "shaped":
        fail(f"--critic-potential's critic reads the shaping potential: it needs --reward shaped, got {args.reward}")
    args.exec_horizon = args.exec_horizon or policy.chunk_size
    if not 1 <= args.exec_horizon <= policy.chunk_size:
        fail(f"--exec-horizon must lie in [1, {policy.chunk_size}] (the policy's chunk), got {args.exec_horizon}")
    policy.config["exec_horizon"] = args.exec_horizon  # saved: evaluation executes what training did
    real_ds = None
    if args.beta > 0:
        try:
            real_ds = demos.LeRobotDataset(args.real_data, chunk_size=policy.chunk_size, wrist_image_key=
                                           demos.WRIST_IMAGE_KEY if "wrist_image" in policy.view_keys else None)
            demos.check_dims(real_ds, policy)
        except (FileNotFoundError, KeyError, ValueError) as e:
            fail(f"cannot use real dataset {args.real_data}: {e}")
        if len(real_ds) == 0:
            fail(f"real dataset {args.real_data} holds no frames")
    image_size = int(policy.config.get("camera_image_size") or
                     (real_ds.info["features"][demos.IMAGE_KEY]["shape"][0] if real_ds is not None else 128))

    # ---- envs (sim only for training) ----------------------------------------------------------------
    wrist_camera = "wrist_image" in policy.view_keys  # a pi0.5 policy with two views
    train_env = make_train_envs(args, rank, image_size, wrist_camera)
    B, H = train_env.num_envs, args.exec_horizon
    max_steps = args.max_episode_steps or train_env.max_episode_steps
    one_episode = math.ceil(max_steps / H)
    args.num_steps = args.num_steps or one_episode
    if args.num_steps < one_episode:
        fail(f"--num-steps {args.num_steps} is shorter than one episode ({one_episode} decisions of {H} steps): "
             f"every rollout must cover a whole episode of every env")
    T, batch_size = args.num_steps, args.num_steps * B  # batch: decisions per process per iteration
    args.num_minibatches = min(args.num_minibatches, batch_size)
    minibatch_size = batch_size // args.num_minibatches
    args.sft_batch_size = args.sft_batch_size or minibatch_size
    eval_envs = {d: make_eval_env(args, d, image_size, wrist_camera) for d in args.eval_domains} \
        if is_main and args.eval_episodes > 0 else {}

    # ---- optimizers: actor and value head, separate learning rates --------------------------------------
    if args.gradient_checkpointing:
        policy.set_gradient_checkpointing(True)
    policy.to(device).eval()  # no dropout: rollout and update compute the same log-probs
    actor_params, critic_params = policy.actor_parameters(), policy.critic_parameters()
    if not critic_params:
        fail(f"{args.init}: the policy has no trainable value_head.* parameters")
    actor_opt = torch.optim.Adam(actor_params, lr=args.learning_rate, betas=args.adam_betas, eps=args.adam_eps)
    critic_opt = torch.optim.Adam(critic_params, lr=args.value_learning_rate, betas=args.adam_betas, eps=args.adam_eps)
    generators = {"real_rng": real_rng}
    start_iter, global_step, last_good = 0, 0, Path(args.init)
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=False)
        actor_opt.load_state_dict(state["actor_opt"])
        critic_opt.load_state_dict(state["critic_opt"])
        plumbing.restore_rng(state["rng"], generators, device, rank)
        start_iter, global_step, last_good = state["iteration"], state["global_step"], resume_from
    protocol = policy.protocol(deterministic=not args.eval_sampled)
    if is_main:
        plumbing.write_args(run_dir, asdict(args))
        print(f"Stage II presets for {policy.kind}/{size}: " + ", ".join(f"{k}={v}" for k, v in from_preset.items()))
        print(f"Stage II: {policy.kind}/{size} from {args.init}, task {args.task}, beta {args.beta} | "
              f"{world_size} process(es) x {B} sim envs on {device}, chunk {policy.chunk_size} executing {H}, "
              f"{T} decisions per rollout | rollouts: {policy.protocol(deterministic=False).split(';')[0]}"
              f" | evaluation: {protocol}"
              + (f" | resuming from iteration {start_iter}" if resume_from else ""))
    metrics = plumbing.MetricsLog(run_dir, resume_at=("iteration", start_iter) if resume_from else None,
                                 enabled=is_main)
    extra = {"stage": "stage2", "task": args.task, "beta": args.beta, "init": args.init, "args": asdict(args)}

    def evaluate(iteration) -> dict:  # monitoring only: process 0, fixed evaluation seeds
        scores = {}
        act = policies.eval_act_fn(policy, deterministic=not args.eval_sampled)
        for domain, env in eval_envs.items():
            records, videos = envs.evaluate_success(env, act, envs.eval_seeds(args.eval_episodes), H,
                                                    video_seeds=int(args.save_video))
            scores[f"eval/success_{domain}"] = float(np.mean([r["success"] for r in records]))
            for frames in videos.values():
                plumbing.save_video(frames, run_dir / "videos" / f"iter{iteration}_{domain}.mp4", fps=4)
        if scores:
            metrics.log({"iteration": iteration, "global_step": global_step}, scores, global_step)
            tqdm.write(f"iteration {iteration}: " + ", ".join(f"{k[5:]} {v:.2f}" for k, v in scores.items())
                       + f" ({protocol})")
        return scores

    def save(iteration, scores, final=False):  # collective: every process's RNG state is gathered
        nonlocal last_good
        state = {"actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict(),
                 "rng": plumbing.capture_rng(generators, device, world_size),
                 "iteration": iteration, "global_step": global_step}
        last_good = ckpt_root / str(iteration)
        if is_main:
            info = {**extra, "iteration": iteration, "protocol": protocol, **scores}
            plumbing.save_checkpoint(policy, last_good, info, state)
            plumbing.prune_checkpoints(ckpt_root, keep=last_good)
            if final:
                plumbing.save_checkpoint(policy, ckpt_root / "final", info)

    def real_batch():
        idx = real_rng.integers(0, len(real_ds), args.sft_batch_size)
        batch = demos.collate([real_ds[int(i)] for i in idx])
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    if start_iter == 0:
        evaluate(0)  # the starting point: success before Stage II
    if global_step >= args.total_env_steps and is_main:
        print(f"nothing to do: the run already took {global_step} of {args.total_env_steps} env steps")
    progress = tqdm(total=args.total_env_steps, initial=global_step, disable=not is_main, desc="Stage II", unit="step")
    iteration = start_iter
    with plumbing.StopFlag("the iteration under way", verbose=is_main) as stop:
        while global_step < args.total_env_steps:  # the budget counts executed env steps, all processes
            iteration += 1
            # ================= rollout in sim =================
            t_rollout = time.time()
            first_seed = ((iteration - 1) * world_size + rank) * B * (T + 1)  # an iteration's own seeds
            buf = rollout(policy, train_env, T, H, args, first_seed)
            iter_steps = int(plumbing.all_sum([buf["live_steps"]], world_size)[0])
            global_step += iter_steps
            rollout_time = time.time() - t_rollout

            # ================= advantages (GAE over decisions) =================
            advantages, returns = compute_gae(buf["rewards"], buf["values"], buf["last_value"], buf["dones"],
                                              buf["bootstrap"], buf["discounts"], args.gae_lambda)
            b_adv, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), buf["values"].reshape(-1)
            if args.norm_adv:
                b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)
            b_views = {key: torch.as_tensor(np.stack([o[key] for o in buf["obs"]])).reshape(-1, image_size, image_size, 3)
                       for key in policy.view_keys}
            b_states = torch.as_tensor(np.stack([o["state"] for o in buf["obs"]])).reshape(batch_size, -1)
            b_instructions = [s for o in buf["obs"] for s in o["instruction"]]
            b_potential = (torch.as_tensor(np.stack([o["potential"] for o in buf["obs"]])).reshape(-1)
                           if args.critic_potential else None)
            b_act = {k: torch.stack([a[k] for a in buf["act"]]).reshape(batch_size, *buf["act"][0][k].shape[1:])
                     for k in buf["act"][0]}
            b_mask = buf["step_mask"].reshape(batch_size, -1)  # 1 where a chunk step was executed

            def minibatch(idx):
                obs = {**{key: v[idx].to(device) for key, v in b_views.items()}, "state": b_states[idx].to(device),
                       "instruction": [b_instructions[i] for i in idx.tolist()]}
                if b_potential is not None:
                    obs["potential"] = b_potential[idx]
                return obs, {k: v[idx].to(device) for k, v in b_act.items()}, b_mask[idx].to(device)

            # old log-probs of the executed actions only (the unexecuted chunk steps never acted)
            b_old_step = b_act["step_logprob"].float()
            if args.recompute_logprob:  # with the update's own computation (bf16 act vs evaluate)
                with torch.no_grad():
                    b_old_step = torch.cat([policy.evaluate(*minibatch(idx)[:2])["step_logprob"].float().cpu()
                                            for idx in torch.arange(batch_size).split(minibatch_size)])
            b_logprobs = (b_old_step * b_mask).sum(1)

            # ================= update: Eq. 5 on every minibatch =================
            t_update = time.time()
            warmup = iteration <= args.critic_warmup_iters  # only the value head learns
            sums, n_mb, first_ratio_dev, stop_update, grad_terms = {}, 0, None, False, {}
            for epoch in range(args.update_epochs):
                perm = torch.randperm(batch_size)
                for start in range(0, minibatch_size * args.num_minibatches, minibatch_size):
                    idx = perm[start:start + minibatch_size]
                    obs, act_out, mask = minibatch(idx)
                    adv, ret = b_adv[idx].to(device), b_returns[idx].to(device)
                    old_logprob, old_value = b_logprobs[idx].to(device), b_values[idx].to(device)

                    new = policy.evaluate(obs, act_out)
                    new_logprob = (new["step_logprob"].float() * mask).sum(1)  # executed actions only
                    entropy = (new["step_entropy"].float() * mask).sum(1) / mask.sum(1).clamp(min=1)
                    logratio = new_logprob - old_logprob
                    ratio = logratio.exp()
                    with torch.no_grad():
                        approx_kl = ((ratio - 1) - logratio).mean()  # the low-variance k3 estimator
                        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
                    if first_ratio_dev is None:  # rollout and update must agree: ratio 1 before any step
                        first_ratio_dev = float((ratio.detach() - 1).abs().max())
                    # L_RL: clipped surrogate, value loss, entropy bonus
                    pg_loss = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - args.clip_coef,
                                                                         1 + args.clip_coef)).mean()
                    new_value = new["value"].float()
                    v_loss = value_error(new_value - ret, args.huber_delta)
                    if args.clip_vloss:
                        v_clipped = old_value + torch.clamp(new_value - old_value, -args.vf_clip_coef, args.vf_clip_coef)
                        v_loss = torch.max(v_loss, value_error(v_clipped - ret, args.huber_delta))
                    v_loss = v_loss.mean()
                    ppo_loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy.mean()
                    # L_SFT(real): beta = 0 runs no real forward at all
                    sft_loss = policy.sft_loss(real_batch()) if args.beta > 0 else torch.zeros((), device=device)
                    loss = ppo_loss + args.beta * sft_loss  # Eq. 5: L_total = L_RL + beta * L_SFT(real)

                    # NaN guard: every process checks every term before backward, and all agree to stop
                    terms = {"pg_loss": pg_loss, "v_loss": v_loss, "entropy": entropy.mean(), "sft_loss": sft_loss}
                    check = plumbing.all_sum([float(not torch.isfinite(x)) for x in terms.values()]
                                             + [float(approx_kl)], world_size)
                    bad = [k for k, flag in zip(terms, check[:-1]) if flag > 0]
                    if bad:
                        fail(f"non-finite {', '.join(bad)} at iteration {iteration}, epoch {epoch}: stopping "
                             f"without saving; last good checkpoint: {last_good}", code=3)
                    approx_kl = check[-1] / world_size
                    if n_mb == 0:  # the balance of Eq. 5: each term's actor gradient norm, first minibatch
                        for name, term in (("ppo", ppo_loss), ("sft", args.beta * sft_loss)):
                            if term.requires_grad:
                                g = torch.autograd.grad(term, actor_params, retain_graph=True, allow_unused=True)
                                norms = [x.norm() for x in g if x is not None]
                                grad_terms[f"losses/grad_norm_actor_{name}"] = \
                                    float(torch.stack(norms).norm()) if norms else 0.0

                    policy.zero_grad(set_to_none=True)
                    loss.backward()
                    plumbing.average_gradients(actor_params + critic_params, world_size)
                    grad_actor = torch.nn.utils.clip_grad_norm_(actor_params, args.max_grad_norm)
                    grad_critic = torch.nn.utils.clip_grad_norm_(critic_params, args.max_grad_norm)
                    if not (torch.isfinite(grad_actor) and torch.isfinite(grad_critic)):
                        fail(f"non-finite gradient ({'actor' if not torch.isfinite(grad_actor) else 'value head'}) "
                             f"at iteration {iteration}, epoch {epoch}: stopping without saving; last good "
                             f"checkpoint: {last_good}", code=3)
                    critic_opt.step()
                    if not warmup:
                        actor_opt.step()

                    n_mb += 1
                    for k, v in dict(terms, loss=loss, ppo_loss=ppo_loss, clipfrac=clipfrac, approx_kl=approx_kl,
                                     grad_norm_actor=grad_actor, grad_norm_value=grad_critic).items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
                    if args.target_kl and approx_kl > args.target_kl:
                        stop_update = True
                        break
                if stop_update:
                    break
            update_time = time.time() - t_update

            # ================= logging =================
            var_y = float(np.var(b_returns.numpy()))
            first = [e for e in buf["episodes"] if e["first"]]
            ep = plumbing.all_sum([sum(e["success"] for e in first), sum(e["return"] for e in first),
                                   sum(e["length"] for e in first), len(first), len(buf["episodes"])], world_size)
            row = {**{f"losses/{k}": v / n_mb for k, v in sums.items()}, **grad_terms}
            row.update({
                "losses/explained_variance": float("nan") if var_y == 0 else
                1 - float(np.var((b_returns - b_values).numpy())) / var_y,
                "losses/first_minibatch_ratio_dev": first_ratio_dev, "losses/minibatches": n_mb,
                "charts/critic_warmup": float(warmup), "charts/decision_reward": float(buf["rewards"].mean()),
                # the first episode of every env, all of which end within the rollout: unbiased
                "charts/episode_success": ep[0] / ep[3], "charts/episode_return": ep[1] / ep[3],
                "charts/episode_length": ep[2] / ep[3], "charts/episodes": ep[4],
                "charts/executed_fraction": float(b_mask[:, :H].mean()),
                "perf/rollout_time": rollout_time, "perf/update_time": update_time,
                "perf/env_sps": iter_steps / (rollout_time + update_time),  # the whole loop
                "perf/rollout_env_sps": iter_steps / rollout_time})
            if policy.kind == "pi05":  # entropy = mean 0.5 log(2 pi e sigma^2): the noise's geometric mean std
                row["charts/noise_sigma"] = math.exp(row["losses/entropy"] - 0.5 * math.log(2 * math.pi * math.e))
            metrics.log({"iteration": iteration, "global_step": global_step}, row, global_step)
            progress.update(iter_steps)
            progress.set_postfix(succ=f"{row['charts/episode_success']:.2f}", kl=f"{row['losses/approx_kl']:.3f}",
                                 sps=f"{row['perf/env_sps']:.0f}")

            # ================= evaluation and checkpoints =================
            done = global_step >= args.total_env_steps
            stopping = not done and plumbing.all_sum([float(stop.requested)], world_size)[0] > 0
            evaluating = not stopping and (done or (args.eval_every and iteration % args.eval_every == 0))
            if evaluating or stopping or (args.checkpoint_every and iteration % args.checkpoint_every == 0):
                scores = evaluate(iteration) if is_main and evaluating else {}
                save(iteration, scores, final=done)
            if stopping:
                break
    for closable in (progress, train_env, *eval_envs.values(), metrics):
        closable.close()
    stopped = global_step < args.total_env_steps  # by a signal: all processes stop together
    if is_main:
        print(f"stopped after iteration {iteration} ({global_step} of {args.total_env_steps} env steps): "
              f"{ckpt_root / str(iteration)}; continue with --resume" if stopped else f"done: {ckpt_root / 'final'}")
    plumbing.finish_distributed(world_size)
    if stopped:
        sys.exit(130)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:  # the second Ctrl-C: stop now; the last saved checkpoint stays
        sys.exit("\ninterrupted: the iteration under way is lost; --resume continues from the last checkpoint")
