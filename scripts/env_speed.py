"""Env steps per second: each twin task (1 env, CPU backend, square camera), next to ManiSkill's
stock PickCube-v1 with the same camera and controller, measured in the same run.

    .venv/bin/python scripts/env_speed.py                  # writes docs/env_speed.md
    .venv/bin/python scripts/env_speed.py --steps 100 --tasks open_drawer

Three ways of stepping, each timed over --steps control steps with random actions (resets
included, as in training):
  every step      the camera image is rendered after every step
  1 in N          rendered only after every N-th step (executing an action chunk of N actions)
  never           physics, success test and reward only
For PickCube-v1 the "1 in N" and "never" rows step its physics and success test without its
observation (what our envs do with render=False); its "every step" row is a plain env.step with
obs_mode="rgb". Timings are wall clock on this machine; a shared CPU inflates them.
"""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import mani_skill.envs  # noqa: F401  (registers PickCube-v1)
import numpy as np
import tyro
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402


@dataclass
class Args:
    tasks: tuple[str, ...] = envs.TASKS
    """twin tasks to time"""
    steps: int = 200
    """control steps timed per setting"""
    image_size: int = 128
    """camera image side"""
    chunk: int = 4
    """render once per this many steps in the "1 in N" setting"""
    repeats: int = 3
    """timing rounds over all settings; each cell reports its fastest round (other processes on a
    shared machine only ever slow a round down)"""
    seed: int = 0
    """seed of the random actions and of the first episode"""
    out: str = "docs/env_speed.md"
    """markdown file to write ("" to only print)"""


def time_twin(task: str, args: Args, render_every: int | None, rng) -> float:
    """Steps per second of one twin env; render_every None means never render."""
    with envs.make_env(task, image_size=args.image_size, auto_reset=True, seed=args.seed) as env:
        env.reset()
        for _ in range(5):  # warm-up: first renders and memory allocations
            env.step(rng.uniform(-1, 1, (1, 7)).astype(np.float32), render=True)
        start = time.perf_counter()
        for t in range(args.steps):
            render = render_every is not None and (t + 1) % render_every == 0
            env.step(rng.uniform(-1, 1, (1, 7)).astype(np.float32), render=render)
        return args.steps / (time.perf_counter() - start)


def time_pick_cube(args: Args, render_every: int | None, rng) -> float:
    """Steps per second of stock PickCube-v1, pd_ee_delta_pose, one RGB camera of the same size."""
    env = gym.make("PickCube-v1", obs_mode="rgb", control_mode="pd_ee_delta_pose",
                   sensor_configs=dict(width=args.image_size, height=args.image_size))
    base = env.unwrapped
    env.reset(seed=args.seed)
    for _ in range(5):
        env.step(rng.uniform(-1, 1, 7).astype(np.float32))
    start = time.perf_counter()
    for t in range(args.steps):
        action = rng.uniform(-1, 1, 7).astype(np.float32)
        if render_every is not None and (t + 1) % render_every == 0:
            env.step(action)  # physics + success test + rendered observation
        else:
            base._step_action(action)  # physics ...
            base._elapsed_steps += 1
            base.get_info()  # ... and success test, no observation
        if int(base.elapsed_steps[0]) >= 50:  # its time limit
            env.reset()
    seconds = time.perf_counter() - start
    env.close()
    return args.steps / seconds


def main(args: Args):
    unknown = [t for t in args.tasks if t not in envs.TASKS]
    if unknown:
        raise SystemExit(f"unknown task {unknown}; valid tasks: {', '.join(envs.TASKS)}")
    if args.steps < args.chunk or args.chunk < 1:
        raise SystemExit("need --steps >= --chunk >= 1")
    rng = np.random.default_rng(args.seed)
    modes = [("every step", 1), (f"1 in {args.chunk}", args.chunk), ("never", None)]
    settings = [("PickCube-v1 (stock)", None)] + [(t, t) for t in args.tasks]
    best = {name: [0.0] * len(modes) for name, _ in settings}  # fastest round per cell
    with tqdm(total=args.repeats * len(settings) * len(modes), desc="timing") as progress:
        for _ in range(args.repeats):
            for name, task in settings:
                for m, (_, every) in enumerate(modes):
                    speed = time_pick_cube(args, every, rng) if task is None else time_twin(task, args, every, rng)
                    best[name][m] = max(best[name][m], speed)
                    progress.update()
    rows = []
    for name, task in settings:
        control = 20 if task is None else envs.CONTROL_FREQ  # PickCube-v1 runs at ManiSkill's default 20 Hz
        rows.append((name, control, best[name]))
    load = os.getloadavg()[0]
    lines = ["# Env speed", "",
             f"Produced by `scripts/env_speed.py` (1 env, CPU backend, {args.image_size}x{args.image_size} "
             f"RGB camera, {args.steps} timed control steps per cell, random actions, resets included, "
             f"fastest of {args.repeats} rounds). "
             f"Control steps per second of wall clock when the camera image is rendered after every step, "
             f"after every {args.chunk}th step (one action chunk), or never. Physics runs at 100 Hz: "
             "a 10 Hz control step is 10 physics steps, a 20 Hz one 5. "
             f"Measured on a shared {os.cpu_count()}-core CPU machine (1-minute load average {load:.1f} at "
             "the end of the run): absolute numbers are inflated by the other processes, and with a load "
             "well above the core count even ratios between rows are only indicative.", "",
             "| env | control Hz | " + " | ".join(f"render {m}" for m, _ in modes) + " | speed-up of 1 in "
             f"{args.chunk} |", "|" + " --- |" * (3 + len(modes))]
    for name, control, speeds in rows:
        lines.append(f"| {name} | {control} | " + " | ".join(f"{s:.1f}" for s in speeds)
                     + f" | {speeds[1] / speeds[0]:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
