"""How fast RL-Co runs on this machine, in one run: raw env steps/s, the Stage II loop against
them, Stage I training steps, and (on a GPU) the full-size policies' step times, memory and MFU.

    python bench.py                                   # CPU: tiny policies (about 5-7 min on 2 cores)
    python bench.py --device cuda --sim-backend gpu --num-envs 64 256 --sizes tiny full
    bash scripts/gpu_bench.sh                         # the GPU run above, JSON under $OUT

Prints one table per section and writes everything to --out (JSON, rewritten after every
measurement, so an interrupted run keeps what it measured). Sections:

env       control steps/s of each twin task and of stock ManiSkill PickCube-v1 (same camera and
          controller), with 1 and N envs, the camera rendered every step or once per action chunk
          (our envs' render=False; for PickCube-v1 its physics and success test without the
          observation). Random actions, resets included. With --sim-backend gpu each setting runs
          in its own process (one GPU PhysX system per process).
stage2    stage2_rl_cotrain.py itself, run for one iteration on a random tiny policy (saved as a
          Stage I checkpoint) and random real demos: its whole-loop and rollout env steps/s, the
          raw env steps/s of the same envs (time_env), and the rollout/update time split.
policies  per kind and size, in a fresh process each: rollout act(), forward (SFT loss, no grad),
          Stage I step (augmentation, SFT loss, backward, clipping, AdamW), Stage II update step
          (evaluate, a PPO-shaped loss, backward, Adam); samples/s, peak memory, model FLOPs and
          MFU. Full sizes need a GPU: random init materialised on it (no published weights), frozen
          weights in bf16 and trainable ones in fp32 as in training, a word-hashing stand-in
          tokenizer (about as many prompt tokens as the published tokenizers give).
Memory: on a GPU torch.cuda.max_memory_allocated per phase; on a CPU the peak resident set size
of the measuring process (VmHWM, reset after the imports through /proc/self/clear_refs) minus its
resident size just before the policy is built: the peak the policy and its training raised the
process to, allocator caching included.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

ROOT = Path(__file__).resolve().parent
TASKS = ("pick_and_place", "push_cube", "open_drawer", "close_drawer")  # = envs.TASKS (not imported: slow)


@dataclass
class Args:
    device: Literal["cpu", "cuda"] = "cpu"
    """where the policies run (full sizes only on cuda)"""
    sim_backend: Literal["cpu", "gpu"] = "cpu"
    """cpu: PhysX on the CPU, N envs in worker processes; gpu: ManiSkill's GPU-parallel simulation"""
    tasks: tuple[str, ...] = TASKS
    """twin tasks whose raw env speed is measured (none: skip them)"""
    num_envs: tuple[int, ...] = (1, 2)
    """env counts measured for each task (and for PickCube-v1 on the gpu backend)"""
    pick_cube: bool = True
    """also measure stock ManiSkill PickCube-v1 (CPU backend: 1 env only)"""
    env_steps: int = 40
    """control steps timed per env setting (after 4 warm-up steps)"""
    chunk: int = 4
    """render once per this many steps in the once-per-chunk setting (pi05's chunk)"""
    image_size: int = 128
    """camera image side, as the demos are recorded"""
    stage2_policies: tuple[str, ...] = ("pi05",)
    """policy kinds run through one Stage II iteration (none: skip)"""
    stage2_task: str = "open_drawer"
    """task of the Stage II runs"""
    stage2_num_envs: tuple[int, ...] = (2,)
    """sim envs of the Stage II runs (one run each)"""
    policy_kinds: tuple[str, ...] = ("openvla", "pi05")
    """policy kinds measured in the policies section (none: skip)"""
    sizes: tuple[str, ...] = ("tiny",)
    """policy sizes measured: tiny, full (full: --device cuda only)"""
    batch_size: int = 8
    """samples per step in the policies section"""
    steps: int = 3
    """timed repetitions per phase (after 2 warm-up ones); the median is reported"""
    out: str = "bench.json"
    """JSON file written (and rewritten after every measurement)"""
    timeout: int = 900
    """seconds allowed to each measuring subprocess"""


