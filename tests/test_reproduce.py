"""reproduce.py: the plan (every run once, shared runs shared, every figure's inputs made by some
step), the skip/resume decisions, and the tables and figures from synthetic evaluation files.
No env runs and no training here: everything is plain file work."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval_real  # noqa: E402
import reproduce  # noqa: E402


def make_args(tmp_path, **kw):
    args = reproduce.Args(data_dir=str(tmp_path / "data"), runs_dir=str(tmp_path / "runs"),
                          out_dir=str(tmp_path / "results"), **kw)
    return args


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["ci", "cpu", "gpu"])
def test_plan_runs_everything_once_and_in_dependency_order(tmp_path, scale):
    steps, inputs = reproduce.build_plan(make_args(tmp_path, scale=scale))
    assert set(inputs) == set(reproduce.EXPERIMENTS)
    cmds = [tuple(s["cmd"]) for s in steps.values()]
    assert len(set(cmds)) == len(cmds), "two steps run the same command"
    outputs = {}  # what each step makes -> its position
    for i, (key, s) in enumerate(steps.items()):
        cmd = s["cmd"]
        if s["kind"] == "collect":
            made = [flag(cmd, "--out")]
        elif s["kind"] in ("stage1", "stage2"):
            assert flag(cmd, "--run-name") == key and str(s["run"]) == str(Path(flag(cmd, "--runs-dir")) / key)
            made = [str(s["run"] / "checkpoints" / "final"), str(s["run"] / "metrics.jsonl")]
            # what it reads was made by an earlier step
            for need in (flag(cmd, "--sim-data"), flag(cmd, "--real-data"), flag(cmd, "--init")):
                assert need is None or outputs[need] < i, (key, need)
        else:
            assert outputs[flag(cmd, "--checkpoint")] < i, key
            assert flag(cmd, "--name") == key
            made = [key]
        for m in made:
            assert m not in outputs, f"{m} is made twice"
            outputs[m] = i
    # every table and figure reads what some step makes
    seeds = reproduce.SCALES[scale]["seeds"]
    for exp, points in inputs.items():
        assert points, exp
        for p in points:
            if "metrics" in p:
                assert p["metrics"] in outputs, (exp, p)
                continue
            # one evaluation per training seed, of runs trained with that seed
            assert len(p["evals"]) == len(seeds) and all(k in outputs for k in p["evals"]), (exp, p)
            assert [reproduce.training_seed(k) for k in p["evals"]] == list(seeds)
            for k, seed in zip(p["evals"], seeds):
                run = steps[Path(flag(steps[k]["cmd"], "--checkpoint")).parent.parent.name]
                assert flag(run["cmd"], "--seed") == str(seed)
    # the hand count of the cpu study (sweeps include the tasks' own alpha and BETA):
    # Table I 4 tasks x 2 policies x (2 Stage I + 1 Stage II); Fig. 4 alphas 0.95 and 1 on
    # pick_and_place, 0.5 and 1 on open_drawer, betas 0 and 1 on both; Fig. 5 the real-only init;
    # Fig. 6 alpha=1 with beta 0.1 and 0; Fig. 7 two more demo counts x 3 paradigms; the gap sweep
    # 4 more gaps x 3 paradigms (close_drawer's calibrated gap 1 is Table I's); each of them once per
    # training seed (3); the datasets once
    if scale == "cpu":
        kinds = [s["kind"] for s in steps.values()]
        assert kinds.count("stage1") == 3 * (16 + 4 + 4 + 4 * 2)
        assert kinds.count("stage2") == 3 * (8 + 4 + 1 + 2 + 2 + 4)
        assert kinds.count("eval") == 3 * (24 + 6 + 8 + 2 + 6 + 4 * 3)
        # sim + real per task, Fig. 7's 50 and 100 demos, the gap sweep's real demos at 4 more gaps,
        # pick_and_place's and push_cube's sim + real demos with the wrist camera (pi0.5's recipe there)
        assert kinds.count("collect") == 4 * 2 + 2 + 4 + 2 * 2


def test_plan_shares_runs_between_experiments(tmp_path):
    steps, inputs = reproduce.build_plan(make_args(tmp_path, scale="cpu"))
    S = reproduce.SCALES["cpu"]
    t1 = {(p["task"], p["policy"], p["method"]): p["evals"] for p in inputs["table1"]}
    od = {m: t1[("open_drawer", "pi0.5", m)] for m in ("Real-only SFT", "SFT co-train", "RL-Co")}
    pp = {m: t1[("pick_and_place", "pi0.5", m)] for m in ("Real-only SFT", "SFT co-train", "RL-Co")}
    fig4 = {(p["task"], p["sweep"], p["x"]): p["evals"] for p in inputs["fig4"]}
    assert fig4[("open_drawer", "alpha", 0.0)] == od["Real-only SFT"]
    assert fig4[("open_drawer", "alpha", 0.95)] == od["SFT co-train"]
    assert fig4[("open_drawer", "beta", 0.1)] == od["RL-Co"]
    assert fig4[("pick_and_place", "alpha", 0.5)] == pp["SFT co-train"]
    fig7 = {(p["method"], p["n_real"]): p["evals"] for p in inputs["fig7"]}
    assert {m: fig7[(m, S["real_episodes"])] for m in od} == od
    assert len({k for keys in fig7.values() for k in keys}) == len(fig7) * len(S["seeds"])
    t2 = {(p["method"], p["variant"]): p["evals"] for p in inputs["table2"]}
    assert {m: t2[(m, "in_distribution")] for m in pp} == pp
    assert {k[1] for k in t2} == set(reproduce.VARIANTS)
    # Figs. 5 and 6 on the scale's ablation task (open_drawer at the cpu scale)
    assert S["ablation_task"] == "open_drawer"
    fig6 = [p["evals"] for p in inputs["fig6"]]
    assert fig6[0] == od["RL-Co"] and fig6[1] == fig4[("open_drawer", "beta", 0.0)]
    assert fig6[2] == [k.replace("a0p95_b0p1", "a1_b0p1") for k in fig4[("open_drawer", "beta", 0.1)]]
    assert fig6[4] == ["s1_" + k[len("s2_"):].replace("_b0p1", "") for k in fig6[2]]  # Stage I alone
    assert len({k for keys in fig6 for k in keys}) == 5 * len(S["seeds"])
    # Fig. 5: the co-trained init's curve is Table I's RL-Co run; the real-only init starts from
    # Table I's real-only Stage I checkpoint
    # Table I's runs of every seed, and a real-only init curve per seed from that seed's checkpoint
    for i, seed in enumerate(S["seeds"]):
        rlco_run = steps[od["RL-Co"][i]]["checkpoint"].parent.parent
        fig5 = {p["init"]: p["metrics"] for p in inputs["fig5"] if p["seed"] == seed}
        assert str(rlco_run / "metrics.jsonl") in fig5.values()
        real_only = next(m for k, m in fig5.items() if "alpha=0)" in k)
        real_only_init = flag(steps[Path(real_only).parent.name]["cmd"], "--init")
        assert real_only_init == str(steps[od["Real-only SFT"][i]]["checkpoint"])
    # the real data of Fig. 7's points: one dataset per demo count, Table I's for its own count
    for (m, n), keys in fig7.items():
        for key in keys:
            run = steps[Path(flag(steps[key]["cmd"], "--checkpoint")).parent.parent.name]
            assert flag(run["cmd"], "--real-data").endswith(f"proxy_real_{n}")


def test_names_match_the_envs_module():
    import envs  # reproduce.py keeps copies: importing envs loads ManiSkill

    assert reproduce.TASKS == envs.TASKS and reproduce.VARIANTS == envs.VARIANTS
    assert set(reproduce.COTRAIN_ALPHA) == set(envs.TASKS)


def test_only_and_tasks_restrict_the_plan(tmp_path):
    steps, inputs = reproduce.build_plan(make_args(tmp_path, scale="ci", only=("table1",), tasks=("open_drawer",)))
    assert set(inputs) == {"table1"}
    kinds = [s["kind"] for s in steps.values()]
    # ci: 2 training seeds x 2 policies x (2 Stage I + 1 Stage II) runs and 3 evaluations
    assert (kinds.count("collect"), kinds.count("stage1"), kinds.count("stage2"), kinds.count("eval")) == (2, 8, 4, 12)
    steps, inputs = reproduce.build_plan(make_args(tmp_path, scale="ci", only=("table1",), tasks=("open_drawer",),
                                                   policies=("pi05",), seeds=(7,)))
    assert [p["policy"] for p in inputs["table1"]] == ["pi0.5"] * 3
    assert all(k.endswith("_s7__in_distribution") for p in inputs["table1"] for k in p["evals"])
    steps, inputs = reproduce.build_plan(make_args(tmp_path, scale="ci", only=("table2", "fig5", "fig7"),
                                                   tasks=("open_drawer",)))
    assert set(inputs) == {"fig7"}  # Table II and Fig. 5 are pick_and_place experiments


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path):
    cmd = [sys.executable, "reproduce.py", "--dry-run", "--scale", "ci", "--only", "table1", "--tasks", "open_drawer",
           "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
           "--out-dir", str(tmp_path / "results")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = [line[2:] for line in done.stdout.splitlines() if line.startswith("$ ")]
    steps, _ = reproduce.build_plan(make_args(tmp_path, scale="ci", only=("table1",), tasks=("open_drawer",)))
    import shlex
    assert printed == [shlex.join(s["cmd"]) for s in steps.values()]
    assert "2 datasets, 8 Stage I runs, 4 Stage II runs, 12 evaluations" in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_skip_resume_and_restart_decisions(tmp_path, capsys, monkeypatch):
    args = make_args(tmp_path, scale="ci", only=("table1",), tasks=("open_drawer",), dry_run=True)
    steps, _ = reproduce.build_plan(args)
    s1, s1b = [k for k, s in steps.items() if s["kind"] == "stage1"][:2]
    s2 = next(k for k, s in steps.items() if s["kind"] == "stage2")
    sim_step = next(s for s in steps.values() if s["kind"] == "collect" and s["out"].name.startswith("sim_"))
    real_step = next(s for s in steps.values() if s["kind"] == "collect" and s["out"].name.startswith("proxy_real_"))
    # a finished Stage I run is skipped; an interrupted one with a checkpoint resumes; one that
    # stopped before its first checkpoint starts again
    (steps[s1]["run"] / "checkpoints" / "final").mkdir(parents=True)
    (steps[s1]["run"] / "checkpoints" / "final" / "config.json").write_text("{}")
    (steps[s1b]["run"] / "checkpoints" / "2").mkdir(parents=True)
    (steps[s1b]["run"] / "args.json").write_text("{}")
    (steps[s1b]["run"] / "checkpoints" / "2" / "trainer_state.pt").write_text("")
    steps[s2]["run"].mkdir(parents=True)
    (steps[s2]["run"] / "args.json").write_text("{}")
    # a dataset with enough episodes is skipped; a bigger one starts as a copy of a smaller one
    sim = sim_step["out"]
    (sim / "meta").mkdir(parents=True)
    (sim / "meta" / "info.json").write_text(json.dumps({"total_episodes": sim_step["n"]}))
    smaller = real_step["out"].with_name("proxy_real_1")
    (smaller / "meta").mkdir(parents=True)
    (smaller / "meta" / "collection.json").write_text("{}")
    (smaller / "meta" / "info.json").write_text(json.dumps({"total_episodes": 1}))
    reproduce.main(args)
    out = capsys.readouterr().out
    assert f"[skip] {sim}" in out and f"[skip] {s1}:" in out
    resumed = next(line for line in out.splitlines() if f"--run-name {s1b}" in line)
    assert resumed.endswith("--resume")
    assert f"$ rm -r {steps[s2]['run']}" in out
    assert next(line for line in out.splitlines() if f"--run-name {s2}" in line).endswith(s2)
    assert f"$ cp -r {smaller} {real_step['out']}" in out
    assert steps[s2]["run"].exists() and not real_step["out"].exists()  # a dry run changes nothing

    # the real thing, with the scripts replaced by a recorder
    ran = []
    monkeypatch.setattr(reproduce.subprocess, "run", lambda cmd: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    args.dry_run = False
    reproduce.collect(real_step, args)
    assert (real_step["out"] / "meta" / "collection.json").exists() and ran[-1] == real_step["cmd"]
    reproduce.train(steps[s2], args, s2)
    assert not steps[s2]["run"].exists() and "--resume" not in ran[-1]
    # an evaluation is redone when its checkpoint changes, else skipped
    ev = next(k for k, s in steps.items() if s["kind"] == "eval")
    ckpt = steps[ev]["checkpoint"]
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "model.safetensors").write_text("a")
    steps[ev]["out"].parent.mkdir(parents=True, exist_ok=True)
    steps[ev]["out"].with_suffix(".json").write_text("{}")  # as eval_real.py would at its end
    n = len(ran)
    reproduce.evaluate(steps[ev], args, ev)
    assert len(ran) == n + 1 and not steps[ev]["out"].with_suffix(".json").exists()  # stale result removed first
    steps[ev]["out"].with_suffix(".json").write_text("{}")
    reproduce.evaluate(steps[ev], args, ev)
    assert len(ran) == n + 1
    import os
    st = (ckpt / "model.safetensors").stat()
    os.utime(ckpt / "model.safetensors", (st.st_atime, st.st_mtime + 10))
    reproduce.evaluate(steps[ev], args, ev)
    assert len(ran) == n + 2
    timings = [json.loads(line) for line in (tmp_path / "results" / "timings.jsonl").read_text().splitlines()]
    assert [t["kind"] for t in timings] == ["collect", "stage2", "eval", "eval"]


# ---------------------------------------------------------------------------------------------
# tables and figures from synthetic evaluations
# ---------------------------------------------------------------------------------------------
def write_eval(evals: Path, key: str, cmd: list[str], wins: int, episodes: int = 4):
    """An evaluation as eval_real.py proxy leaves it (one noise-free repeat on the states
    1_000_000 + i, the first `wins` of them successes): <key>.episodes.jsonl, then <key>.json/.md."""
    records = [{"method": flag(cmd, "--names"), "checkpoint": flag(cmd, "--checkpoint"), "task": flag(cmd, "--task"),
                "variant": flag(cmd, "--variant"), "domain": "proxy_real", "repeat": 0, "seed": 1_000_000 + i,
                "gap": float(flag(cmd, "--gap")), "success": i < wins, "steps": 10} for i in range(episodes)]
    for rec in records:
        eval_real.append_record(evals / f"{key}.episodes.jsonl", rec)
    eval_real.write_table(eval_real.summarize(records), evals / key)


def write_point(evals: Path, steps: dict, keys: list[str], wins: tuple[int, ...]):
    """A point's evaluations, one per training seed, with wins[i] successes out of 4 for seed i."""
    for key, w in zip(keys, wins):
        write_eval(evals, key, steps[key]["cmd"], w)


