"""Calibrate the proxy gap per task, before any Table I comparison is looked at: the sim-only
policy of scripts/learnability.py (alpha = 1) is evaluated on proxy_real at gaps 0, 0.25, 0.5,
0.75 and 1 (envs.make_env's gap: 0 = the sim twin, 1 = the full proxy_real domain) with the
noise-free protocol on 50 identical initial states, and the gap of each task is chosen by
CRITERION below. Looks only at the sim-only policy. Writes results/reproduce_cpu/gap_calibration.json
and the evaluations under results/reproduce_cpu/evals/gap_<task>_<gap>.*

    python scripts/gap_calibration.py --tasks open_drawer close_drawer
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

from study_io import ROOT

CRITERION = ("the largest gap of the grid at which the sim-only (alpha = 1) policy, >= 80 % successful in sim, "
             "succeeds in 5-25 % of 50 proxy_real episodes (noise-free protocol); where no grid point falls in "
             "that band, the midpoint of the two gaps that bracket it is evaluated too (at most 3 times)")


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: ["open_drawer", "close_drawer", "push_cube", "pick_and_place"])
    """tasks to calibrate"""
    policy: str = "pi05"
    """policy family of the sim-only policy"""
    attempt: str = "default"
    """the learnability attempt whose first seed's checkpoint is calibrated on"""
    gaps: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """the grid of gaps"""
    episodes: int = 50
    """proxy_real episodes per gap (envs.eval_seeds)"""
    num_envs: int = 2
    """parallel envs of each evaluation"""
    runs_dir: str = "runs/learnability"
    """where scripts/learnability.py put its runs"""
    learnability: str = "results/reproduce_cpu/learnability.json"
    """scripts/learnability.py's results (the sim success of each policy)"""
    out: str = "results/reproduce_cpu/gap_calibration.json"
    """the results file"""


def proxy_success(ckpt: Path, task: str, gap: float, args: Args) -> float:
    name = f"gap_{task}_{args.policy}_{gap:g}".replace(".", "p")
    evals = ROOT / "results/reproduce_cpu/evals"
    table = evals / f"{name}.json"
    if not table.exists():
        cmd = [sys.executable, "eval_real.py", "proxy", "--checkpoint", str(ckpt), "--names", "sim_only",
               "--task", task, "--episodes", str(args.episodes), "--num-envs", str(args.num_envs), "--gap", f"{gap:g}",
               "--videos", "1", "--name", name, "--out-dir", str(evals)]
        print("+ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}")
    cell = json.loads(table.read_text())["rows"][0]["cells"][task]
    return float(cell["mean"])


def read_results(out: Path) -> dict:
    result = json.loads(out.read_text()) if out.exists() else {"criterion": CRITERION, "points": [], "chosen": {}}
    if result["criterion"] != CRITERION:
        sys.exit(f"{out} was written under another criterion; a criterion never changes after its results are seen")
    return result


def main(args: Args):
    rows = json.loads((ROOT / args.learnability).read_text())
    out = ROOT / args.out
    read_results(out)  # refuse before evaluating anything if it was written under another criterion
    for task in args.tasks:
        row = next(r for r in rows if (r["task"], r["policy"], r["attempt"]) == (task, args.policy, args.attempt))
        ckpt = ROOT / args.runs_dir / f"{task}_{args.policy}_{args.attempt}_s{row['seeds'][0]}" / "checkpoints/final"
        sim = row["per_seed_pct"][0]
        points = {g: proxy_success(ckpt, task, g, args) for g in args.gaps}
        for _ in range(3):  # refine where the band lies between two grid points
            if any(5 <= s <= 25 for s in points.values()):
                break
            grid = sorted(points)
            brackets = [(a, b) for a, b in zip(grid, grid[1:]) if (points[a] - 15) * (points[b] - 15) < 0]
            if not brackets:
                break
            a, b = brackets[-1]
            points[(a + b) / 2] = proxy_success(ckpt, task, (a + b) / 2, args)
        result = read_results(out)  # read late: calibrations of other tasks may run side by side
        result["points"] = [p for p in result["points"] if p["task"] != task] + [
            {"task": task, "gap": g, "sim_success_pct": sim, "proxy_real_success_pct": s, "episodes": args.episodes,
             "checkpoint": str(ckpt.relative_to(ROOT))} for g, s in sorted(points.items())]
        in_band = [g for g, s in points.items() if 5 <= s <= 25] if sim >= 80 else []
        result["chosen"][task] = max(in_band) if in_band else None
        out.write_text(json.dumps(result, indent=1))
        print(f"{task}: sim {sim:.0f} %, proxy_real by gap " + ", ".join(f"{g:g}: {s:.0f} %" for g, s in sorted(points.items()))
              + f" -> chosen gap {result['chosen'][task]}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
