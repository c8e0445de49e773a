"""eval_real.py: the table maths, the trial log, the openpi-protocol server, proxy and offline."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval_real  # noqa: E402

# One torch thread: on a busy 2-core machine torch's default two threads spin against each other
# (the tiny openvla's act measured 4 s instead of 0.05 s). Subprocesses get the same setting.
SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rec(method, task, variant, repeat, success, **kw):
    return {"method": method, "task": task, "variant": variant, "repeat": repeat, "success": success, **kw}


def cli_error(argv) -> str:
    """Run eval_real's CLI in-process; it must stop with one "error: ..." line (no traceback)."""
    with pytest.raises(SystemExit) as stop:
        eval_real.main(argv)
    assert isinstance(stop.value.code, str) and stop.value.code.startswith("error: "), stop.value.code
    return stop.value.code


# ---------------------------------------------------------------------------------------------
# table maths
# ---------------------------------------------------------------------------------------------
def test_table_one_task_mean_std_by_hand():
    # repeat 0: 3/4 = 75 %, repeat 1: 2/4 = 50 %  ->  mean 62.5, population std 12.5,
    # sample std 12.5 * sqrt(2) = 17.68
    succ = {0: [1, 1, 1, 0], 1: [1, 0, 0, 1]}
    records = [rec("rlco", "open_drawer", "in_distribution", r, bool(s), seed=1_000_000 + i)
               for r, ss in succ.items() for i, s in enumerate(ss)]
    records += [rec("sft", "open_drawer", "in_distribution", r, False) for r in (0, 1) for _ in range(4)]
    table = eval_real.summarize(records)
    assert table["columns"] == ["open_drawer"]
    assert [r["method"] for r in table["rows"]] == ["rlco", "sft"]
    cell = table["rows"][0]["cells"]["open_drawer"]
    assert cell["mean"] == pytest.approx(62.5)
    assert cell["std"] == pytest.approx(12.5)
    assert cell["per_repeat"] == {"0": 75.0, "1": 50.0}
    assert cell["episodes"] == {"0": 4, "1": 4}
    assert eval_real.summarize(records, ddof=1)["rows"][0]["cells"]["open_drawer"]["std"] == pytest.approx(
        12.5 * 2 ** 0.5)
    md = eval_real.to_markdown(table)
    assert "| rlco | 62.5 +- 12.5 |" in md
    assert "| sft | 0.0 +- 0.0 |" in md
    assert "population std" in md


def test_table_several_tasks_has_avg_over_per_repeat_means():
    # pick_and_place: r0 3/5 = 60, r1 4/5 = 80;  push_cube: r0 1/5 = 20, r1 1/5 = 20
    # Avg per repeat: r0 40, r1 50 -> 45 +- 5 (population)
    records = []
    for task, per_rep in (("pick_and_place", (3, 4)), ("push_cube", (1, 1))):
        for r, k in enumerate(per_rep):
            records += [rec("pi05_rlco", task, "in_distribution", r, i < k) for i in range(5)]
    table = eval_real.summarize(records)
    assert table["columns"] == ["pick_and_place", "push_cube", "Avg"]
    cells = table["rows"][0]["cells"]
    assert (cells["pick_and_place"]["mean"], cells["pick_and_place"]["std"]) == pytest.approx((70.0, 10.0))
    assert (cells["push_cube"]["mean"], cells["push_cube"]["std"]) == pytest.approx((20.0, 0.0))
    assert (cells["Avg"]["mean"], cells["Avg"]["std"]) == pytest.approx((45.0, 5.0))
    assert "| pi05_rlco | 70.0 +- 10.0 | 20.0 +- 0.0 | 45.0 +- 5.0 |" in eval_real.to_markdown(table)


def test_table_variants_show_relative_drop_and_missing_cells():
    # in_distribution 8/10 and 6/10 -> 70; unseen_states 4/10 and 3/10 -> 35, a 50 % drop
    records = []
    for variant, per_rep in (("in_distribution", (8, 6)), ("unseen_states", (4, 3))):
        for r, k in enumerate(per_rep):
            records += [rec("rlco", "pick_and_place", variant, r, i < k) for i in range(10)]
    records += [rec("sft", "pick_and_place", "in_distribution", 0, True)]  # one repeat only
    table = eval_real.summarize(records)
    assert table["columns"] == ["in_distribution", "unseen_states"]
    rl, sft = (r["cells"] for r in table["rows"])
    assert rl["unseen_states"]["drop_pct"] == pytest.approx(50.0)
    assert sft["unseen_states"] is None
    md = eval_real.to_markdown(table)
    assert "| rlco | 70.0 +- 10.0 | 35.0 +- 5.0 (-50.0%) |" in md
    # a single repeat has no spread, whichever std: the cell shows the mean alone
    assert "| sft | 100.0 | - |" in md and sft["in_distribution"]["std"] is None
    assert "| sft | 100.0 | - |" in eval_real.to_markdown(eval_real.summarize(records, ddof=1))
    one = eval_real.to_markdown(eval_real.summarize([r for r in records if r["method"] == "sft"]))
    assert "one repeat (no spread)" in one and "+-" not in one