def md_row(text: str, first: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def no_ci(cells: list[str]) -> list[str]:
    """Table cells without their bracketed confidence interval."""
    return [c.split(" [")[0] for c in cells]


def test_tables_and_figures_from_synthetic_evaluations(tmp_path):
    args = make_args(tmp_path, scale="ci")  # training seeds 1 and 2
    steps, inputs = reproduce.build_plan(args)
    evals, out = tmp_path / "results" / "evals", tmp_path / "results"
    by = lambda exp, **kw: next(p["evals"] for p in inputs[exp] if all(p[k] == v for k, v in kw.items()))  # noqa: E731
    special = {  # point -> successes of 4 episodes for seeds 1 and 2; every other point: 2/4 and 2/4
        tuple(by("table1", task="open_drawer", policy="pi0.5", method="RL-Co")): (3, 1),  # 75, 25: 50 +- 35.4
        tuple(by("table2", method="RL-Co", variant="unseen_objects")): (1, 1),            # 25 +- 0, drop 50 %
        tuple(by("fig4", task="open_drawer", sweep="alpha", x=0.5)): (4, 3),              # 87.5 +- 17.7
        tuple(by("fig6", setting="no real data in either stage")): (0, 1),                # 12.5 +- 17.7
        tuple(by("fig7", method="SFT co-train", n_real=3)): (1, 2),                       # 37.5 +- 17.7
    }
    written_keys = set()
    for keys, wins in special.items():
        write_point(evals, steps, list(keys), wins)
        written_keys |= set(keys)
    for key, s in steps.items():
        if s["kind"] == "eval" and key not in written_keys:
            write_eval(evals, key, s["cmd"], 2)
    # Fig. 5 curves, evaluations every 50 iterations and at the end, as Stage II logs them: the
    # seeds' env steps at an iteration differ; seed 1 logs iteration 50 twice (a resumed run: the
    # last one counts) and its final evaluation at iteration 104, which seed 2 (still running)
    # has not reached (left out of the mean)
    logs = {1: [(0, 0, 0.0), (50, 9600, 0.9), (50, 9600, 0.1), (100, 19200, 0.2), (104, 20100, 0.5)],
            2: [(0, 0, 0.0), (50, 9500, 0.3), (100, 19000, 0.2)]}
    for p in inputs["fig5"]:
        path = Path(p["metrics"])
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [{"iteration": 1, "global_step": 96, "train/loss": 1.0}]
        lines += [{"iteration": i, "global_step": g, "eval/success_sim": v} for i, g, v in logs[p["seed"]]]
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))

    written = reproduce.aggregate(inputs, evals, out, "ci")
    assert set(written) == set(reproduce.EXPERIMENTS)
    for files in written.values():
        for f in files:
            assert Path(f).stat().st_size > 0
            if f.endswith(".png"):
                assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    t1 = json.loads((out / "table1.json").read_text())
    assert t1["columns"] == list(reproduce.TASKS) + ["Avg"]
    rows = {r["method"]: r["cells"] for r in t1["rows"]}
    assert len(rows) == 6 and "pi0.5: RL-Co" in rows and "OpenVLA: Real-only SFT" in rows
    cell = rows["pi0.5: RL-Co"]["open_drawer"]
    # per seed 75 and 25: mean 50, sample std 25 * sqrt(2)
    assert (cell["mean"], cell["std"]) == pytest.approx((50.0, 35.3553), abs=1e-3)
    assert cell["per_repeat"] == {"1": 75.0, "2": 25.0} and cell["seeds"] == [1, 2]
    lo, hi = cell["ci95"]
    assert 0.0 <= lo < 50.0 < hi <= 100.0
    # Avg per seed over the 4 tasks: (3 * 50 + 75) / 4 = 56.25 and (3 * 50 + 25) / 4 = 43.75
    assert (rows["pi0.5: RL-Co"]["Avg"]["mean"], rows["pi0.5: RL-Co"]["Avg"]["std"]) == pytest.approx((50.0, 8.8388), abs=1e-3)
    assert (rows["OpenVLA: RL-Co"]["Avg"]["mean"], rows["OpenVLA: RL-Co"]["Avg"]["std"]) == pytest.approx((50.0, 0.0))
    md = (out / "table1.md").read_text()
    assert no_ci(md_row(md, "pi0.5: RL-Co")[1:]) == ["50.0 +- 0.0", "50.0 +- 0.0", "50.0 +- 35.4", "50.0 +- 0.0", "50.0 +- 8.8"]
    # paired tests per policy and task: RL-Co vs SFT co-train, SFT co-train vs real-only
    comps = {(c["a"], c["b"], c["task"]): c for c in t1["comparisons"]}
    assert len(comps) == 2 * 2 * 4
    c = comps[("pi0.5: RL-Co", "pi0.5: SFT co-train", "open_drawer")]
    # per state, mean over seeds: RL-Co (1, 0.5, 0.5, 0) vs co-train (1, 1, 0, 0): differences cancel
    assert c["diff_pct"] == pytest.approx(0.0) and c["p_value"] == pytest.approx(1.0)
    assert c["n_states"] == 4 and c["seeds_a"] == c["seeds_b"] == 2
    assert comps[("OpenVLA: RL-Co", "OpenVLA: SFT co-train", "open_drawer")]["diff_pct"] == 0.0
    assert "p-value" in md or "p =" in md

    t2 = json.loads((out / "table2.json").read_text())
    assert t2["columns"] == list(reproduce.VARIANTS)
    c = next(r for r in t2["rows"] if r["method"] == "RL-Co")["cells"]["unseen_objects"]
    assert (c["mean"], c["std"], c["drop_pct"]) == pytest.approx((25.0, 0.0, 50.0))
    assert md_row((out / "table2.md").read_text(), "RL-Co")[2].startswith("25.0 +- 0.0")
    assert md_row((out / "table2.md").read_text(), "RL-Co")[2].endswith("(-50.0%)")

    f4 = json.loads((out / "fig4.json").read_text())
    p = next(p for p in f4 if p["task"] == "open_drawer" and p["sweep"] == "alpha" and p["x"] == 0.5)
    assert (p["mean"], p["std"]) == pytest.approx((87.5, 17.6777), abs=1e-3)
    assert p["per_seed"] == {"1": 100.0, "2": 75.0}
    assert sorted(p["x"] for p in f4 if p["task"] == "open_drawer" and p["sweep"] == "alpha") == [0.0, 0.5, 0.95, 1.0]
    assert "| open_drawer | alpha | 0.5 | 87.5 +- 17.7 |" in (out / "fig4.md").read_text()

    f5 = json.loads((out / "fig5.json").read_text())
    assert len(f5) == 2
    for curve in f5.values():
        assert curve["seeds"] == [1, 2] and curve["env_steps"] == [0, 9550, 19100]
        assert [q["mean"] for q in curve["points"]] == pytest.approx([0.0, 20.0, 20.0])
        assert [q["std"] for q in curve["points"]] == pytest.approx([0.0, 14.1421, 0.0], abs=1e-3)

    f6 = json.loads((out / "fig6.json").read_text())
    assert [p["mean"] for p in f6["points"]] == pytest.approx([50.0, 50.0, 50.0, 12.5, 50.0])
    assert [p["std"] for p in f6["points"]] == pytest.approx([0.0, 0.0, 0.0, 17.6777, 0.0], abs=1e-3)
    # paired on the shared states: RL-Co vs each removal, alpha 1 with vs without beta, sim RL alone
    # vs its Stage I checkpoint
    f6_diffs = {(c["a"].split(" (")[0], c["b"].split(" (")[0]): c["diff_pct"] for c in f6["comparisons"]}
    assert f6_diffs == pytest.approx({("RL-Co", "no real data in Stage II"): 0.0, ("RL-Co", "no real data in Stage I"): 0.0,
                                      ("no real data in Stage I", "no real data in either stage"): 37.5,
                                      ("no real data in either stage", "sim-only SFT, no RL"): -37.5})
    assert "| no real data in either stage | 12.5 +- 17.7 |" in (out / "fig6.md").read_text()

    f7md = (out / "fig7.md").read_text()
    assert md_row(f7md, "method") == ["method", "2 demos", "3 demos"]
    assert md_row(f7md, "SFT co-train") == ["SFT co-train", "50.0 +- 0.0", "37.5 +- 17.7"]
    summary = (out / "summary.md").read_text()
    for name in reproduce.EXPERIMENTS:
        assert (out / f"{name}.md").read_text() in summary

    # an evaluation that has not finished (eval_real.py writes <key>.json last) counts as missing, and
    # one seed missing is the point missing: Table I and the figures show it as "-" (Table I also its
    # row's Avg, and names it under the table), never a mean over fewer seeds
    (evals / f"{by('fig7', method='SFT co-train', n_real=3)[1]}.json").unlink()
    (evals / f"{by('table1', task='pick_and_place', policy='OpenVLA', method='RL-Co')[1]}.json").unlink()
    out2 = tmp_path / "partial"
    written = reproduce.aggregate(inputs, evals, out2, "ci")
    assert "table1" in written and "fig7" in written
    assert md_row((out2 / "fig7.md").read_text(), "SFT co-train") == ["SFT co-train", "50.0 +- 0.0", "-"]
    t1md = (out2 / "table1.md").read_text()
    assert md_row(t1md, "method") == ["method"] + list(reproduce.TASKS) + ["Avg"]
    assert no_ci(md_row(t1md, "OpenVLA: RL-Co")[1:]) == ["-", "50.0 +- 0.0", "50.0 +- 0.0", "50.0 +- 0.0", "-"]
    assert no_ci(md_row(t1md, "pi0.5: RL-Co")[1:]) == no_ci(md_row(md, "pi0.5: RL-Co")[1:])
    assert "Not evaluated on every training seed (shown as -): OpenVLA: RL-Co on pick_and_place." in t1md
    t1p = json.loads((out2 / "table1.json").read_text())
    assert t1p["not_evaluated"] == ["OpenVLA: RL-Co on pick_and_place"] and t1["not_evaluated"] == []
    assert [r["method"] for r in t1p["rows"]] == list(rows)  # the planned row order, whichever cells are in
    pairs = {(c["a"], c["task"]) for c in t1p["comparisons"]}
    assert ("OpenVLA: RL-Co", "pick_and_place") not in pairs and ("OpenVLA: RL-Co", "push_cube") in pairs
    assert ("OpenVLA: SFT co-train", "pick_and_place") in pairs
    # with no Table I cell evaluated on every seed there is no table
    written = reproduce.aggregate({"table1": inputs["table1"]}, tmp_path / "no_evals", tmp_path / "empty", "ci")
    assert "table1" not in written and not (tmp_path / "empty" / "table1.json").exists()


