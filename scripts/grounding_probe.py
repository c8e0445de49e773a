"""Can a tiny policy learn to read its first frame? A small supervised problem cut out of the
task: SFT (pi0.5: flow matching; OpenVLA: action-token cross-entropy) on the first few frames of
each demo only. push_cube: the first action's lateral command (dy) is set by which of the three
row positions the named cube took (about -0.2, 0 or +0.2), so the policy must bind the colour
word to a place in the image. pick_and_place: the first action's dx, dy point from the tcp to the
object, which only the image shows. Every --eval-every steps, on the first frame of demos it
trained on and of held-out demos, the noise-free first action is compared with the expert's:

    |dx error|, |dy error|   mean absolute error of the first action's dx and dy
    corr dx, corr dy         correlation of the policy's dx (dy) with the expert's across the frames
    change                   push_cube: mean |dy change| when the instruction names another of the
                             three cubes (0: the instruction is not read)

    python scripts/grounding_probe.py --data data/push_cube/sim_300 --steps 1500 --lr 3e-4
    python scripts/grounding_probe.py --policy openvla --frames-per-episode 1
    python scripts/grounding_probe.py --data data/pick_and_place/sim_300 --frames-per-episode 1

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
    policy: str = "pi05"
    """policy family (tiny size, random init): pi05 or openvla"""
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
    """tiny policy options (key value pairs), as Stage I's --policy-overrides"""
    seed: int = 0
    """seed of the initial weights and the batches"""


def other_cube_named(instruction: str) -> str:
    """The same instruction naming the next of the three colours."""
    named = next(c for c in COLOURS if f" {c} " in f" {instruction} ")
    return instruction.replace(named, COLOURS[(COLOURS.index(named) + 1) % 3])


def first_action_scores(policy, samples: list[dict]) -> dict:
    """|dx error|, |dy error|, corr dx, corr dy and (push_cube) change of the noise-free first
    action (see the module docstring)."""
    batch = demos.collate(samples)
    obs = {"image": batch["image"], "state": batch["state"], "instruction": batch["instruction"]}
    keys = list(range(len(samples)))  # the same x0 per frame for both instructions
    first = policy.act(obs, deterministic=True, x0_seeds=keys)["actions"][:, 0].numpy()
    expert = batch["actions"][:, 0].numpy()
    scores = {}
    for dim, name in ((0, "dx"), (1, "dy")):
        scores[f"{name}_error"] = float(np.abs(first[:, dim] - expert[:, dim]).mean())
        with np.errstate(invalid="ignore", divide="ignore"):  # nan where either side is constant
            scores[f"{name}_corr"] = float(np.corrcoef(first[:, dim], expert[:, dim])[0, 1])
    scores["change"] = None
    if all(names_a_cube(t) for t in obs["instruction"]):
        swapped = {**obs, "instruction": [other_cube_named(t) for t in obs["instruction"]]}
        dy_swapped = policy.act(swapped, deterministic=True, x0_seeds=keys)["actions"][:, 0, 1].numpy()
        scores["change"] = float(np.abs(first[:, 1] - dy_swapped).mean())
    return scores


def names_a_cube(instruction: str) -> bool:
    return any(f" {c} " in f" {instruction} " for c in COLOURS)


def describe(scores: dict) -> str:
    text = (f"|error| dx {scores['dx_error']:.3f} dy {scores['dy_error']:.3f}, "
            f"corr dx {scores['dx_corr']:+.2f} dy {scores['dy_corr']:+.2f}")
    return text if scores["change"] is None else text + f", change {scores['change']:.3f}"


def main(args: Args):
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    if args.policy not in policies.KINDS:
        raise SystemExit(f"error: --policy {args.policy!r}; choose one of {policies.KINDS}")
    try:
        ds = demos.LeRobotDataset(args.data, chunk_size=policies.default_chunk_size(args.policy))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if not all(names_a_cube(t) or t.startswith("put the ") for t in ds.tasks):
        raise SystemExit(f"error: {args.data} does not look like push_cube or pick_and_place demos (tasks: {ds.tasks})")
    starts = [0] + sorted(set(int(e) for e in ds.episode_end))[:-1]
    if len(starts) <= args.held_out_episodes:
        raise SystemExit(f"error: {len(starts)} demos, but {args.held_out_episodes} are to be held out")
    trained_starts, held_out_starts = starts[:-args.held_out_episodes], starts[-args.held_out_episodes:]
    train_frames = [s + k for s in trained_starts for k in range(args.frames_per_episode)]
    samples = {i: ds[i] for i in train_frames + held_out_starts}
    norm_stats = {key: merge_stats([ds.stats[key]], [1.0]) for key in (demos.STATE_KEY, demos.ACTION_KEY)}
    policy = policies.make_policy(args.policy, "tiny", chunk_size=ds.chunk_size, action_dim=ds.action_dim,
                                  state_dim=ds.state_dim, instructions=ds.tasks, norm_stats=norm_stats,
                                  **parse_overrides(args.policy, "tiny", args.policy_overrides))
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
            print(f"step {step}: first action, trained demos: {describe(seen)}; held out: {describe(held)} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if step == args.steps:
            break
        loss = policy.sft_loss(demos.collate([samples[i] for i in rng.choice(train_frames, 32)]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    main(tyro.cli(Args))
