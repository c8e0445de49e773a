"""Measurements for policies.py: parameter counts, tiny forward+backward time, act latency, and the
memory numbers behind docs/policies.md ("Full-size memory plan").

    .venv/bin/python scripts/policy_speed.py            # prints markdown tables
    .venv/bin/python scripts/policy_speed.py --reps 20

Timings are wall-clock medians on whatever CPU runs this (a shared machine inflates them). The
full-size models are built on the meta device: their parameter counts and the weight / gradient /
optimizer bytes are exact; activation memory is not measured here (no GPU), see the docs.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import policies  # noqa: E402

INSTRUCTIONS = ["pick up the red cube and put it in the bowl", "open the drawer", "push the blue cube",
                "close the drawer"]


@dataclass
class Args:
    reps: int = 10
    """timed repetitions per measurement (after 2 warm-up runs)"""
    batch_size: int = 8
    """batch for the forward+backward timings"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""


def median_seconds(fn, reps):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def make_obs(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch_size, 128, 128, 3), dtype=np.uint8),
            "state": rng.uniform(-1, 1, (batch_size, 8)).astype(np.float32),
            "instruction": [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch_size)]}


def count(policy, prefix=""):
    return sum(p.numel() for n, p in policy.named_parameters() if n.startswith(prefix))


def tiny_measurements(args):
    rows = []
    for kind in policies.KINDS:
        torch.manual_seed(0)
        policy = policies.make_policy(kind, instructions=INSTRUCTIONS)
        B = args.batch_size
        obs = make_obs(B)
        batch = dict(obs, actions=np.random.default_rng(1).uniform(-1, 1, (B, policy.chunk_size, 7)).astype(np.float32))

        def sft_step():
            policy.zero_grad()
            policy.sft_loss(batch).backward()

        rollout = policy.act(obs)

        def ppo_step():  # what an RL update does per minibatch: evaluate + backward
            policy.zero_grad()
            out = policy.evaluate(obs, rollout)
            (out["logprob"].mean() + out["value"].mean() + out["entropy"].mean()).backward()

        obs1 = make_obs(1)
        rows.append({
            "kind": kind,
            "params": count(policy),
            "trainable": sum(p.numel() for p in policy.trainable_parameters()),
            "sft fwd+bwd B=%d [ms]" % B: 1e3 * median_seconds(sft_step, args.reps),
            "evaluate fwd+bwd B=%d [ms]" % B: 1e3 * median_seconds(ppo_step, args.reps),
            "act B=1 [ms]": 1e3 * median_seconds(lambda: policy.act(obs1), args.reps),
            "act B=%d [ms]" % B: 1e3 * median_seconds(lambda: policy.act(obs), args.reps),
            "act deterministic B=1 [ms]": 1e3 * median_seconds(lambda: policy.act(obs1, deterministic=True), args.reps),
        })
    return rows


GB = 1e9


def full_memory_rows():
    """Exact parameter counts of the full sizes (meta device) and the bytes of weights, gradients
    and AdamW state under each training option: frozen weights in bf16, trainable ones in fp32
    with an fp32 gradient and two fp32 Adam moments (16 bytes per trainable parameter)."""
    from accelerate import init_empty_weights
    rows = []
    options = [("openvla", {"lora_rank": 32}, "LoRA r=32 on the LM + value head"),
               ("openvla", {"lora_rank": 0}, "full fine-tuning"),
               ("pi05", {"train_expert_only": True}, "expert + heads (VLM frozen)"),
               ("pi05", {"train_expert_only": False}, "full fine-tuning")]
    for kind, overrides, label in options:
        policy = policies.empty_policy(policies.full_config(kind, **overrides))
        with init_empty_weights():
            policy.configure_training()
        total = count(policy)
        trainable = sum(p.numel() for p in policy.trainable_parameters())
        frozen = total - trainable
        weights = 2 * frozen + 4 * trainable
        train_state = 12 * trainable  # fp32 gradient + Adam exp_avg + exp_avg_sq
        rows.append({"kind": kind, "training": label, "params": total, "trainable": trainable,
                     "weights [GB]": weights / GB, "grads+Adam [GB]": train_state / GB,
                     "sum [GB]": (weights + train_state) / GB})
    return rows


def component_rows():
    rows = []
    for kind, parts in [("openvla", ["vision_backbone.dino.", "vision_backbone.siglip.", "projector.",
                                     "language_model.", "value_head."]),
                        ("pi05", ["vlm.vision_tower.", "vlm.multi_modal_projector.", "vlm.language_model.",
                                  "expert.", "action_", "time_mlp", "noise_head.", "value_head."])]:
        policy = policies.empty_policy(policies.full_config(kind))
        for part in parts:
            rows.append({"kind": kind, "component": part + "*", "params": count(policy, part)})
        rows.append({"kind": kind, "component": "total", "params": count(policy)})
    return rows


def markdown(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:,}" if isinstance(v, int) else f"{v:.1f}" if isinstance(v, float) else str(v)
                 for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: Args):
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("## Tiny policies (CPU)\n")
    print(markdown(tiny_measurements(args)), "\n")
    print("## Full sizes: parameters per component (meta device, exact)\n")
    print(markdown(component_rows()), "\n")
    print("## Full sizes: weights, gradients and AdamW state\n")
    print(markdown(full_memory_rows()))


if __name__ == "__main__":
    main(tyro.cli(Args))
