"""The paper's whole study (Tables I-II, Figs. 4-7, sec. V of "Beyond Imitation: Reinforcement
Learning-Based Sim-Real Co-Training for VLA Models", arXiv:2602.12628): `make reproduce` runs this.

    python reproduce.py                          # SCALE=cpu: tiny policies, small counts (hours on 2 cores)
    python reproduce.py --scale gpu              # full demo counts, GPU simulation, longer training
    python reproduce.py --only table1 fig7 --tasks open_drawer
    python reproduce.py --dry-run                # print the plan (the commands) and run nothing
    python reproduce.py --report-only            # tables and figures from the evaluations done so far

Every experiment is a set of runs of the project's scripts, each printed before it runs:
collect_demos.py (datasets), stage1_sft_cotrain.py (Stage I), stage2_rl_cotrain.py (Stage II) and
eval_real.py proxy (success on identical proxy_real initial states, noise-free protocol). A run
that two experiments need is made once (Table I's open_drawer pi05 runs are also points of Figs. 4
and 7). Rerunning reuses what is done: a dataset resumes to its requested size (a bigger one of the
same task and domain starts as a copy of the next smaller one: collect_demos.py writes episodes in
attempt order, so the first N episodes are the same), a stage whose final checkpoint exists is
skipped (an interrupted one resumes from its last checkpoint), and an evaluation is redone only
when its checkpoint changed.

Writes, under --out-dir (default results/reproduce_<scale>/): table1/table2 .json + .md, fig4-fig7
.json + .md + .png, summary.md (everything in one page), timings.jsonl (wall time of every command),
and evals/ (one eval_real.py output per run and variant).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro

from tables import comparisons_markdown, format_cell, load_records, paired_comparisons, summarize, to_markdown

TASKS = ("pick_and_place", "push_cube", "open_drawer", "close_drawer")  # envs.TASKS (importing envs loads ManiSkill)
POLICIES = {"openvla": "OpenVLA", "pi05": "pi0.5"}
VARIANTS = ("in_distribution", "unseen_objects", "unseen_states")
EXPERIMENTS = ("table1", "table2", "fig4", "fig5", "fig6", "fig7", "gap_sweep")
IMAGE_SIZE = 64  # the tiny policies' input size: bigger demos would only cost collection time
# Stage I sim ratio of "SFT co-training" and the start of RL-Co: the paper's Fig. 4 picks 0.5 for
# pick_and_place and 0.95 for open_drawer; it does not report the other two tasks' ratio.
COTRAIN_ALPHA = {"pick_and_place": 0.5, "push_cube": 0.5, "open_drawer": 0.95, "close_drawer": 0.5}
BETA = 0.1  # Stage II real-SFT weight of RL-Co (Eq. 5) wherever a figure does not sweep it
FIG7_TASK = "open_drawer"
# gap_sweep (no anchor has it): Table I's three paradigms on the scale's gap_sweep_task, pi0.5, at
# each proxy_real gap (0 = the sim twin, 1 = the full proxy_real) instead of the calibrated one
SWEEP_GAPS = (0.0, 0.25, 0.5, 0.75, 1.0)
DDOF = 1  # spread over training seeds: the sample std
# the Stage I settings a stage1_recipe may set besides its steps and --policy-overrides (each key is
# stage1_sft_cotrain.py's flag of that name)
RECIPE_FLAGS = ("lr", "start_frames", "start_weight", "ema_decay")

# Per scale: demo counts, Stage I steps and batch, Stage II env steps, parallel envs and monitoring
# (None: the script's preset for tiny policies), evaluation episodes (one noise-free evaluation per
# run), the sweeps and the training seeds (every run of every experiment is trained once per seed).
# cpu: the settings under which scripts/learnability.py met its criterion (close_drawer: 300 sim
# demos, 3000 Stage I steps; open_drawer with pi0.5: 10,000 steps, no state in the prompt; with
# OpenVLA: 6000 steps; pick_and_place with pi0.5: 15,000 steps at peak lr 1e-3, no state, a wrist
# camera, whose demos are recorded with both cameras; push_cube with pi0.5: 30,000 steps, no state,
# the wrist camera, each episode's first frame drawn 25 times as often, EMA 0.999; see stage1_recipe)
# and scripts/rl_gain.py's Stage II (20k env steps, 4 envs); 50 evaluation episodes on
# envs.eval_seeds(50), shared by every row.
SCALES = {
    "cpu": dict(sim_episodes=300, real_episodes=20, stage1_steps=3000, stage1_batch=32,
                # task -> policy -> Stage I steps, --policy-overrides and RECIPE_FLAGS settings of every
                # paradigm of that cell (the same architecture and training for real-only, co-train and sim-only)
                stage1_recipe={"open_drawer": {"pi05": dict(steps=10_000, overrides=["discrete_state_input", "false"]),
                                                "openvla": dict(steps=6000)},
                               "pick_and_place": {"pi05": dict(steps=15_000, lr=1e-3, overrides=[
                                   "discrete_state_input", "false", "wrist_camera", "true"])},
                               "push_cube": {"pi05": dict(steps=30_000, start_frames=1, start_weight=25.0, ema_decay=0.999, overrides=[
                                   "discrete_state_input", "false", "wrist_camera", "true"])}},
                stage2_env_steps=20_000, stage2_num_envs=4, stage2_eval_episodes=50, stage2_eval_num_envs=2,
                stage2_eval_every=50, eval_episodes=50, eval_num_envs=2, sim_backend="cpu", seeds=(1, 2, 3),
                alphas=(0.0, 0.5, 0.95, 1.0), betas=(0.0, 0.1, 1.0), fig7_real=(20, 50, 100),
                # Figs. 5 and 6 need a task that Stage I learns: they were run on open_drawer before
                # pick_and_place was learned at this scale (with the wrist camera)
                ablation_task="open_drawer", gap_sweep_task="close_drawer"),
    "gpu": dict(sim_episodes=1000, real_episodes=50, stage1_steps=5000, stage1_batch=64,
                stage2_env_steps=300_000, stage2_num_envs=64, stage2_eval_episodes=32, stage2_eval_num_envs=32,
                stage2_eval_every=None, eval_episodes=50, eval_num_envs=50, sim_backend="gpu", seeds=(1, 2, 3),
                alphas=(0.0, 0.25, 0.5, 0.75, 0.95, 1.0), betas=(0.0, 0.01, 0.1, 0.5, 1.0), fig7_real=(20, 50, 100, 200),
                ablation_task="pick_and_place", gap_sweep_task="pick_and_place"),  # the paper's ablations (sec. V-C): pick_and_place, pi0.5
    "ci": dict(sim_episodes=3, real_episodes=2, stage1_steps=4, stage1_batch=8,
               stage2_env_steps=16, stage2_num_envs=1, stage2_eval_episodes=1, stage2_eval_num_envs=1,
               stage2_eval_every=None, eval_episodes=2, eval_num_envs=1, sim_backend="cpu", seeds=(1, 2),
               alphas=(0.0, 0.5, 1.0), betas=(0.0, 0.1), fig7_real=(2, 3), ablation_task="pick_and_place",
               gap_sweep_task="open_drawer"),
}


@dataclass
class Args:
    scale: Literal["cpu", "gpu", "ci"] = "cpu"
    """cpu: tiny policies, small counts (hours on 2 cores); gpu: full demo counts, GPU simulation; ci: a few steps per stage"""
    only: tuple[Literal["table1", "table2", "fig4", "fig5", "fig6", "fig7", "gap_sweep"], ...] = EXPERIMENTS
    """experiments to run (and to tabulate/plot), e.g. --only table1 fig7"""
    tasks: tuple[Literal["pick_and_place", "push_cube", "open_drawer", "close_drawer"], ...] = TASKS
    """tasks to run; an experiment whose task is left out is skipped"""
    policies: tuple[Literal["openvla", "pi05"], ...] = tuple(POLICIES)
    """policy families of Table I (the other experiments are pi0.5's)"""
    seeds: Optional[tuple[int, ...]] = None
    """training seeds: every Stage I and Stage II run is made once per seed (default: the scale's)"""
    sweep_gaps: tuple[float, ...] = SWEEP_GAPS
    """gap_sweep: the proxy_real gaps (0 = the sim twin, 1 = full proxy_real) to train, evaluate and
    tabulate; a gap whose evaluations are missing is left out of the table"""
    dry_run: bool = False
    """print the plan (every command that would run) and run nothing"""
    report_only: bool = False
    """run nothing: write the tables and figures of --only/--tasks from the evaluations already in
    <out-dir>/evals (e.g. after running subsets of the study as separate processes)"""
    sim_backend: Optional[Literal["cpu", "gpu"]] = None
    """ManiSkill backend of Stage II and evaluation (default: the scale's, gpu for --scale gpu)"""
    data_dir: str = "data"
    """datasets go to <data-dir>/<task>/<domain>_<episodes>"""
    runs_dir: Optional[str] = None
    """training runs (default: runs/reproduce_<scale>)"""
    out_dir: Optional[str] = None
    """tables, figures and evaluations (default: results/reproduce_<scale>)"""


# ----------------------------------------------------------------------------------------------
# The plan: every command of every experiment, each run once
# ----------------------------------------------------------------------------------------------
def tag(x: float) -> str:
    """0.95 -> "0p95": names without dots (eval_real.py's --name and Path.with_suffix cut at a dot)."""
    return f"{x:g}".replace(".", "p")


def calibrated_gaps(out_dir: str | Path) -> dict:
    """task -> the proxy_real gap chosen by scripts/gap_calibration.py (its "chosen" in
    <out-dir>/gap_calibration.json); a task without one is evaluated at gap 1, the full proxy_real."""
    path = Path(out_dir) / "gap_calibration.json"
    chosen = json.loads(path.read_text()).get("chosen", {}) if path.exists() else {}
    return {t: float(chosen.get(t, 1.0)) for t in TASKS}


def build_plan(args: Args) -> tuple[dict, dict]:
    """(steps, inputs). steps: key -> step dict, in run order (what a step needs comes before it);
    inputs: experiment -> the list of points it tabulates, each naming the evals (one per training
    seed) or metrics it reads."""
    S = SCALES[args.scale]
    py = sys.executable
    data, runs = Path(args.data_dir), Path(args.runs_dir)
    evals = Path(args.out_dir) / "evals"
    backend = args.sim_backend or S["sim_backend"]
    seeds = args.seeds or S["seeds"]
    gaps = calibrated_gaps(args.out_dir)
    steps = {}

    # every function below takes gap=None: the task's calibrated gap (the gap sweep passes its own)
    def gap_of(task, gap=None):
        return gaps[task] if gap is None else gap

    def gtag(task, gap=None):  # run and dataset names carry the gap where it is not the full proxy_real
        return "" if gap_of(task, gap) == 1.0 else f"_gap{tag(gap_of(task, gap))}"

    def recipe_of(task, policy):  # the cell's Stage I recipe (steps, --policy-overrides, RECIPE_FLAGS), {} if none
        return S.get("stage1_recipe", {}).get(task, {}).get(policy, {})

    def wrist_of(task, policy):  # does the cell's policy read a wrist camera (its demos need one)?
        overrides = recipe_of(task, policy).get("overrides", [])
        return dict(zip(overrides[::2], overrides[1::2])).get("wrist_camera") == "true"

    def dataset(task, domain, n, gap=None, wrist=False):
        # the real demos come from the proxy_real domain at the task's gap, as its evaluations do
        gap = gap_of(task, gap) if domain == "proxy_real" else 1.0
        out = data / task / (f"{domain}{gtag(task, gap) if domain == 'proxy_real' else ''}_{n}" + ("_wrist" if wrist else ""))
        if str(out) not in steps:
            steps[str(out)] = dict(kind="collect", out=out, n=n, cmd=[
                py, "collect_demos.py", "--task", task, "--domain", domain, "--num-episodes", str(n),
                "--out", str(out), "--image-size", str(IMAGE_SIZE), *(["--gap", f"{gap:g}"] if gap != 1.0 else []),
                *(["--wrist-camera"] if wrist else [])])
        return out

    def stage1(task, policy, alpha, n_real, seed, gap=None):
        name = f"s1_{task}_{policy}_a{tag(alpha)}_r{n_real}{gtag(task, gap)}_s{seed}"
        if name not in steps:
            # both datasets, whatever alpha: the normalization statistics cover every dataset given
            wrist = wrist_of(task, policy)
            sim = ["--sim-data", str(dataset(task, "sim", S["sim_episodes"], wrist=wrist))]
            real = ["--real-data", str(dataset(task, "proxy_real", n_real, gap, wrist=wrist))]
            recipe = recipe_of(task, policy)
            total = recipe.get("steps", S["stage1_steps"])
            overrides = ["--policy-overrides", *recipe["overrides"]] if recipe.get("overrides") else []
            for key in RECIPE_FLAGS:  # the recipe's Stage I settings, e.g. lr -> --lr 0.001
                overrides += [f"--{key.replace('_', '-')}", f"{recipe[key]:g}"] if key in recipe else []
            # no monitoring evaluation (--eval-domains with nothing): eval_real.py measures the final
            # checkpoint; --eval-every still writes resumable checkpoints
            steps[name] = dict(kind="stage1", run=runs / name, cmd=[
                py, "stage1_sft_cotrain.py", "--task", task, "--policy", policy, "--alpha", f"{alpha:g}", *sim, *real,
                "--total-steps", str(total), "--batch-size", str(S["stage1_batch"]), *overrides,
                "--eval-every", str(max(1, total // 4)), "--eval-domains",
                "--seed", str(seed), "--runs-dir", str(runs), "--run-name", name])
        return name

    def stage2(task, policy, alpha, beta, n_real, seed, gap=None):
        init = stage1(task, policy, alpha, n_real, seed, gap)
        uses_real = alpha < 1 or beta > 0
        name = (f"s2_{task}_{policy}_a{tag(alpha)}_b{tag(beta)}" + (f"_r{n_real}" if uses_real else "")
                + f"{gtag(task, gap)}_s{seed}")
        if name not in steps:
            # stage2 reads the real dataset even at beta = 0 (its image size); it then adds no gradient
            real = dataset(task, "proxy_real", n_real, gap, wrist=wrist_of(task, policy))
            optional = [(flag, S[key]) for flag, key in (("--num-envs", "stage2_num_envs"),
                                                         ("--eval-episodes", "stage2_eval_episodes"),
                                                         ("--eval-num-envs", "stage2_eval_num_envs"),
                                                         ("--eval-every", "stage2_eval_every")) if S[key]]
            # sim evaluation only: it is Fig. 5's curve; proxy_real is measured by eval_real.py
            steps[name] = dict(kind="stage2", run=runs / name, cmd=[
                py, "stage2_rl_cotrain.py", "--task", task, "--init", str(runs / init / "checkpoints" / "final"),
                "--real-data", str(real), "--beta", f"{beta:g}", "--total-env-steps", str(S["stage2_env_steps"]),
                *[str(x) for pair in optional for x in pair], "--sim-backend", backend, "--eval-domains", "sim",
                "--no-save-video", "--seed", str(seed), "--runs-dir", str(runs), "--run-name", name])
        return name

    def evaluation(run, task, variant="in_distribution", gap=None):
        """One noise-free proxy_real evaluation of a run's final checkpoint on envs.eval_seeds: the
        same initial states for every run of the task, at the task's calibrated gap (or `gap`)."""
        key = f"{run}__{variant}"
        if key not in steps:
            steps[key] = dict(kind="eval", out=evals / key, checkpoint=runs / run / "checkpoints" / "final", cmd=[
                py, "eval_real.py", "proxy", "--checkpoint", str(runs / run / "checkpoints" / "final"),
                "--names", run, "--task", task, "--variant", variant, "--episodes", str(S["eval_episodes"]),
                "--num-envs", str(S["eval_num_envs"]), "--gap", f"{gap_of(task, gap):g}",
                "--image-size", str(IMAGE_SIZE), "--sim-backend", backend,
                "--videos", "1", "--name", key, "--out-dir", str(evals)])
        return key

    def per_seed(make_run, task, variant="in_distribution", gap=None):
        """The evaluation keys of one point, one per training seed."""
        return [evaluation(make_run(s), task, variant, gap) for s in seeds]

    n_real = S["real_episodes"]

    def three_paradigms(task, policy, n=n_real, variants=("in_distribution",), gap=None):
        """Table I's three paradigms for one task and policy: method -> {variant: [eval key per seed]}."""
        a = COTRAIN_ALPHA[task]
        rows = {"Real-only SFT": lambda s: stage1(task, policy, 0.0, n, s, gap),
                "SFT co-train": lambda s: stage1(task, policy, a, n, s, gap),
                "RL-Co": lambda s: stage2(task, policy, a, BETA, n, s, gap)}
        return {m: {v: per_seed(r, task, v, gap) for v in variants} for m, r in rows.items()}

    inputs = {}
    if "table1" in args.only:
        inputs["table1"] = [dict(policy=POLICIES[p], method=m, task=t, evals=ev["in_distribution"])
                            for t in args.tasks for p in args.policies for m, ev in three_paradigms(t, p).items()]
    if "table2" in args.only and "pick_and_place" in args.tasks:
        inputs["table2"] = [dict(method=m, variant=v, evals=keys) for m, ev in
                            three_paradigms("pick_and_place", "pi05", variants=VARIANTS).items() for v, keys in ev.items()]
    if "fig4" in args.only:
        inputs["fig4"] = []
        for t in [t for t in ("pick_and_place", "open_drawer") if t in args.tasks]:
            a = COTRAIN_ALPHA[t]
            for alpha in sorted(set(S["alphas"]) | {a}):
                inputs["fig4"].append(dict(task=t, sweep="alpha", x=alpha,
                                           evals=per_seed(lambda s: stage1(t, "pi05", alpha, n_real, s), t)))
            for beta in sorted(set(S["betas"]) | {BETA}):
                inputs["fig4"].append(dict(task=t, sweep="beta", x=beta, alpha=a,
                                           evals=per_seed(lambda s: stage2(t, "pi05", a, beta, n_real, s), t)))
    t = S["ablation_task"]  # Figs. 5 and 6
    if "fig5" in args.only and t in args.tasks:
        inputs["fig5"] = [dict(task=t, init=label, seed=s,
                               metrics=str(runs / stage2(t, "pi05", alpha, BETA, n_real, s) / "metrics.jsonl"))
                          for label, alpha in (("Real-only SFT init (alpha=0)", 0.0),
                                               (f"SFT co-train init (alpha={COTRAIN_ALPHA[t]:g})", COTRAIN_ALPHA[t]))
                          for s in seeds]
    if "fig6" in args.only and t in args.tasks:
        a = COTRAIN_ALPHA[t]
        inputs["fig6"] = [dict(task=t, setting=label,
                               evals=per_seed(lambda s: stage2(t, "pi05", alpha, beta, n_real, s), t))
                          for label, alpha, beta in (("RL-Co (real data in both stages)", a, BETA),
                                                     ("no real data in Stage II (beta=0)", a, 0.0),
                                                     ("no real data in Stage I (alpha=1)", 1.0, BETA),
                                                     ("no real data in either stage", 1.0, 0.0))]
        # the sim-only Stage I checkpoint itself: zero-shot transfer without RL, the bar the
        # last one is read against (did RL in sim alone move proxy_real success?)
        inputs["fig6"].append(dict(task=t, setting="sim-only SFT, no RL (alpha=1, Stage I alone)",
                                   evals=per_seed(lambda s: stage1(t, "pi05", 1.0, n_real, s), t)))
    if "fig7" in args.only and FIG7_TASK in args.tasks:
        inputs["fig7"] = [dict(method=m, n_real=n, evals=ev["in_distribution"]) for n in S["fig7_real"]
                          for m, ev in three_paradigms(FIG7_TASK, "pi05", n).items()]
    sweep_task = S["gap_sweep_task"]
    if "gap_sweep" in args.only and sweep_task in args.tasks:
        # the point at the task's calibrated gap is Table I's (same run names)
        inputs["gap_sweep"] = [dict(task=sweep_task, gap=g, method=m, evals=ev["in_distribution"])
                               for g in args.sweep_gaps
                               for m, ev in three_paradigms(sweep_task, "pi05", gap=g).items()]
    return steps, inputs


# ----------------------------------------------------------------------------------------------
# Running the plan, skipping what is done
# ----------------------------------------------------------------------------------------------
def run(cmd: list[str], args: Args, key: str, kind: str):
    print("\n$ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return
    t0 = time.time()
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"reproduce: step failed: {key} (rerun the same command to continue)")
    wall = time.time() - t0
    print(f"  ({wall:.0f} s)")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "timings.jsonl", "a") as f:
        f.write(json.dumps({"key": key, "kind": kind, "wall_s": round(wall, 1), "cmd": shlex.join(cmd[1:])}) + "\n")


def episodes_in(dataset: Path) -> int:
    info = dataset / "meta" / "info.json"
    return json.loads(info.read_text())["total_episodes"] if info.exists() else 0


def collect(step: dict, args: Args):
    out, n = step["out"], step["n"]
    if episodes_in(out) >= n:
        print(f"\n[skip] {out}: holds {episodes_in(out)} episodes")
        return
    if not out.exists():  # start from the biggest smaller collection of this task and domain
        domain = out.name.rsplit("_", 1)[0]
        smaller = [p for p in out.parent.glob(f"{domain}_*") if p.name.rsplit("_", 1)[1].isdigit()
                   and int(p.name.rsplit("_", 1)[1]) < n and (p / "meta" / "collection.json").exists()]
        if smaller:
            src = max(smaller, key=lambda p: int(p.name.rsplit("_", 1)[1]))
            print(f"\n$ cp -r {src} {out}")
            if not args.dry_run:
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                tmp.rename(out)
    run(step["cmd"], args, str(out), "collect")


def train(step: dict, args: Args, key: str):
    final = step["run"] / "checkpoints" / "final"
    if (final / "config.json").exists():
        print(f"\n[skip] {key}: {final} exists")
        return
    cmd = step["cmd"]
    if (step["run"] / "args.json").exists():
        resumable = [p for p in (step["run"] / "checkpoints").glob("*")
                     if p.name.isdigit() and (p / "trainer_state.pt").exists()]
        if resumable:
            cmd = cmd + ["--resume"]
        else:  # stopped before its first checkpoint: nothing to continue from
            print(f"\n$ rm -r {step['run']}")
            if not args.dry_run:
                shutil.rmtree(step["run"])
    run(cmd, args, key, step["kind"])


def evaluate(step: dict, args: Args, key: str):
    out, ckpt = step["out"], step["checkpoint"]
    stamp_file = out.with_suffix(".inputs.json")
    model = ckpt / "model.safetensors"
    stamp = {"checkpoint_mtime": model.stat().st_mtime if model.exists() else None, "cmd": step["cmd"][2:]}
    if out.with_suffix(".json").exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        print(f"\n[skip] {key}: up to date")
        return
    if not args.dry_run:  # <key>.json is written last by eval_real.py: it marks a finished evaluation
        out.with_suffix(".json").unlink(missing_ok=True)
    run(step["cmd"], args, key, "eval")
    if not args.dry_run:
        stamp["checkpoint_mtime"] = model.stat().st_mtime
        stamp_file.write_text(json.dumps(stamp, indent=1))


# ----------------------------------------------------------------------------------------------
# Tables and figures from the evaluations (pure file work: tests call these on synthetic files)
# ----------------------------------------------------------------------------------------------
def eval_records(evals: Path, key: str, method: str | None = None) -> list[dict] | None:
    """The episode records of a finished evaluation (None if it has not finished), renamed to `method`."""
    if not (evals / f"{key}.json").exists():
        return None
    records = load_records(evals / f"{key}.episodes.jsonl")
    return [{**r, "method": method or r["method"]} for r in records] or None


def training_seed(key: str) -> int:
    """The training seed in an evaluation key: runs are named ..._s<seed>, keys <run>__<variant>."""
    return int(re.search(r"_s(\d+)__", key).group(1))


def seed_records(evals: Path, keys: list[str], method: str) -> list[dict] | None:
    """The records of one point's evaluations, one per training seed, as one method whose
    "repeat" is the training seed (tables.summarize then gives mean, std and CI over seeds);
    None until every seed's evaluation has finished."""
    records = []
    for key in keys:
        recs = eval_records(evals, key, method)
        if recs is None:
            return None
        records += [{**r, "repeat": training_seed(key)} for r in recs]
    return records


def point(evals: Path, keys: list[str]) -> dict | None:
    """success (%) of one point: mean and sample std over training seeds (one noise-free evaluation
    each, on the same initial states) and the bootstrap CI over seeds and states."""
    return point_of(seed_records(evals, keys, "point"))


def point_of(records: list[dict] | None) -> dict | None:
    """point() of records already read by seed_records (None: not every seed evaluated yet)."""
    if records is None:
        return None
    table = summarize(records, ddof=DDOF)
    cell = table["rows"][0]["cells"][table["columns"][0]]
    return {"mean": cell["mean"], "std": cell["std"] or 0.0, "per_seed": cell["per_repeat"], "ci95": cell.get("ci95")}


def series_markdown(head: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def fmt(p: dict | None) -> str:
    return "-" if p is None else format_cell({"mean": p["mean"], "std": p["std"]})


def plot_lines(ax, xs, points, label, style=0):
    """A mean line with a shaded +- std band; missing points are left out. Each `style` has its own
    marker and dash, so that lines lying on top of each other (all at 0 %) stay visible."""
    import numpy as np

    have = [(x, p) for x, p in zip(xs, points) if p is not None]
    if not have:
        return
    x = np.array([h[0] for h in have], float)
    m = np.array([h[1]["mean"] for h in have])
    s = np.array([h[1]["std"] for h in have])
    ax.plot(x, m, marker="os^Dv"[style % 5], ls=("-", "--", ":", "-.")[style % 4], markersize=8 - 1.5 * (style % 3),
            label=label)
    ax.fill_between(x, m - s, m + s, alpha=0.2)


def aggregate(inputs: dict, evals: Path, out: Path, scale: str = "") -> dict:
    """Writes every table and figure whose inputs exist; returns {experiment: [files written]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written, pages = {}, []
    note = f" (scale {scale})" if scale else ""

    def save(name, payload, markdown, fig=None):
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / f"{name}.md").write_text(markdown)
        files = [out / f"{name}.json", out / f"{name}.md"]
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=120)
            plt.close(fig)
            files.append(out / f"{name}.png")
        written[name] = [str(f) for f in files]
        pages.append(markdown + (f"\n![{name}]({name}.png)\n" if fig is not None else ""))

    def gap_note(records):
        gaps = {r["task"]: r.get("gap") for r in records}
        return "proxy_real gap per task (scripts/gap_calibration.py): " + ", ".join(f"{t} {g:g}" if g is not None else
                                                                                  f"{t} ?" for t, g in gaps.items())

    # Table I: rows = policy x paradigm, columns = tasks (+ Avg); mean, std and CI over training seeds,
    # and paired tests on the shared initial states: RL-Co vs SFT co-train, SFT co-train vs real-only.
    # A cell not yet evaluated on every one of its training seeds is shown as "-" and named under the
    # table (never a mean over fewer seeds); so is its row's Avg.
    if inputs.get("table1"):
        rows = [f"{i['policy']}: {i['method']}" for i in inputs["table1"]]
        per_cell = [seed_records(evals, i["evals"], row) for i, row in zip(inputs["table1"], rows)]
        missing = [f"{row} on {i['task']}" for i, row, r in zip(inputs["table1"], rows, per_cell) if r is None]
        if len(missing) < len(per_cell):
            records = [x for r in per_cell if r is not None for x in r]
            table = summarize(records, ddof=DDOF)
            table["not_evaluated"] = missing
            table["rows"].sort(key=lambda row: rows.index(row["method"]))  # as planned, whichever cells are in
            policies = dict.fromkeys(i["policy"] for i in inputs["table1"])
            table["comparisons"] = paired_comparisons(records, [
                pair for p in policies for pair in ((f"{p}: RL-Co", f"{p}: SFT co-train"),
                                                    (f"{p}: SFT co-train", f"{p}: Real-only SFT"))])
            alphas = ", ".join(f"{t} {COTRAIN_ALPHA[t]:g}" for t in dict.fromkeys(i["task"] for i in inputs["table1"]))
            md = (f"### Table I: proxy_real success (%) by training paradigm{note}\n\n" + to_markdown(table)
                  + f"\nSFT co-train alpha per task: {alphas}; RL-Co: Stage II from the co-train checkpoint, "
                    f"beta={BETA:g}. Repeats are training seeds; {gap_note(records)}.\n\n"
                  + comparisons_markdown(table["comparisons"])
                  + (f"\nNot evaluated on every training seed (shown as -): {'; '.join(missing)}.\n" if missing else ""))
            save("table1", table, md)
    # Table II: pick_and_place, pi0.5, columns = variants with the drop from in_distribution
    if inputs.get("table2"):
        records = [seed_records(evals, i["evals"], i["method"]) for i in inputs["table2"]]
        if all(r is not None for r in records):
            records = [x for r in records for x in r]
            table = summarize(records, ddof=DDOF)
            save("table2", table, f"### Table II: pick_and_place, pi0.5, unseen settings{note}\n\n" + to_markdown(table)
                 + f"\nRepeats are training seeds; {gap_note(records)}.\n")
    # Fig. 4: alpha sweep (SFT co-training) and beta sweep (RL-Co at the task's alpha), per task
    if inputs.get("fig4"):
        pts = [{**i, **(point(evals, i["evals"]) or {"mean": None})} for i in inputs["fig4"]]
        tasks = list(dict.fromkeys(i["task"] for i in pts))
        if any(p["mean"] is not None for p in pts):
            fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 3.4 * len(tasks)), squeeze=False)
            rows = []
            for r, task in enumerate(tasks):
                for c, sweep in enumerate(("alpha", "beta")):
                    sel = [p for p in pts if p["task"] == task and p["sweep"] == sweep]
                    ok = [p if p["mean"] is not None else None for p in sel]
                    ax = axes[r][c]
                    label = "SFT co-train" if sweep == "alpha" else f"RL-Co (alpha={sel[0].get('alpha', 0):g})"
                    plot_lines(ax, [p["x"] for p in sel], ok, label)
                    if sweep == "beta":  # the Stage I checkpoint these runs start from
                        base = next((p for p in pts if p["task"] == task and p["sweep"] == "alpha"
                                     and p["x"] == sel[0]["alpha"] and p["mean"] is not None), None)
                        if base:
                            ax.axhline(base["mean"], ls="--", color="gray", label="its SFT co-train init")
                        ax.set_xscale("symlog", linthresh=0.01)
                        ax.set_xlim(left=-0.004)  # beta >= 0: no empty negative half
                    ax.set_xlabel(sweep)
                    ax.set_ylabel("proxy_real success (%)")
                    ax.set_title(f"{task}: {sweep} sweep")
                    ax.set_ylim(-5, 105)
                    ax.legend(fontsize=8)
                    rows += [[task, sweep, f"{p['x']:g}", fmt(o)] for p, o in zip(sel, ok)]
            save("fig4", pts, f"### Fig. 4: co-training ratio alpha and regularization weight beta (pi0.5){note}\n\n"
                 + series_markdown(["task", "sweep", "value", "success (%)"], rows), fig)
    # Fig. 5: sim success during Stage II, real-only init vs co-trained init, mean +- std over seeds
    if inputs.get("fig5"):
        curves = {}
        for i in inputs["fig5"]:
            path = Path(i["metrics"])
            if not path.exists():
                continue
            by_iter = {}  # iteration -> (env steps, success); a resumed run may log one twice: the last counts
            for line in path.read_text().splitlines():
                m = json.loads(line) if line.strip() else {}
                if "eval/success_sim" in m:
                    by_iter[m["iteration"]] = (m["global_step"], 100.0 * m["eval/success_sim"])
            if by_iter:
                curves.setdefault(i["init"], {})[i["seed"]] = [by_iter[it] for it in sorted(by_iter)]
        if curves:
            import numpy as np

            payload, rows = {}, []
            fig, ax = plt.subplots(figsize=(6, 4))
            for k, (init, seeds) in enumerate(curves.items()):
                # Every seed evaluates on one schedule (every --eval-every iterations, then at its
                # end), but an iteration's env steps differ between seeds (episodes end at different
                # steps): the n-th evaluations are averaged, at their mean env steps. A seed still
                # running has fewer: the curve stops where the last seed is.
                n = min(len(c) for c in seeds.values())
                steps = [int(round(np.mean([c[j][0] for c in seeds.values()]))) for j in range(n)]
                pts = [{"mean": float(np.mean([c[j][1] for c in seeds.values()])),
                        "std": float(np.std([c[j][1] for c in seeds.values()], ddof=DDOF)) if len(seeds) > DDOF else 0.0}
                       for j in range(n)]
                payload[init] = {"seeds": sorted(seeds), "env_steps": steps, "points": pts}
                plot_lines(ax, steps, pts, f"{init}, {len(seeds)} seed(s)", style=k)
                rows += [[init, s, fmt(p)] for s, p in zip(steps, pts)]
            ax.set_xlabel("Stage II env steps")
            ax.set_ylabel("sim success (%)")
            ax.set_ylim(-5, 105)
            ax.legend(fontsize=8)
            save("fig5", payload, f"### Fig. 5: sim success during Stage II ({inputs['fig5'][0]['task']}, pi0.5, beta={BETA:g}){note}\n\n"
                 + series_markdown(["init", "env steps", "sim success (%), mean +- std over seeds"], rows), fig)
    # Fig. 6: real supervision removed from Stage I, Stage II or both
    if inputs.get("fig6"):
        per_setting = [seed_records(evals, i["evals"], i["setting"]) for i in inputs["fig6"]]
        pts = [{**i, **(point_of(r) or {"mean": None})} for i, r in zip(inputs["fig6"], per_setting)]
        if any(p["mean"] is not None for p in pts):
            have = [p for p in pts if p["mean"] is not None]
            fig, ax = plt.subplots(figsize=(8, 4))
            ax.bar(range(len(have)), [p["mean"] for p in have], yerr=[p["std"] for p in have], capsize=4)
            ax.set_xticks(range(len(have)), [p["setting"].replace(" (", "\n(") for p in have], fontsize=7)
            ax.set_ylabel("proxy_real success (%)")
            ax.set_ylim(0, 105)
            # paired tests on the shared initial states, one per reading of the figure: each removal
            # against RL-Co, real SFT in Stage II without real data in Stage I, and RL in sim alone
            # against the sim-only checkpoint it started from
            rlco, no_s2, no_s1, neither, stage1_alone = (i["setting"] for i in inputs["fig6"])
            records = [r for recs in per_setting for r in recs or []]
            comparisons = paired_comparisons(records, [(rlco, no_s2), (rlco, no_s1), (no_s1, neither),
                                                       (neither, stage1_alone)])
            save("fig6", {"points": pts, "comparisons": comparisons},
                 f"### Fig. 6: real supervision removed ({inputs['fig6'][0]['task']}, pi0.5){note}\n\n"
                 + series_markdown(["setting", "success (%)"],
                                   [[p["setting"], fmt(p if p["mean"] is not None else None)] for p in pts])
                 + "\nRepeats are training seeds; seed s of every setting is evaluated on the same initial states.\n\n"
                 + comparisons_markdown(comparisons), fig)
    # Fig. 7: success vs number of real demos, for the three paradigms
    if inputs.get("fig7"):
        pts = [{**i, **(point(evals, i["evals"]) or {"mean": None})} for i in inputs["fig7"]]
        if any(p["mean"] is not None for p in pts):
            fig, ax = plt.subplots(figsize=(6, 4))
            methods = list(dict.fromkeys(p["method"] for p in pts))
            ns = sorted({p["n_real"] for p in pts})
            for k, m in enumerate(methods):
                by_n = {p["n_real"]: p for p in pts if p["method"] == m and p["mean"] is not None}
                plot_lines(ax, ns, [by_n.get(n) for n in ns], m, style=k)
            ax.set_xticks(ns)
            ax.set_xlabel("real (proxy_real) demos")
            ax.set_ylabel("proxy_real success (%)")
            ax.set_ylim(-5, 105)
            ax.legend(fontsize=8)
            cell = {(p["method"], p["n_real"]): p for p in pts}
            rows = [[m] + [fmt(cell[(m, n)] if cell[(m, n)]["mean"] is not None else None) for n in ns]
                    for m in methods]
            save("fig7", pts, f"### Fig. 7: number of real demos ({FIG7_TASK}, pi0.5){note}\n\n"
                 + series_markdown(["method"] + [f"{n} demos" for n in ns], rows), fig)
    # Gap sweep: the three paradigms against the proxy_real gap (columns = gaps; a gap is shown once
    # every paradigm and training seed of it is evaluated), paired tests per gap
    if inputs.get("gap_sweep"):
        task, records, done = inputs["gap_sweep"][0]["task"], [], []
        for g in dict.fromkeys(i["gap"] for i in inputs["gap_sweep"]):
            at_g = [seed_records(evals, i["evals"], i["method"]) for i in inputs["gap_sweep"] if i["gap"] == g]
            if all(r is not None for r in at_g):
                done.append(g)
                records += [{**r, "task": f"gap {g:g}"} for recs in at_g for r in recs]
        if records:
            table = summarize(records, ddof=DDOF, avg=False)  # a mean over gaps means nothing
            table["comparisons"] = paired_comparisons(records, [("RL-Co", "SFT co-train"),
                                                                ("SFT co-train", "Real-only SFT")])
            table["task"], table["gaps"] = task, done
            fig, ax = plt.subplots(figsize=(6, 4))
            for k, row in enumerate(table["rows"]):
                cells = [row["cells"][f"gap {g:g}"] for g in done]
                plot_lines(ax, done, [{"mean": c["mean"], "std": c["std"] or 0.0} for c in cells], row["method"], style=k)
            ax.set_xticks(done)
            ax.set_xlabel("proxy_real gap (0 = the sim twin, 1 = full proxy_real)")
            ax.set_ylabel("proxy_real success (%)")
            ax.set_ylim(-5, 105)
            ax.legend(fontsize=8)
            save("gap_sweep", table, f"### Success against the sim-real gap ({task}, pi0.5){note}\n\n"
                 + to_markdown(table) + f"\nSFT co-train alpha {COTRAIN_ALPHA[task]:g}; RL-Co: Stage II from the "
                 f"co-train checkpoint, beta={BETA:g}. Real demos and evaluation at each column's gap. Repeats are "
                 "training seeds.\n\n" + comparisons_markdown(table["comparisons"]), fig)
    if pages:
        (out / "summary.md").write_text(f"# RL-Co study{note}\n\nSuccess rates in %: one noise-free evaluation "
                                        "per run on the same initial states, mean +- sample std over training "
                                        "seeds.\n\n" + "\n".join(pages))
    return written


def main(args: Args):
    args.runs_dir = args.runs_dir or f"runs/reproduce_{args.scale}"
    args.out_dir = args.out_dir or f"results/reproduce_{args.scale}"
    if (args.sim_backend or SCALES[args.scale]["sim_backend"]) == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # env worker processes share the cores
    if not all(0.0 <= g <= 1.0 for g in args.sweep_gaps):
        sys.exit(f"reproduce: --sweep-gaps must lie in [0, 1] (0 = the sim twin, 1 = full proxy_real), "
                 f"got {' '.join(f'{g:g}' for g in args.sweep_gaps)}")
    steps, inputs = build_plan(args)
    kinds = [s["kind"] for s in steps.values()]
    print(f"reproduce ({args.scale}): {', '.join(inputs) or 'nothing'}: {kinds.count('collect')} datasets, "
          f"{kinds.count('stage1')} Stage I runs, {kinds.count('stage2')} Stage II runs, "
          f"{kinds.count('eval')} evaluations" + (" (dry run: nothing runs)" if args.dry_run else "")
          + (" (report only: nothing runs)" if args.report_only else ""))
    gaps = calibrated_gaps(args.out_dir)
    print(f"  training seeds {', '.join(map(str, args.seeds or SCALES[args.scale]['seeds']))}; proxy_real gap per task "
          f"(from {args.out_dir}/gap_calibration.json, else 1): " + ", ".join(f"{t} {gaps[t]:g}" for t in args.tasks))
    t0 = time.time()
    if not args.report_only:
        for key, step in steps.items():
            if step["kind"] == "collect":
                collect(step, args)
            elif step["kind"] == "eval":
                evaluate(step, args, key)
            else:
                train(step, args, key)
    if args.dry_run:
        return
    written = aggregate(inputs, Path(args.out_dir) / "evals", Path(args.out_dir), args.scale)
    summary = {"args": asdict(args), "scale": SCALES[args.scale], "written": written,
               "runs": [k for k, s in steps.items() if s["kind"] in ("stage1", "stage2")],
               "wall_s_this_invocation": time.time() - t0}
    (Path(args.out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {', '.join(written) or 'nothing'} to {args.out_dir}/ ({time.time() - t0:.0f} s); "
          f"all of it in {args.out_dir}/summary.md")


if __name__ == "__main__":
    main(tyro.cli(Args))