def test_table_rejects_incomplete_records():
    with pytest.raises(eval_real.EvalError, match="lacks"):
        eval_real.summarize([{"method": "a", "task": "t", "success": True}])
    with pytest.raises(eval_real.EvalError, match="no episode records"):
        eval_real.summarize([])


def test_write_table_keeps_dots_in_the_name(tmp_path):
    records = [{"method": "m", "task": "open_drawer", "variant": "in_distribution", "repeat": 0, "success": True}]
    eval_real.write_table(eval_real.summarize(records), tmp_path / "alpha0.95")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha0.95.json", "alpha0.95.md"]


def test_method_name_from_checkpoint_path():
    assert eval_real.method_name("runs/pi05_rlco/checkpoints/final") == "pi05_rlco"
    assert eval_real.method_name("runs/pi05_rlco/checkpoints/final/") == "pi05_rlco"
    assert eval_real.method_name("runs/sft/checkpoints/2000") == "sft@2000"
    assert eval_real.method_name("runs/rlco_{task}/checkpoints/final") == "rlco"


# ---------------------------------------------------------------------------------------------
# results log
# ---------------------------------------------------------------------------------------------
def test_results_log_drops_a_torn_last_line_and_repairs_it(tmp_path, capsys):
    log = tmp_path / "results.jsonl"
    eval_real.append_record(log, {"a": 1})
    eval_real.append_record(log, {"a": 2})
    with open(log, "ab") as f:
        f.write(b'{"a": 3, "succ')  # a write cut short by a crash
    assert eval_real.load_records(log) == [{"a": 1}, {"a": 2}]
    assert "unfinished last line" in capsys.readouterr().out
    assert log.read_bytes().endswith(b"succ")  # without repair the file is left alone
    eval_real.load_records(log, repair=True)
    eval_real.append_record(log, {"a": 4})
    assert eval_real.load_records(log) == [{"a": 1}, {"a": 2}, {"a": 4}]
    # a broken line in the middle is not a crash artefact: it is reported, not skipped
    log.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(eval_real.EvalError, match=":2: not a JSON line"):
        eval_real.load_records(log)


def test_trial_plan_expands_repeats_and_rejects_bad_plans(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"task": "open_drawer", "repeats": 2, "trials": [
        {"id": "a", "setup": "drawer left", "seed": 1_000_000},
        {"setup": "drawer right", "seed": 1_000_001, "variant": "unseen_states"}]}))
    trials = eval_real.load_plan(plan)
    assert [(t["trial"], t["repeat"], t["variant"]) for t in trials] == [
        ("a", 0, "in_distribution"), ("1", 0, "unseen_states"),
        ("a", 1, "in_distribution"), ("1", 1, "unseen_states")]
    assert all(t["task"] == "open_drawer" for t in trials)
    for bad, why in ((None, "not found"), ("{", "not valid JSON"), ('{"trials": []}', "non-empty"),
                     ('{"task": "x", "trials": [{"seed": 1}]}', "setup"),
                     ('{"trials": [{"setup": "s"}]}', "no task"),
                     ('{"task": "x", "trials": [{"id": 1, "setup": "s"}, {"id": "1", "setup": "t"}]}', "duplicate")):
        p = tmp_path / "bad.json"
        if p.exists():
            p.unlink()
        if bad is not None:
            p.write_text(bad)
        with pytest.raises(eval_real.EvalError, match=why):
            eval_real.load_plan(p)


