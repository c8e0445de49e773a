"""quickstart.py --scale ci end to end: every artefact it reports exists and agrees with what it
asked for. Env start-up dominates on a CPU, so the run reuses the session's demo collections
(collection then has nothing to do), trains without monitoring evaluations and evaluates in-process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quickstart  # noqa: E402

SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.e2e
def test_quickstart_ci_writes_consistent_artefacts_and_a_rerun_skips_everything(tmp_path, tiny_data):
    import envs
    import eval_real
    import policies

    scale = quickstart.SCALES["ci"]
    data = tmp_path / "data" / "open_drawer"
    # the fixture's datasets hold exactly the ci counts and were collected with quickstart's
    # settings (64 px, collect_demos.py's default teleoperation and seed): collection resumes with nothing to do
    shutil.copytree(tiny_data["sim"], data / "sim_ci")
    shutil.copytree(tiny_data["proxy_real"], data / "proxy_real_ci")
    out = tmp_path / "results"
    cmd = [sys.executable, "quickstart.py", "--scale", "ci", "--task", "open_drawer", "--gap", "1", "--seed", "0",
           "--data-dir", str(tmp_path / "data"),
           "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=SUB_ENV)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("nothing to do") == 2  # both datasets were complete

    # the summary names every artefact, and each exists
    summary = json.loads((out / "table1_open_drawer_pi05_ci.summary.json").read_text())
    assert summary["scale"] == scale
    for p in summary["datasets"] + list(summary["checkpoints"].values()) + [summary["table"]]:
        assert Path(p).exists(), p
    # datasets: the episode counts asked for
    for path, n in zip(summary["datasets"], (scale["sim_episodes"], scale["real_episodes"])):
        assert json.loads((Path(path) / "meta" / "info.json").read_text())["total_episodes"] == n
    # checkpoints: loadable, and made by the stage and settings the row names
    names = list(summary["checkpoints"])
    assert len(names) == 3
    extras = {}
    for name, path in summary["checkpoints"].items():
        policy = policies.load_policy(path)
        assert policy.kind == "pi05"
        extras[name] = policy.config["extra"]
    real_only, cotrain, rlco = (extras[n] for n in names)
    assert (real_only["stage"], real_only["alpha"]) == ("stage1", 0.0)
    assert (cotrain["stage"], cotrain["alpha"]) == ("stage1", 0.95)
    assert (rlco["stage"], rlco["beta"]) == ("stage2", 0.1)
    assert Path(rlco["init"]) == Path(summary["checkpoints"][names[1]])
    assert real_only["args"]["total_steps"] == scale["stage1_steps"]

    # the table: three rows named as the checkpoints, success in [0, 100] % from per-episode
    # successes in {0, 1}, the episodes asked for, one noise-free evaluation
    table = json.loads((out / "table1_open_drawer_pi05_ci.json").read_text())
    assert [r["method"] for r in table["rows"]] == names and table["columns"] == ["open_drawer"]
    assert table["repeats"] == [0] and table["episodes"] == 3 * scale["eval_episodes"]
    for r in table["rows"]:
        cell = r["cells"]["open_drawer"]
        assert 0.0 <= cell["mean"] <= 100.0
        assert cell["episodes"] == {"0": scale["eval_episodes"]}
    records = eval_real.load_records(out / "table1_open_drawer_pi05_ci.episodes.jsonl")
    assert eval_real.summarize(records)["rows"] == table["rows"]
    assert all(r["success"] in (True, False) and r["domain"] == "proxy_real" for r in records)
    seeds = {(r["method"], r["repeat"]): sorted(x["seed"] for x in records
                                                 if (x["method"], x["repeat"]) == (r["method"], r["repeat"]))
             for r in records}
    assert set(map(tuple, seeds.values())) == {tuple(envs.eval_seeds(scale["eval_episodes"]))}  # same initial states
    md = (out / "table1_open_drawer_pi05_ci.md").read_text()
    for r in table["rows"]:
        assert f"| {r['method']} | {eval_real.format_cell(r['cells']['open_drawer'])} |" in md

    # a rerun trains and evaluates nothing
    stamp = (out / "table1_open_drawer_pi05_ci.json").stat().st_mtime
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=SUB_ENV)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("[skip]") == 4
    commands = [line for line in again.stdout.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and all("collect_demos.py" in c for c in commands), commands
    assert (out / "table1_open_drawer_pi05_ci.json").stat().st_mtime == stamp


def fake_quickstart(tmp_path, monkeypatch, *argv):
    """quickstart.main with every command recorded instead of run: the trainings leave a final
    checkpoint, the evaluation a table. Returns (plain commands, side-by-side groups, summary)."""
    plain, groups = [], []

    def pretend(cmd):
        if "--run-name" in cmd:
            ckpt = Path(cmd[cmd.index("--runs-dir") + 1]) / cmd[cmd.index("--run-name") + 1] / "checkpoints" / "final"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "model.safetensors").write_text("")
            (ckpt / "config.json").write_text("{}")
        if "eval_real.py" in cmd[1]:
            out = Path(cmd[cmd.index("--out-dir") + 1])
            out.mkdir(parents=True, exist_ok=True)
            for ext in (".md", ".json"):
                (out / (cmd[cmd.index("--name") + 1] + ext)).write_text("{}")

    monkeypatch.setattr(quickstart, "run", lambda cmd: plain.append(cmd) or pretend(cmd))
    monkeypatch.setattr(quickstart, "run_side_by_side",
                        lambda cmds, logs: groups.append(cmds) or [pretend(c) for c in cmds])
    args = tyro.cli(quickstart.Args, args=["--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
                                           "--out-dir", str(tmp_path / "out"), *argv])
    quickstart.main(args)
    summary = next((tmp_path / "out").glob("*.summary.json"))
    return plain, groups, json.loads(summary.read_text())


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_quickstart_runs_the_studys_cell_at_the_task_gap(tmp_path, monkeypatch, capsys):
    import reproduce
    study = reproduce.SCALES["cpu"]
    plain, groups, summary = fake_quickstart(tmp_path, monkeypatch, "--gap", "0.25")
    collect_sim, collect_real, stage2, evaluation = plain
    assert summary["args"]["task"] == "close_drawer" and summary["gap"] == 0.25
    # the real demos and the evaluation at the gap; the sim demos without one
    assert flag(collect_real, "--gap") == "0.25" and flag(evaluation, "--gap") == "0.25"
    assert "--gap" not in collect_sim and flag(collect_sim, "--domain") == "sim"
    assert flag(collect_real, "--out").endswith(f"close_drawer/proxy_real_gap0p25_{study['real_episodes']}")
    assert flag(collect_sim, "--num-episodes") == str(study["sim_episodes"])
    assert "--seed" not in collect_sim + collect_real  # the study's demos, whatever the training seed
    # both Stage I runs side by side, the study's steps, alpha 0 and the task's co-train alpha
    (real_only, cotrain), = groups
    assert [flag(c, "--alpha") for c in (real_only, cotrain)] == ["0", f"{reproduce.COTRAIN_ALPHA['close_drawer']:g}"]
    assert {flag(c, "--total-steps") for c in (real_only, cotrain)} == {str(study["stage1_steps"])}
    assert {flag(c, "--real-data") for c in (real_only, cotrain, stage2)} == {flag(collect_real, "--out")}
    # Stage II from the co-trained checkpoint, the study's env steps; the three checkpoints evaluated
    assert Path(flag(stage2, "--init")) == tmp_path / "runs" / flag(cotrain, "--run-name") / "checkpoints" / "final"
    assert flag(stage2, "--total-env-steps") == str(study["stage2_env_steps"])
    assert flag(evaluation, "--episodes") == str(study["eval_episodes"])
    evaluated = evaluation[evaluation.index("--checkpoint") + 1:evaluation.index("--names")]
    assert evaluated == list(summary["checkpoints"].values())
    assert [Path(p).parts[-3] for p in evaluated] == [flag(real_only, "--run-name"), flag(cotrain, "--run-name"),
                                                       flag(stage2, "--run-name")]
    assert "gap 0.25" in capsys.readouterr().out

    # open_drawer at its calibrated gap: the real data and evaluation there, and its Stage I recipe
    plain, groups, summary = fake_quickstart(tmp_path / "od", monkeypatch, "--task", "open_drawer")
    gap = reproduce.calibrated_gaps(ROOT / "results/reproduce_cpu")["open_drawer"]
    assert summary["gap"] == gap != 1.0 and flag(plain[-1], "--gap") == f"{gap:g}"
    recipe = study["stage1_recipe"]["open_drawer"]["pi05"]
    for c in groups[0]:
        assert flag(c, "--total-steps") == str(recipe["steps"])
        assert c[c.index("--policy-overrides") + 1:c.index("--policy-overrides") + 3] == recipe["overrides"]

    # pick_and_place: its recipe's lr and wrist camera, on demos recorded with both cameras
    plain, groups, summary = fake_quickstart(tmp_path / "pp", monkeypatch, "--task", "pick_and_place")
    recipe = study["stage1_recipe"]["pick_and_place"]["pi05"]
    collect_sim, collect_real = plain[:2]
    assert "--wrist-camera" in collect_sim and "--wrist-camera" in collect_real
    for c in groups[0]:
        assert flag(c, "--lr") == f"{recipe['lr']:g}" and flag(c, "--total-steps") == str(recipe["steps"])
        assert flag(c, "--sim-data") == flag(collect_sim, "--out") and flag(c, "--sim-data").endswith("_wrist")
        assert flag(c, "--real-data") == flag(collect_real, "--out")
    assert "--wrist-camera" not in fake_quickstart(tmp_path / "cd0", monkeypatch)[0][0]  # close_drawer: one camera

    # close_drawer by default at the gap the study's sweep separates the paradigms most clearly
    plain, groups, summary = fake_quickstart(tmp_path / "cd", monkeypatch)
    assert summary["gap"] == quickstart.SHOWCASE_GAP["close_drawer"] and flag(plain[-1], "--gap") == "0.75"

    with pytest.raises(SystemExit, match="in \\[0, 1\\]"):
        fake_quickstart(tmp_path / "bad", monkeypatch, "--gap", "1.5")


def test_the_close_drawer_gap_is_where_the_sweep_separates_the_paradigms_most():
    # the rule of docs/study_cpu_progress.md section 5, reapplied to the committed sweep: the
    # largest mean RL-Co minus real-only difference, positive, ties to the larger gap
    sweep = json.loads((ROOT / "results/reproduce_cpu/gap_sweep.json").read_text())
    cells = {r["method"]: r["cells"] for r in sweep["rows"]}
    diff = {float(c.removeprefix("gap ")): cells["RL-Co"][c]["mean"] - cells["Real-only SFT"][c]["mean"]
            for c in sweep["columns"]}
    best = max(diff, key=lambda g: (round(diff[g], 6), g))
    assert sweep["task"] == "close_drawer" and diff[best] > 0
    assert all(c["seeds"] == [1, 2] for row in cells.values() for c in row.values())
    assert quickstart.SHOWCASE_GAP == {"close_drawer": best}


def test_side_by_side_runs_at_once_logs_each_and_stops_on_a_failure(tmp_path, capsys):
    py = sys.executable
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    flag_file = tmp_path / "b_started"
    # the first waits for the second to have started: run one after the other, it would fail
    waits = (f"import pathlib, sys, time\nfor _ in range(600):\n    if pathlib.Path({str(flag_file)!r}).exists(): "
             f"print('one'); sys.exit(0)\n    time.sleep(0.05)\nsys.exit('never saw the other')")
    quickstart.run_side_by_side([[py, "-c", waits],
                                 [py, "-c", f"import pathlib; pathlib.Path({str(flag_file)!r}).touch(); print('two')"]],
                                logs)
    assert [log.read_text().strip() for log in logs] == ["one", "two"]
    with pytest.raises(SystemExit, match="step failed"):
        quickstart.run_side_by_side([[py, "-c", "print('fine')"], [py, "-c", "import sys; sys.exit('broken')"]], logs)
    assert "broken" in capsys.readouterr().err


def test_the_cpu_scale_is_the_cpu_studys():
    import reproduce
    study = reproduce.SCALES["cpu"]
    assert quickstart.SCALES["cpu"] == {k: study[k] for k in quickstart.SCALES["cpu"]}
    assert quickstart.STAGE1_RECIPE == study["stage1_recipe"] and quickstart.RECIPE_FLAGS == reproduce.RECIPE_FLAGS
    assert quickstart.COTRAIN_ALPHA == reproduce.COTRAIN_ALPHA and quickstart.IMAGE_SIZE == reproduce.IMAGE_SIZE
    assert {t: quickstart.calibrated_gap(t) for t in reproduce.TASKS} == reproduce.calibrated_gaps(
        ROOT / "results/reproduce_cpu")
    assert quickstart.tag(0.25) == reproduce.tag(0.25) == "0p25"
