"""The paper in miniature, on one task: `make quickstart` runs this.

    python quickstart.py                 # close_drawer, tiny pi05, 24 min on an idle 2-core CPU
    python quickstart.py --scale ci      # a few steps per stage: checks the pipeline, not the method

At the cpu scale every setting is the cpu study's (reproduce.py's SCALES["cpu"]: 300 sim and 20
proxy_real demos, the task's Stage I recipe, 20k Stage II env steps, 50 evaluation episodes), and
so is the task's co-training ratio (COTRAIN_ALPHA). The proxy_real gap is, for close_drawer, the one
where the study's gap sweep separates the three paradigms most clearly (SHOWCASE_GAP), for the
other tasks their calibrated gap (results/reproduce_cpu/gap_calibration.json): the table is one
training seed of the study's cell (gap_sweep.md / table1.md). close_drawer is the task whose whole
pipeline fits in about 30 minutes here; open_drawer's Stage I recipe (10,000 steps) takes about
1.5 hours, pick_and_place's (15,000 steps, two cameras) about 2 and push_cube's (30,000 steps, two
cameras) about 3.

Steps (each is the command a researcher would type; each prints before it runs):
  1. collect_demos.py: sim demos and proxy_real ("real") demos of the task, at the task's gap
  2. stage1_sft_cotrain.py --alpha 0: the real-only SFT baseline        } side by side, one
  3. stage1_sft_cotrain.py --alpha A: SFT co-training (Eq. 4)            } process each
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
from typing import Literal, Optional

import tyro

# The cpu study's settings (reproduce.py's SCALES["cpu"], COTRAIN_ALPHA and IMAGE_SIZE; scripts do not
# import each other, and tests/test_quickstart.py checks that these agree with reproduce.py's)
IMAGE_SIZE = 64
COTRAIN_ALPHA = {"pick_and_place": 0.5, "push_cube": 0.5, "open_drawer": 0.95, "close_drawer": 0.5}
STAGE1_RECIPE = {"open_drawer": {"pi05": dict(steps=10_000, overrides=["discrete_state_input", "false"]),
                                 "openvla": dict(steps=6000)},
                 "pick_and_place": {"pi05": dict(steps=15_000, lr=1e-3, overrides=[
                     "discrete_state_input", "false", "wrist_camera", "true"])},
                 "push_cube": {"pi05": dict(steps=30_000, start_frames=1, start_weight=25.0, ema_decay=0.999, overrides=[
                     "discrete_state_input", "false", "wrist_camera", "true"])}}
RECIPE_FLAGS = ("lr", "start_frames", "start_weight", "ema_decay")  # stage1_sft_cotrain.py's flags of these names
# Per scale: demo counts, Stage I steps and batch, Stage II env steps and envs, evaluation episodes
# and envs. The cpu scale is the cpu study's; the ci scale takes a few steps of each stage.
SCALES = {
    "cpu": dict(sim_episodes=300, real_episodes=20, stage1_steps=3000, stage1_batch=32,
                stage2_env_steps=20_000, stage2_num_envs=4, eval_episodes=50, eval_num_envs=2),
    "ci": dict(sim_episodes=4, real_episodes=3, stage1_steps=6, stage1_batch=8,
               stage2_env_steps=32, stage2_num_envs=1, eval_episodes=2, eval_num_envs=1),
}
CALIBRATION = Path(__file__).resolve().parent / "results/reproduce_cpu/gap_calibration.json"  # the study's
# The gap close_drawer is shown at: where the study's gap sweep (results/reproduce_cpu/gap_sweep.json,
# training seeds 1 and 2) separates the paradigms most clearly, by the rule fixed before its last
# runs were evaluated (docs/study_cpu_progress.md, section 5): the largest mean RL-Co minus
# real-only difference, ties to the larger gap. RL-Co - real-only there: 13, 2, -5, 13 and 10 points
# at gaps 0, 0.25, 0.5, 0.75 and 1. tests/test_quickstart.py reapplies the rule to the file.
SHOWCASE_GAP = {"close_drawer": 0.75}


def calibrated_gap(task: str) -> float:
    """The task's proxy_real gap chosen by scripts/gap_calibration.py; 1 (the full proxy_real) if none."""
    chosen = json.loads(CALIBRATION.read_text()).get("chosen", {}) if CALIBRATION.exists() else {}
    return float(chosen.get(task, 1.0))


