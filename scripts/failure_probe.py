"""Where do a policy's sim episodes go wrong? Runs a checkpoint in the sim twin with the noise-free
protocol and, along the policy's own trajectory, asks the scripted expert (envs.py) what it would do
at every control step: the expert's phase machine advances on the policy's states, so an episode's
furthest expert phase says how far it got (e.g. push_cube: 0 above the cube, 1 down behind it,
2 pushing, 3 backing off), |policy action - expert action| per dimension says which command
went wrong first, and the tcp's closest approach (in the table plane) to each object it could
have gone for says where it went instead (push_cube: each of the three cubes and which one was
named; pick_and_place: the object's grasp point; the drawers: the handle). For push_cube it also
asks the policy for its first action with another cube named: a policy that reads its instruction
changes it (the lateral command by up to 0.4 between slots).

    python scripts/failure_probe.py --checkpoint runs/learnability/push_cube_pi05_default_s1/checkpoints/final \\
        --task push_cube --episodes 12 --trace 1
    python scripts/failure_probe.py --checkpoint expert --task open_drawer     # the expert itself

Prints one line per episode and writes them as JSON lines to --out when given. The expert acts from
privileged state; its actions here are only compared, never executed (except with --checkpoint expert).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import policies  # noqa: E402

DIMS = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")


@dataclass
class Args:
    checkpoint: str
    """policy checkpoint directory, or "expert" to run the scripted expert itself"""
    task: str = "push_cube"
    """task (sim domain, in_distribution)"""
    episodes: int = 12
    """episodes, on the evaluation initial states envs.eval_seeds(episodes)"""
    train_states: bool = False
    """start from the training initial states envs.train_seed(0 .. episodes - 1) instead (those of
    the first demos): does the policy reproduce its own demos?"""
    trace: int = 0
    """print every 4th step (phase, tcp tilt, policy and expert actions) of the first N episodes"""
    zero_dims: list[int] = field(default_factory=list)
    """execute the policy's actions with these dimensions set to 0 (e.g. 3 4: no roll or pitch
    command); the errors are still those of the policy's own actions. Does a failure come from them?"""
    out: Optional[str] = None
    """also write one JSON line per episode here"""


def tilt_degrees(q_wxyz: np.ndarray) -> float:
    """Angle between the tcp's z axis and the world's -z (0 = pointing straight down)."""
    w, x, y, _ = q_wxyz
    z_axis_z = 1 - 2 * (x * x + y * y)
    return float(np.degrees(np.arccos(np.clip(-z_axis_z, -1.0, 1.0))))


def object_xy_distances(raw, task: str) -> tuple[np.ndarray, int]:
    """The tcp's distance in the table plane to each object of the task, and the index of the one
    the instruction names (push_cube: the three cubes; other tasks: their one object)."""
    tcp = raw.agent.tcp_pose.p[0, :2]
    if task == "push_cube":
        return torch.linalg.norm(raw.cube_xy()[0] - tcp, dim=-1).cpu().numpy(), int(raw.target[0])
    point = raw.grasp_point(raw.object_pose()) if task == "pick_and_place" else raw.handle_pos()
    return torch.linalg.norm(point[0, :2] - tcp, dim=-1, keepdim=True).cpu().numpy(), 0


