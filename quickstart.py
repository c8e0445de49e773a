"""The paper in miniature, on one task: `make quickstart` runs this.

    python quickstart.py                 # open_drawer, tiny pi05, about 30 min on a 2-core CPU
    python quickstart.py --scale ci      # a few steps per stage: checks the pipeline, not the method

Steps (each is the command a researcher would type; each prints before it runs):
  1. collect_demos.py: sim demos and proxy_real ("real") demos of the task
  2. stage1_sft_cotrain.py --alpha 0: the real-only SFT baseline
  3. stage1_sft_cotrain.py --alpha A: SFT co-training (Eq. 4)
  4. stage2_rl_cotrain.py --init <3> --beta B: RL-Co (Eq. 5)
  5. eval_real.py proxy: the three checkpoints on identical proxy_real initial states with the
     noise-free protocol, and the Table I row

Rerunning reuses what is done: datasets resume to their requested size, a stage whose final
checkpoint exists is skipped, and the evaluation is redone only when a checkpoint changed.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

# Per scale: demo counts, Stage I steps, Stage II env steps, evaluation episodes. monitor_episodes:
# the training scripts' own sim/proxy_real evaluations (0: none, which also saves their env start-up,
# tens of seconds each on a CPU); stage2_num_envs: None = the script's preset; eval_num_envs: None =
# eval_real.py's default (1 runs in this process: no worker processes to start).
SCALES = {
    "cpu": dict(sim_episodes=100, real_episodes=20, stage1_steps=1500, stage1_batch=32,
                stage2_env_steps=6000, eval_episodes=20, stage1_eval_every=0, monitor_episodes=4,
                stage2_num_envs=None, eval_num_envs=None),
    "ci": dict(sim_episodes=4, real_episodes=3, stage1_steps=6, stage1_batch=8,
               stage2_env_steps=32, eval_episodes=2, stage1_eval_every=0, monitor_episodes=0,
               stage2_num_envs=1, eval_num_envs=1),
}


@dataclass
class Args:
    task: str = "open_drawer"
    """task of the run"""
    policy: Literal["openvla", "pi05"] = "pi05"
    """policy family (tiny size)"""
    scale: Literal["cpu", "ci"] = "cpu"
    """cpu: the real miniature (~30 min on 2 cores); ci: a few steps per stage"""
    alpha: float = 0.95
    """sim ratio of SFT co-training (the paper's Fig. 4 best for open_drawer)"""
    beta: float = 0.1
    """weight of the real-data SFT loss in Stage II (Eq. 5)"""
    image_size: int = 64
    """camera resolution of the collected demos and of evaluation"""
    seed: int = 1
    """seed of every stage"""
    data_dir: str = "data"
    """where datasets go (data/<task>/sim, data/<task>/proxy_real)"""
    runs_dir: str = "runs"
    """where training runs go"""
    out_dir: str = "results/quickstart"
    """where the table goes"""


def run(cmd: list[str]):
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    # one torch thread per process unless the user says otherwise: on a small CPU the env workers
    # and a multi-threaded torch contend for the cores, and the training step slows several-fold
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if subprocess.run(cmd, env=env).returncode != 0:
        sys.exit(f"quickstart: step failed: {' '.join(cmd[1:3])} (rerun `make quickstart` to continue)")
    print(f"  ({time.time() - t0:.0f} s)")


def main(args: Args):
    scale = SCALES[args.scale]
    py = sys.executable
    t_start = time.time()
    tag = f"{args.task}_{args.policy}_{args.scale}"
    sim_data = Path(args.data_dir) / args.task / "sim"
    real_data = Path(args.data_dir) / args.task / "proxy_real"
    if args.scale == "ci":  # keep the CI's tiny datasets apart from a real quickstart's
        sim_data, real_data = sim_data.with_name("sim_ci"), real_data.with_name("proxy_real_ci")

    # 1. demonstrations
    for domain, out, n in (("sim", sim_data, scale["sim_episodes"]),
                           ("proxy_real", real_data, scale["real_episodes"])):
        run([py, "collect_demos.py", "--task", args.task, "--domain", domain, "--num-episodes", str(n),
             "--out", str(out), "--image-size", str(args.image_size), "--seed", str(args.seed)])

    # 2.-3. Stage I: real-only SFT (alpha = 0) and SFT co-training (alpha = A)
    stage1_runs = {}
    for label, alpha in (("real_only", 0.0), ("sft_cotrain", args.alpha)):
        name = f"qs_{tag}_{label}"
        stage1_runs[label] = Path(args.runs_dir) / name / "checkpoints" / "final"
        if (stage1_runs[label] / "config.json").exists():
            print(f"\n[skip] {label}: {stage1_runs[label]} exists")
            continue
        resume = ["--resume"] if (Path(args.runs_dir) / name / "args.json").exists() else []
        run([py, "stage1_sft_cotrain.py", "--task", args.task, "--policy", args.policy,
             "--alpha", str(alpha), "--sim-data", str(sim_data), "--real-data", str(real_data),
             "--total-steps", str(scale["stage1_steps"]), "--batch-size", str(scale["stage1_batch"]),
             "--eval-every", str(scale["stage1_eval_every"]),
             *(["--eval-episodes", str(scale["monitor_episodes"]), "--eval-num-envs", "1"]
               if scale["monitor_episodes"] else ["--eval-domains"]),
             "--seed", str(args.seed), "--runs-dir", args.runs_dir, "--run-name", name, *resume])

    # 4. Stage II: RL-Co from the co-trained checkpoint
    name = f"qs_{tag}_rlco_beta{args.beta:g}"
    rlco = Path(args.runs_dir) / name / "checkpoints" / "final"
    if (rlco / "config.json").exists():
        print(f"\n[skip] rl_co: {rlco} exists")
    else:
        resume = ["--resume"] if (Path(args.runs_dir) / name / "args.json").exists() else []
        run([py, "stage2_rl_cotrain.py", "--task", args.task, "--init", str(stage1_runs["sft_cotrain"]),
             "--real-data", str(real_data), "--beta", str(args.beta),
             "--total-env-steps", str(scale["stage2_env_steps"]),
             *(["--num-envs", str(scale["stage2_num_envs"])] if scale["stage2_num_envs"] else []),
             "--eval-episodes", str(scale["monitor_episodes"]), "--eval-num-envs", "1",
             "--seed", str(args.seed), "--runs-dir", args.runs_dir, "--run-name", name, *resume])

    # 5. evaluation on identical proxy_real initial states, the noise-free protocol
    checkpoints = {"Real only (SFT)": stage1_runs["real_only"],
                   f"SFT co-train (alpha={args.alpha:g})": stage1_runs["sft_cotrain"],
                   f"RL-Co (beta={args.beta:g})": rlco}
    out_dir = Path(args.out_dir)
    table_name = f"table1_{tag}"
    stamp = {str(p): (p / "model.safetensors").stat().st_mtime for p in checkpoints.values()}
    stamp_file = out_dir / f"{table_name}.inputs.json"
    if (out_dir / f"{table_name}.json").exists() and stamp_file.exists() \
            and json.loads(stamp_file.read_text()) == stamp:
        print(f"\n[skip] evaluation: {out_dir / table_name}.json is up to date")
    else:
        run([py, "eval_real.py", "proxy", "--checkpoint", *map(str, checkpoints.values()),
             "--names", *checkpoints.keys(), "--task", args.task, "--episodes", str(scale["eval_episodes"]),
             "--image-size", str(args.image_size),
             *(["--num-envs", str(scale["eval_num_envs"])] if scale["eval_num_envs"] else []),
             "--seed", str(args.seed), "--name", table_name, "--out-dir", str(out_dir)])
        stamp_file.write_text(json.dumps(stamp, indent=1))

    summary = {"args": asdict(args), "scale": scale, "datasets": [str(sim_data), str(real_data)],
               "checkpoints": {k: str(v) for k, v in checkpoints.items()},
               "table": str(out_dir / f"{table_name}.md"), "wall_s_this_invocation": time.time() - t_start}
    (out_dir / f"{table_name}.summary.json").write_text(json.dumps(summary, indent=1))
    print("\nTable I row, proxy_real success (%), one noise-free evaluation on identical initial states:\n")
    print((out_dir / f"{table_name}.md").read_text())
    print(f"Next: the full study with `make reproduce` (SCALE=cpu|gpu); compare more checkpoints with\n"
          f"  python eval_real.py proxy --checkpoint {rlco} ... --task {args.task}")


if __name__ == "__main__":
    main(tyro.cli(Args))