def default_gap(task: str) -> float:
    return SHOWCASE_GAP.get(task, calibrated_gap(task))


def tag(x: float) -> str:
    """0.25 -> "0p25", as the study names its runs and datasets."""
    return f"{x:g}".replace(".", "p")


@dataclass
class Args:
    task: Literal["pick_and_place", "push_cube", "open_drawer", "close_drawer"] = "close_drawer"
    """task of the run"""
    policy: Literal["openvla", "pi05"] = "pi05"
    """policy family (tiny size)"""
    scale: Literal["cpu", "ci"] = "cpu"
    """cpu: the cpu study's settings (24 min on 2 idle cores for close_drawer); ci: a few steps per stage"""
    alpha: Optional[float] = None
    """sim ratio of SFT co-training (default: the study's for the task, COTRAIN_ALPHA)"""
    beta: float = 0.1
    """weight of the real-data SFT loss in Stage II (Eq. 5)"""
    gap: Optional[float] = None
    """proxy_real gap of the real demos and of the evaluation, 0 (the sim twin) to 1 (the full
    proxy_real) (default: close_drawer 0.75, where the study's gap sweep separates the paradigms
    most clearly; other tasks their calibrated gap, results/reproduce_cpu/gap_calibration.json)"""
    seed: int = 1
    """training seed of every stage (the demos are the study's, collected with collect_demos.py's
    default teleoperation seed whatever this is)"""
    data_dir: str = "data"
    """where datasets go (data/<task>/sim_<n>, data/<task>/proxy_real[_gap<g>]_<n>, as the study's)"""
    runs_dir: str = "runs"
    """where training runs go"""
    out_dir: str = "results/quickstart"
    """where the table goes"""


def command_env() -> dict:
    # one torch thread per process unless the user says otherwise: on a small CPU the env workers
    # and a multi-threaded torch contend for the cores, and the training step slows several-fold
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def failed(cmd: list[str]):
    sys.exit(f"quickstart: step failed: {' '.join(cmd[1:3])} (rerun `make quickstart` to continue)")


def run(cmd: list[str]):
    print("\n$ " + shlex.join(cmd), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, env=command_env()).returncode != 0:
        failed(cmd)
    print(f"  ({time.time() - t0:.0f} s)")


def run_side_by_side(cmds: list[list[str]], logs: list[Path]):
    """Independent commands at once, one process each (a 2-core CPU trains two tiny policies in
    the time of one); each writes to its log, and the last line of each is shown every 30 s."""
    t0 = time.time()
    procs, outs = [], []
    for cmd, log in zip(cmds, logs):
        print("\n$ " + shlex.join(cmd) + f"  > {log}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        outs.append(open(log, "w"))
        procs.append(subprocess.Popen(cmd, env=command_env(), stdout=outs[-1], stderr=subprocess.STDOUT))
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1 if time.time() - t0 < 30 else 30)
            for log, p in zip(logs, procs):
                # tqdm redraws with carriage returns: the last one is the current state
                last = log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-1:] or [""]
                print(f"  [{time.time() - t0:5.0f} s] {log.stem}: {'running' if p.poll() is None else 'done'} "
                      f"{last[0][-100:]}", flush=True)
    except KeyboardInterrupt:  # Ctrl-C reaches the children too: they save a checkpoint and stop
        for p in procs:
            p.wait()
        raise
    finally:
        for out in outs:
            out.close()
    for cmd, log, p in zip(cmds, logs, procs):
        if p.returncode != 0:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            failed(cmd)
    print(f"  ({time.time() - t0:.0f} s)")