def test_report_only_tabulates_finished_evaluations_and_runs_nothing(tmp_path):
    # subsets of the study run as separate processes; one --report-only call then writes the whole table
    args = make_args(tmp_path, scale="ci", only=("table1",), tasks=("open_drawer", "close_drawer"))
    steps, inputs = reproduce.build_plan(args)
    evals = tmp_path / "results" / "evals"
    for p in inputs["table1"]:
        close_real_only = p["task"] == "close_drawer" and p["method"] == "Real-only SFT" and p["policy"] == "pi0.5"
        write_point(evals, steps, p["evals"], (4, 2) if close_real_only else (1, 1))
    cmd = [sys.executable, "reproduce.py", "--report-only", "--scale", "ci", "--only", "table1",
           "--tasks", "open_drawer", "close_drawer", "--data-dir", str(tmp_path / "data"),
           "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "results")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "report only" in done.stdout and "\n$ " not in done.stdout  # no command ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no dataset or run made
    md = (tmp_path / "results" / "table1.md").read_text()
    assert md_row(md, "method")[1:] == ["open_drawer", "close_drawer", "Avg"]
    assert no_ci(md_row(md, "pi0.5: Real-only SFT")[1:]) == ["25.0 +- 0.0", "75.0 +- 35.4", "50.0 +- 17.7"]
    assert no_ci(md_row(md, "OpenVLA: RL-Co")[1:]) == ["25.0 +- 0.0", "25.0 +- 0.0", "25.0 +- 0.0"]
    # co-train (1, 0, 0, 0) vs real-only (1, 1, 0.5, 0.5) per state: differences (0, -1, -0.5, -0.5);
    # of the 8 sign patterns of the 3 non-zero ones, 2 reach |sum| >= 2: exact two-sided p = 0.25
    t1 = json.loads((tmp_path / "results" / "table1.json").read_text())
    c = next(c for c in t1["comparisons"] if c["a"] == "pi0.5: SFT co-train" and c["task"] == "close_drawer")
    assert c["b"] == "pi0.5: Real-only SFT" and c["diff_pct"] == pytest.approx(-50.0)
    assert c["p_value"] == pytest.approx(0.25)
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert set(summary["written"]) == {"table1"}


def test_calibrated_gap_reaches_real_demos_and_evaluations(tmp_path):
    # scripts/gap_calibration.py's choice: the task's real demos are collected and its runs
    # evaluated at that gap; the sim demos and the other tasks are untouched
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "gap_calibration.json").write_text(json.dumps({"chosen": {"open_drawer": 0.5}}))
    steps, inputs = reproduce.build_plan(make_args(tmp_path, scale="ci", only=("table1",),
                                                   tasks=("open_drawer", "close_drawer"), policies=("pi05",)))
    for key, s in steps.items():
        task = flag(s["cmd"], "--task")
        if s["kind"] == "eval":
            assert flag(s["cmd"], "--gap") == ("0.5" if task == "open_drawer" else "1")
        elif s["kind"] == "collect":
            real = flag(s["cmd"], "--domain") == "proxy_real"
            assert flag(s["cmd"], "--gap") == ("0.5" if real and task == "open_drawer" else None)
            assert ("gap0p5" in key) == (real and task == "open_drawer")
        else:  # a run's real data is the dataset of its task's gap
            assert ("proxy_real_gap0p5_" in flag(s["cmd"], "--real-data")) == (task == "open_drawer")
            assert ("_gap0p5_" in key) == (task == "open_drawer")