def probe(args: Args) -> list[dict]:
    if args.task not in envs.TASKS:
        raise SystemExit(f"unknown task {args.task!r}; valid tasks: {', '.join(envs.TASKS)}")
    torch.set_num_threads(1)
    use_expert = args.checkpoint == "expert"
    if use_expert:
        act, horizon, image_size, wrist = None, 1, 64, False
    else:
        try:
            policy = policies.load_policy(args.checkpoint)
        except FileNotFoundError as e:
            raise SystemExit(str(e))
        act = policies.eval_act_fn(policy, deterministic=True)
        horizon, image_size = policy.exec_horizon, int(policy.config.get("camera_image_size", 64))
        wrist = "wrist_image" in policy.view_keys
    records = []
    with envs.make_env(args.task, "sim", num_envs=1, image_size=image_size, num_workers=0, wrist_camera=wrist) as env:
        raw = env._local.envs[0]  # one in-process sub-env: its expert phase is readable
        seeds = [envs.train_seed(i) for i in range(args.episodes)] if args.train_states else envs.eval_seeds(args.episodes)
        for k, seed in enumerate(seeds):
            obs, _ = env.reset(seed=[seed])
            errors, phases, step, decision, done = [], [], 0, 0, False
            closest, named = object_xy_distances(raw, args.task)
            max_tilt = tilt_degrees(raw.agent.tcp_pose.q[0].cpu().numpy())
            while not done:
                if not use_expert:
                    if obs["image"] is None:
                        obs = {**obs, **env.render_views()}
                    chunk = act(obs, [envs.decision_key(seed, decision)])[0]
                    if decision == 0 and args.task == "push_cube":  # does naming another cube change it?
                        named_colour = obs["instruction"][0].split()[2]
                        other = next(c for c in raw.colours if c != named_colour)
                        swapped = act({**obs, "instruction": [obs["instruction"][0].replace(named_colour, other)]},
                                      [envs.decision_key(seed, decision)])[0]
                        first_change = np.abs(swapped[0] - chunk[0])[:3]
                for j in range(horizon):
                    expert = np.asarray(env.expert_action())[0]  # advances the phase machine on this state
                    action = expert if use_expert else chunk[j]
                    phase = int(raw.expert_phase[0])
                    phases.append(phase)
                    closest = np.minimum(closest, object_xy_distances(raw, args.task)[0])
                    errors.append(np.abs(action - expert))
                    if k < args.trace and step % 4 == 0:
                        print(f"  step {step:3d} phase {phase} tilt {tilt_degrees(raw.agent.tcp_pose.q[0].cpu().numpy()):5.1f} deg"
                              f"  policy {np.round(action, 2)}  expert {np.round(expert, 2)}")
                    if args.zero_dims and not use_expert:  # after the trace: it shows the policy's own action
                        action = action.copy()
                        action[args.zero_dims] = 0.0
                    obs, _, terminated, truncated, info = env.step(action[None].astype(np.float32),
                                                                   render=j == horizon - 1 and not use_expert)
                    step += 1
                    max_tilt = max(max_tilt, tilt_degrees(raw.agent.tcp_pose.q[0].cpu().numpy()))
                    if terminated[0] or truncated[0]:
                        done = True
                        break
                decision += 1
            error = np.mean(errors, axis=0)
            record = {"seed": int(seed), "success": bool(info["success"][0]), "steps": step,
                      "max_expert_phase": max(phases), "max_tilt_deg": round(max_tilt, 1),
                      "closest_xy_cm": np.round(100 * closest.astype(float), 1).tolist(), "named_object": named,
                      "went_to_named": bool(np.argmin(closest) == named), "mean_abs_action_error": dict(zip(DIMS, np.round(error, 3).tolist()))}
            if not use_expert and args.task == "push_cube":
                record["first_xyz_change_other_cube_named"] = np.round(first_change.astype(float), 3).tolist()
            records.append(record)
            print(f"seed {seed}: {'success' if record['success'] else 'fail'} after {step} steps, furthest expert phase "
                  f"{record['max_expert_phase']}, max tilt {max_tilt:.0f} deg, closest approach (cm) {record['closest_xy_cm']} (named: {named}), "
                  f"mean |policy - expert| " + " ".join(f"{d} {e:.2f}" for d, e in zip(DIMS, error)),
                  flush=True)
    phases = np.bincount([r["max_expert_phase"] for r in records])
    print(f"\nsuccess {sum(r['success'] for r in records)}/{len(records)}; episodes by furthest expert phase: "
          + ", ".join(f"phase {p}: {n}" for p, n in enumerate(phases) if n)
          + f"; closest to the named object in {sum(r['went_to_named'] for r in records)}")
    changes = [r["first_xyz_change_other_cube_named"] for r in records if "first_xyz_change_other_cube_named" in r]
    if changes:
        print("first action, mean |change| of dx dy dz with another cube named: "
              + " ".join(f"{c:.3f}" for c in np.mean(changes, axis=0)))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


if __name__ == "__main__":
    probe(tyro.cli(Args))
