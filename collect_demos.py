"""Stage 0 of RL-Co: scripted-expert demonstrations -> a LeRobot v3.0 dataset.

    python collect_demos.py --task open_drawer --domain sim --num-episodes 1000 --out data/open_drawer/sim
    python collect_demos.py --task open_drawer --domain proxy_real            # 50 teleop-like demos

Runs the scripted expert of envs.py in several envs at once, keeps the successful episodes,
counts the failed ones, and writes every kept episode to the dataset as soon as it is done
(demos.LeRobotWriter). The paper's data (Sec. V-A): 1,000 successful sim trajectories and 20-50
real teleoperated demos per task. A human teleoperator is not a scripted expert, so for
`--domain proxy_real` the expert's actions get teleoperation-like variability (TeleopNoise: a
per-episode speed, a slowly drifting hand error, jitter, short pauses); the recorded actions are
the ones executed.

Attempt k (counting from --first-attempt) starts from training seed envs.train_seed(k), and
episodes are written in attempt order, so the same command always produces the same dataset.
Interrupted (Ctrl-C, kill), the folder holds a valid dataset of the episodes written so far;
the same command continues from there to the requested count.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import tyro
from tqdm import tqdm

import demos
import envs

PROVENANCE = "meta/collection.json"  # how the dataset was made; resuming must match it


@dataclass
class Args:
    task: str = "open_drawer"
    """task: pick_and_place, push_cube, open_drawer, close_drawer"""
    domain: str = "sim"
    """sim (the twin RL trains in) or proxy_real (the stand-in for the real robot)"""
    variant: str = "in_distribution"
    """in_distribution, unseen_objects or unseen_states"""
    num_episodes: Optional[int] = None
    """successful episodes the dataset should hold (default: 1000 for sim, 50 for proxy_real)"""
    out: Optional[str] = None
    """dataset folder (default: data/<task>/<domain>); an existing one is continued"""
    image_size: int = 128
    """side of the square camera image (pixels)"""
    image_format: Literal["video", "image"] = "video"
    """video: h264 mp4 per episode (as real LeRobot datasets); image: PNG in the data parquet"""
    wrist_camera: bool = False
    """also record the camera on the Panda's hand (feature observation.images.wrist), for policies
    that read two views (pi05 --policy-overrides wrist_camera true)"""
    num_envs: Optional[int] = None
    """envs run in parallel, in worker processes (default: the number of CPUs)"""
    teleop: Optional[bool] = None
    """teleoperation-like variability on the expert's actions (default: on for proxy_real only)"""
    teleop_noise: float = 0.1
    """std of the slowly drifting error added to the expert's motion (normalized action units)"""
    teleop_speed: tuple[float, float] = (0.6, 1.0)
    """range of the per-episode speed factor of the teleoperator"""
    teleop_pause_prob: float = 0.03
    """per-step probability that the teleoperator pauses for 2-5 steps"""
    first_attempt: Optional[int] = None
    """index of the first training seed used (default: 0 for sim, 500000 for proxy_real: other initial states)"""
    max_episode_steps: Optional[int] = None
    """time limit of an attempt (default: the task's)"""
    dart_noise: float = 0.0
    """std of Gaussian noise (normalized units, 1 = 10 cm) added to the executed motion dims 0-2 while
    the expert's own action is recorded (DART, Laskey et al. 2017): demos that show the way back
    from small position errors, the errors a cloned policy makes. 0: off; not with --teleop"""
    seed: int = 0
    """seed of the teleoperation variability and of the DART noise"""
    gap: Optional[float] = None
    """proxy_real only: how far from the sim twin, 0 (the twin) .. 1 (the full proxy_real domain, the default); see envs.make_env"""


