"""Does Stage II raise sim success? Stage II (RL in the sim twin, Eq. 5 with --beta) from a finished
sim-only Stage I run of scripts/learnability.py, one run per Stage II seed, each evaluated with the
noise-free protocol on the same 50 sim episodes (envs.eval_seeds) as its starting checkpoint.
Appends a row per task, policy and attempt to results/reproduce_cpu/rl_gain.json: the mean over
seeds before and after, per-seed values, the evaluation protocol (from the final checkpoints),
the rollout success of the first and last quarter of the iterations (sampled chain, first episode
of every env) and times: the wall time of each run, as the
invocation that trained it measured it (it writes rl_gain_wall_s.json in the run folder, so one seed
per invocation, then a reading call for all seeds, keeps them; None for a run trained
elsewhere; a resumed run's is its last invocation's) and, for every run, its training loop's
time from its own metrics (rollouts + updates, without evaluations or start-up). The study asks for a gain
of >= 15 points (mean over >= 3 Stage II seeds).

    python scripts/rl_gain.py --tasks open_drawer --init-attempt default --seeds 1 2 3
    python scripts/rl_gain.py --tasks close_drawer --beta 0.1 --attempt beta0.1

A finished run (its checkpoints/final exists) is not trained again, only read; an interrupted one
resumes.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Optional

import tyro

from study_io import ROOT, dataset_dir, run, upsert_row


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: ["open_drawer", "close_drawer"])
    """tasks to train and evaluate"""
    policy: str = "pi05"
    """policy family (tiny size)"""
    init_attempt: str = "default"
    """the learnability.py attempt whose Stage I run Stage II starts from"""
    init_seed: int = 1
    """the Stage I seed of that run"""
    learnability_runs: str = "runs/learnability"
    """where learnability.py put its Stage I runs"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Stage II seeds"""
    beta: float = 0.0
    """weight of the real-demo SFT loss (Eq. 5); 0 = RL alone"""
    total_env_steps: int = 20000
    """Stage II env steps per run"""
    num_envs: int = 4
    """parallel training envs"""
    learning_rate: Optional[float] = None
    """actor learning rate (default: Stage II's preset for the policy)"""
    temperature: Optional[float] = None
    """Stage II's --temperature (openvla): the rollouts' token sampling temperature"""
    critic_state: bool = False
    """Stage II's --critic-state (pi05): the value head also reads the robot state"""
    critic_potential: bool = False
    """Stage II's --critic-potential (pi05): the value head also reads the shaping potential phi(s)"""
    sigma_range: Optional[tuple[float, float]] = None
    """Stage II's --sigma-range (pi05): the bounds of ReinFlow's step noise (default: the checkpoint's)"""
    noise_steps: Optional[list[int]] = None
    """Stage II's --noise-steps (pi05): the denoising steps that draw ReinFlow's noise (default: the checkpoint's, all)"""
    episodes: int = 50
    """sim evaluation episodes of the final policy"""
    image_size: int = 64
    """camera resolution of learnability.py's datasets"""
    real_episodes: int = 20
    """proxy_real demos of its dataset (Stage II's --real-data: read at beta 0 for its image size only)"""
    data_dir: str = "data"
    """where learnability.py put the datasets (<data-dir>/<task>/proxy_real_<real-episodes> at 64 px)"""
    attempt: str = "beta0"
    """name of this attempt (a run folder suffix and a field of the row)"""
    runs_dir: str = "runs/rl_gain"
    """Stage II runs go here, one folder per task, policy, attempt and seed"""
    out: str = "results/reproduce_cpu/rl_gain.json"
    """the results file (a row per task, policy and attempt; a rerun replaces its row)"""


