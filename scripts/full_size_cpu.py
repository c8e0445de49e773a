"""The full-size policies on the CPU, with random weights: one rollout and one update of each kind.

    .venv/bin/python scripts/full_size_cpu.py --policy pi05        # about 12 GiB of memory, 50 s on 2 cores
    .venv/bin/python scripts/full_size_cpu.py --policy openvla     # about 21.5 GiB of memory, 3 min

Builds the full-size policy (published sizes) with random weights, policies.random_full_policy
(no downloads; frozen weights in the config dtype, bf16, trainable ones in fp32, a word-hashing
stand-in tokenizer), then runs at batch 1 on a fake observation (uint8 image at the policy's size,
state [1, 8], "open the drawer"):

act        act(obs) sampled (seeded) and act(obs, deterministic=True), no gradients
evaluate   evaluate(obs, act_out) with gradients; |logprob - act's logprob| is the act/evaluate
           disagreement (bf16 autocast on the CPU: not exactly zero)
ppo step   ratio = exp(evaluate logprob - act logprob), PPO's clipped surrogate with advantage +1,
           plus beta * sft_loss on a fake real batch (same observation, random actions [1, H, 7]),
           backward, optimizer step on the trainable parameters (uses evaluate's graph)
sft step   sft_loss on the fake batch, backward, optimizer step

Prints the wall time of each part, the gradient norms the PPO loss gave the trainable parameter
groups, which parameters the steps changed, and the process's peak resident set size (VmHWM,
reset after the imports; plumbing.peak_rss_mib). tests/test_full_size.py runs the same functions
on pi05 (openvla at 7.5B parameters is too big for CI). Figures: docs/policies.md, "Full sizes on
the CPU".
"""

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402

INSTRUCTION = "open the drawer"
# parameter groups whose PPO gradient is reported (and asserted non-zero by the test)
GRAD_GROUPS = {"pi05": {"noise head": "noise_head.", "expert": "expert.", "action out proj": "action_out_proj."},
               "openvla": {"LoRA B": "lora_B", "LoRA A": "lora_A"}}


@dataclass
class Args:
    policy: Literal["openvla", "pi05"] = "pi05"
    """policy kind (full size, random weights)"""
    threads: int = 2
    """torch CPU threads"""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """sgd keeps no state (less memory); adamw adds two fp32 moments per trainable parameter"""
    lr: float = 1e-4
    """learning rate of both steps"""
    beta: float = 0.1
    """weight of the SFT loss on the fake real batch in the PPO-style loss"""
    clip: float = 0.2
    """PPO clip range"""
    seed: int = 0
    """seed of the weights, the fake data and the sampled action"""


def fake_obs(policy, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    size = policy.config["model"]["image_size"]
    return {"image": rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8),
            "state": rng.uniform(-1, 1, (1, policy.state_dim)).astype(np.float32),
            "instruction": [INSTRUCTION]}


def fake_batch(policy, obs, seed=0) -> dict:
    """A 'real' SFT batch: the observation with random actions [1, H, 7] in [-1, 1]."""
    rng = np.random.default_rng(seed + 1)
    return dict(obs, actions=rng.uniform(-1, 1, (1, policy.chunk_size, policy.action_dim)).astype(np.float32))


def build(kind: str, seed=0):
    """The full-size policy with random weights (policies.random_full_policy), in training mode."""
    import policies
    return policies.random_full_policy(kind, "cpu", seed=seed).train()