def test_stage1_recipe_applies_to_every_paradigm_of_its_cell_only(tmp_path):
    # the cpu scale's open_drawer recipes (the learnability.py settings that met the criterion: pi0.5
    # 10k steps without state, OpenVLA 6000 steps) reach every Stage I run of their cell alike; no
    # other task gets them
    steps, _ = reproduce.build_plan(make_args(tmp_path, scale="cpu", only=("table1",),
                                              tasks=("open_drawer", "close_drawer"), policies=("pi05", "openvla")))
    stage1 = [s["cmd"] for s in steps.values() if s["kind"] == "stage1"]
    recipes = reproduce.SCALES["cpu"]["stage1_recipe"]["open_drawer"]
    recipe = recipes["pi05"]
    seen_alphas = {"pi05": set(), "openvla": set()}
    for cmd in stage1:
        task, policy = flag(cmd, "--task"), flag(cmd, "--policy")
        if task == "open_drawer":
            seen_alphas[policy].add(flag(cmd, "--alpha"))
            assert flag(cmd, "--total-steps") == str(recipes[policy]["steps"])
        if (task, policy) == ("open_drawer", "pi05"):
            i = cmd.index("--policy-overrides")
            assert cmd[i + 1:i + 1 + len(recipe["overrides"])] == list(recipe["overrides"])
        else:
            assert "--policy-overrides" not in cmd
        if task != "open_drawer":
            assert flag(cmd, "--total-steps") == str(reproduce.SCALES["cpu"]["stage1_steps"])
    assert recipes["openvla"]["steps"] != reproduce.SCALES["cpu"]["stage1_steps"]
    # real-only and co-train of each family (RL-Co starts from co-train)
    assert seen_alphas == {"pi05": {"0", "0.95"}, "openvla": {"0", "0.95"}}
    # the recipe's overrides are ones Stage I accepts for that policy
    import stage1_sft_cotrain
    assert stage1_sft_cotrain.parse_overrides("pi05", "tiny", dict(zip(recipe["overrides"][::2], recipe["overrides"][1::2]))) \
        == {"discrete_state_input": False}