class TeleopNoise:
    """Turns the scripted expert's actions into ones that look teleoperated: the whole episode at
    one speed (a factor on the motion), a hand error that drifts slowly (AR(1) with a ~1 s time
    constant at 10 Hz), small step-to-step jitter, and now and then a pause of a few steps.
    The gripper command is kept. The expert is closed-loop, so it corrects the drift."""

    def __init__(self, rng: np.random.Generator, noise: float, speed: tuple[float, float], pause_prob: float):
        self.rng, self.noise, self.pause_prob = rng, noise, pause_prob
        self.speed = rng.uniform(*speed)
        self.drift = np.zeros(6)
        self.pause_left = 0

    def __call__(self, expert_action: np.ndarray) -> np.ndarray:
        action = expert_action.astype(np.float64).copy()
        rho = 0.9
        self.drift = rho * self.drift + np.sqrt(1 - rho ** 2) * self.noise * self.rng.normal(size=6)
        action[:6] = self.speed * action[:6] + self.drift + (self.noise / 3) * self.rng.normal(size=6)
        if self.pause_left == 0 and self.rng.random() < self.pause_prob:
            self.pause_left = int(self.rng.integers(2, 6))
        if self.pause_left > 0:
            action[:6] = 0.0
            self.pause_left -= 1
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def resolve_defaults(args: Args) -> Args:
    for what, value, valid in (("task", args.task, envs.TASKS), ("domain", args.domain, envs.DOMAINS),
                               ("variant", args.variant, envs.VARIANTS)):
        if value not in valid:
            fail(f"unknown --{what} {value!r}; choose one of {', '.join(valid)}")
    real = args.domain == "proxy_real"
    if args.num_episodes is None:
        args.num_episodes = 50 if real else 1000
    if args.out is None:
        args.out = f"data/{args.task}/{args.domain}"
    if args.num_envs is None:
        args.num_envs = os.cpu_count() or 1
    if args.teleop is None:
        args.teleop = real
    if args.first_attempt is None:
        args.first_attempt = 500_000 if real else 0
    if args.num_episodes < 1 or args.num_envs < 1:
        fail("--num-episodes and --num-envs must be >= 1")
    if args.gap is not None and (not real or not 0.0 <= args.gap <= 1.0):
        fail(f"--gap {args.gap}: a number in [0, 1], for --domain proxy_real only")
    if args.dart_noise < 0 or (args.dart_noise and args.teleop):
        fail(f"--dart-noise {args.dart_noise}: a std >= 0, and only without --teleop (teleop records the noisy action)")
    if args.image_format == "video" and args.image_size % 2:
        fail(f"--image-size {args.image_size}: h264 video needs an even size (or use --image-format image)")
    return args


def open_dataset(args: Args, fps: int) -> tuple[demos.LeRobotWriter | None, int]:
    """The writer, and the first attempt not yet made: after the last one in the dataset. A dataset
    this script made that already holds --num-episodes is only read: (None, the episodes it holds),
    so that several study jobs can share one without any of them writing to it."""
    out = Path(args.out)
    settings = {k: getattr(args, k) for k in ("task", "domain", "variant", "image_size", "image_format",
                                              "teleop", "teleop_noise", "teleop_speed", "teleop_pause_prob",
                                              "first_attempt", "max_episode_steps", "seed")}
    if args.gap is not None:  # only when given: datasets made before --gap existed stay continuable
        settings["gap"] = args.gap
    if args.dart_noise:  # likewise
        settings["dart_noise"] = args.dart_noise
    if args.wrist_camera:  # likewise
        settings["wrist_camera"] = True
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file
    provenance = out / PROVENANCE
    if provenance.is_file():
        made_with = json.loads(provenance.read_text())["settings"]
        if made_with != settings:
            differ = {k: (made_with.get(k), v) for k, v in settings.items() if made_with.get(k) != v}
            fail(f"{out} was collected with other settings; (theirs, yours): {differ}\n"
                 "  rerun with the same options to continue it, or choose another --out")
        info = out / "meta/info.json"
        held = json.loads(info.read_text()).get("total_episodes", 0) if info.is_file() else 0
        if held >= args.num_episodes:
            return None, held
    try:
        writer = demos.LeRobotWriter(out, fps=fps, image_shape=(args.image_size, args.image_size, 3),
                                     use_videos=args.image_format == "video", robot_type="panda",
                                     camera_keys=tuple(CAMERA_FEATURES[k] for k in view_keys(args)))
    except (FileExistsError, ValueError) as e:
        fail(str(e))
    if not provenance.is_file():
        if writer.num_episodes:
            fail(f"{out} holds a dataset that collect_demos.py did not make; choose another --out")
        demos.write_json(provenance, {"settings": settings, "command": " ".join(sys.argv)})
    # attempts are numbered by training seed; find the last one whose episode was kept
    seeds = [e["seed"] for e in writer.episodes]
    next_attempt, remaining = args.first_attempt, set(seeds)
    while remaining:
        remaining.discard(envs.train_seed(next_attempt))
        next_attempt += 1
        if next_attempt - args.first_attempt > 100 * (len(seeds) + 100):
            fail(f"{out}: its episode seeds do not follow --first-attempt {args.first_attempt}")
    return writer, next_attempt


# the env's observation key of each camera -> its dataset feature
CAMERA_FEATURES = {"image": demos.IMAGE_KEY, "wrist_image": demos.WRIST_IMAGE_KEY}


def view_keys(args: Args) -> tuple:
    return ("image", "wrist_image") if args.wrist_camera else ("image",)


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # `kill` ends the run like Ctrl-C: the dataset on disk is valid either way


