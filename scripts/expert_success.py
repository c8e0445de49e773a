"""Success rate of the scripted experts (envs.py) per task x domain x variant, on the evaluation
seeds, and one picture of each task in each domain.

    .venv/bin/python scripts/expert_success.py                      # 100 seeds per setting
    .venv/bin/python scripts/expert_success.py --num-seeds 10 --tasks open_drawer

Writes docs/expert_success.md (table), docs/expert_success.json (per-seed results) and
docs/task_<task>_<domain>.png (initial state | state when the expert finished, first eval seed).
The experts act from privileged simulator state, without rendering.
"""

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import tyro
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402


@dataclass
class Args:
    tasks: tuple[str, ...] = envs.TASKS
    """tasks to measure"""
    domains: tuple[str, ...] = envs.DOMAINS
    """domains to measure"""
    variants: tuple[str, ...] = envs.VARIANTS
    """variants to measure"""
    num_seeds: int = 100
    """episodes per setting: evaluation seeds EVAL_SEED_START .. + num_seeds - 1"""
    num_envs: int = 2
    """sub-envs stepped together (worker processes on the CPU backend)"""
    num_workers: int | None = None
    """worker processes (default: one per sub-env up to the CPU count; 0: all in this process)"""
    out_dir: str = "docs"
    """where the table, the per-seed JSON and the pictures go"""
    images: bool = True
    """also write docs/task_<task>_<domain>.png"""
    image_size: int = 256
    """side of each panel of those pictures"""


def check_names(args: Args):
    for what, given, valid in (("task", args.tasks, envs.TASKS), ("domain", args.domains, envs.DOMAINS),
                               ("variant", args.variants, envs.VARIANTS)):
        unknown = [name for name in given if name not in valid]
        if unknown:
            raise SystemExit(f"unknown {what} {unknown}; valid {what}s: {', '.join(valid)}")
    if args.num_seeds < 1 or args.num_envs < 1:
        raise SystemExit("--num-seeds and --num-envs must be >= 1")


def run_setting(task, domain, variant, seeds, args, progress) -> list[dict]:
    """Run the expert once from each seed; one result dict per seed."""
    results = []
    with envs.make_env(task, domain=domain, variant=variant, num_envs=args.num_envs, image_size=32,
                       num_workers=args.num_workers) as env:
        for start in range(0, len(seeds), args.num_envs):
            batch = seeds[start:start + args.num_envs]
            padded = batch + [batch[-1]] * (args.num_envs - len(batch))  # the last batch may be short
            obs, _ = env.reset(seed=padded)
            done = np.zeros(args.num_envs, bool)
            success = np.zeros(args.num_envs, bool)
            length = np.full(args.num_envs, env.max_episode_steps)
            for t in range(env.max_episode_steps):
                _, _, terminated, truncated, info = env.step(env.expert_action(), render=False)
                finished = (terminated | truncated) & ~done
                success |= finished & info["success"]
                length[finished] = t + 1
                done |= finished
                if done.all():
                    break
            for i, seed in enumerate(batch):
                results.append(dict(seed=seed, success=bool(success[i]), steps=int(length[i]),
                                    instruction=obs["instruction"][i]))
            progress.update(len(batch))
    return results


def save_picture(task, domain, args, path):
    """Initial state and the state when the expert finished, side by side (first eval seed)."""
    with envs.make_env(task, domain=domain, image_size=args.image_size) as env:
        obs, _ = env.reset(seed=envs.eval_seeds(1)[0])
        first = obs["image"][0]
        for _ in range(env.max_episode_steps):
            _, _, terminated, truncated, _ = env.step(env.expert_action(), render=False)
            if terminated[0] or truncated[0]:
                break
        last = env.render_frame()[0]
    gap = np.full((args.image_size, 4, 3), 255, np.uint8)
    imageio.imwrite(path, np.concatenate([first, gap, last], axis=1))


def write_table(table: dict, args: Args, seconds: float, path: Path):
    lines = ["# Scripted-expert success", "",
             f"Produced by `scripts/expert_success.py` ({args.num_seeds} evaluation seeds per setting, "
             f"seeds {envs.EVAL_SEED_START}..{envs.EVAL_SEED_START + args.num_seeds - 1}; "
             f"{envs.CONTROL_FREQ} Hz control; run took {seconds / 60:.1f} min). Each cell: success rate "
             "(successes / episodes), mean and max episode length in control steps "
             "(time limit in the header).", ""]
    header = "| task (limit) | variant | " + " | ".join(args.domains) + " |"
    lines += [header, "|" + " --- |" * (2 + len(args.domains))]
    for task in args.tasks:
        for variant in args.variants:
            cells = []
            for domain in args.domains:
                rows = table[task][domain][variant]
                wins = sum(r["success"] for r in rows)
                steps = [r["steps"] for r in rows if r["success"]] or [0]
                cells.append(f"{100 * wins / len(rows):.0f}% ({wins}/{len(rows)}), "
                             f"{np.mean(steps):.0f} / {max(steps)} steps")
            lines.append(f"| {task} ({envs.MAX_EPISODE_STEPS[task]}) | {variant} | " + " | ".join(cells) + " |")
    failures = [f"{t}/{d}/{v}: seeds {[r['seed'] for r in table[t][d][v] if not r['success']]}"
                for t in args.tasks for d in args.domains for v in args.variants
                if not all(r["success"] for r in table[t][d][v])]
    lines += ["", "Failed episodes: " + ("; ".join(failures) if failures else "none"), ""]
    path.write_text("\n".join(lines))


def main(args: Args):
    check_names(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = envs.eval_seeds(args.num_seeds)
    start = time.time()
    table = {t: {d: {} for d in args.domains} for t in args.tasks}
    total = len(args.tasks) * len(args.domains) * len(args.variants) * len(seeds)
    with tqdm(total=total, desc="expert episodes") as progress:
        for task in args.tasks:
            for domain in args.domains:
                for variant in args.variants:
                    progress.set_postfix_str(f"{task}/{domain}/{variant}")
                    rows = run_setting(task, domain, variant, seeds, args, progress)
                    table[task][domain][variant] = rows
                    wins = sum(r["success"] for r in rows)
                    tqdm.write(f"{task:15s} {domain:11s} {variant:16s} success {wins}/{len(rows)}")
    seconds = time.time() - start
    (out_dir / "expert_success.json").write_text(json.dumps(table, indent=1))
    write_table(table, args, seconds, out_dir / "expert_success.md")
    print((out_dir / "expert_success.md").read_text())
    if args.images:
        for task in tqdm(args.tasks, desc="pictures"):
            for domain in args.domains:
                save_picture(task, domain, args, out_dir / f"task_{task}_{domain}.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