def fingerprint(policy) -> dict:
    """Per parameter: autograd's version counter (bumped by every in-place write, which is how
    optimizers update) and a strided sample of its values; cheap next to copying 3-7B weights."""
    return {n: (p._version, p.detach().reshape(-1)[:: max(1, p.numel() // 64)].float().clone())
            for n, p in policy.named_parameters()}


def changed(policy, before: dict) -> dict:
    """Names of the trainable and frozen parameters whose version or sampled values changed."""
    out = {"trainable": [], "frozen": []}
    for n, p in policy.named_parameters():
        version, sample = before[n]
        now = p.detach().reshape(-1)[:: max(1, p.numel() // 64)].float()
        if p._version != version or not torch.equal(now, sample):
            out["trainable" if p.requires_grad else "frozen"].append(n)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def ppo_loss(ev, act_out, sft, beta, clip, advantage=1.0):
    ratio = torch.exp(ev["logprob"] - act_out["logprob"])
    surrogate = torch.min(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return -surrogate.mean() + beta * sft


def run(policy, optimizer, beta=0.1, clip=0.2, seed=0) -> dict:
    """act, evaluate, PPO step, SFT step on one fake observation; returns what they gave and took."""
    kind = policy.kind
    obs = fake_obs(policy, seed)
    batch = fake_batch(policy, obs, seed)
    r = {"seconds": {}}
    (act_out, det), r["seconds"]["act (sampled + deterministic)"] = timed(lambda: (
        policy.act(obs, generator=torch.Generator().manual_seed(seed)), policy.act(obs, deterministic=True)))
    r["act"], r["deterministic_actions"] = act_out, det["actions"]
    ev, r["seconds"]["evaluate (with grad)"] = timed(lambda: policy.evaluate(obs, act_out))
    r["evaluate"] = {k: v.detach() for k, v in ev.items()}
    r["logprob_diff"] = (ev["logprob"] - act_out["logprob"]).abs().max().item()

    def ppo_step():
        before = fingerprint(policy)
        loss = ppo_loss(ev, act_out, policy.sft_loss(batch, generator=torch.Generator().manual_seed(seed)),
                        beta, clip)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = {group: math.sqrt(sum(p.grad.float().pow(2).sum().item() for n, p in policy.named_parameters()
                                      if prefix in n and p.grad is not None))
                 for group, prefix in GRAD_GROUPS[kind].items()}
        optimizer.step()
        return {"loss": loss.item(), "grad_norms": grads, "changed": changed(policy, before)}

    r["ppo"], r["seconds"]["ppo step (loss + sft, backward, step)"] = timed(ppo_step)

    def sft_step():
        before = fingerprint(policy)
        loss = policy.sft_loss(batch, generator=torch.Generator().manual_seed(seed + 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "changed": changed(policy, before)}

    r["sft"], r["seconds"]["sft step (loss, backward, step)"] = timed(sft_step)
    optimizer.zero_grad(set_to_none=True)
    return r


def make_optimizer(policy, name="sgd", lr=1e-4):
    if name == "adamw":
        return torch.optim.AdamW(policy.trainable_parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    return torch.optim.SGD(policy.trainable_parameters(), lr=lr)


def main(args: Args):
    torch.set_num_threads(args.threads)
    torch.ones(1) @ torch.ones(1)
    plumbing.reset_peak_rss()
    rss_before = plumbing.rss_mib()
    policy, build_s = timed(lambda: build(args.policy, args.seed))
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    total = sum(p.numel() for p in policy.parameters())
    print(f"{args.policy} full size, random weights: {total:,} parameters, {trainable:,} trainable; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, {args.optimizer}")
    print(f"  build (random init)                     {build_s:7.1f} s")
    r = run(policy, make_optimizer(policy, args.optimizer, args.lr), args.beta, args.clip, args.seed)
    for part, seconds in r["seconds"].items():
        print(f"  {part:40s}{seconds:7.1f} s")
    print(f"  total after build                       {sum(r['seconds'].values()):7.1f} s")
    print(f"act logprob {r['act']['logprob'].item():.4f}, evaluate logprob {r['evaluate']['logprob'].item():.4f}, "
          f"|difference| {r['logprob_diff']:.2e}; entropy {r['evaluate']['entropy'].item():.4f}")
    print(f"ppo loss {r['ppo']['loss']:.4f}, grad norms "
          + ", ".join(f"{g} {v:.3e}" for g, v in r["ppo"]["grad_norms"].items()))
    for step in ("ppo", "sft"):
        c = r[step]["changed"]
        print(f"{step} step changed {len(c['trainable'])} trainable and {len(c['frozen'])} frozen parameter tensors"
              + (f" (loss {r[step]['loss']:.4f})" if step == "sft" else ""))
    print(f"peak RSS {plumbing.peak_rss_mib() / 1024:.1f} GiB (process; {rss_before / 1024:.1f} GiB before the build)")


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))