def test_report_cli_prints_table_and_rejects_missing_file(tmp_path):
    log = tmp_path / "results.jsonl"
    for r, k in ((0, 1), (1, 2)):
        for i in range(2):
            eval_real.append_record(log, rec("rlco", "close_drawer", "in_distribution", r, i < k))
    out = subprocess.run([sys.executable, "eval_real.py", "report", str(log), "--out", str(tmp_path / "t")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=SUB_ENV)
    assert out.returncode == 0, out.stderr
    assert "| rlco | 75.0 +- 25.0 |" in out.stdout
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["cells"]["close_drawer"]["mean"] == 75.0
    assert "| rlco | 75.0 +- 25.0 |" in (tmp_path / "t.md").read_text()
    bad = subprocess.run([sys.executable, "eval_real.py", "report", str(tmp_path / "nope.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=SUB_ENV)
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------
# tiny checkpoints and the policy server
# ---------------------------------------------------------------------------------------------
INSTRUCTIONS = ["open the drawer", "close the drawer", "pick up the object and place it in the container",
                "push the cube"]


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    import policies
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for kind in ("pi05", "openvla"):
        paths[kind] = root / f"tiny_{kind}" / "checkpoints" / "final"
        policies.make_policy(kind, "tiny", instructions=INSTRUCTIONS).save(paths[kind])
    return paths


@pytest.fixture()
def server(tiny_ckpts):
    policy = eval_real.load_checkpoint(str(tiny_ckpts["pi05"]))
    srv = eval_real.PolicyServer(policy, "observation/image", "observation/state", "prompt", None,
                                 deterministic=False, seed=7, metadata={"policy": "pi05", "action_horizon": 4})
    ws_server = srv.start("127.0.0.1", 0, max_message_mb=1.0)
    srv.port = ws_server.socket.getsockname()[1]
    yield srv
    ws_server.shutdown()


def robot_obs(rng, size=64):
    return {"observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32), "prompt": "open the drawer"}


def test_server_survives_bad_clients_and_serves_the_next(server):
    import urllib.request

    from openpi_client import msgpack_numpy
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    uri = f"ws://127.0.0.1:{server.port}"
    rng = np.random.default_rng(0)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
        assert r.status == 200 and r.read() == b"OK\n"

    # malformed requests: a text frame per request, and the same connection still serves
    with connect(uri, compression=None, max_size=None, open_timeout=10) as ws:
        assert msgpack_numpy.unpackb(ws.recv(timeout=10))["policy"] == "pi05"
        for bad, why in ((b"\xc1 not msgpack", "not a msgpack observation"),
                         (msgpack_numpy.packb([1, 2, 3]), "expected a msgpack map"),
                         (msgpack_numpy.packb({"prompt": "open the drawer"}), "missing key"),
                         (msgpack_numpy.packb({**robot_obs(rng), "observation/state": np.zeros(3, np.float32)}),
                          "must be 8 finite floats"),
                         (msgpack_numpy.packb({**robot_obs(rng), "observation/image": np.zeros((8, 8), np.uint8)}),
                          "uint8 image"),
                         ("a text frame", "binary msgpack frame")):
            ws.send(bad)
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str) and why in reply, reply
        ws.send(msgpack_numpy.packb(robot_obs(rng)))
        assert msgpack_numpy.unpackb(ws.recv(timeout=60))["actions"].shape == (4, 7)

    # an oversized request (limit 1 MiB) closes only that connection, with code 1009
    with connect(uri, compression=None, max_size=None, open_timeout=10) as ws:
        ws.recv(timeout=10)
        ws.send(b"\x00" * (2 * 2**20))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    # a client that vanishes mid-episode, before its reply, without a closing handshake
    ws = connect(uri, compression=None, max_size=None, open_timeout=10)
    ws.recv(timeout=10)
    ws.send(msgpack_numpy.packb(robot_obs(rng)))
    ws.socket.close()
    served = server.requests
    deadline = time.time() + 60
    while server.requests == served and time.time() < deadline:  # the server finishes its inference
        time.sleep(0.05)

    # a second, well-behaved client (the unmodified PyPI openpi-client) is served
    client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    assert client.get_server_metadata()["action_horizon"] == 4
    out = client.infer(robot_obs(rng))
    assert out["actions"].shape == (4, 7) and out["actions"].dtype == np.float32
    assert np.isfinite(out["actions"]).all() and out["server_timing"]["infer_ms"] > 0
    client._ws.close()
    assert server.errors == 6


def test_server_sampling_replays_per_episode_and_maps_keys(tiny_ckpts):
    """The same observations give the same sampled actions on each new connection (the generator
    is reseeded per episode); custom observation keys and a default prompt are honoured."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = eval_real.load_checkpoint(str(tiny_ckpts["openvla"]))
    srv = eval_real.PolicyServer(policy, "cam", "robot_state", "task", "open the drawer",
                                 deterministic=False, seed=3, metadata={})
    ws_server = srv.start("127.0.0.1", 0, max_message_mb=4)
    try:
        port = ws_server.socket.getsockname()[1]
        rng = np.random.default_rng(1)
        seq = [{"cam": rng.integers(0, 256, (3, 48, 48), dtype=np.uint8),  # CHW is accepted too
                "robot_state": rng.normal(size=8)} for _ in range(4)]
        runs = []
        for _ in range(2):
            client = WebsocketClientPolicy(host="127.0.0.1", port=port)
            runs.append(np.stack([client.infer(o)["actions"] for o in seq]))
            client._ws.close()
        # in-process with the same seed and observations: identical samples
        import policies

        gen = eval_real.make_generator(3)
        act = policies.eval_act_fn(policy, False, gen)
        local = np.stack([act({"image": o["cam"].transpose(1, 2, 0)[None],
                               "state": o["robot_state"][None].astype(np.float32),
                               "instruction": ["open the drawer"]})[0] for o in seq])
    finally:
        ws_server.shutdown()
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], local)
    assert len({a.tobytes() for a in runs[0]}) > 1  # actions actually vary with the observation


def test_server_gives_a_two_view_policy_the_wrist_image(tmp_path):
    import policies

    torch.manual_seed(0)
    policy = policies.make_policy("pi05", instructions=["open the drawer"], wrist_camera=True)
    srv = eval_real.PolicyServer(policy, "observation/image", "observation/state", "prompt", "open the drawer",
                                 deterministic=True, seed=0, metadata={})
    rng = np.random.default_rng(2)
    msg = {"observation/image": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 256, (3, 48, 48), dtype=np.uint8),  # CHW too
           "observation/state": rng.normal(size=8)}
    obs = srv.to_obs(msg)
    np.testing.assert_array_equal(obs["wrist_image"][0], msg["observation/wrist_image"].transpose(1, 2, 0))
    np.testing.assert_array_equal(obs["image"][0], msg["observation/image"])
    with pytest.raises(eval_real.EvalError, match="observation/wrist_image"):
        srv.to_obs({k: v for k, v in msg.items() if k != "observation/wrist_image"})
    one_view = eval_real.PolicyServer(policies.make_policy("pi05", instructions=["open the drawer"]),
                                      "observation/image", "observation/state", "prompt", "open the drawer",
                                      deterministic=True, seed=0, metadata={})
    assert "wrist_image" not in one_view.to_obs(msg)  # a one-view policy neither needs nor gets it


# ---------------------------------------------------------------------------------------------
# the operator's trial log through the real CLI: killed, then resumed
# ---------------------------------------------------------------------------------------------
def start_serve(ckpt, plan, results):
    proc = subprocess.Popen([sys.executable, "eval_real.py", "serve", "--checkpoint", str(ckpt), "--host", "127.0.0.1",
                             "--port", "0", "--trials", str(plan), "--results", str(results)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=SUB_ENV)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line, "serve exited early:\n" + "".join(lines)
        lines.append(line)
        if "health check:" in line:
            port = int(line.split("ws://127.0.0.1:")[1].split(";")[0])
            return proc, port, lines
    proc.kill()
    raise AssertionError("serve did not start:\n" + "".join(lines))


def finish_serve(proc, answers, timeout=120):
    """Type the operator's answers, close stdin and return the rest of the console output.
    (Not communicate(): it would skip what readline() already buffered.)"""
    import threading

    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        proc.stdin.write(answers)
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait()
    finally:
        watchdog.cancel()
    return out


def wait_for_lines(path, n, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, "serve exited"
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines")


@pytest.mark.e2e
def test_trial_log_survives_kill_and_resumes_without_duplicates(tiny_ckpts, tmp_path):
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"task": "open_drawer", "repeats": 2, "trials": [
        {"id": "left", "setup": "drawer closed, cabinet 5 cm left", "seed": 1_000_000},
        {"id": "right", "setup": "drawer closed, cabinet 5 cm right", "seed": 1_000_001}]}))
    results = tmp_path / "results.jsonl"

    proc, port, _ = start_serve(tiny_ckpts["pi05"], plan, results)
    try:
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        for _ in range(3):  # the robot runs trial "left": three action chunks
            client.infer(robot_obs(np.random.default_rng(0)))
        proc.stdin.write("y\nhandle slipped once\n")
        proc.stdin.flush()
        wait_for_lines(results, 1, proc)
        proc.stdin.write("y\n\n")
        proc.stdin.flush()
        wait_for_lines(results, 2, proc)
    finally:
        proc.send_signal(signal.SIGKILL)  # the operator's laptop dies
        proc.wait(timeout=30)
    with open(results, "a") as f:
        f.write('{"method": "tiny_pi05", "trial": "left", "repe')  # and a write it never finished

    proc, port, lines = start_serve(tiny_ckpts["pi05"], plan, results)
    out = finish_serve(proc, "y\n\nmaybe\nn\nmissed the handle\n")
    out = "".join(lines) + out
    assert proc.returncode == 0, out
    assert "2 already in" in out and "2 to go" in out
    assert "please answer one of" in out  # "maybe" is asked again, not recorded
    assert "unfinished last line" in out

    recs = eval_real.load_records(results)
    assert [(r["trial"], r["repeat"], r["success"]) for r in recs] == [
        ("left", 0, True), ("right", 0, True), ("left", 1, True), ("right", 1, False)]
    assert len({eval_real.trial_key(r) for r in recs}) == 4
    assert recs[0]["note"] == "handle slipped once" and recs[3]["note"] == "missed the handle"
    assert recs[0]["requests"] == 3 and recs[1]["requests"] == 0
    assert recs[0]["method"] == "tiny_pi05" and recs[0]["seed"] == 1_000_000 and recs[0]["domain"] == "real"
    # repeat 0: 2/2 = 100 %, repeat 1: 1/2 = 50 %  ->  75.0 +- 25.0, printed at the end and by report
    assert "| tiny_pi05 | 75.0 +- 25.0 |" in out
    assert "| tiny_pi05 | 75.0 +- 25.0 |" in eval_real.to_markdown(eval_real.summarize(recs))


# ---------------------------------------------------------------------------------------------
# offline action error
# ---------------------------------------------------------------------------------------------
def test_offline_action_error_against_known_offsets(tiny_ckpts, tmp_path):
    """Demos whose actions are the openvla policy's own greedy actions, except dz shifted by 0.05:
    L1 is 0.05 on dz and 0 elsewhere; dz's tokens all miss, the others all hit."""
    import demos

    policy = eval_real.load_checkpoint(str(tiny_ckpts["openvla"]))
    rng = np.random.default_rng(0)
    writer = demos.LeRobotWriter(tmp_path / "real", fps=10, image_shape=(32, 32, 3), use_videos=False)
    for _ in range(2):
        images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
        states = rng.normal(size=(5, 8)).astype(np.float32)
        actions = policy.act({"image": images, "state": states, "instruction": ["open the drawer"] * 5},
                             deterministic=True)["actions"][:, 0].numpy()
        actions[:, 2] += 0.05
        writer.add_episode(images, states, actions, "open the drawer")
    writer.close()

    out = tmp_path / "offline.json"
    m = eval_real.offline(eval_real.OfflineArgs(checkpoint=str(tiny_ckpts["openvla"]), data=str(tmp_path / "real"),
                                                batch_size=4, out=str(out)))
    assert json.loads(out.read_text()) == m
    assert m["frames"] == 10 and m["action_steps"] == 10
    assert m["l1"]["dz"] == pytest.approx(0.05, abs=1e-5)
    assert all(v == pytest.approx(0.0, abs=1e-6) for k, v in m["l1"].items() if k != "dz")
    assert m["l1_mean"] == pytest.approx(0.05 / 7, abs=1e-5)
    assert m["token_accuracy"]["dz"] == 0.0
    assert all(v == 1.0 for k, v in m["token_accuracy"].items() if k != "dz")

    # pi05 predicts chunks of 4: steps past an episode's end are not scored (4+4+3+2+1 per episode)
    m = eval_real.offline(eval_real.OfflineArgs(checkpoint=str(tiny_ckpts["pi05"]), data=str(tmp_path / "real"),
                                                out=str(tmp_path / "pi05.json")))
    assert m["action_steps"] == 28 and "token_accuracy" not in m
    assert all(np.isfinite(v) and v > 0 for v in m["l1"].values())


def test_offline_rejects_unfit_data_clearly(tiny_ckpts, tmp_path):
    # the fixture (a real SO-101 dataset) comes without its video files: one clear line, no traceback
    fixture = ROOT / "tests" / "fixtures" / "lerobot-v3-so101-real"
    assert "video file missing" in cli_error(["offline", "--checkpoint", str(tiny_ckpts["pi05"]),
                                              "--data", str(fixture), "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()
    with pytest.raises(eval_real.EvalError, match="not found"):
        eval_real.offline(eval_real.OfflineArgs(checkpoint=str(tiny_ckpts["pi05"]), data=str(tmp_path / "nowhere")))
    # 6-D joint actions (an SO-101 arm) do not fit a 7-D end-effector policy
    import demos

    writer = demos.LeRobotWriter(tmp_path / "so101", fps=30, image_shape=(16, 16, 3), state_dim=6, action_dim=6,
                                 use_videos=False, robot_type="so101_follower")
    writer.add_episode(np.zeros((3, 16, 16, 3), np.uint8), np.zeros((3, 6), np.float32), np.zeros((3, 6), np.float32),
                       "pick the cube")
    writer.close()
    with pytest.raises(eval_real.EvalError, match="6 dims but the pi05 policy expects 7"):
        eval_real.offline(eval_real.OfflineArgs(checkpoint=str(tiny_ckpts["pi05"]), data=str(tmp_path / "so101")))


# ---------------------------------------------------------------------------------------------
# proxy_real episodes: in-process, through the server, and the proxy command
# ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_openpi_client_episode_equals_in_process(tiny_ckpts):
    """A whole proxy_real episode driven by the PyPI openpi-client through the server replays the
    in-process episode of the same checkpoint and seeds: same observations, actions and outcome."""
    import envs
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = eval_real.load_checkpoint(str(tiny_ckpts["pi05"]))
    env = envs.make_env("open_drawer", domain="proxy_real", num_envs=1, image_size=64, max_episode_steps=12)
    seeds = envs.eval_seeds(1)
    try:
        import policies

        local_act = policies.eval_act_fn(policy, False, eval_real.make_generator(5))
        local_log, remote_log = [], []

        def local(obs, keys):
            local_log.append((obs["image"].copy(), obs["state"].copy(), local_act(obs)))
            return local_log[-1][2]

        local_eps, _ = envs.evaluate_success(env, local, seeds)

        srv = eval_real.PolicyServer(policy, "observation/image", "observation/state", "prompt", None,
                                     deterministic=False, seed=5, metadata={})
        ws_server = srv.start("127.0.0.1", 0, max_message_mb=4)
        try:
            client = WebsocketClientPolicy(host="127.0.0.1", port=ws_server.socket.getsockname()[1])

            def remote(obs, keys):  # what a robot runtime does: one unbatched observation per request
                reply = client.infer({"observation/image": obs["image"][0], "observation/state": obs["state"][0],
                                      "prompt": obs["instruction"][0]})
                remote_log.append((obs["image"].copy(), obs["state"].copy(), reply["actions"][None]))
                return remote_log[-1][2]

            remote_eps, videos = envs.evaluate_success(env, remote, seeds, video_seeds=1)
            client._ws.close()
        finally:
            ws_server.shutdown()
    finally:
        env.close()
    assert remote_eps == local_eps
    assert local_eps[0]["steps"] == 12 or local_eps[0]["success"]
    assert len(local_log) == len(remote_log) == -(-local_eps[0]["steps"] // 4)  # one request per chunk of 4
    for (i1, s1, a1), (i2, s2, a2) in zip(local_log, remote_log):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(local_log[0][1], local_log[-1][1])  # the robot moved
    assert len(videos[seeds[0]]) == len(local_log) + 1  # a frame per decision, plus the last one


@pytest.mark.e2e
def test_proxy_writes_table_log_and_videos(tiny_ckpts, tmp_path):
    # sampled evaluation (--no-deterministic): repeat r samples with seed r
    args = eval_real.ProxyArgs(checkpoint=[str(tiny_ckpts["pi05"]), str(tiny_ckpts["openvla"])],
                               task=["close_drawer"], variant=["in_distribution"], episodes=2, repeats=2,
                               deterministic=False, num_envs=1, image_size=64, max_episode_steps=6, videos=1,
                               name="t", out_dir=str(tmp_path))
    table = eval_real.proxy(args)
    log = eval_real.load_records(tmp_path / "t.episodes.jsonl")
    assert len(log) == 2 * 2 * 2  # checkpoints x repeats x episodes
    import envs

    for method in ("tiny_pi05", "tiny_openvla"):
        for repeat in (0, 1):  # every checkpoint and repeat ran the same initial states
            eps = [r for r in log if r["method"] == method and r["repeat"] == repeat]
            assert [r["seed"] for r in eps] == envs.eval_seeds(2)
            assert all(r["sampling_seed"] == repeat and r["domain"] == "proxy_real" for r in eps)
            assert all(r["deterministic"] is False and ("sampled" in r["protocol"] or "ReinFlow" in r["protocol"])
                       for r in eps)
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == table["rows"]
    assert [r["method"] for r in table["rows"]] == ["tiny_pi05", "tiny_openvla"]
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("| method | close_drawer |") and "| tiny_openvla | " in md
    assert "Protocol of tiny_pi05: ReinFlow noisy chain" in md
    assert "Protocol of tiny_openvla: action tokens sampled" in md
    for row in table["rows"]:  # the table agrees with the episode log
        for repeat in (0, 1):
            wins = [r["success"] for r in log if r["method"] == row["method"] and r["repeat"] == repeat]
            assert row["cells"]["close_drawer"]["per_repeat"][str(repeat)] == 100.0 * sum(wins) / 2
    videos = sorted(p.name for p in (tmp_path / "videos" / "t").iterdir())
    assert len(videos) == 2 and all(v.endswith(".mp4") and "_seed1000000_" in v for v in videos)
    assert all((tmp_path / "videos" / "t" / v).stat().st_size > 0 for v in videos)


def logging_act_fns(monkeypatch, log: dict):
    """Wrap policies.eval_act_fn (what proxy acts with): every decision's action chunk goes to
    log[(policy kind, decision key)], and its observation's image shape to log[("image", kind)]."""
    import policies

    real = getattr(policies.eval_act_fn, "unwrapped", policies.eval_act_fn)  # wrap once, log to this `log`

    def eval_act_fn(policy, deterministic=True, generator=None):
        act = real(policy, deterministic, generator)

        def logged(obs, keys=None):
            out = act(obs, keys)
            log.setdefault(("image", policy.kind), set()).add(tuple(obs["image"].shape[1:]))
            log.setdefault(("calls", policy.kind), []).append(len(keys))
            for k, chunk in zip(keys, out):  # first: a short batch's spare copies come last (held, unlogged)
                log.setdefault((policy.kind, k), chunk)
            return out
        return logged

    eval_act_fn.unwrapped = real
    monkeypatch.setattr(policies, "eval_act_fn", eval_act_fn)


@pytest.mark.e2e
def test_proxy_default_is_noise_free_and_replays_for_any_num_envs(tiny_ckpts, tmp_path, monkeypatch, capsys):
    """By default every episode is evaluated with the noise-free protocol (and says so), once even
    when more repeats are asked; a second run and a run on 2 sub-envs instead of 1 give the same
    episodes and the same action chunk at every decision."""
    import functools

    import envs

    # 2 sub-envs in this process: what is tested is the batch, not the worker processes (seconds to start)
    monkeypatch.setattr(envs, "make_env", functools.partial(envs.make_env, num_workers=0))
    runs = {}
    for run, num_envs in (("a", 1), ("b", 1), ("c", 2)):
        log = {}
        logging_act_fns(monkeypatch, log)
        table = eval_real.proxy(eval_real.ProxyArgs(
            checkpoint=[str(tiny_ckpts["pi05"]), str(tiny_ckpts["openvla"])], task=["open_drawer"], episodes=3,
            repeats=2, num_envs=num_envs, image_size=64, max_episode_steps=6, videos=0, name=run,
            out_dir=str(tmp_path)))
        runs[run] = (eval_real.load_records(tmp_path / f"{run}.episodes.jsonl"), log, table)
    assert "note: the noise-free protocol's repeats are identical: running 1, not 2" in capsys.readouterr().out

    records, log, table = runs["a"]
    assert len(records) == 2 * 3  # checkpoints x episodes, one repeat
    for r in records:
        assert r["deterministic"] is True and r["repeat"] == 0 and r["sampling_seed"] is None
        assert (r["image_size"], r["domain"]) == (64, "proxy_real")
    pi05 = [r for r in records if r["method"] == "tiny_pi05"]
    vla = [r for r in records if r["method"] == "tiny_openvla"]
    assert [r["seed"] for r in pi05] == [r["seed"] for r in vla] == envs.eval_seeds(3)
    assert {r["protocol"] for r in pi05} == {"noise-free flow ODE, K=4 Euler steps, fresh x0 per decision; "
                                             "chunk 4, 4 executed"}
    assert {r["protocol"] for r in vla} == {"greedy action tokens; chunk 1, 1 executed"}
    assert {(r["method"], r["exec_horizon"]) for r in records} == {("tiny_pi05", 4), ("tiny_openvla", 1)}
    assert table["protocol"] == {pi05[0]["protocol"]: ["tiny_pi05"], vla[0]["protocol"]: ["tiny_openvla"]}
    md = (tmp_path / "a.md").read_text()
    assert f"Protocol of tiny_pi05: {pi05[0]['protocol']}." in md
    assert f"Protocol of tiny_openvla: {vla[0]['protocol']}." in md

    def outcomes(recs):
        return [(r["method"], r["seed"], r["success"], r["steps"], r["protocol"]) for r in recs]

    chunks = [k for k in log if k[0] in ("pi05", "openvla")]  # every decision of every episode
    assert len(chunks) == sum(-(-r["steps"] // 4) for r in pi05) + sum(r["steps"] for r in vla)
    for other in ("b", "c"):
        assert outcomes(runs[other][0]) == outcomes(records), other
        assert runs[other][2]["rows"] == table["rows"]
        for k in chunks:  # run c batches 2 sub-envs: the same actions up to float rounding
            np.testing.assert_allclose(runs[other][1][k], log[k], rtol=0, atol=1e-5 if other == "c" else 0)
    assert max(runs["c"][1][("calls", "pi05")]) == 2 and max(log[("calls", "pi05")]) == 1


@pytest.mark.e2e
def test_proxy_takes_image_size_and_exec_horizon_from_the_checkpoint(tiny_ckpts, tmp_path, monkeypatch):
    """Without --image-size the camera takes the checkpoint's camera_image_size (128 when it has
    none; one env per resolution); each decision executes the checkpoint's exec_horizon actions."""
    import envs
    import policies

    policy = policies.load_policy(tiny_ckpts["pi05"])
    policy.config["camera_image_size"], policy.config["exec_horizon"] = 32, 2
    own = tmp_path / "own_pi05" / "checkpoints" / "final"
    policy.save(own)
    log, horizons = {}, []
    logging_act_fns(monkeypatch, log)
    real = envs.evaluate_success

    def evaluate_success(env, act_fn, seeds, exec_horizon=None, **kw):
        horizons.append((env.image_size, exec_horizon))
        return real(env, act_fn, seeds, exec_horizon, **kw)

    monkeypatch.setattr(envs, "evaluate_success", evaluate_success)
    eval_real.proxy(eval_real.ProxyArgs(checkpoint=[str(own), str(tiny_ckpts["pi05"])], task=["open_drawer"],
                                        episodes=1, num_envs=1, max_episode_steps=6, videos=0, name="t",
                                        out_dir=str(tmp_path)))
    assert horizons == [(32, 2), (128, 4)]
    assert log[("image", "pi05")] == {(32, 32, 3), (128, 128, 3)}
    own_rec, plain_rec = eval_real.load_records(tmp_path / "t.episodes.jsonl")
    assert (own_rec["image_size"], own_rec["exec_horizon"]) == (32, 2)
    assert own_rec["protocol"].endswith("chunk 4, 2 executed")
    assert (plain_rec["image_size"], plain_rec["exec_horizon"]) == (128, 4)
    assert plain_rec["protocol"].endswith("chunk 4, 4 executed")
    # act calls, one per decision: 2 actions executed per chunk of 4, then 4 per chunk
    decisions = log[("calls", "pi05")]
    assert len(decisions) == -(-own_rec["steps"] // 2) + -(-plain_rec["steps"] // 4)
    assert own_rec["steps"] == 6 or own_rec["success"]
    assert own_rec["gap"] == plain_rec["gap"] == 1.0  # proxy_real itself, unless --gap says otherwise
    eval_real.proxy(eval_real.ProxyArgs(checkpoint=[str(own)], task=["open_drawer"], episodes=1, num_envs=1,
                                        max_episode_steps=2, videos=0, name="g", out_dir=str(tmp_path), gap=0.25))
    (rec,) = eval_real.load_records(tmp_path / "g.episodes.jsonl")
    assert rec["gap"] == 0.25
    # an explicit --image-size wins over the checkpoint's
    assert eval_real.camera_size(policy, 48) == 48 and eval_real.camera_size(policy, None) == 32


def test_proxy_rejects_bad_arguments_before_running(tiny_ckpts, tmp_path):
    base = ["proxy", "--out-dir", str(tmp_path), "--checkpoint"]
    assert "is not a checkpoint" in cli_error(base + [str(tmp_path / "missing")])
    assert "unknown task" in cli_error(base + [str(tiny_ckpts["pi05"]), "--task", "fold_laundry"])
    assert "unknown variant" in cli_error(base + [str(tiny_ckpts["pi05"]), "--variant", "upside_down"])
    assert "share the row name" in cli_error(base + [str(tiny_ckpts["pi05"])] * 2)
    assert "--names has 1 entries for 2" in cli_error(
        base + [str(tiny_ckpts["pi05"]), str(tiny_ckpts["openvla"]), "--names", "a"])
    # a {task} checkpoint template is checked for every task before anything runs
    template = str(tiny_ckpts["pi05"]).replace("tiny_pi05", "{task}")
    assert "open_drawer/checkpoints/final is not a checkpoint" in cli_error(base + [template, "--task", "open_drawer"])
    assert not any(tmp_path.iterdir())