def main(args: Args):
    args = resolve_defaults(args)
    signal.signal(signal.SIGTERM, stop_on_sigterm)

    fps = envs.CONTROL_FREQ
    writer, next_attempt = open_dataset(args, fps)
    if writer is None:
        print(f"{args.out} already holds {next_attempt} episodes (asked for {args.num_episodes}); nothing to do")
        return
    already = writer.num_episodes
    print(f"collecting {args.num_episodes - already} {args.task} episodes ({args.domain}, "
          f"{'teleop-like' if args.teleop else 'scripted expert'}) into {args.out}"
          + (f", continuing after {already}" if already else "") + f", {args.num_envs} envs in parallel")

    # sub-env i starts on attempt next_attempt + i and, after each episode, moves num_envs on
    # (auto-reset): every attempt is made exactly once, whatever the number of envs
    n = args.num_envs
    attempt = next_attempt + np.arange(n)           # attempt of each sub-env's current episode
    frames = [[] for _ in range(n)]                  # ({view: image}, state, action, success) so far
    cameras = {k: CAMERA_FEATURES[k] for k in view_keys(args)}  # obs key -> dataset feature

    def new_noise(a):  # per attempt: the same attempt always gets the same variability
        rng = np.random.default_rng([args.seed, int(a)])
        return TeleopNoise(rng, args.teleop_noise, args.teleop_speed, args.teleop_pause_prob) if args.teleop else None

    noise = [new_noise(a) for a in attempt]
    # DART: one generator per attempt, as the teleop noise (a resumed collection repeats it)
    dart_rng = lambda a: np.random.default_rng([args.seed, int(a), 1])
    dart = [dart_rng(a) for a in attempt]
    finished = {}                                    # attempt -> episode dict, or None if it failed
    next_to_write, failures = next_attempt, 0
    max_failures = max(100, 5 * args.num_episodes)
    start = time.perf_counter()
    env, progress = None, None
    try:
        env = envs.make_env(args.task, args.domain, args.variant, num_envs=n, image_size=args.image_size,
                            seed=envs.train_seed(next_attempt), max_episode_steps=args.max_episode_steps,
                            auto_reset=True, gap=args.gap, wrist_camera=args.wrist_camera)
        obs, _ = env.reset()
        instruction = list(obs["instruction"])
        startup_s, start = time.perf_counter() - start, time.perf_counter()
        progress = tqdm(total=args.num_episodes, initial=already, unit="ep", desc=f"{args.task}/{args.domain}")
        while writer.num_episodes < args.num_episodes:
            expert = env.expert_action()
            action = np.stack([noise[i](expert[i]) if noise[i] else expert[i] for i in range(n)])
            label = action                           # what the dataset records
            if args.dart_noise:                      # execute a perturbed action, record the expert's
                label, action = action, action.copy()
                for i in range(n):
                    action[i, :3] += args.dart_noise * dart[i].normal(size=3)
                action = np.clip(action, -1.0, 1.0)
            next_obs, _, terminated, truncated, info = env.step(action, render=True)
            for i in range(n):
                views = {feature: obs[k][i] for k, feature in cameras.items()}
                frames[i].append((views, obs["state"][i], label[i], info["success"][i]))
                if not (terminated[i] or truncated[i]):
                    continue
                # the episode is over (the sub-env has already started its next attempt)
                if info["seed"][i] != envs.train_seed(int(attempt[i])):
                    raise RuntimeError(f"sub-env {i} ran seed {info['seed'][i]} for attempt {attempt[i]}: "
                                       "envs' auto-reset seeds no longer follow envs.train_seed")
                episode = None                       # failed attempts are counted, not kept
                if terminated[i]:                    # terminated = reached success
                    views, states, actions, success = zip(*frames[i])
                    images = {key: np.stack([v[key] for v in views]) for key in views[0]}
                    states, actions, success = np.stack(states), np.stack(actions), np.stack(success)
                    episode = dict(images=images, states=states, actions=actions, success=success,
                                   task=instruction[i], seed=int(info["seed"][i]))
                finished[int(attempt[i])] = episode
                attempt[i] += n
                frames[i], noise[i], dart[i] = [], new_noise(attempt[i]), dart_rng(attempt[i])
                instruction[i] = next_obs["instruction"][i]
            obs = next_obs
            # write in attempt order, so a rerun or a resume gives the same dataset
            while next_to_write in finished and writer.num_episodes < args.num_episodes:
                episode = finished.pop(next_to_write)
                next_to_write += 1
                if episode is None:
                    failures += 1
                else:
                    writer.add_episode(**episode)
                progress.set_postfix(kept=writer.num_episodes - already, failed=failures, refresh=False)
                progress.update(episode is not None)
                if failures > max_failures:
                    fail(f"the expert failed {failures} of {failures + writer.num_episodes - already} attempts; "
                         f"{writer.num_episodes} episodes are in {args.out}")
        progress.close()
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        print(f"\ninterrupted: {args.out} holds {writer.num_episodes} episodes (a valid dataset); "
              "run the same command to continue", file=sys.stderr)
        sys.exit(130)
    finally:
        if env is not None:
            env.close()
    writer.close()
    made = writer.num_episodes - already
    elapsed = time.perf_counter() - start
    print(f"wrote {made} episodes to {args.out} ({writer.num_episodes} in all, {writer.num_frames} frames) "
          f"in {elapsed:.0f} s (+ {startup_s:.0f} s starting the envs), {made / elapsed:.2f} episodes/s; "
          f"{failures} failed attempts were dropped (expert success {made / max(1, made + failures):.1%})")


if __name__ == "__main__":
    main(tyro.cli(Args))
