"""bench.py (FLOP counting, the CPU run, the full-size code path on shrunk configs), gradient
checkpointing and Stage I's --fsdp."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import demos
import policies
from conftest import ROOT


# ---- FLOP counting -------------------------------------------------------------------------------
def test_transformer_flops_by_hand():
    # 4 tokens, width 8, 2 heads of 4, MLP 16, 2 layers. A matmul [m, k] x [k, n] is 2 m n k.
    #   q, k, v, o projections: 4 x 2*4*8*8 = 4 x 512        = 2048
    #   scores QK^T 2*4*4*8 = 256, weighted sum AV 256       =  512
    #   plain MLP, 2 matrices of 8 x 16: 2 x 2*4*8*16        = 2048
    #   per layer 4608, 2 layers                             = 9216
    assert bench.transformer_flops(4, 8, 2, 16, 2, gated_mlp=False) == 9216
    # gated MLP (Llama/Gemma): 3 matrices, 3 x 1024 = 3072 -> (2048 + 512 + 3072) x 2 = 11264
    assert bench.transformer_flops(4, 8, 2, 16, 2) == 11264
    # one layer, 2 query heads of 4, 1 kv head (GQA), attending to 6 keys (pi0.5's expert):
    #   q 2*4*8*8 = 512, k 2*4*8*4 = 256, v 256, o 512       = 1536
    #   scores 2*4*6*8 = 384, weighted sum 384               =  768
    #   gated MLP                                            = 3072
    assert bench.transformer_flops(4, 8, 1, 16, 2, head_dim=4, kv_heads=1, kv_tokens=6) == 1536 + 768 + 3072
    assert bench.training_flops(1000) == 3000


def test_policy_flops_matches_parameter_count():
    """The usual 2 x parameters x tokens, plus attention, must agree with the per-part count."""
    config = policies.full_config("openvla", lora_rank=0)
    m = config["model"]
    policy = policies.empty_policy(config)
    count = lambda prefix: sum(p.numel() for n, p in policy.named_parameters()
                               if n.startswith(prefix) and p.dim() >= 2)  # matrices only
    prompt, n_act, patches = 20, 7, 256
    seq = 1 + patches + prompt + n_act
    lm_matrices = count("language_model.model.layers.")
    expected = (2 * (count("vision_backbone.dino.blocks.")) * (patches + 5)
                + 2 * count("vision_backbone.siglip.blocks.") * patches
                + 2 * count("projector.") * patches
                + 2 * lm_matrices * seq + 2 * 2 * seq * seq * m["llm_width"] * m["llm_depth"]
                + 2 * n_act * m["llm_width"] * m["vocab_size"])
    flops = bench.policy_flops("openvla", m, 1, 7, prompt, "sft")
    assert abs(flops["forward"] / expected - 1) < 0.01, (flops, expected)
    assert flops["train"] == pytest.approx(3 * flops["forward"], rel=1e-9)  # everything trains
    lora = bench.policy_flops("openvla", policies.full_config("openvla")["model"], 1, 7, prompt, "sft")
    assert lora["forward"] < lora["train"] < 2.1 * lora["forward"]  # frozen ViTs: no backward
    pi05 = policies.full_config("pi05")["model"]
    expert_only = bench.policy_flops("pi05", pi05, 4, 7, 60, "rl", num_chain_steps=4)
    full_ft = bench.policy_flops("pi05", dict(pi05, train_expert_only=False), 4, 7, 60, "rl", num_chain_steps=4)
    assert expert_only["forward"] == full_ft["forward"] and full_ft["train"] == 3 * full_ft["forward"]
    assert expert_only["train"] < 1.5 * expert_only["forward"]  # the frozen prefix dominates


def test_peak_table():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.peak_flops("NVIDIA GeForce RTX 4090") is None


# ---- gradient checkpointing -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", policies.KINDS)
def test_gradient_checkpointing_same_gradients(kind, monkeypatch):
    torch.manual_seed(0)
    policy = policies.make_policy(kind, instructions=["open the drawer"])
    policy.eval()  # Stage II updates in eval mode: checkpointing must still apply
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8),
           "state": rng.uniform(-1, 1, (3, 8)).astype(np.float32), "instruction": ["open the drawer"] * 3}
    batch = dict(obs, actions=rng.uniform(-1, 1, (3, policy.chunk_size, 7)).astype(np.float32))
    rollout = policy.act(obs)
    calls = []
    real_checkpoint = policies.checkpoint
    monkeypatch.setattr(policies, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    def gradients(enabled):
        policy.set_gradient_checkpointing(enabled)
        policy.zero_grad()
        out = policy.evaluate(obs, rollout)
        loss = policy.sft_loss(batch, generator=torch.Generator().manual_seed(1))
        (loss + out["logprob"].mean() + out["value"].mean() + out["entropy"].mean()).backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    plain = gradients(False)
    assert not calls
    checkpointed = gradients(True)
    assert len(calls) >= 2 * len(policy.transformer_layers())  # every layer, in both passes
    assert policy.config["model"]["gradient_checkpointing"] is True
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # no recompute without gradients (rollouts)
        calls.clear()
        policy.act(obs)
        assert not calls


# ---- the full-size code path, on shrunk full configs (CPU, float32) -------------------------------
SHRUNK = {
    "openvla": dict(dino_width=32, dino_depth=1, dino_heads=2, dino_mlp=64, siglip_width=32, siglip_depth=1,
                    siglip_heads=2, siglip_mlp=64, llm_width=64, llm_depth=2, llm_heads=2, llm_mlp=128,
                    lora_rank=4, dtype="float32"),
    "pi05": dict(vision_width=32, vision_depth=1, vision_heads=2, vision_mlp=64, vlm_width=64, vlm_depth=2,
                 vlm_mlp=128, num_heads=2, head_dim=16, expert_width=32, expert_mlp=64, dtype="float32"),
}


@pytest.mark.parametrize("kind", policies.KINDS)
def test_time_policy_full_code_path(kind):
    """Random materialisation, stand-in tokenizer, LoRA / expert-only, every phase and figure: what
    bench.py runs on a GPU for the full sizes, here at the published sequence lengths (224 px) and
    vocabularies with small widths."""
    row = bench.time_policy(kind, "full", "cpu", batch_size=2, steps=1, image_size=128,
                            overrides=dict(SHRUNK[kind], gradient_checkpointing=True))
    assert "error" not in row
    assert 0 < row["trainable"] < row["params"]  # LoRA / expert-only
    assert row["prompt_tokens"] > 10
    for phase in ("act", "forward", "sft_step", "rl_step"):
        for key in ("s", "samples_per_s", "gflop_per_sample", "tflops"):
            assert row[f"{phase}_{key}"] > 0, (phase, key)
    assert row["sft_step_gflop_per_sample"] > row["forward_gflop_per_sample"]


# ---- bench.py end to end on the CPU ---------------------------------------------------------------
def positive_numbers(row, keys):
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value, row)


@pytest.mark.e2e
def test_bench_cpu_run(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--tasks", "open_drawer", "--num-envs", "1", "--env-steps", "8",
           "--stage2-num-envs", "1", "--steps", "1", "--batch-size", "2", "--sizes", "tiny", "full",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["env"], r["num_envs"]) for r in result["env"]] == [("open_drawer", 1), ("PickCube-v1 (stock)", 1)]
    for row in result["env"]:
        positive_numbers(row, ["start_s", "sps_render_every_step", "sps_render_once_per_chunk"])
    (stage2,) = result["stage2"]
    positive_numbers(stage2, ["raw_env_sps_render_all_steps", "raw_env_sps_render_decision_points",
                              "rollout_env_sps", "env_sps", "rollout_time", "update_time", "rollout_over_raw",
                              "loop_over_raw", "update_share"])
    assert stage2["env_sps"] < stage2["rollout_env_sps"]  # the loop includes the update
    assert [(r["kind"], r["size"]) for r in result["policies"]] == [("openvla", "tiny"), ("pi05", "tiny")]
    for row in result["policies"]:
        positive_numbers(row, ["params", "trainable", "prompt_tokens", "peak_rss_increase_mib"]
                         + [f"{p}_{k}" for p in ("act", "forward", "sft_step", "rl_step")
                            for k in ("s", "samples_per_s", "gflop_per_sample", "tflops")])
    assert any("full sizes" in s for s in result["skipped"])
    assert "## Env control steps/s" in done.stdout and "written:" in done.stdout


# ---- Stage I --fsdp -------------------------------------------------------------------------------
def random_dataset(path, seed):
    rng = np.random.default_rng(seed)
    writer = demos.LeRobotWriter(path, fps=10, image_shape=(64, 64, 3), use_videos=False)
    for _ in range(2):
        writer.add_episode(rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8),
                           rng.uniform(-1, 1, (12, 8)).astype(np.float32),
                           rng.uniform(-1, 1, (12, 7)).astype(np.float32), "open the drawer")
    writer.close()


@pytest.mark.e2e
def test_fsdp_matches_ddp_and_resumes(tmp_path):
    """Two gloo processes: FSDP2 (with gradient checkpointing) takes the same steps as DDP (same
    losses, gradient norms and final weights), and a run stopped and resumed under FSDP ends where
    the uninterrupted one does."""
    random_dataset(tmp_path / "sim", 0)
    random_dataset(tmp_path / "real", 1)

    def run(name, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "stage1_sft_cotrain.py",
               "--policy", "openvla", "--sim-data", str(tmp_path / "sim"), "--real-data", str(tmp_path / "real"),
               "--alpha", "0.5", "--batch-size", "4", "--log-every", "1", "--eval-every", "2", "--eval-domains",
               "--no-save-video", "--runs-dir", str(tmp_path / "runs"), "--run-name", name, *extra]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        lines = [json.loads(l) for l in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [(l["train/loss"], l["train/grad_norm"]) for l in lines if "train/loss" in l]

    ddp = run("ddp", "--total-steps", "4")
    fsdp = run("fsdp", "--total-steps", "4", "--fsdp", "--gradient-checkpointing")
    np.testing.assert_allclose(fsdp, ddp, rtol=1e-5)
    run("resumed", "--total-steps", "2", "--fsdp")
    run("resumed", "--total-steps", "4", "--fsdp", "--resume")
    final = {name: policies.load_policy(tmp_path / "runs" / name / "checkpoints" / "final").state_dict()
             for name in ("ddp", "fsdp", "resumed")}
    assert final["fsdp"].keys() == final["ddp"].keys()
    for key in final["ddp"]:
        torch.testing.assert_close(final["fsdp"][key], final["ddp"][key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(final["resumed"][key], final["fsdp"][key], rtol=0, atol=0)
    assert policies.load_policy(tmp_path / "runs" / "fsdp" / "checkpoints" / "final").config["model"][
        "gradient_checkpointing"] is True