def main(args: Args):
    scale = SCALES[args.scale]
    alpha = COTRAIN_ALPHA[args.task] if args.alpha is None else args.alpha
    gap = default_gap(args.task) if args.gap is None else args.gap
    if not 0.0 <= gap <= 1.0 or not 0.0 <= alpha <= 1.0:
        sys.exit(f"quickstart: --gap and --alpha are numbers in [0, 1] (got gap {gap:g}, alpha {alpha:g})")
    recipe = STAGE1_RECIPE.get(args.task, {}).get(args.policy, {}) if args.scale == "cpu" else {}
    stage1_steps = recipe.get("steps", scale["stage1_steps"])
    policy_overrides = recipe.get("overrides", [])  # key value pairs
    recipe_args = ["--policy-overrides", *policy_overrides] if policy_overrides else []
    for key in RECIPE_FLAGS:  # the recipe's Stage I settings, e.g. lr -> --lr 0.001
        recipe_args += [f"--{key.replace('_', '-')}", f"{recipe[key]:g}"] if key in recipe else []
    # a policy with a wrist camera trains on demos recorded with it (the study's `_wrist` folders)
    wrist = dict(zip(policy_overrides[::2], policy_overrides[1::2])).get("wrist_camera") == "true"
    py = sys.executable
    t_start = time.time()
    gtag = "" if gap == 1.0 else f"_gap{tag(gap)}"
    label_of_run = f"{args.task}_{args.policy}{gtag}_{args.scale}"
    # the cpu scale names its datasets as the study does (a quickstart and `make reproduce` share them);
    # the CI's tiny ones are kept apart
    size = {"cpu": (scale["sim_episodes"], scale["real_episodes"]), "ci": ("ci", "ci")}[args.scale]
    sim_data = Path(args.data_dir) / args.task / (f"sim_{size[0]}" + ("_wrist" if wrist else ""))
    real_data = Path(args.data_dir) / args.task / (f"proxy_real{gtag}_{size[1]}" + ("_wrist" if wrist else ""))
    print(f"quickstart: {args.task}, tiny {args.policy}, scale {args.scale}; alpha {alpha:g}, beta {args.beta:g}, "
          f"proxy_real gap {gap:g}; Stage I {stage1_steps} steps, Stage II {scale['stage2_env_steps']} env steps, "
          f"{scale['eval_episodes']} evaluation episodes", flush=True)

    # 1. demonstrations (the real ones from the proxy_real domain at the gap they are evaluated at),
    # collected as the study collects them, so that the two share them
    for domain, out, n in (("sim", sim_data, scale["sim_episodes"]),
                           ("proxy_real", real_data, scale["real_episodes"])):
        run([py, "collect_demos.py", "--task", args.task, "--domain", domain, "--num-episodes", str(n),
             "--out", str(out), "--image-size", str(IMAGE_SIZE),
             *(["--gap", f"{gap:g}"] if domain == "proxy_real" and gap != 1.0 else []),
             *(["--wrist-camera"] if wrist else [])])

    # 2.-3. Stage I: real-only SFT (alpha = 0) and SFT co-training (alpha = A, Eq. 4), side by side;
    # no monitoring evaluation (eval_real.py measures the final checkpoints), checkpoints every quarter
    stage1_runs, todo = {}, []
    for label, a in (("real_only", 0.0), ("sft_cotrain", alpha)):
        name = f"qs_{label_of_run}_{label}" + (f"_a{tag(a)}" if label == "sft_cotrain" else "")
        stage1_runs[label] = Path(args.runs_dir) / name / "checkpoints" / "final"
        if (stage1_runs[label] / "config.json").exists():
            print(f"\n[skip] {label}: {stage1_runs[label]} exists")
            continue
        resume = ["--resume"] if (Path(args.runs_dir) / name / "args.json").exists() else []
        todo.append((name, [py, "stage1_sft_cotrain.py", "--task", args.task, "--policy", args.policy,
                            "--alpha", f"{a:g}", "--sim-data", str(sim_data), "--real-data", str(real_data),
                            "--total-steps", str(stage1_steps), "--batch-size", str(scale["stage1_batch"]),
                            *recipe_args, "--eval-every", str(max(1, stage1_steps // 4)), "--eval-domains",
                            "--seed", str(args.seed), "--runs-dir", args.runs_dir, "--run-name", name, *resume]))
    if todo:
        run_side_by_side([cmd for _, cmd in todo], [Path(args.runs_dir) / f"{name}.log" for name, _ in todo])

    # 4. Stage II: RL-Co (Eq. 5) from the co-trained checkpoint, no monitoring evaluation
    name = f"qs_{label_of_run}_rlco_a{tag(alpha)}_b{tag(args.beta)}"
    rlco = Path(args.runs_dir) / name / "checkpoints" / "final"
    if (rlco / "config.json").exists():
        print(f"\n[skip] rl_co: {rlco} exists")
    else:
        resume = ["--resume"] if (Path(args.runs_dir) / name / "args.json").exists() else []
        run([py, "stage2_rl_cotrain.py", "--task", args.task, "--init", str(stage1_runs["sft_cotrain"]),
             "--real-data", str(real_data), "--beta", f"{args.beta:g}",
             "--total-env-steps", str(scale["stage2_env_steps"]), "--num-envs", str(scale["stage2_num_envs"]),
             "--eval-domains", "--seed", str(args.seed), "--runs-dir", args.runs_dir, "--run-name", name, *resume])

    # 5. evaluation on identical proxy_real initial states at the gap, the noise-free protocol
    checkpoints = {"Real only (SFT)": stage1_runs["real_only"],
                   f"SFT co-train (alpha={alpha:g})": stage1_runs["sft_cotrain"],
                   f"RL-Co (beta={args.beta:g})": rlco}
    out_dir = Path(args.out_dir)
    table_name = f"table1_{label_of_run}"
    stamp = {str(p): (p / "model.safetensors").stat().st_mtime for p in checkpoints.values()}
    stamp_file = out_dir / f"{table_name}.inputs.json"
    if (out_dir / f"{table_name}.json").exists() and stamp_file.exists() \
            and json.loads(stamp_file.read_text()) == stamp:
        print(f"\n[skip] evaluation: {out_dir / table_name}.json is up to date")
    else:
        run([py, "eval_real.py", "proxy", "--checkpoint", *map(str, checkpoints.values()),
             "--names", *checkpoints.keys(), "--task", args.task, "--episodes", str(scale["eval_episodes"]),
             "--gap", f"{gap:g}", "--image-size", str(IMAGE_SIZE), "--num-envs", str(scale["eval_num_envs"]),
             "--seed", str(args.seed), "--name", table_name, "--out-dir", str(out_dir)])
        stamp_file.write_text(json.dumps(stamp, indent=1))

    summary = {"args": asdict(args), "alpha": alpha, "gap": gap, "stage1_steps": stage1_steps, "scale": scale,
               "datasets": [str(sim_data), str(real_data)],
               "checkpoints": {k: str(v) for k, v in checkpoints.items()},
               "table": str(out_dir / f"{table_name}.md"), "wall_s_this_invocation": time.time() - t_start}
    (out_dir / f"{table_name}.summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nTable I row, proxy_real success (%) at gap {gap:g}, one noise-free evaluation on identical initial "
          f"states (one training seed: a smoke test, not a comparison):\n")
    print((out_dir / f"{table_name}.md").read_text())
    study_table = "gap_sweep.md" if args.task in SHOWCASE_GAP and gap != calibrated_gap(args.task) else "table1.md"
    print(f"The study's cell, 2-3 training seeds: results/reproduce_cpu/{study_table}. Next: `make reproduce` "
          f"(SCALE=cpu|gpu); compare more checkpoints with\n"
          f"  python eval_real.py proxy --checkpoint {rlco} ... --task {args.task} --gap {gap:g}")
    print(f"quickstart: {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main(tyro.cli(Args))