def test_every_stage1_recipe_setting_reaches_stage1_as_its_flag(tmp_path, monkeypatch):
    # a recipe may set Stage I's sampling and EMA as well as its lr: each key reaches every Stage I
    # run of its cell as stage1_sft_cotrain.py's flag of that name, and no other cell gets it
    import dataclasses
    import stage1_sft_cotrain
    fields = {f.name for f in dataclasses.fields(stage1_sft_cotrain.Args)}
    assert set(reproduce.RECIPE_FLAGS) <= fields
    recipes = reproduce.SCALES["cpu"]["stage1_recipe"]
    # the committed recipes use only keys that build_plan turns into flags
    assert all(set(r) <= {"steps", "overrides", *reproduce.RECIPE_FLAGS} for cell in recipes.values() for r in cell.values())
    recipe = dict(steps=7, lr=2e-4, start_frames=1, start_weight=25.0, ema_decay=0.999)
    monkeypatch.setitem(reproduce.SCALES["cpu"], "stage1_recipe", {**recipes, "close_drawer": {"pi05": recipe}})
    steps, _ = reproduce.build_plan(make_args(tmp_path, scale="cpu", only=("table1",),
                                              tasks=("close_drawer",), policies=("pi05", "openvla")))
    stage1 = [s["cmd"] for s in steps.values() if s["kind"] == "stage1"]
    assert {flag(cmd, "--policy") for cmd in stage1} == {"pi05", "openvla"}
    for cmd in stage1:
        ours = flag(cmd, "--policy") == "pi05"
        got = [flag(cmd, f) for f in ("--total-steps", "--lr", "--start-frames", "--start-weight", "--ema-decay")]
        if ours:
            assert got == ["7", "0.0002", "1", "25", "0.999"]
            args = stage1_sft_cotrain.tyro.cli(stage1_sft_cotrain.Args, args=cmd[2:])
            assert (args.lr, args.start_frames, args.start_weight, args.ema_decay) == (2e-4, 1, 25.0, 0.999)
        else:
            assert got == [str(reproduce.SCALES["cpu"]["stage1_steps"]), None, None, None, None]