# --------------------------------------------------------------------------------------------
# FLOP counting (matmuls only)
# --------------------------------------------------------------------------------------------
def transformer_flops(tokens, width, depth, mlp, heads, head_dim=None, kv_heads=None, kv_tokens=None,
                      gated_mlp=True) -> int:
    """Matmul FLOPs of one forward pass of `depth` transformer layers over `tokens` tokens (one
    sample). A matmul [m, k] x [k, n] costs 2 m n k. Per layer: the q, k, v and output projections
    (q and output: width x heads*head_dim; k and v: width x kv_heads*head_dim), attention scores
    Q K^T and the weighted sum A V (2 * 2 * tokens * kv_tokens * heads*head_dim, i.e. 2*2*s^2*d
    for plain self-attention; the full square is counted also for causal masks), and the MLP (3
    matrices width x mlp when gated (Llama, Gemma), 2 otherwise (ViT)). Norms, softmax, rotary
    embeddings, activations and residual adds are ignored (a few per cent at these widths).
    kv_tokens: keys/values attended to (pi0.5's expert attends to the prefix and its own tokens)."""
    head_dim = head_dim or width // heads
    kv_heads = kv_heads or heads
    kv_tokens = tokens if kv_tokens is None else kv_tokens
    q, kv = heads * head_dim, kv_heads * head_dim
    projections = 2 * tokens * width * q + 2 * (2 * tokens * width * kv) + 2 * tokens * q * width
    attention = 2 * (2 * tokens * kv_tokens * q)
    mlp_flops = (3 if gated_mlp else 2) * 2 * tokens * width * mlp
    return depth * (projections + attention + mlp_flops)


def training_flops(forward: int) -> int:
    """A training step of a fully trained model: forward + backward, the backward costing two
    forwards (gradients of the inputs and of the weights): 3x forward."""
    return 3 * forward


