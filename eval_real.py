"""Success rates on identical initial states, the way the paper reports them (Sec. V).

  proxy    evaluate checkpoints on the `proxy_real` domain: the same evaluation seeds for every
           checkpoint, by default with the noise-free protocol (greedy tokens / the noise-free
           flow chain; the checkpoint's own executed chunk and camera resolution); prints the
           paper's table (success %, mean +- std over repeats) and writes results/<name>.json/.md
  serve    serve a checkpoint to a real robot over WebSocket with openpi's protocol (any
           `openpi-client` runtime drives it); with --trials, keeps the operator's trial log
  report   the same table from one or more trial/episode logs (results.jsonl)
  offline  action error of a checkpoint on held-out real demos (a LeRobot v3.0 dataset)

Every episode or trial is one JSON line {method, task, variant, repeat, seed, success, protocol, ...};
`summarize` and `to_markdown` (tables.py) turn such lines into the table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from tables import (STD_NAMES, EvalError, _mean_std, _unique, append_record, format_cell,  # noqa: F401
                    load_records, summarize, to_markdown, write_table)


# ----------------------------------------------------------------------------------------------
# Policy helpers
# ----------------------------------------------------------------------------------------------
def method_name(checkpoint: str) -> str:
    """runs/<run>/checkpoints/final -> <run>; runs/<run>/checkpoints/<step> -> <run>@<step>."""
    p = Path(checkpoint.replace("{task}", "").rstrip("/"))
    if p.parent.name == "checkpoints":
        run = p.parent.parent.name.strip("_-")
        return run if p.name == "final" else f"{run}@{p.name}"
    return p.name.strip("_-") or str(p)


def check_checkpoint(path: str) -> None:
    if not (Path(path) / "config.json").is_file() or not (Path(path) / "model.safetensors").is_file():
        raise EvalError(f"{path} is not a checkpoint (expected config.json and model.safetensors there)")


def load_checkpoint(path: str, device: str | None = None):
    """policies.load_policy in eval mode on `device` (default: cuda when there is one, else cpu);
    a bad path is one clear line."""
    import policies
    import torch

    check_checkpoint(path)
    try:
        policy = policies.load_policy(path)
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"cannot load {path}: {e}") from None
    return policy.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def make_generator(seed: int):
    import torch

    return torch.Generator().manual_seed(int(seed))


# ----------------------------------------------------------------------------------------------
# proxy: automatic evaluation on the proxy_real domain
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ProxyArgs:
    """Evaluate checkpoints on the proxy_real domain on identical initial states.

    Every checkpoint runs the same evaluation seeds with one protocol, stated in every episode
    record and under the table: by default noise-free (greedy action tokens / pi0.5's noise-free
    K-step flow chain, x0 seeded per decision), so a second repeat would be identical;
    --no-deterministic samples instead (repeat r from a generator seeded with --seed + r). Each
    decision renders the camera once and executes the checkpoint's exec_horizon actions of its
    chunk; the camera takes the checkpoint's training resolution. Writes <out-dir>/<name>.json, .md
    (the table), .episodes.jsonl (one line per episode; `report` reads it) and a few videos under
    <out-dir>/videos/<name>/."""

    checkpoint: list[str]
    """checkpoint directories (one table row each). A path containing {task} is filled in per task (per-task checkpoints, e.g. runs/rlco_{task}/checkpoints/final); without it the same checkpoint is evaluated on every task."""
    task: list[str] = dataclasses.field(default_factory=lambda: ["pick_and_place"])
    """task(s); several give the Table I layout with an Avg column"""
    variant: list[str] = dataclasses.field(default_factory=lambda: ["in_distribution"])
    """variant(s): in_distribution, unseen_objects, unseen_states (Table II layout)"""
    names: list[str] | None = None
    """row names, one per checkpoint (default: the run's directory name)"""
    episodes: int = 20
    """evaluation episodes per repeat: initial states envs.eval_seeds(episodes), the same for all"""
    repeats: int = 1
    """times each setting is evaluated; only with --no-deterministic (the paper samples twice): repeat r samples with torch seed --seed + r on the same initial states. The noise-free protocol runs once (its repeats would be identical)"""
    seed: int = 0
    """base policy-sampling seed (--no-deterministic)"""
    deterministic: bool = True
    """the noise-free protocol (greedy tokens / noise-free flow chain with a per-decision seeded x0; proxy_real's own noise follows the episode seed). --no-deterministic samples actions instead (ReinFlow's noisy chain / tokens at temperature)"""
    num_envs: int = 4
    """parallel sub-envs per batch (noise-free results do not depend on it; sampled ones are reproducible for the same --seed and --num-envs)"""
    image_size: int | None = None
    """camera resolution (default: the checkpoint's camera_image_size, 128 for checkpoints without one)"""
    max_episode_steps: int | None = None
    """override the task's time limit"""
    gap: float = 1.0
    """how far the proxy_real domain is from the sim twin, in [0, 1] (envs.make_env: 0 = the twin, 1 = proxy_real)"""
    device: str | None = None
    """torch device of the policy (default: cuda when available, else cpu)"""
    sim_backend: Literal["cpu", "gpu"] = "cpu"
    """ManiSkill backend: cpu (sub-envs in worker processes) or gpu (one batched env)"""
    videos: int = 2
    """videos saved per checkpoint, task and variant (first repeat; one frame per decision)"""
    name: str | None = None
    """output name: results/<name>.json, .md, .episodes.jsonl (default: proxy_<tasks>_<variants>)"""
    out_dir: str = "results"
    """output directory"""
    std_ddof: int = 0
    """0: population std over repeats (numpy's default; half the spread of two repeats); 1: sample std"""


def camera_size(policy, image_size: int | None) -> int:
    """--image-size, else the resolution the checkpoint was trained at (128 when it does not say)."""
    return int(image_size or policy.config.get("camera_image_size") or 128)


def evaluate_setting(env, policy, args: ProxyArgs, seeds: list[int], meta: dict, log: Path,
                     video_dir: Path) -> list[dict]:
    """All repeats of one (checkpoint, task, variant) on the fixed seeds (envs.evaluate_success,
    the project's one success rollout); logs each episode with its protocol."""
    import envs
    import plumbing
    import policies
    from tqdm import tqdm

    records = []
    protocol = {"protocol": policy.protocol(args.deterministic), "deterministic": args.deterministic,
                "exec_horizon": policy.exec_horizon, "image_size": env.image_size, "gap": env.gap}
    for repeat in range(1 if args.deterministic else args.repeats):
        act = policies.eval_act_fn(policy, args.deterministic, make_generator(args.seed + repeat))
        t0 = time.time()
        with tqdm(total=len(seeds), desc=f"{meta['method']} {meta['task']} {meta['variant']} r{repeat}",
                  unit="ep", leave=False, file=sys.stdout) as bar:
            eps, videos = envs.evaluate_success(env, act, seeds, exec_horizon=policy.exec_horizon,
                                                video_seeds=args.videos if repeat == 0 else 0, progress=bar.update)
        for e in eps:
            records.append({**meta, "domain": "proxy_real", "repeat": repeat, **protocol,
                            "sampling_seed": None if args.deterministic else args.seed + repeat, **e})
            append_record(log, records[-1])
        wins = sum(e["success"] for e in eps)
        print(f"  {meta['method']} | {meta['task']} | {meta['variant']} | repeat {repeat}: "
              f"{100.0 * wins / len(eps):.1f}% ({wins}/{len(eps)}), {len(eps) / (time.time() - t0):.2f} episodes/s")
        fps = env.control_freq / policy.exec_horizon  # one frame per decision
        for s, frames in videos.items():
            ok = next(e["success"] for e in eps if e["seed"] == s)
            plumbing.save_video(frames, video_dir / f"{meta['method']}_{meta['task']}_{meta['variant']}_seed{s}_"
                                           f"{'success' if ok else 'fail'}.mp4", fps)
    return records


def proxy(args: ProxyArgs) -> dict:
    import envs

    for t in args.task:
        if t not in envs.TASKS:
            raise EvalError(f"unknown task {t!r}; choose from {envs.TASKS}")
    for v in args.variant:
        if v not in envs.VARIANTS:
            raise EvalError(f"unknown variant {v!r}; choose from {envs.VARIANTS}")
    if args.names is not None and len(args.names) != len(args.checkpoint):
        raise EvalError(f"--names has {len(args.names)} entries for {len(args.checkpoint)} checkpoints")
    if min(args.episodes, args.repeats, args.num_envs) < 1:
        raise EvalError("--episodes, --repeats and --num-envs must be >= 1")
    for template in args.checkpoint:  # all of them, before minutes of evaluation
        for t in args.task:
            check_checkpoint(template.replace("{task}", t))
    names = args.names or [method_name(c) for c in args.checkpoint]
    if len(set(names)) != len(names):
        raise EvalError(f"two checkpoints share the row name {names}; pass --names")
    if args.deterministic and args.repeats > 1:
        print(f"note: the noise-free protocol's repeats are identical: running 1, not {args.repeats} "
              f"(--no-deterministic samples)")
    name = args.name or f"proxy_{'-'.join(args.task)}_{'-'.join(args.variant)}"
    out = Path(args.out_dir) / name
    log = out.with_name(out.name + ".episodes.jsonl")
    log.unlink(missing_ok=True)  # this run's raw episodes only
    seeds = envs.eval_seeds(args.episodes)
    records, t0 = [], time.time()
    for task in args.task:
        task_envs = {}  # (variant, image size, wrist camera) -> env, shared by the checkpoints: building one takes seconds
        try:
            for template, method in zip(args.checkpoint, names):
                path = template.replace("{task}", task)
                print(f"[proxy] {method}: {path} on {task}")
                policy = load_checkpoint(path, args.device)
                size = camera_size(policy, args.image_size)
                wrist = "wrist_image" in policy.view_keys
                for variant in args.variant:
                    if (variant, size, wrist) not in task_envs:
                        try:
                            task_envs[variant, size, wrist] = envs.make_env(
                                task, domain="proxy_real", variant=variant, num_envs=min(args.num_envs, args.episodes),
                                image_size=size, sim_backend=args.sim_backend, max_episode_steps=args.max_episode_steps,
                                gap=args.gap, wrist_camera=wrist)
                        except ValueError as e:  # make_env's checks of --image-size etc.
                            raise EvalError(str(e)) from None
                    meta = {"method": method, "checkpoint": path, "task": task, "variant": variant}
                    records += evaluate_setting(task_envs[variant, size, wrist], policy, args, seeds, meta, log,
                                                Path(args.out_dir) / "videos" / name)
                del policy
        finally:
            for env in task_envs.values():
                env.close()
    elapsed = time.time() - t0
    table = summarize(records, ddof=args.std_ddof)
    table["episodes_per_s"] = len(records) / elapsed
    print()
    print(to_markdown(table))
    print(f"{len(records)} episodes in {elapsed:.1f}s ({len(records) / elapsed:.2f} episodes/s, model loading "
          f"and env set-up included); episode log: {log}")
    write_table(table, out)
    return table


# ----------------------------------------------------------------------------------------------
# serve: openpi-protocol WebSocket policy server, plus the operator's trial log
# ----------------------------------------------------------------------------------------------
class PolicyServer:
    """openpi's protocol: on connect, a msgpack metadata dict; then each binary msgpack
    observation dict gets {"actions": float32 [H, 7] in the robot's action space, "server_timing"}.
    A malformed request gets a text frame with the reason and the connection stays usable.
    deterministic: greedy tokens / the noise-free flow chain, with a fresh x0 per request drawn from
    the seeded generator (policies.eval_act_fn without decision keys); else sampled from it."""

    def __init__(self, policy, image_key: str, state_key: str, prompt_key: str,
                 default_prompt: str | None, deterministic: bool, seed: int, metadata: dict,
                 wrist_image_key: str = "observation/wrist_image"):
        self.state_key, self.prompt_key = state_key, prompt_key
        # the client keys of the camera views the policy reads, by our obs key
        client_keys = {"image": image_key, "wrist_image": wrist_image_key}
        self.view_keys = {k: client_keys[k] for k in policy.view_keys}
        self.default_prompt, self.metadata = default_prompt, metadata
        self.state_dim = policy.state_dim
        import policies

        # Noise (x0, sampling) comes from one generator, reseeded with episode_seed whenever an
        # episode starts (a client connects, or the operator starts a trial): an episode replays exactly.
        self.episode_seed = seed
        self.generator = make_generator(seed)
        self.act = policies.eval_act_fn(policy, deterministic, self.generator)
        self.lock = threading.Lock()  # one inference at a time; the policy is not thread-safe
        self.requests = 0  # answered requests, for the trial log
        self.errors = 0

    def to_obs(self, msg) -> dict:
        """A client's observation dict -> our batched obs dict (B = 1)."""
        if not isinstance(msg, dict):
            raise EvalError(f"expected a msgpack map (dict), got {type(msg).__name__}")
        missing = [k for k in (*self.view_keys.values(), self.state_key) if k not in msg]
        if missing:
            raise EvalError(f"missing key(s) {missing}; got keys {sorted(map(str, msg))} "
                            f"(map yours with --image-key/--wrist-image-key/--state-key)")
        views = {}
        for obs_key, key in self.view_keys.items():
            image = np.asarray(msg[key])
            if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
                image = image.transpose(1, 2, 0)  # CHW -> HWC
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise EvalError(f"{key!r} must be a uint8 image [H, W, 3], got {image.dtype} {list(image.shape)}")
            views[obs_key] = np.ascontiguousarray(image)[None]
        try:
            state = np.asarray(msg[self.state_key], dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise EvalError(f"{self.state_key!r} is not numeric: {e}") from None
        if state.shape[0] != self.state_dim or not np.isfinite(state).all():
            raise EvalError(f"{self.state_key!r} must be {self.state_dim} finite floats (tcp xyz, quaternion "
                            f"wxyz, gripper), got {state.shape[0]} values: {state.tolist()[:12]}")
        prompt = msg.get(self.prompt_key, self.default_prompt)
        if isinstance(prompt, bytes):
            prompt = prompt.decode()
        if not isinstance(prompt, str) or not prompt:
            raise EvalError(f"missing instruction: send {self.prompt_key!r} or start the server with --prompt")
        return {**views, "state": state[None], "instruction": [prompt]}

    def handle(self, ws) -> None:
        from openpi_client import msgpack_numpy
        from websockets.exceptions import ConnectionClosed

        peer = ws.remote_address
        print(f"[serve] client {peer} connected")
        with self.lock:
            self.generator.manual_seed(self.episode_seed)
        try:
            ws.send(msgpack_numpy.packb(self.metadata))
            for message in ws:
                try:
                    if isinstance(message, str):
                        raise EvalError("expected a binary msgpack frame, got a text frame")
                    try:
                        msg = msgpack_numpy.unpackb(message)
                    except Exception as e:  # any decoding failure is the client's
                        raise EvalError(f"not a msgpack observation ({type(e).__name__}: {e})") from None
                    obs = self.to_obs(msg)
                    with self.lock:
                        t0 = time.perf_counter()
                        actions = self.act(obs)[0]
                        infer_ms = 1000 * (time.perf_counter() - t0)
                        self.requests += 1
                    ws.send(msgpack_numpy.packb({"actions": actions.astype(np.float32),
                                                 "server_timing": {"infer_ms": infer_ms}}))
                except EvalError as e:
                    self.errors += 1
                    print(f"[serve] bad request from {peer}: {e}")
                    ws.send(f"bad request: {e}")
                except ConnectionClosed:
                    raise
                except Exception as e:  # the policy failed: tell the robot, keep serving
                    self.errors += 1
                    traceback.print_exc()
                    ws.send(f"server error: {type(e).__name__}: {e}")
            print(f"[serve] client {peer} closed the connection")
        except ConnectionClosed as e:
            why = e.rcvd or e.sent
            print(f"[serve] client {peer} dropped ({why.code if why else 'no close frame'}"
                  f"{': ' + why.reason if why and why.reason else ''})")

    def start(self, host: str, port: int, max_message_mb: float):
        """Listen in a background thread; returns the websockets server (.shutdown() stops it).
        GET /healthz answers 200 "OK" without opening a WebSocket."""
        from websockets.sync.server import serve

        def process_request(connection, request):
            if request.path == "/healthz":
                return connection.respond(200, "OK\n")
            return None

        try:
            server = serve(self.handle, host, port, compression=None, process_request=process_request,
                           max_size=int(max_message_mb * 2**20))
        except OSError as e:  # port taken, unknown host
            raise EvalError(f"cannot listen on {host}:{port}: {e}") from None
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


def load_plan(path: Path) -> list[dict]:
    """Trial plan -> one entry per (trial, repeat), in repeat-major order.

    {"task": "open_drawer", "variant": "in_distribution", "repeats": 2,
     "trials": [{"id": "01", "setup": "drawer closed, 10 cm left of the mark", "seed": 1000000}, ...]}
    A trial may override task and variant; id defaults to its position."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvalError(f"trial plan {path} not found") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"trial plan {path} is not valid JSON: {e}") from None
    if isinstance(plan, list):
        plan = {"trials": plan}
    if not isinstance(plan, dict) or not isinstance(plan.get("trials"), list) or not plan["trials"]:
        raise EvalError(f"trial plan {path} needs a non-empty \"trials\" list")
    repeats = plan.get("repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise EvalError(f"trial plan {path}: \"repeats\" must be a positive integer")
    trials, ids = [], set()
    for i, t in enumerate(plan["trials"]):
        if not isinstance(t, dict) or "setup" not in t:
            raise EvalError(f"trial plan {path}: trial {i} needs a \"setup\" description")
        trial = {"trial": str(t.get("id", i)), "setup": str(t["setup"]), "seed": t.get("seed"),
                 "task": t.get("task", plan.get("task")),
                 "variant": t.get("variant", plan.get("variant", "in_distribution"))}
        if not trial["task"]:
            raise EvalError(f"trial plan {path}: trial {i} has no task (set \"task\" in the plan or the trial)")
        if trial["trial"] in ids:
            raise EvalError(f"trial plan {path}: duplicate trial id {trial['trial']!r}")
        ids.add(trial["trial"])
        trials.append(trial)
    return [{**t, "repeat": r} for r in range(repeats) for t in trials]


def trial_key(r: dict) -> tuple:
    return (r["method"], r["task"], r["variant"], str(r["trial"]), int(r["repeat"]))


def ask(prompt: str, answers: dict[str, object]):
    while True:
        reply = input(prompt).strip().lower()
        if reply in answers:
            return answers[reply]
        print(f"  please answer one of {'/'.join(answers)}")


def run_trials(server: PolicyServer, plan_path: Path, results: Path, method: str, checkpoint: str,
               seed: int) -> None:
    """The operator's loop: show each set-up, serve its episode, record success. Resumable."""
    plan = load_plan(plan_path)
    done = {trial_key(r) for r in load_records(results, repair=True) if "trial" in r}
    todo = [t for t in plan if trial_key({**t, "method": method}) not in done]
    print(f"[trials] {len(plan)} trials in {plan_path}, {len(plan) - len(todo)} already in {results}, "
          f"{len(todo)} to go")
    yes_no = {"y": True, "yes": True, "n": False, "no": False, "q": None}
    for k, t in enumerate(todo):
        with server.lock:
            server.episode_seed = seed + t["repeat"]  # as proxy: repeat r samples with seed + r
            server.generator.manual_seed(server.episode_seed)
            start_requests = server.requests
        mirrors = f", mirrors sim seed {t['seed']}" if t["seed"] is not None else ""
        print(f"\n[trial {len(plan) - len(todo) + k + 1}/{len(plan)}] id {t['trial']}, repeat {t['repeat'] + 1}, "
              f"task {t['task']} ({t['variant']}){mirrors}")
        print(f"  set-up: {t['setup']}")
        print("  Set the scene up, run the episode with the robot client, then answer.")
        success = ask("  success? [y/n, q to stop] ", yes_no)
        if success is None:
            print("[trials] stopped; rerun the same command to continue")
            return
        note = input("  note (optional): ").strip()
        requests = server.requests - start_requests
        if requests == 0:
            print("  warning: no requests were served during this trial (is the robot client connected?)")
        append_record(results, {"method": method, "checkpoint": checkpoint, "domain": "real",
                                "protocol": server.metadata.get("protocol"), **t,
                                "success": success, "note": note, "requests": requests,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"  recorded ({requests} requests served)")
    print(f"\n[trials] all {len(plan)} trials recorded in {results}")
    print(to_markdown(summarize([r for r in load_records(results) if r.get("method") == method])))


@dataclasses.dataclass
class ServeArgs:
    """Serve a checkpoint to a robot over WebSocket (openpi's protocol), optionally with a trial log.

    Any openpi-client runtime connects unchanged: it gets a metadata dict, sends msgpack observation
    dicts and receives {"actions": [H, 7] in the robot's action space, "server_timing"}. A malformed
    request gets a text frame and the server goes on. GET /healthz answers "OK". With --trials the
    console walks the operator through a plan of initial states (a JSON file with task, variant,
    repeats and trials, each trial with id, setup and the sim seed it mirrors): each trial shows its
    set-up, serves the episode, asks success y/n and a note, and appends the result, fsync'd, to the
    results log; a rerun skips the trials already there."""

    checkpoint: str
    """checkpoint directory"""
    host: str = "0.0.0.0"
    """interface to listen on"""
    port: int = 8000
    """port (0: any free port)"""
    image_key: str = "observation/image"
    """client observation key of the third-person camera image (uint8 [H, W, 3] or [3, H, W])"""
    wrist_image_key: str = "observation/wrist_image"
    """client observation key of the wrist camera image (read for a policy with wrist_camera)"""
    state_key: str = "observation/state"
    """client observation key of the robot state (8 floats: tcp xyz, quaternion wxyz, gripper)"""
    prompt_key: str = "prompt"
    """client observation key of the language instruction"""
    prompt: str | None = None
    """instruction used when a request carries none"""
    deterministic: bool = True
    """the noise-free protocol (greedy tokens / noise-free flow chain, x0 fresh per request); --no-deterministic samples. Noise comes from a generator seeded when an episode starts (a client connects, or a trial starts): --seed, and --seed + repeat in trials"""
    seed: int = 0
    """base policy-sampling seed"""
    max_message_mb: float = 16.0
    """largest request accepted; a bigger one closes that connection (code 1009), not the server"""
    trials: str | None = None
    """trial plan (JSON): initial states to run, see load_plan; without it the server just serves"""
    results: str = "results/real_trials.jsonl"
    """trial log; one fsync'd line per trial, trials already there are skipped on a rerun"""
    name: str | None = None
    """method name in the log and table (default: the run's directory name)"""
    device: str | None = None
    """torch device of the policy (default: cuda when available, else cpu)"""


def serve(args: ServeArgs) -> None:
    if args.trials:
        load_plan(Path(args.trials))  # a bad plan fails before the model loads
    policy = load_checkpoint(args.checkpoint, args.device)
    method = args.name or method_name(args.checkpoint)
    metadata = {"policy": policy.kind, "method": method, "checkpoint": str(args.checkpoint),
                "task": (policy.config.get("extra") or {}).get("task"), "action_horizon": policy.chunk_size,
                "exec_horizon": policy.exec_horizon, "action_dim": policy.action_dim, "state_dim": policy.state_dim,
                "action_space": "end-effector delta pose + gripper (pd_ee_delta_pose), de-normalized",
                "obs_keys": {"image": args.image_key,
                             **({"wrist_image": args.wrist_image_key} if "wrist_image" in policy.view_keys else {}),
                             "state": args.state_key, "prompt": args.prompt_key},
                "deterministic": args.deterministic, "protocol": policy.protocol(args.deterministic)}
    server = PolicyServer(policy, args.image_key, args.state_key, args.prompt_key, args.prompt,
                          args.deterministic, args.seed, metadata, args.wrist_image_key)
    ws_server = server.start(args.host, args.port, args.max_message_mb)
    port = ws_server.socket.getsockname()[1]
    print(f"[serve] {method} ({metadata['policy']}, horizon {metadata['action_horizon']}) on ws://{args.host}:{port}; "
          f"health check: http://{args.host}:{port}/healthz", flush=True)
    try:
        if args.trials:
            run_trials(server, Path(args.trials), Path(args.results), method, str(args.checkpoint), args.seed)
        else:
            while True:
                time.sleep(3600)
    except (KeyboardInterrupt, EOFError):
        print("\n[serve] stopped; every recorded trial is on disk")
    finally:
        ws_server.shutdown()
        print(f"[serve] {server.requests} requests served, {server.errors} errors")


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReportArgs:
    """Print the success table from results logs (real trials or proxy episodes)."""

    results: tyro.conf.Positional[list[str]]
    """one or more results .jsonl files"""
    std_ddof: int = 0
    """0: population std over repeats (numpy's default); 1: sample std"""
    out: str | None = None
    """also write the table to <out>.json and <out>.md"""


def report(args: ReportArgs) -> dict:
    records = []
    for p in args.results:
        if not Path(p).exists():
            raise EvalError(f"{p} not found")
        records += load_records(Path(p))
    table = summarize(records, ddof=args.std_ddof)
    print(to_markdown(table))
    if args.out:
        write_table(table, Path(args.out))
    return table


# ----------------------------------------------------------------------------------------------
# offline: action error on held-out real demos
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OfflineArgs:
    """Action error of a checkpoint on held-out real demos (a LeRobot v3.0 dataset).

    Per action dimension: L1 between the predicted (deterministic) and demonstrated action chunks,
    in robot units and in the policy's normalized [-1, 1] units; for openvla also the share of
    action tokens equal to the demo's."""

    checkpoint: str
    """checkpoint directory"""
    data: str
    """LeRobot v3.0 dataset folder of held-out real demos"""
    image_key: str = "observation.images.front"
    """dataset feature holding the camera image"""
    wrist_image_key: str = "observation.images.wrist"
    """dataset feature holding the wrist camera's image (read for a policy with wrist_camera)"""
    state_key: str = "observation.state"
    """dataset feature holding the robot state"""
    action_key: str = "action"
    """dataset feature holding the action"""
    batch_size: int = 16
    """frames per forward pass"""
    max_frames: int | None = None
    """evaluate only the first N frames"""
    out: str | None = None
    """write the metrics as JSON here (default: results/offline_<method>_<dataset>.json)"""
    device: str | None = None
    """torch device of the policy (default: cuda when available, else cpu)"""


def offline(args: OfflineArgs) -> dict:
    """Per-dimension mean |predicted - demo action| over every valid step of every predicted chunk,
    in the robot's units and in the policy's normalized [-1, 1] units; for openvla also the share
    of action tokens equal to the demo's tokens. The policy acts deterministically (greedy tokens /
    the fixed-noise flow), so the numbers are reproducible."""
    import torch
    from tqdm import tqdm

    import demos

    policy = load_checkpoint(args.checkpoint, args.device)
    try:
        ds = demos.LeRobotDataset(args.data, chunk_size=policy.chunk_size, image_key=args.image_key,
                                  wrist_image_key=args.wrist_image_key if "wrist_image" in policy.view_keys else None,
                                  state_key=args.state_key, action_key=args.action_key)
        demos.check_dims(ds, policy)
    except (OSError, ValueError) as e:
        raise EvalError(str(e)) from None
    if args.max_frames is not None and args.max_frames < 1:
        raise EvalError("--max-frames must be >= 1")
    n = len(ds) if args.max_frames is None else min(len(ds), args.max_frames)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=args.batch_size,
                                         collate_fn=demos.collate)
    A, dev = policy.action_dim, policy.device
    l1, l1_norm, token_hits = (torch.zeros(A, device=dev) for _ in range(3))
    steps = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="offline", unit="batch", file=sys.stdout):
            out = policy.act(batch, deterministic=True)
            pred, target = out["actions"].float(), batch["actions"].float().to(dev)
            mask = batch["action_mask"][..., None].float().to(dev)  # no target past an episode's end
            l1 += ((pred - target).abs() * mask).sum((0, 1))
            l1_norm += ((policy.normalize_actions(pred) - policy.normalize_actions(target)).abs() * mask).sum((0, 1))
            if "action_tokens" in out:
                want = policy.actions_to_tokens(policy.normalize_actions(target))
                token_hits += ((out["action_tokens"].view_as(want) == want).float() * mask).sum((0, 1))
            steps += int(mask.sum())
    names = demos.ACTION_NAMES if A == len(demos.ACTION_NAMES) else [f"a{i}" for i in range(A)]
    metrics = {"l1": l1.cpu() / steps, "l1_normalized": l1_norm.cpu() / steps}
    if policy.kind == "openvla":
        metrics["token_accuracy"] = token_hits.cpu() / steps
    result = {"checkpoint": args.checkpoint, "data": args.data, "frames": n, "action_steps": steps,
              "policy": policy.kind, "chunk_size": policy.chunk_size}
    for key, per_dim in metrics.items():
        result[key] = dict(zip(names, per_dim.tolist()))
        result[key + "_mean"] = float(per_dim.mean())
    print(f"\n{n} frames, {steps} action steps of {policy.kind} chunks (H = {policy.chunk_size})")
    print("| dim | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics))
    for i, dim in enumerate(names):
        print(f"| {dim} | " + " | ".join(f"{m[i]:.4f}" for m in metrics.values()) + " |")
    print("| mean | " + " | ".join(f"{m.mean():.4f}" for m in metrics.values()) + " |")
    out = Path(args.out or f"results/offline_{method_name(args.checkpoint)}_{Path(args.data).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


COMMANDS = {"proxy": (ProxyArgs, proxy), "serve": (ServeArgs, serve), "report": (ReportArgs, report),
            "offline": (OfflineArgs, offline)}


def main(argv: list[str] | None = None):
    args = tyro.extras.subcommand_cli_from_dict({k: cls for k, (cls, _) in COMMANDS.items()},
                                                 description=__doc__.split("\n\n")[0], args=argv)
    fn = next(f for cls, f in COMMANDS.values() if isinstance(args, cls))
    try:
        return fn(args)
    except EvalError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
