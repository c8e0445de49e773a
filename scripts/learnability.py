"""Can the miniature learn each task at all? A sim-only Stage I policy (alpha = 1) per task, policy
and seed, evaluated with the noise-free protocol on 50 sim episodes (envs.eval_seeds), appended to
results/reproduce_cpu/learnability.json (one row per attempt: its settings, per-seed successes, the
mean, wall times). The criterion of the study: >= 80 % sim success.

    python scripts/learnability.py --tasks open_drawer close_drawer --policy pi05
    python scripts/learnability.py --tasks pick_and_place --stage1-steps 10000 \
        --policy-overrides patch_size 8 --attempt patch8_10k

Datasets are made when missing (collect_demos.py: --sim-episodes sim demos and --real-episodes
proxy_real demos, whose actions also enter the normalization statistics as in every Stage I run).
A finished run (its checkpoints/final exists) is not trained again, only read.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import tyro

from study_io import ROOT, dataset_dir, run, upsert_row


@dataclass
class Args:
    tasks: list[str] = field(default_factory=lambda: ["open_drawer", "close_drawer", "push_cube", "pick_and_place"])
    """tasks to train and evaluate"""
    policy: str = "pi05"
    """policy family (tiny size)"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """Stage I training seeds"""
    stage1_steps: int = 3000
    """Stage I optimizer steps"""
    batch_size: int = 32
    """Stage I batch size"""
    lr: float = 3e-4
    """Stage I peak learning rate"""
    ema_decay: float = 0.0
    """Stage I's --ema-decay: the policy evaluated is the exponential moving average of the weights with this decay (0 = off; openpi uses 0.999)"""
    policy_overrides: list[str] = field(default_factory=list)
    """passed on to Stage I's --policy-overrides (key value pairs)"""
    start_frames: int = 0
    """Stage I's --start-frames / --start-weight: each episode's first N frames drawn W times as often (0: uniform)"""
    start_weight: float = 1.0
    """see --start-frames"""
    augment: bool = True
    """Stage I's --augment: random crop and colour jitter on training images (--no-augment: off)"""
    chunk_size: int = 0
    """Stage I's --chunk-size: actions per predicted chunk, all executed (0: the policy's default, 4 for pi05, 1 for openvla)"""
    sim_episodes: int = 100
    """sim demos"""
    dart_noise: float = 0.0
    """collect_demos.py's --dart-noise for the sim demos (recorded labels stay the expert's; 0: off); its datasets get their own folder"""
    wrist_camera: bool = False
    """pi05 with a second view from a camera on the Panda's hand (collect_demos.py --wrist-camera, --policy-overrides wrist_camera true); its datasets get their own folders"""
    real_episodes: int = 20
    """proxy_real demos (normalization statistics only at alpha = 1)"""
    image_size: int = 64
    """camera resolution of the demos and of evaluation"""
    episodes: int = 50
    """sim evaluation episodes"""
    attempt: str = "default"
    """name of this attempt (a run folder suffix and a field of the row)"""
    data_dir: str = "data"
    """datasets go to <data-dir>/<task>/<domain>_<episodes> (at 64 px; else <domain>_<size>px_<episodes>), as reproduce.py's"""
    runs_dir: str = "runs/learnability"
    """Stage I runs go here, one folder per task, policy, attempt and seed"""
    out: str = "results/reproduce_cpu/learnability.json"
    """the results file (a row per task, policy and attempt; a rerun replaces its row)"""


def main(args: Args):
    py = sys.executable
    out = ROOT / args.out
    for task in args.tasks:
        counts = {"sim": args.sim_episodes, "proxy_real": args.real_episodes}
        data = {d: dataset_dir(args.data_dir, task, d, n, args.image_size) for d, n in counts.items()}
        dart = ["--dart-noise", str(args.dart_noise)] if args.dart_noise else []
        if dart:
            data["sim"] = data["sim"].with_name(f"{data['sim'].name}_dart{args.dart_noise:g}")
        if args.wrist_camera:
            data = {d: path.with_name(f"{path.name}_wrist") for d, path in data.items()}
        for domain, n in counts.items():
            run([py, "collect_demos.py", "--task", task, "--domain", domain, "--num-episodes", str(n),
                 "--out", str(data[domain]), "--image-size", str(args.image_size), *(dart if domain == "sim" else []),
                 *(["--wrist-camera"] if args.wrist_camera else [])])
        overrides = [*args.policy_overrides, *(["wrist_camera", "true"] if args.wrist_camera else [])]
        per_seed, walls, protocol = [], [], None
        for seed in args.seeds:
            name = f"{task}_{args.policy}_{args.attempt}_s{seed}"
            final = ROOT / args.runs_dir / name / "checkpoints" / "final"
            wall = 0.0
            if not (final / "config.json").exists():
                resume = ["--resume"] if (ROOT / args.runs_dir / name / "args.json").exists() else []
                wall = run([py, "stage1_sft_cotrain.py", "--task", task, "--policy", args.policy, "--alpha", "1",
                            "--sim-data", str(data["sim"]), "--real-data", str(data["proxy_real"]),
                            "--total-steps", str(args.stage1_steps), "--batch-size", str(args.batch_size),
                            "--lr", str(args.lr), "--ema-decay", str(args.ema_decay),
                            "--eval-every", "0", "--eval-domains", "sim",
                            "--eval-episodes", str(args.episodes), "--eval-num-envs", "2", "--no-save-video",
                            "--seed", str(seed), "--runs-dir", str(ROOT / args.runs_dir), "--run-name", name,
                            *(["--policy-overrides", *overrides] if overrides else []),
                            *(["--chunk-size", str(args.chunk_size)] if args.chunk_size else []),
                            *([] if args.augment else ["--no-augment"]),
                            *(["--start-frames", str(args.start_frames), "--start-weight", str(args.start_weight)]
                              if args.start_frames else []),
                            *resume])
            extra = json.loads((final / "config.json").read_text())["extra"]
            per_seed.append(100.0 * extra["eval/success_sim"])
            walls.append(round(wall, 1))
            protocol = extra.get("protocol")
        row = {"task": task, "policy": args.policy, "alpha": 1.0, "stage1_steps": args.stage1_steps,
               "seeds": list(args.seeds), "episodes": args.episodes,
               "sim_success_pct": sum(per_seed) / len(per_seed), "per_seed_pct": per_seed,
               "attempt": args.attempt, "policy_overrides": args.policy_overrides, "batch_size": args.batch_size,
               "lr": args.lr, "ema_decay": args.ema_decay, "chunk_size": args.chunk_size or None, "sim_episodes": args.sim_episodes,
               "dart_noise": args.dart_noise, "wrist_camera": args.wrist_camera,
               "start_frames": args.start_frames, "start_weight": args.start_weight,
               "augment": args.augment, "image_size": args.image_size,
               "protocol": protocol, "stage1_wall_s": walls, "criterion_met": sum(per_seed) / len(per_seed) >= 80.0}
        upsert_row(out, row)
        print(f"{task} {args.policy} {args.attempt}: sim success {row['sim_success_pct']:.1f} % "
              f"(per seed {per_seed}), {args.episodes} episodes; written to {out}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