def test_a_wrist_camera_recipe_gets_two_camera_demos_in_both_stages(tmp_path):
    # pick_and_place with pi0.5 at the cpu scale reads a wrist camera: its Stage I runs (every
    # paradigm) and RL-Co's Stage II train on demos recorded with it; OpenVLA's cell keeps the
    # one-camera demos, and the recipe's lr reaches Stage I
    steps, _ = reproduce.build_plan(make_args(tmp_path, scale="cpu", only=("table1",),
                                              tasks=("pick_and_place",), policies=("pi05", "openvla")))
    collect = {str(s["out"]): s["cmd"] for s in steps.values() if s["kind"] == "collect"}
    stage1 = [s["cmd"] for s in steps.values() if s["kind"] == "stage1"]
    assert {flag(cmd, "--policy") for cmd in stage1} == {"pi05", "openvla"}
    for cmd in stage1:
        wrist = flag(cmd, "--policy") == "pi05"
        for key in ("--sim-data", "--real-data"):
            assert ("--wrist-camera" in collect[flag(cmd, key)]) == wrist == flag(cmd, key).endswith("_wrist")
        assert (flag(cmd, "--lr") == "0.001") == wrist
        assert ("wrist_camera" in cmd) == wrist
    stage2 = [s["cmd"] for s in steps.values() if s["kind"] == "stage2"]
    assert stage2
    for cmd in stage2:  # each Stage II reads the real demos its init was trained beside
        init_run = steps[Path(flag(cmd, "--init")).parent.parent.name]["cmd"]
        assert flag(cmd, "--real-data") == flag(init_run, "--real-data")