def policy_flops(kind: str, m: dict, chunk_size: int, action_dim: int, prompt_tokens: int,
                 phase: str, num_chain_steps: int = 0) -> dict:
    """Model FLOPs per sample of one phase ("sft": the SFT loss; "rl": evaluate of a rollout;
    "act": a rollout) of a policy with model config `m`, as {"forward", "train"}.

    The forward sums transformer_flops of each part plus its other matmuls (patch embeddings,
    projectors, heads). "train" adds each part's backward: 2x its forward where its weights train,
    1x where it is frozen but gradients pass through to trained weights before it (input gradients
    only: openvla's LM under LoRA; its attention core really costs 2x, a small undercount), 0 where
    it is frozen and nothing before it trains (openvla's ViTs under LoRA, pi05's VLM with
    train_expert_only). Fully trained: training_flops(forward), 3x. Model FLOPs: the recompute of
    gradient checkpointing is not counted (the usual MFU convention)."""
    parts = []  # (forward FLOPs, backward factor)
    if kind == "openvla":
        patches = (m["image_size"] // m["patch_size"]) ** 2
        pixels = 3 * m["patch_size"] ** 2
        lora = int(m["lora_rank"]) > 0
        vision_back = 0 if lora else 2
        dino = 2 * patches * pixels * m["dino_width"] + transformer_flops(
            patches + 1 + m["dino_registers"], m["dino_width"], m["dino_depth"], m["dino_mlp"], m["dino_heads"],
            gated_mlp=False)
        siglip = 2 * patches * pixels * m["siglip_width"] + transformer_flops(
            patches, m["siglip_width"], m["siglip_depth"], m["siglip_mlp"], m["siglip_heads"], gated_mlp=False)
        fused = m["dino_width"] + m["siglip_width"]
        projector = 2 * patches * (fused * 4 * fused + 4 * fused * m["llm_width"] + m["llm_width"] ** 2)
        n_actions = chunk_size * action_dim
        # [BOS, patches, prompt, action tokens]; act() runs the same tokens through a KV cache
        seq = 1 + patches + prompt_tokens + n_actions
        lm = transformer_flops(seq, m["llm_width"], m["llm_depth"], m["llm_mlp"], m["llm_heads"])
        lm_head = 2 * n_actions * m["llm_width"] * m["vocab_size"]  # logits at the action positions only
        h1, h2 = m["value_hidden"]
        value = 2 * (m["llm_width"] * h1 + h1 * h2 + h2)
        parts += [(dino, vision_back), (siglip, vision_back), (projector, vision_back),
                  (lm + lm_head, 1 if lora else 2), (value, 2)]
    else:
        patches = (m["image_size"] // m["patch_size"]) ** 2
        vision = 2 * patches * 3 * m["patch_size"] ** 2 * m["vision_width"] + transformer_flops(
            patches, m["vision_width"], m["vision_depth"], m["vision_mlp"], m["vision_heads"], gated_mlp=False)
        vision += 2 * patches * m["vision_width"] * m["vlm_width"]  # multi-modal projector
        prefix_len = patches + 1 + prompt_tokens  # image tokens, BOS, prompt with state tokens
        vlm = transformer_flops(prefix_len, m["vlm_width"], m["vlm_depth"], m["vlm_mlp"], m["num_heads"],
                                m["head_dim"], m["num_kv_heads"])
        H, W = chunk_size, m["expert_width"]
        A = m["max_action_dim"] or action_dim
        expert = transformer_flops(H, W, m["vlm_depth"], m["expert_mlp"], m["num_heads"], m["head_dim"],
                                   m["num_kv_heads"], kv_tokens=prefix_len + H)
        expert += 2 * 2 * W * W                             # time MLP (one token)
        expert += (2 * m["vlm_depth"] + 1) * 2 * W * 3 * W  # adaptive norms (one token each)
        expert += 2 * H * A * W * 2                         # action in / out projections
        expert += 2 * H * (W * m["noise_hidden"] + m["noise_hidden"] * action_dim)  # noise head
        h1, h2 = m["value_hidden"]
        value = 2 * (m["vlm_width"] * h1 + h1 * h2 + h2)
        calls = 1 if phase == "sft" else num_chain_steps  # velocity evaluations
        frozen = bool(m["train_expert_only"])
        parts += [(vision, 0 if frozen else 2), (vlm, 0 if frozen else 2), (calls * expert, 2), (value, 2)]
    forward = sum(f for f, _ in parts)
    return {"forward": int(forward), "train": int(sum(f * (1 + b) for f, b in parts))}


# bf16 dense tensor-core peak (no sparsity), FLOP/s, by device name (NVIDIA data sheets)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device_name: str):
    for key, peak in PEAK_BF16:
        if key in device_name:
            return peak
    return None


# --------------------------------------------------------------------------------------------
# Measurements that run in a subprocess: python -c "import bench; bench.run_worker(...)"
# --------------------------------------------------------------------------------------------
RESULT = "BENCH_RESULT "


def run_worker(fn_name: str, kwargs: dict):
    """Subprocess entry: run one measurement, print its row as the last line."""
    try:
        row = globals()[fn_name](**kwargs)
    except Exception as e:  # a failed measurement is a row with an error, not a failed bench
        row = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    print(RESULT + json.dumps(row), flush=True)


def in_subprocess(fn_name: str, kwargs: dict, timeout: int) -> dict:
    code = f"import bench; bench.run_worker({fn_name!r}, {kwargs!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {"error": f"exit code {done.returncode}: {done.stderr[-800:]}"}


# ---- env speed -----------------------------------------------------------------------------
def time_env(task: str, num_envs: int, sim_backend: str, image_size: int, steps: int, chunk: int) -> dict:
    """Control steps/s (all envs together) of one twin task, rendering every step and once per chunk."""
    import envs
    t0 = time.perf_counter()
    env = envs.make_env(task, num_envs=num_envs, image_size=image_size, sim_backend=sim_backend,
                        auto_reset=True, seed=0)
    env.reset()
    start_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    row = {"env": task, "num_envs": num_envs, "start_s": start_s}
    for name, every in (("sps_render_every_step", 1), ("sps_render_once_per_chunk", chunk)):
        for i in range(4):  # warm-up: first renders, allocations
            env.step(rng.uniform(-1, 1, (num_envs, 7)).astype(np.float32), render=True)
        t0 = time.perf_counter()
        for i in range(steps):
            env.step(rng.uniform(-1, 1, (num_envs, 7)).astype(np.float32), render=(i + 1) % every == 0)
        row[name] = num_envs * steps / (time.perf_counter() - t0)
    env.close()
    return row


def time_pick_cube(num_envs: int, sim_backend: str, image_size: int, steps: int, chunk: int) -> dict:
    """Stock PickCube-v1 (pd_ee_delta_pose, one RGB camera of the same size), as time_env; the
    steps without a render step its physics and success test only (what our render=False does)."""
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers PickCube-v1)
    t0 = time.perf_counter()
    env = gym.make("PickCube-v1", num_envs=num_envs, obs_mode="rgb", control_mode="pd_ee_delta_pose",
                   sim_backend="physx_cuda" if sim_backend == "gpu" else "physx_cpu",
                   sensor_configs=dict(width=image_size, height=image_size))
    base = env.unwrapped
    env.reset(seed=0)
    row = {"env": "PickCube-v1 (stock)", "num_envs": num_envs, "start_s": time.perf_counter() - t0}
    rng = np.random.default_rng(0)
    shape = (num_envs, 7) if num_envs > 1 else (7,)
    for name, every in (("sps_render_every_step", 1), ("sps_render_once_per_chunk", chunk)):
        for i in range(4):
            env.step(rng.uniform(-1, 1, shape).astype(np.float32))
        t0 = time.perf_counter()
        for i in range(steps):
            action = rng.uniform(-1, 1, shape).astype(np.float32)
            if (i + 1) % every == 0:
                env.step(action)  # physics + success test + rendered observation
            else:
                base._step_action(action)  # physics ...
                base._elapsed_steps += 1
                base.get_info()  # ... and success test, no observation
            if int(base.elapsed_steps.max()) >= 50:  # its time limit
                env.reset()
        row[name] = num_envs * steps / (time.perf_counter() - t0)
    env.close()
    return row


# ---- policies ------------------------------------------------------------------------------
def time_policy(kind: str, size: str, device: str, batch_size: int, steps: int, image_size: int,
                overrides: dict) -> dict:
    """One policy's phases (see the module docstring): median seconds, samples/s, peak memory,
    model FLOPs per sample and (GPU) MFU."""
    import torch
    import demos
    import plumbing
    import policies
    if device == "cpu":
        torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU
    torch.ones(1) @ torch.ones(1)  # lazy initialisations outside the measured increase
    plumbing.reset_peak_rss()
    rss_before = plumbing.rss_mib()  # after the imports
    cuda = device == "cuda"
    instruction = "open the drawer"
    if size == "tiny":
        policy = policies.make_policy(kind, instructions=[instruction], **overrides).to(device)
    else:
        policy = policies.random_full_policy(kind, device, **overrides)
    policy.train()
    m = policy.config["model"]
    rng = np.random.default_rng(0)
    B, H = batch_size, policy.chunk_size
    obs = {"image": rng.integers(0, 256, (B, image_size, image_size, 3), dtype=np.uint8),
           "state": rng.uniform(-1, 1, (B, policy.state_dim)).astype(np.float32),
           "instruction": [instruction] * B}
    actions = torch.as_tensor(rng.uniform(-1, 1, (B, H, policy.action_dim)).astype(np.float32))
    trainable = policy.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    augment_rng = torch.Generator().manual_seed(0)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def act():
        return policy.act(obs)

    def forward():
        with torch.no_grad():
            policy.sft_loss(dict(obs, actions=actions))

    def sft_step():  # Stage I's step
        images = demos.augment_images(torch.as_tensor(obs["image"]), augment_rng)
        batch = {"image": images.to(device), "state": torch.as_tensor(obs["state"]).to(device),
                 "instruction": obs["instruction"], "actions": actions.to(device)}
        loss = policy.sft_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    rollout = policy.act(obs)

    def rl_step():  # Stage II's update on one minibatch: evaluate, PPO-shaped loss, backward, step
        out = policy.evaluate(obs, rollout)
        loss = -out["logprob"].mean() + 0.5 * out["value"].pow(2).mean() - 0.005 * out["entropy"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    prompt = (len(policy.tokenizer.encode(policies.OPENVLA_PROMPT.format(instruction=instruction)))
              + len(m["prompt_end_ids"]) if kind == "openvla" else
              1 + len(policy.tokenizer.encode(policy._prompts(torch.as_tensor(obs["state"][:1]).to(device),
                                                              [instruction])[0])))
    flops = {phase: policy_flops(kind, m, H, policy.action_dim, prompt, phase, m.get("num_steps", 0))
             for phase in ("sft", "rl", "act")}
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    row = {"kind": kind, "size": size, "options": overrides, "batch_size": B, "prompt_tokens": prompt,
           "params": sum(p.numel() for p in policy.parameters()), "trainable": sum(p.numel() for p in trainable),
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if weights_gib is not None:
        row["weights_gib"] = weights_gib
    phases = (("act", act, flops["act"]["forward"]), ("forward", forward, flops["sft"]["forward"]),
              ("sft_step", sft_step, flops["sft"]["train"]), ("rl_step", rl_step, flops["rl"]["train"]))
    for name, fn, flops_per_sample in phases:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(2 + steps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times[2:]))
        row[f"{name}_s"] = seconds
        row[f"{name}_samples_per_s"] = B / seconds
        row[f"{name}_gflop_per_sample"] = flops_per_sample / 1e9
        row[f"{name}_tflops"] = B * flops_per_sample / seconds / 1e12
        if cuda:
            row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row[f"{name}_mfu"] = B * flops_per_sample / seconds / peak if peak else None
    if cuda:
        row["peak_gib"] = max(row[f"{n}_peak_gib"] for n, _, _ in phases)
        if peak is None:
            row["mfu_note"] = f"no bf16 peak known for {torch.cuda.get_device_name()}: MFU not reported"
    else:
        row["peak_rss_increase_mib"] = plumbing.peak_rss_mib() - rss_before
    return row


# ---- Stage II ------------------------------------------------------------------------------
def time_stage2(kind: str, task: str, num_envs: int, args: Args, work: Path) -> dict:
    """Run stage2_rl_cotrain.py for one iteration from a random tiny Stage I checkpoint and return
    its perf/* figures."""
    import demos
    import policies
    work.mkdir(parents=True, exist_ok=True)
    ckpt, real = work / f"init_{kind}", work / "real"
    policy = policies.make_policy(kind, instructions=["open the drawer"])
    policy.save(ckpt, extra={"stage": "stage1", "task": task})
    if not real.exists():  # random frames: Stage II only needs their format
        rng = np.random.default_rng(0)
        writer = demos.LeRobotWriter(real, fps=10, image_shape=(args.image_size, args.image_size, 3),
                                     use_videos=False)
        for _ in range(2):
            writer.add_episode(rng.integers(0, 256, (10, args.image_size, args.image_size, 3), dtype=np.uint8),
                               rng.uniform(-1, 1, (10, 8)).astype(np.float32),
                               rng.uniform(-1, 1, (10, 7)).astype(np.float32), "open the drawer")
        writer.close()
    run_name = f"stage2_{kind}_{num_envs}"
    cmd = [sys.executable, str(ROOT / "stage2_rl_cotrain.py"), "--task", task, "--init", str(ckpt),
           "--real-data", str(real), "--num-envs", str(num_envs), "--sim-backend", args.sim_backend,
           "--total-env-steps", "1", "--eval-episodes", "0", "--no-save-video", "--device", args.device,
           "--runs-dir", str(work / "runs"), "--run-name", run_name]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "num_envs": num_envs, "error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        return {"kind": kind, "num_envs": num_envs, "error": f"exit code {done.returncode}: {done.stderr[-800:]}"}
    merged = {}
    for line in (work / "runs" / run_name / "metrics.jsonl").read_text().splitlines():
        merged.update({k: v for k, v in json.loads(line).items() if k.startswith("perf/")})
    row = {"kind": kind, "task": task, "num_envs": num_envs}
    row.update({k: merged["perf/" + k] for k in ("rollout_env_sps", "env_sps", "rollout_time", "update_time")})
    # the yardstick: the same envs stepped with random actions, rendering every step / at decision points
    raw = time_env(task, num_envs, args.sim_backend, args.image_size, args.env_steps, policy.chunk_size)
    row["raw_env_sps_render_all_steps"] = raw["sps_render_every_step"]
    row["raw_env_sps_render_decision_points"] = raw["sps_render_once_per_chunk"]
    # the loop's overhead: how much of the raw rate (same envs, same rendering) it keeps
    row["rollout_over_raw"] = row["rollout_env_sps"] / row["raw_env_sps_render_decision_points"]
    row["loop_over_raw"] = row["env_sps"] / row["raw_env_sps_render_decision_points"]
    row["update_share"] = row["update_time"] / (row["rollout_time"] + row["update_time"])
    return row


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def full_size_memory(kind: str, **overrides) -> dict:
    """Computed (not measured) bytes of weights, gradients and AdamW state of a full size: frozen
    weights bf16, trainable ones fp32 with an fp32 gradient and two fp32 moments (16 bytes)."""
    from accelerate import init_empty_weights
    import policies
    policy = policies.empty_policy(policies.full_config(kind, **overrides))
    with init_empty_weights():
        policy.configure_training()
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    return {"params": total, "trainable": trainable,
            "weights_grads_adam_gb_computed": (2 * (total - trainable) + 16 * trainable) / 1e9}


def table(rows: list[dict], keys: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(args: Args):
    if args.device == "cpu" and "full" in args.sizes:
        print("note: full sizes need --device cuda; skipped on the CPU", flush=True)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task {unknown}; valid tasks: {', '.join(TASKS)}")
    started = time.time()
    result = {"args": asdict(args), "machine": {"cpu_count": os.cpu_count(),
                                                "load_average_start": os.getloadavg()},
              "env": [], "stage2": [], "policies": [], "skipped": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["machine"]["load_average_end"] = os.getloadavg()
        result["wall_s"] = time.time() - started
        out.write_text(json.dumps(result, indent=2))

    def note(msg):
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    # ---- env speed ----
    gpu_sim = args.sim_backend == "gpu"
    settings = [("time_env", dict(task=t, num_envs=n)) for t in args.tasks for n in args.num_envs]
    if args.pick_cube:
        for n in args.num_envs:
            if n > 1 and not gpu_sim:
                result["skipped"].append(f"PickCube-v1 with {n} envs: ManiSkill's CPU backend runs one env "
                                         f"per process")
            else:
                settings.append(("time_pick_cube", dict(num_envs=n)))
    for fn_name, kw in settings:
        kw.update(sim_backend=args.sim_backend, image_size=args.image_size, steps=args.env_steps, chunk=args.chunk)
        note(f"env: {kw.get('task', 'PickCube-v1')}, {kw['num_envs']} env(s), {args.sim_backend} backend ...")
        if gpu_sim:  # one GPU PhysX system per process
            row = in_subprocess(fn_name, kw, args.timeout)
        else:
            try:
                row = globals()[fn_name](**kw)
            except Exception as e:
                row = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        row.setdefault("env", kw.get("task", "PickCube-v1 (stock)"))
        row.setdefault("num_envs", kw["num_envs"])
        result["env"].append(row)
        save()

    # ---- Stage II loop ----
    work = Path(tempfile.mkdtemp(prefix="bench_stage2_"))
    try:
        for kind in args.stage2_policies:
            for n in args.stage2_num_envs:
                note(f"stage2: one iteration, {kind} tiny, {n} env(s) ...")
                result["stage2"].append(time_stage2(kind, args.stage2_task, n, args, work))
                save()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # ---- policies ----
    configs = []
    for size in args.sizes:
        if size == "full" and args.device != "cuda":
            result["skipped"].append("full sizes: need --device cuda")
            continue
        for kind in args.policy_kinds:
            if size == "tiny":
                configs.append((kind, size, {}))
            elif kind == "openvla":
                configs += [(kind, size, {}), (kind, size, {"gradient_checkpointing": True})]
                mem = full_size_memory("openvla", lora_rank=0)
                result["skipped"].append(
                    f"openvla full fine-tuning (lora_rank 0): {mem['weights_grads_adam_gb_computed']:.0f} GB of "
                    f"weights, gradients and AdamW state (computed) do not fit one 80 GB GPU; use "
                    f"stage1_sft_cotrain.py --fsdp over several GPUs")
            else:
                configs += [(kind, size, {}), (kind, size, {"train_expert_only": False, "gradient_checkpointing": True}),
                            (kind, size, {"train_expert_only": False})]
    for kind, size, overrides in configs:
        note(f"policies: {kind} {size} {overrides or ''} on {args.device} ...")
        row = in_subprocess("time_policy", dict(kind=kind, size=size, device=args.device, batch_size=args.batch_size,
                                                steps=args.steps, image_size=args.image_size, overrides=overrides),
                            args.timeout)
        row.update(kind=kind, size=size, options=overrides)
        result["policies"].append(row)
        save()

    # ---- report ----
    save()
    load = result["machine"]["load_average_end"]
    print(f"\n# bench.py: {args.device} policies, {args.sim_backend} sim backend, {os.cpu_count()} CPU cores, "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min), {time.time() - started:.0f} s\n")
    print("## Env control steps/s (all envs together)\n")
    print(table(result["env"], ["env", "num_envs", "start_s", "sps_render_every_step", "sps_render_once_per_chunk",
                                "error"]))
    print("\n## Stage II loop (one iteration) vs raw env steps/s of the same envs\n")
    print(table(result["stage2"], ["kind", "num_envs", "raw_env_sps_render_all_steps",
                                   "raw_env_sps_render_decision_points", "rollout_env_sps", "env_sps",
                                   "rollout_over_raw", "loop_over_raw", "rollout_time", "update_time", "error"]))
    print("\n## Policies (batch %d; seconds are medians; GFLOP per sample, model FLOPs)\n" % args.batch_size)
    mem_key = "peak_gib" if args.device == "cuda" else "peak_rss_increase_mib"
    print(table([dict(r, options=json.dumps(r.get("options") or {})) for r in result["policies"]],
                ["kind", "size", "options", "act_s", "forward_s", "sft_step_s", "sft_step_samples_per_s",
                 "rl_step_s", "sft_step_gflop_per_sample", "rl_step_gflop_per_sample", "sft_step_tflops",
                 "sft_step_mfu", "rl_step_mfu", mem_key, "error"]))
    for msg in result["skipped"]:
        print(f"\nskipped: {msg}")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    import tyro
    main(tyro.cli(Args))
