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
    # settings for --seed 0 (64 px, default teleoperation): collection resumes with nothing to do
    shutil.copytree(tiny_data["sim"], data / "sim_ci")
    shutil.copytree(tiny_data["proxy_real"], data / "proxy_real_ci")
    out = tmp_path / "results"
    cmd = [sys.executable, "quickstart.py", "--scale", "ci", "--seed", "0", "--data-dir", str(tmp_path / "data"),
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
