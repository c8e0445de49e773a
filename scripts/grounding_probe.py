"""Can a tiny pi0.5 learn which cube push_cube's instruction names? A small supervised problem
cut out of the task: flow-matching SFT on the first few frames of each demo only, where the first
action's lateral command (dy) is set by which of the three row positions the named cube took
(about -0.2, 0 or +0.2). Every --eval-every steps, on the first frame of demos it trained on and
of held-out demos, the noise-free first action is compared with the expert's:

    |dy error|       mean absolute error of the first action's dy
    corr             correlation of the policy's dy with the expert's across the frames
    change           mean |dy change| when the instruction names another of the three cubes
                     (0: the instruction is not read)

    python scripts/grounding_probe.py --data data/push_cube/sim_300 --steps 1500 --lr 3e-4

No environment is run: it reads the dataset only (about 0.2 s a step on one core).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demos  # noqa: E402
import policies  # noqa: E402
from envs import TRAIN_COLOURS as COLOURS  # noqa: E402  (the three cubes of the training variant)
from stage1_sft_cotrain import merge_stats, parse_overrides  # noqa: E402


@dataclass
class Args:
    data: str = "data/push_cube/sim_300"
    """push_cube sim dataset (collect_demos.py)"""
    steps: int = 1500
    """optimizer steps (AdamW, constant learning rate, batch 32)"""
    lr: float = 3e-4
    """learning rate"""
    frames_per_episode: int = 3
    """the first N frames of each training demo are the training set"""
    held_out_episodes: int = 50
    """the last N demos are held out (their first frame is evaluated)"""
    eval_every: int = 250
    """steps between evaluations"""
    policy_overrides: dict[str, str] = field(default_factory=dict)
    """tiny pi0.5 options (key value pairs), as Stage I's --policy-overrides"""
    seed: int = 0
    """seed of the initial weights and the batches"""


def other_cube_named(instruction: str) -> str:
    """The same instruction naming the next of the three colours."""
    named = next(c for c in COLOURS if f" {c} " in f" {instruction} ")
    return instruction.replace(named, COLOURS[(COLOURS.index(named) + 1) % 3])


def first_action_scores(policy, samples: list[dict]) -> dict:
    """|dy error|, corr and change (see the module docstring) of the noise-free first action."""
    batch = demos.collate(samples)
    obs = {"image": batch["image"], "state": batch["state"], "instruction": batch["instruction"]}
    keys = list(range(len(samples)))  # the same x0 per frame for both instructions
    dy = policy.act(obs, deterministic=True, x0_seeds=keys)["actions"][:, 0, 1].numpy()
    swapped = {**obs, "instruction": [other_cube_named(t) for t in obs["instruction"]]}
    dy_swapped = policy.act(swapped, deterministic=True, x0_seeds=keys)["actions"][:, 0, 1].numpy()
    expert = batch["actions"][:, 0, 1].numpy()
    return {"dy_error": float(np.abs(dy - expert).mean()), "corr": float(np.corrcoef(dy, expert)[0, 1]),
            "change": float(np.abs(dy - dy_swapped).mean())}


def main(args: Args):
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    try:
        ds = demos.LeRobotDataset(args.data, chunk_size=policies.default_chunk_size("pi05"))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if not any(f" {c} " in f" {t} " for t in ds.tasks for c in COLOURS):
        raise SystemExit(f"error: {args.data} does not look like push_cube demos (tasks: {ds.tasks})")
    starts = [0] + sorted(set(int(e) for e in ds.episode_end))[:-1]
    if len(starts) <= args.held_out_episodes:
        raise SystemExit(f"error: {len(starts)} demos, but {args.held_out_episodes} are to be held out")
    trained_starts, held_out_starts = starts[:-args.held_out_episodes], starts[-args.held_out_episodes:]
    train_frames = [s + k for s in trained_starts for k in range(args.frames_per_episode)]
    samples = {i: ds[i] for i in train_frames + held_out_starts}
    norm_stats = {key: merge_stats([ds.stats[key]], [1.0]) for key in (demos.STATE_KEY, demos.ACTION_KEY)}
    policy = policies.make_policy("pi05", "tiny", chunk_size=ds.chunk_size, action_dim=ds.action_dim,
                                  state_dim=ds.state_dim, instructions=ds.tasks, norm_stats=norm_stats,
                                  **parse_overrides("pi05", "tiny", args.policy_overrides))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr)
    rng = np.random.default_rng(args.seed)
    print(f"{len(train_frames)} training frames (the first {args.frames_per_episode} of {len(trained_starts)} demos), "
          f"{len(held_out_starts)} held-out first frames")
    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            policy.eval()
            with torch.no_grad():
                seen = first_action_scores(policy, [samples[i] for i in trained_starts[:args.held_out_episodes]])
                held = first_action_scores(policy, [samples[i] for i in held_out_starts])
            policy.train()
            print(f"step {step}: first dy, trained demos: |error| {seen['dy_error']:.3f} corr {seen['corr']:+.2f} "
                  f"change {seen['change']:.3f}; held out: |error| {held['dy_error']:.3f} corr {held['corr']:+.2f} "
                  f"change {held['change']:.3f} ({time.time() - t0:.0f} s)", flush=True)
        if step == args.steps:
            break
        loss = policy.sft_loss(demos.collate([samples[i] for i in rng.choice(train_frames, 32)]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main(tyro.cli(Args))
