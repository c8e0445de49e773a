"""The study's driver scripts (scripts/): each answers --help, and the pieces of them that decide
what a row of results/ says are checked on hand-made inputs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if p.name != "study_io.py")  # study_io: a module
sys.path.insert(0, str(ROOT / "scripts"))  # the scripts import study_io, as they do when run


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_every_script_answers_help(script):
    done = subprocess.run([sys.executable, f"scripts/{script}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()


def test_learnability_keeps_a_dataset_folder_per_demo_count():
    # Stage I trains on every episode of the folder it is given: two demo counts sharing a folder
    # would train the smaller attempt on the bigger dataset
    study_io = load("study_io")
    a = study_io.dataset_dir("data", "open_drawer", "sim", 100, 64)
    b = study_io.dataset_dir("data", "open_drawer", "sim", 300, 64)
    c = study_io.dataset_dir("data", "open_drawer", "sim", 100, 128)
    assert len({a, b, c}) == 3
    assert a == ROOT / "data" / "open_drawer" / "sim_100"  # reproduce.py's layout: the datasets are shared


def test_learnability_passes_its_stage1_options_and_writes_the_row(tmp_path, monkeypatch):
    learnability = load("learnability")
    commands = []

    def pretend(cmd):  # demo collection does nothing; a Stage I run leaves its final checkpoint at 60 %
        commands.append(cmd)
        if "stage1_sft_cotrain.py" in cmd[1]:
            final = Path(cmd[cmd.index("--runs-dir") + 1]) / cmd[cmd.index("--run-name") + 1] / "checkpoints" / "final"
            final.mkdir(parents=True)
            (final / "config.json").write_text(json.dumps({"extra": {"eval/success_sim": 0.6, "protocol": "p"}}))
        return 2.0

    monkeypatch.setattr(learnability, "run", pretend)
    common = ["--tasks", "pick_and_place", "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
              "--out", str(tmp_path / "rows.json")]
    learnability.main(learnability.tyro.cli(learnability.Args, args=common))
    learnability.main(learnability.tyro.cli(learnability.Args, args=[*common, "--attempt", "plain", "--no-augment",
                                                                      "--ema-decay", "0.999"]))
    learnability.main(learnability.tyro.cli(learnability.Args, args=[*common, "--attempt", "dart", "--dart-noise", "0.1"]))
    learnability.main(learnability.tyro.cli(learnability.Args, args=[*common, "--attempt", "wrist", "--wrist-camera",
                                                                      "--policy-overrides", "patch_size", "8"]))
    stage1 = [c for c in commands if "stage1_sft_cotrain.py" in c[1]]
    assert len(stage1) == 4
    default, plain, dart, wrist = stage1
    # DART demos: the sim collection gets the noise and a folder of its own, which Stage I trains on
    collect = [c for c in commands if "collect_demos.py" in c[1]]
    sim_dart = [c for c in collect if "--dart-noise" in c]
    assert len(sim_dart) == 1 and sim_dart[0][sim_dart[0].index("--domain") + 1] == "sim"
    assert sim_dart[0][sim_dart[0].index("--dart-noise") + 1] == "0.1"
    dart_dir = sim_dart[0][sim_dart[0].index("--out") + 1]
    assert dart_dir.endswith("sim_100_dart0.1") and dart[dart.index("--sim-data") + 1] == dart_dir
    assert default[default.index("--sim-data") + 1].endswith("sim_100")
    assert "--no-augment" in plain and "--no-augment" not in default
    assert plain[plain.index("--ema-decay") + 1] == "0.999" and plain[plain.index("--alpha") + 1] == "1"
    rows = {r["attempt"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert (rows["default"]["augment"], rows["plain"]["augment"]) == (True, False)
    assert rows["plain"]["sim_success_pct"] == pytest.approx(60.0) and rows["plain"]["stage1_wall_s"] == [2.0]
    assert rows["plain"]["criterion_met"] is False
    assert (rows["default"]["dart_noise"], rows["dart"]["dart_noise"]) == (0.0, 0.1)
    # the wrist camera: both datasets recorded with it, in folders of their own, and the policy told
    wrist_collect = [c for c in collect if "--wrist-camera" in c]
    assert sorted(c[c.index("--domain") + 1] for c in wrist_collect) == ["proxy_real", "sim"]
    assert {c[c.index("--out") + 1] for c in wrist_collect} == {wrist[wrist.index("--sim-data") + 1],
                                                                wrist[wrist.index("--real-data") + 1]}
    assert wrist[wrist.index("--sim-data") + 1].endswith("sim_100_wrist")
    assert wrist[wrist.index("--policy-overrides") + 1:][:4] == ["patch_size", "8", "wrist_camera", "true"]
    assert "--policy-overrides" not in default and (rows["wrist"]["wrist_camera"], rows["plain"]["wrist_camera"]) == (True, False)


def test_rl_gain_quarters_of_the_rollout_success():
    rl_gain = load("rl_gain")
    rows = [{"iteration": 0, "global_step": 0, "eval/success_sim": 0.4}]  # an evaluation row: no rollout
    rows += [{"iteration": i, "global_step": 200 * i, "charts/episode_success": s}
             for i, s in enumerate([0.0, 0.25, 0.5, 0.5, 0.5, 0.75, 1.0, 1.0], start=1)]
    first, last = rl_gain.quarter_success(rows)
    assert (first, last) == pytest.approx((0.125, 1.0))  # 8 iterations: quarters of 2


def test_rl_gain_passes_its_stage2_options_and_writes_the_row(tmp_path, monkeypatch):
    rl_gain = load("rl_gain")
    init = tmp_path / "learn" / "open_drawer_openvla_x_s1" / "checkpoints" / "final"
    init.mkdir(parents=True)
    (init / "config.json").write_text(json.dumps({"extra": {"eval/success_sim": 0.5}}))
    (tmp_path / "data" / "open_drawer" / "proxy_real_20" / "meta").mkdir(parents=True)
    (tmp_path / "data" / "open_drawer" / "proxy_real_20" / "meta" / "info.json").write_text("{}")
    commands = []

    def pretend(cmd):  # a Stage II run: its final checkpoint at 70 % and its metrics
        commands.append(cmd)
        run_dir = Path(cmd[cmd.index("--runs-dir") + 1]) / cmd[cmd.index("--run-name") + 1]
        (run_dir / "checkpoints" / "final").mkdir(parents=True)
        extra = {"eval/success_sim": 0.7, "protocol": "greedy"}
        (run_dir / "checkpoints" / "final" / "config.json").write_text(json.dumps({"extra": extra}))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "global_step": 200, "charts/episode_success": 0.5,
                                                           "perf/rollout_time": 3.0, "perf/update_time": 1.5}) + "\n")
        return 1.0

    monkeypatch.setattr(rl_gain, "run", pretend)
    common = ["--tasks", "open_drawer", "--policy", "openvla", "--init-attempt", "x", "--seeds", "1",
              "--learnability-runs", str(tmp_path / "learn"), "--data-dir", str(tmp_path / "data"),
              "--out", str(tmp_path / "rows.json")]
    rl_gain.main(rl_gain.tyro.cli(rl_gain.Args, args=[*common, "--runs-dir", str(tmp_path / "a"),
                                                      "--learning-rate", "1e-4", "--num-envs", "16"]))
    rl_gain.main(rl_gain.tyro.cli(rl_gain.Args, args=[*common, "--runs-dir", str(tmp_path / "b"), "--attempt", "preset",
                                                      "--critic-state", "--critic-potential", "--temperature", "0.5",
                                                      "--sigma-range", "0.04", "0.08", "--noise-steps", "3"]))
    with_lr, preset = commands
    assert with_lr[with_lr.index("--learning-rate") + 1] == "0.0001" and "--learning-rate" not in preset
    assert "--critic-state" in preset and "--critic-state" not in with_lr
    assert "--critic-potential" in preset and "--critic-potential" not in with_lr
    i = preset.index("--sigma-range")
    assert preset[i + 1:i + 3] == ["0.04", "0.08"] and "--sigma-range" not in with_lr
    assert preset[preset.index("--noise-steps") + 1] == "3" and "--noise-steps" not in with_lr
    assert preset[preset.index("--temperature") + 1] == "0.5" and "--temperature" not in with_lr
    assert with_lr[with_lr.index("--num-envs") + 1] == "16"
    rows = {r["attempt"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert (rows["beta0"]["learning_rate"], rows["preset"]["learning_rate"]) == (1e-4, None)
    assert (rows["beta0"]["critic_state"], rows["preset"]["critic_state"]) == (False, True)
    assert (rows["beta0"]["critic_potential"], rows["preset"]["critic_potential"]) == (False, True)
    assert (rows["beta0"]["sigma_range"], rows["preset"]["sigma_range"]) == (None, [0.04, 0.08])
    assert (rows["beta0"]["noise_steps"], rows["preset"]["noise_steps"]) == (None, [3])
    assert (rows["beta0"]["temperature"], rows["preset"]["temperature"]) == (None, 0.5)
    assert rows["beta0"]["protocol"] == "greedy"
    assert rows["beta0"]["sim_before_pct"] == 50.0 and rows["beta0"]["gain_points"] == pytest.approx(20.0)
    assert rows["beta0"]["stage2_wall_s"] == [1.0] and rows["beta0"]["stage2_loop_s"] == [4.5]
    # a second invocation only reads the finished run: the wall time its training invocation wrote
    # beside it, the loop time from its log; a run trained elsewhere has no wall time
    rl_gain.main(rl_gain.tyro.cli(rl_gain.Args, args=[*common, "--runs-dir", str(tmp_path / "a")]))
    assert len(commands) == 2
    row = next(r for r in json.loads((tmp_path / "rows.json").read_text()) if r["attempt"] == "beta0")
    assert row["stage2_wall_s"] == [1.0] and row["stage2_loop_s"] == [4.5]
    (tmp_path / "a" / "open_drawer_openvla_beta0_s1" / "rl_gain_wall_s.json").unlink()
    rl_gain.main(rl_gain.tyro.cli(rl_gain.Args, args=[*common, "--runs-dir", str(tmp_path / "a")]))
    row = next(r for r in json.loads((tmp_path / "rows.json").read_text()) if r["attempt"] == "beta0")
    assert row["stage2_wall_s"] == [None]


def test_a_row_written_beside_another_run_keeps_both(tmp_path):
    # two attempts run side by side: each writes its row into the file the other may have just written
    study_io = load("study_io")
    out = tmp_path / "rows.json"
    study_io.upsert_row(out, {"task": "open_drawer", "policy": "pi05", "attempt": "a", "x": 1})
    study_io.upsert_row(out, {"task": "open_drawer", "policy": "pi05", "attempt": "b", "x": 2})
    study_io.upsert_row(out, {"task": "open_drawer", "policy": "pi05", "attempt": "a", "x": 3})  # a rerun
    rows = json.loads(out.read_text())
    assert sorted((r["attempt"], r["x"]) for r in rows) == [("a", 3), ("b", 2)]


def test_gap_calibration_refuses_results_of_another_criterion(tmp_path):
    gap_calibration = load("gap_calibration")
    out = tmp_path / "gap.json"
    assert gap_calibration.read_results(out)["criterion"] == gap_calibration.CRITERION
    out.write_text(json.dumps({"criterion": "a looser band", "points": [], "chosen": {}}))
    with pytest.raises(SystemExit, match="another criterion"):
        gap_calibration.read_results(out)


def test_failure_probe_follows_the_expert_phases(capsys):
    # with the expert's own actions the probe must see every phase of the expert's machine reached,
    # success, and no action error; a policy's episodes are read against the same machine
    failure_probe = load("failure_probe")
    records = failure_probe.probe(failure_probe.Args(checkpoint="expert", task="open_drawer", episodes=1))
    assert records[0]["success"] and records[0]["max_expert_phase"] == 3  # above, down, close, pull
    assert max(records[0]["mean_abs_action_error"].values()) == 0.0
    assert "phase 3: 1" in capsys.readouterr().out
    assert records[0]["closest_xy_cm"][0] < 1.5  # the fingers closed on the handle
    assert failure_probe.tilt_degrees(np.array([0.0, 1.0, 0.0, 0.0])) == pytest.approx(0.0)  # top-down
    assert failure_probe.tilt_degrees(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(180.0)  # pointing up


def test_failure_probe_sees_which_cube_the_episode_went_for():
    # the expert pushes the named cube: the tcp comes closest to it (a few cm behind it), and stays
    # far from the other two (12 cm apart in the row)
    failure_probe = load("failure_probe")
    record = failure_probe.probe(failure_probe.Args(checkpoint="expert", task="push_cube", episodes=1))[0]
    named, closest = record["named_object"], record["closest_xy_cm"]
    assert record["success"] and record["went_to_named"] and len(closest) == 3
    assert closest[named] < 6.0 and min(c for i, c in enumerate(closest) if i != named) > 8.0


def stand_in_policy(monkeypatch, failure_probe, fill):
    """Make failure_probe load a stand-in policy: chunks of 4 zero actions that fill(obs, chunk) edits."""
    class StandIn:
        exec_horizon, config, view_keys = 4, {"camera_image_size": 64}, ("image",)

    def act_fn(policy, deterministic):
        def act(obs, keys):
            chunk = np.zeros((1, 4, 7), np.float32)
            fill(obs, chunk)
            return chunk
        return act

    monkeypatch.setattr(failure_probe.policies, "load_policy", lambda path: StandIn())
    monkeypatch.setattr(failure_probe.policies, "eval_act_fn", act_fn)


def test_failure_probe_measures_whether_the_instruction_is_read(monkeypatch):
    # a stand-in policy whose lateral command follows the word "red": naming another cube changes
    # its first dy by 0.4 (red is one of the two colours of every swap), and nothing else
    failure_probe = load("failure_probe")

    def reads_red(obs, chunk):
        chunk[..., 1] = 0.2 if "red" in obs["instruction"][0] else -0.2

    stand_in_policy(monkeypatch, failure_probe, reads_red)
    record = failure_probe.probe(failure_probe.Args(checkpoint="stand-in", task="push_cube", episodes=1,
                                                    train_states=True))[0]
    assert record["seed"] == failure_probe.envs.train_seed(0)
    assert record["first_xyz_change_other_cube_named"] == pytest.approx([0.0, 0.4, 0.0])
    # the named cube is still an index (the swap must not replace it), read against the distances
    assert record["named_object"] in (0, 1, 2)
    assert record["went_to_named"] == (int(np.argmin(record["closest_xy_cm"])) == record["named_object"])


def test_failure_probe_zero_dims_removes_a_command_but_still_scores_it(monkeypatch):
    # a stand-in policy that only ever pitches (0.5 = 0.05 rad per step): executed, the gripper
    # tilts far from top-down; with --zero-dims 3 4 it stays top-down, while the error reported is
    # still that of the policy's own pitch command
    failure_probe = load("failure_probe")

    def pitches(obs, chunk):
        chunk[..., 4], chunk[..., 6] = 0.5, 1.0

    stand_in_policy(monkeypatch, failure_probe, pitches)
    as_is, zeroed = (failure_probe.probe(failure_probe.Args(checkpoint="stand-in", task="open_drawer", episodes=1,
                                                            zero_dims=dims))[0] for dims in ([], [3, 4]))
    assert as_is["max_tilt_deg"] > 30.0 and zeroed["max_tilt_deg"] < 5.0
    # top-down, the expert commands no pitch: the error is the policy's 0.5, not the executed 0
    assert zeroed["mean_abs_action_error"]["dpitch"] == pytest.approx(0.5, abs=0.05)
    assert as_is["mean_abs_action_error"]["dpitch"] > 1.0  # tilted, the expert pitches back hard


def test_grounding_probe_scores_whether_the_frame_and_the_named_cube_are_read():
    # a stand-in policy whose first dx reads the image (pixel value / 100) and whose first dy
    # follows the word "red" (+0.2, else -0.2), on three frames whose expert actions it matches: no
    # error, full correlation, and a change only where the swap (red -> green -> blue -> red) adds
    # or removes "red"
    import torch
    grounding_probe = load("grounding_probe")
    assert grounding_probe.other_cube_named("push the blue cube to the goal") == "push the red cube to the goal"

    class ReadsRed:
        def act(self, obs, deterministic, x0_seeds):
            actions = torch.zeros(len(obs["instruction"]), 4, 7)
            actions[:, :, 0] = torch.as_tensor(obs["image"])[:, 0, 0, 0].float()[:, None] / 100
            actions[:, :, 1] = torch.tensor([0.2 if "red" in t else -0.2 for t in obs["instruction"]])[:, None]
            return {"actions": actions}

    def frame(pixel, instruction, dy):
        actions = np.zeros((4, 7), np.float32)
        actions[:, 0], actions[:, 1] = pixel / 100, dy
        return {"image": np.full((8, 8, 3), pixel, np.uint8), "state": np.zeros(8, np.float32),
                "instruction": instruction, "action_mask": np.ones(4, bool), "actions": actions}

    push = [frame(10 * k, f"push the {c} cube to the goal", 0.2 if c == "red" else -0.2)
            for k, c in enumerate(("red", "green", "blue"))]
    scores = grounding_probe.first_action_scores(ReadsRed(), push)
    for name in ("dx", "dy"):
        assert scores[f"{name}_error"] == pytest.approx(0.0, abs=1e-6) and scores[f"{name}_corr"] == pytest.approx(1.0)
    assert scores["change"] == pytest.approx(0.8 / 3)
    # pick_and_place frames: no cube is named, so no change is scored; a wrong dx is
    pick = [frame(10 * k, "put the cube in the box", -0.2) for k in range(3)]
    for sample in pick:
        sample["actions"][:, 0] += 0.05
    scores = grounding_probe.first_action_scores(ReadsRed(), pick)
    assert scores["change"] is None and scores["dx_error"] == pytest.approx(0.05, abs=1e-6)
    assert scores["dx_corr"] == pytest.approx(1.0) and np.isnan(scores["dy_corr"])  # a constant dy has no correlation


def test_grounding_probe_refuses_other_demos(tiny_data):
    grounding_probe = load("grounding_probe")
    with pytest.raises(SystemExit, match="push_cube or pick_and_place"):
        grounding_probe.main(grounding_probe.Args(data=str(tiny_data["sim"]), steps=1))