def test_cpu_scale_ablation_figures_use_a_task_stage1_learns(tmp_path):
    # Figs. 5 and 6 sit on the scale's ablation task (open_drawer at the cpu scale, where pick_and_place
    # was not learned when they ran); their RL-Co runs are Table I's, their real-only init is Table I's real-only run
    S = reproduce.SCALES["cpu"]
    assert S["ablation_task"] == "open_drawer" and reproduce.SCALES["gpu"]["ablation_task"] == "pick_and_place"
    steps, inputs = reproduce.build_plan(make_args(tmp_path, scale="cpu", only=("table1", "fig5", "fig6"),
                                                   tasks=("open_drawer",), policies=("pi05",)))
    t1 = {p["method"]: p["evals"] for p in inputs["table1"]}
    fig6 = {p["setting"]: p["evals"] for p in inputs["fig6"]}
    assert {p["task"] for p in inputs["fig5"] + inputs["fig6"]} == {"open_drawer"}
    assert fig6["RL-Co (real data in both stages)"] == t1["RL-Co"]
    assert len({k for keys in fig6.values() for k in keys}) == 5 * len(S["seeds"])
    for key in fig6["no real data in Stage I (alpha=1)"]:
        init = flag(steps[steps[key]["checkpoint"].parent.parent.name]["cmd"], "--init")
        s1 = steps[Path(init).parent.parent.name]["cmd"]
        assert flag(s1, "--alpha") == "1" and flag(s1, "--total-steps") == "10000"  # the task's recipe
    for i, seed in enumerate(S["seeds"]):
        fig5 = {p["init"]: p["metrics"] for p in inputs["fig5"] if p["seed"] == seed}
        rlco_run = steps[t1["RL-Co"][i]]["checkpoint"].parent.parent
        assert str(rlco_run / "metrics.jsonl") == fig5["SFT co-train init (alpha=0.95)"]
        real_only = steps[Path(fig5["Real-only SFT init (alpha=0)"]).parent.name]["cmd"]
        assert flag(real_only, "--init") == str(steps[t1["Real-only SFT"][i]]["checkpoint"])
    # without the ablation task among --tasks, no figure is planned
    _, inputs = reproduce.build_plan(make_args(tmp_path, scale="cpu", only=("fig5", "fig6"), tasks=("close_drawer",)))
    assert "fig5" not in inputs and "fig6" not in inputs