def quarter_success(rows: list[dict]) -> tuple[float, float]:
    """Mean rollout success (first episode of every env) over the first and last quarter of iterations
    of a run's metrics.jsonl rows."""
    succ = [r["charts/episode_success"] for r in rows if "charts/episode_success" in r]
    q = max(1, len(succ) // 4)
    return sum(succ[:q]) / q, sum(succ[-q:]) / q


def loop_seconds(rows: list[dict]) -> float:
    """Seconds a run spent in its training loop (rollouts + updates), summed from its metrics.jsonl rows."""
    return sum(r.get("perf/rollout_time", 0.0) + r.get("perf/update_time", 0.0) for r in rows)


def main(args: Args):
    py = sys.executable
    out = ROOT / args.out
    for task in args.tasks:
        init_run = ROOT / args.learnability_runs / f"{task}_{args.policy}_{args.init_attempt}_s{args.init_seed}"
        init = init_run / "checkpoints" / "final"
        if not (init / "config.json").exists():
            sys.exit(f"no finished Stage I run at {init}: run scripts/learnability.py --tasks {task} "
                     f"--attempt {args.init_attempt} --seeds {args.init_seed} first")
        before = 100.0 * json.loads((init / "config.json").read_text())["extra"]["eval/success_sim"]
        real = dataset_dir(args.data_dir, task, "proxy_real", args.real_episodes, args.image_size)
        if not (real / "meta" / "info.json").exists():
            sys.exit(f"no dataset at {real}: scripts/learnability.py --tasks {task} makes it")
        after, walls, loops, quarters, env_steps, protocols = [], [], [], [], [], set()
        for seed in args.seeds:
            name = f"{task}_{args.policy}_{args.attempt}_s{seed}"
            final = ROOT / args.runs_dir / name / "checkpoints" / "final"
            wall_file = final.parents[1] / "rl_gain_wall_s.json"  # the invocation that trained it wrote it
            wall = None
            if not (final / "config.json").exists():
                resume = ["--resume"] if (ROOT / args.runs_dir / name / "args.json").exists() else []
                wall = run([py, "stage2_rl_cotrain.py", "--task", task, "--init", str(init), "--real-data", str(real),
                            "--beta", f"{args.beta:g}", "--total-env-steps", str(args.total_env_steps),
                            "--num-envs", str(args.num_envs),
                            *(["--learning-rate", f"{args.learning_rate:g}"] if args.learning_rate is not None else []),
                            *(["--critic-state"] if args.critic_state else []),
                            *(["--critic-potential"] if args.critic_potential else []),
                            *(["--sigma-range", *(f"{x:g}" for x in args.sigma_range)] if args.sigma_range else []),
                            *(["--noise-steps", *map(str, args.noise_steps)] if args.noise_steps else []),
                            *(["--temperature", f"{args.temperature:g}"] if args.temperature is not None else []),
                            "--eval-every", "0", "--eval-episodes", str(args.episodes),
                            "--eval-num-envs", "2", "--eval-domains", "sim", "--no-save-video", "--seed", str(seed),
                            "--runs-dir", str(ROOT / args.runs_dir), "--run-name", name, *resume])
                wall_file.write_text(json.dumps({"wall_s": wall}))
            elif wall_file.exists():  # a finished run is only read: its wall time as its own invocation measured it
                wall = json.loads(wall_file.read_text())["wall_s"]
            extra = json.loads((final / "config.json").read_text())["extra"]
            after.append(100.0 * extra["eval/success_sim"])
            protocols.add(extra.get("protocol"))
            metrics = [json.loads(line) for line in (final.parents[1] / "metrics.jsonl").read_text().splitlines()
                       if line.strip()]
            quarters.append(quarter_success(metrics))
            env_steps.append(max(r.get("global_step", 0) for r in metrics))
            walls.append(None if wall is None else round(wall, 1))
            loops.append(round(loop_seconds(metrics), 1))
        mean_after = sum(after) / len(after)
        row = {"task": task, "policy": args.policy, "seeds": list(args.seeds), "env_steps": max(env_steps),
               "sim_before_pct": before, "sim_after_pct": mean_after, "per_seed_after_pct": after,
               "gain_points": mean_after - before, "episodes": args.episodes,
               "protocol": " | ".join(sorted(str(p) for p in protocols)), "beta": args.beta,
               "num_envs": args.num_envs, "learning_rate": args.learning_rate,
               "critic_state": args.critic_state, "critic_potential": args.critic_potential,
               "sigma_range": list(args.sigma_range) if args.sigma_range else None, "noise_steps": args.noise_steps,
               "temperature": args.temperature, "attempt": args.attempt,
               "init": f"{init_run.relative_to(ROOT) if init_run.is_relative_to(ROOT) else init_run} "
                       "(sim-only Stage I, alpha 1)",
               "rollout_success_first_quarter": [round(a, 3) for a, _ in quarters],
               "rollout_success_last_quarter": [round(b, 3) for _, b in quarters],
               "stage2_wall_s": walls, "stage2_loop_s": loops, "criterion_met": mean_after - before >= 15.0 and len(args.seeds) >= 3}
        upsert_row(out, row)
        print(f"{task} {args.policy} {args.attempt}: sim success {before:.1f} % -> {mean_after:.1f} % "
              f"(per seed {after}), {args.episodes} episodes; written to {out}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