def test_gap_sweep_trains_and_evaluates_each_gap_and_tabulates_the_finished_ones(tmp_path):
    # the calibrated gap of the sweep's task (0.5 here) is Table I's runs; every other gap has its
    # own real demos, runs and evaluations at that gap; the sim demos are shared
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "gap_calibration.json").write_text(json.dumps({"chosen": {"open_drawer": 0.5}}))
    args = make_args(tmp_path, scale="ci", only=("table1", "gap_sweep"), tasks=("open_drawer",), policies=("pi05",))
    steps, inputs = reproduce.build_plan(args)
    assert reproduce.SCALES["ci"]["gap_sweep_task"] == "open_drawer"
    sweep = {(p["gap"], p["method"]): p["evals"] for p in inputs["gap_sweep"]}
    assert sorted({g for g, _ in sweep}) == list(reproduce.SWEEP_GAPS)
    t1 = {p["method"]: p["evals"] for p in inputs["table1"]}
    assert {m: sweep[(0.5, m)] for m in t1} == t1
    for (g, m), keys in sweep.items():
        for key in keys:
            ev = steps[key]["cmd"]
            assert flag(ev, "--gap") == f"{g:g}"
            run = steps[Path(flag(ev, "--checkpoint")).parent.parent.name]["cmd"]
            if m == "RL-Co":  # its Stage I init and its real data are of the same gap
                run = steps[Path(flag(run, "--init")).parent.parent.name]["cmd"]
            real = steps[flag(run, "--real-data")]["cmd"]
            assert (flag(real, "--gap") or "1") == f"{g:g}" and flag(real, "--domain") == "proxy_real"
            assert flag(steps[flag(run, "--sim-data")]["cmd"], "--gap") is None
    collects = [s for s in steps.values() if s["kind"] == "collect"]
    assert len(collects) == 1 + len(reproduce.SWEEP_GAPS)  # one sim dataset, real demos per gap
    assert len({k for keys in sweep.values() for k in keys}) == len(sweep) * len(reproduce.SCALES["ci"]["seeds"])

    # report: RL-Co at gap 0.25 wins 4/4 and 3/4 (seeds 1, 2), everything else 2/4; gap 0.75 misses
    # one evaluation and is left out
    evals, out = tmp_path / "results" / "evals", tmp_path / "results"
    for (g, m), keys in sweep.items():
        if (g, m) == (0.75, "SFT co-train"):
            keys = keys[:1]
        write_point(evals, steps, keys, (4, 3) if (g, m) == (0.25, "RL-Co") else (2, 2))
    written = reproduce.aggregate({"gap_sweep": inputs["gap_sweep"]}, evals, out, "ci")
    assert set(written) == {"gap_sweep"}
    table = json.loads((out / "gap_sweep.json").read_text())
    assert table["gaps"] == [0.0, 0.25, 0.5, 1.0] and table["columns"] == ["gap 0", "gap 0.25", "gap 0.5", "gap 1"]
    rows = {r["method"]: r["cells"] for r in table["rows"]}
    assert (rows["RL-Co"]["gap 0.25"]["mean"], rows["RL-Co"]["gap 0.25"]["std"]) == pytest.approx((87.5, 17.6777), abs=1e-3)
    assert rows["SFT co-train"]["gap 1"]["mean"] == 50.0 and "Avg" not in rows["RL-Co"]
    comps = {(c["a"], c["task"]): c for c in table["comparisons"]}
    assert len(comps) == 2 * 4
    # per state, mean over seeds: RL-Co (1, 1, 1, 0.5) vs co-train (1, 1, 0, 0) -> +37.5 points
    assert comps[("RL-Co", "gap 0.25")]["diff_pct"] == pytest.approx(37.5)
    assert comps[("RL-Co", "gap 0")]["diff_pct"] == pytest.approx(0.0)
    assert md_row((out / "gap_sweep.md").read_text(), "method")[1:] == table["columns"]
    assert (out / "gap_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --sweep-gaps picks the gaps to run; one outside [0, 1] is refused with one line
    _, inputs = reproduce.build_plan(make_args(tmp_path, scale="ci", only=("gap_sweep",), tasks=("open_drawer",),
                                               sweep_gaps=(0.0, 0.75)))
    assert sorted({p["gap"] for p in inputs["gap_sweep"]}) == [0.0, 0.75]
    done = subprocess.run([sys.executable, "reproduce.py", "--dry-run", "--scale", "ci", "--only", "gap_sweep",
                           "--sweep-gaps", "0", "1.5", "--out-dir", str(tmp_path / "r2")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--sweep-gaps must lie in [0, 1]" in done.stderr and "Traceback" not in done.stderr
