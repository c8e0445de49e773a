"""Stage I: the alpha mix (Eq. 4), the schedule, the statistics, the EMA of the weights, and short real runs."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

import demos
import policies
import stage1_sft_cotrain as stage1

ROOT = Path(__file__).resolve().parents[1]


class FakeDemos:
    """A dataset stand-in whose samples say where they came from (state[0]: 0 sim, 1 real)."""

    def __init__(self, source, n):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"state": np.array([self.source, i], np.float32), "instruction": "x",
                "actions": np.zeros((1, 7), np.float32), "action_mask": np.ones(1, bool)}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.95, 1.0])
def test_realised_sim_fraction_matches_alpha(alpha):
    sim = FakeDemos(0, 50) if alpha > 0 else None
    real = FakeDemos(1, 7) if alpha < 1 else None
    mixer = demos.AlphaMixer(sim, real, alpha, batch_size=64, seed=123)
    batches = [mixer.next_batch() for _ in range(150)]
    from_sim = np.concatenate([b["state"][:, 0].numpy() == 0 for b, _ in batches])
    assert np.array_equal(from_sim, np.concatenate([flags for _, flags in batches]))
    n, k = from_sim.size, int(from_sim.sum())
    if alpha in (0.0, 1.0):
        assert k == alpha * n
        return
    # two-sided binomial test: the z-score of k under Binomial(n, alpha); a concatenation of the
    # datasets would give the fraction 50 / 57 instead
    z = (k - n * alpha) / math.sqrt(n * alpha * (1 - alpha))
    assert abs(z) < 4.0, f"sim fraction {k / n:.4f} is not alpha={alpha} (z={z:.1f})"


def test_each_sample_is_drawn_independently_and_ranks_split_one_global_batch():
    mixer = demos.AlphaMixer(FakeDemos(0, 50), FakeDemos(1, 7), 0.5, batch_size=32, seed=0)
    counts = [flags.sum() for _, flags in (mixer.next_batch() for _ in range(200))]
    assert np.std(counts) > 1.5  # Binomial(32, 0.5) has std 2.83; a fixed split would have 0
    whole = demos.AlphaMixer(FakeDemos(0, 50), FakeDemos(1, 7), 0.5, batch_size=8, seed=5)
    parts = [demos.AlphaMixer(FakeDemos(0, 50), FakeDemos(1, 7), 0.5, batch_size=8, seed=5,
                              rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        full, _ = whole.next_batch()
        halves = [m.next_batch()[0]["state"] for m in parts]
        assert torch.equal(torch.cat(halves), full["state"])


def test_merge_stats_equals_pooled_statistics():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(4000, 3))
    b = rng.normal(2.0, 0.5, size=(1000, 3))

    def stats(x):
        return {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
                "q01": np.quantile(x, 0.01, axis=0), "q99": np.quantile(x, 0.99, axis=0)}

    merged = stage1.merge_stats([stats(a), stats(b)], [len(a), len(b)])
    both = np.concatenate([a, b])
    np.testing.assert_allclose(merged["mean"], both.mean(0), rtol=1e-10)
    np.testing.assert_allclose(merged["std"], both.std(0), rtol=1e-10)
    np.testing.assert_allclose(merged["min"], both.min(0))
    np.testing.assert_allclose(merged["max"], both.max(0))
    np.testing.assert_allclose(merged["q01"], np.minimum(stats(a)["q01"], stats(b)["q01"]))
    np.testing.assert_allclose(merged["q99"], np.maximum(stats(a)["q99"], stats(b)["q99"]))


def test_learning_rate_warms_up_then_decays_by_cosine():
    args = stage1.Args(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert stage1.lr_at(0, args) == pytest.approx(1e-4)
    assert stage1.lr_at(9, args) == pytest.approx(1e-3)
    assert stage1.lr_at(10, args) == pytest.approx(1e-3)
    assert stage1.lr_at(60, args) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way down the cosine
    assert stage1.lr_at(110, args) == pytest.approx(1e-4)
    lrs = [stage1.lr_at(s, args) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


def test_augmentation_keeps_format_changes_pixels_and_is_seeded():
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    out1 = demos.augment_images(images, torch.Generator().manual_seed(0))
    out2 = demos.augment_images(images, torch.Generator().manual_seed(0))
    assert out1.shape == images.shape and out1.dtype == torch.uint8
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, images)


# ---- in-process runs on small random datasets (no simulator) -----------------------------------

def random_dataset(path, seed, action_scale=1.0):
    rng = np.random.default_rng(seed)
    writer = demos.LeRobotWriter(path, fps=10, image_shape=(64, 64, 3), use_videos=False)
    for _ in range(2):
        writer.add_episode(rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8),
                           rng.uniform(-1, 1, (12, 8)).astype(np.float32),
                           (action_scale * rng.uniform(-1, 1, (12, 7))).astype(np.float32), "open the drawer")
    writer.close()
    return path


@pytest.fixture(scope="module")
def random_data(tmp_path_factory):
    """sim actions in [-1, 1], real actions in [-5, 5]"""
    root = tmp_path_factory.mktemp("random_data")
    return {"sim": random_dataset(root / "sim", 0), "real": random_dataset(root / "real", 1, action_scale=5.0)}


def quick_args(tmp_path, data, *extra, real=True):
    return tyro.cli(stage1.Args, args=[
        "--sim-data", str(data["sim"]), *(["--real-data", str(data["real"])] if real else []),
        "--runs-dir", str(tmp_path), "--device", "cpu", "--eval-domains", "--no-save-video",
        "--batch-size", "4", "--log-every", "1", "--eval-every", "0", "--warmup-steps", "0", *extra])


def test_alpha_1_statistics_cover_the_real_data_and_config_records_camera_size(tmp_path, random_data, capsys,
                                                                                monkeypatch):
    args = quick_args(tmp_path, random_data, "--alpha", "1", "--total-steps", "1", "--run-name", "a1")
    stage1.main(args)
    run_dir = tmp_path / "a1"
    config = policies.load_policy(run_dir / "checkpoints" / "final").config
    real = demos.LeRobotDataset(random_data["real"]).stats["action"]
    sim = demos.LeRobotDataset(random_data["sim"]).stats["action"]
    stats = config["norm_stats"]["action"]
    assert np.all(np.asarray(stats["q99"]) >= np.asarray(real["q99"]))
    assert np.all(np.asarray(stats["q01"]) <= np.asarray(real["q01"]))
    assert max(stats["q99"]) > 3  # the real range, not sim's [-1, 1]
    np.testing.assert_allclose(stats["mean"], sim["mean"])  # pooled with weights alpha, 1 - alpha
    assert config["camera_image_size"] == 64 and "exec_horizon" not in config
    # the resolved args, printed at start and written to args.json
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("args: ")]
    assert len(printed) == 1
    assert json.loads(printed[0].removeprefix("args: ")) == json.loads((run_dir / "args.json").read_text())
    assert json.loads((run_dir / "args.json").read_text())["chunk_size"] == 4

    # alpha = 1 without --real-data and no default real dataset: sim only, with a note
    monkeypatch.chdir(tmp_path)
    stage1.main(quick_args(tmp_path, random_data, "--alpha", "1", "--total-steps", "1", "--run-name", "a1_sim",
                           real=False))
    assert "note: no real dataset at data/open_drawer/proxy_real" in capsys.readouterr().out
    config = policies.load_policy(tmp_path / "a1_sim" / "checkpoints" / "final").config
    assert max(config["norm_stats"]["action"]["q99"]) <= 1
    # an explicitly passed --real-data that is missing is an error, whatever alpha is
    with pytest.raises(SystemExit) as e:
        stage1.main(quick_args(tmp_path, {**random_data, "real": tmp_path / "nope"}, "--alpha", "1",
                               "--run-name", "a1_missing"))
    assert e.value.code == 2 and "real dataset not found" in capsys.readouterr().err


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(tmp_path, random_data, monkeypatch):
    # --checkpoint-every 2 with no evaluation: a run that dies in its sixth step (no handler runs,
    # as under SIGKILL) has checkpoints/4/, and --resume from it follows the uninterrupted run and
    # logs step 5, which it runs again, once
    common = ["--policy", "pi05", "--alpha", "0.5", "--min-lr-ratio", "1.0", "--total-steps", "6",
              "--checkpoint-every", "2"]
    stage1.main(quick_args(tmp_path, random_data, *common, "--run-name", "straight"))
    # writing the periodic checkpoints leaves the training itself as it is
    stage1.main(quick_args(tmp_path, random_data, *common[:-2], "--checkpoint-every", "0", "--run-name", "none"))
    assert [r["train/loss"] for r in read_metrics(tmp_path / "none")] == \
        [r["train/loss"] for r in read_metrics(tmp_path / "straight")]
    lr_at = stage1.lr_at

    def dies_in_step_6(step, args):
        if step == 5:
            raise RuntimeError("killed")
        return lr_at(step, args)

    monkeypatch.setattr(stage1, "lr_at", dies_in_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        stage1.main(quick_args(tmp_path, random_data, *common, "--run-name", "killed"))
    ckpts = tmp_path / "killed" / "checkpoints"
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in ckpts.iterdir()) == ["4"]  # 2 was pruned when 4 was written
    assert "eval/success_sim" not in json.loads((ckpts / "4" / "config.json").read_text())["extra"]
    monkeypatch.setattr(stage1, "lr_at", lr_at)
    stage1.main(quick_args(tmp_path, random_data, *common, "--run-name", "killed", "--resume"))
    a = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "straight")}
    b = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "killed")}
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[5], b[6]], [a[5], a[6]], rtol=1e-6)


def test_sigterm_finishes_the_step_saves_and_resume_continues_exactly(tmp_path, random_data, monkeypatch):
    # with an EMA: checkpoints/3/ holds it as the model and the training weights in its trainer state
    common = ["--policy", "pi05", "--alpha", "0.5", "--min-lr-ratio", "1.0", "--total-steps", "6",
              "--ema-decay", "0.9"]
    stage1.main(quick_args(tmp_path, random_data, *common, "--run-name", "straight"))

    lr_at, sent = stage1.lr_at, []

    def lr_and_sigterm(step, args):  # SIGTERM in the middle of the third step
        if step == 2 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, args)

    def unhandled(signum, frame):  # stands in for the default action (which would end pytest)
        raise RuntimeError("SIGTERM reached the previous handler")

    monkeypatch.setattr(stage1, "lr_at", lr_and_sigterm)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(SystemExit) as e:
            stage1.main(quick_args(tmp_path, random_data, *common, "--run-name", "resumed"))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # handler restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert e.value.code == 130
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["3"] and (ckpts / "3" / "trainer_state.pt").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3]

    stage1.main(quick_args(tmp_path, random_data, *common, "--run-name", "resumed", "--resume"))
    a = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "straight")}
    b = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "resumed")}
    assert sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)
    pa = policies.load_policy(tmp_path / "straight" / "checkpoints" / "final").state_dict()
    pb = policies.load_policy(ckpts / "final").state_dict()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=1e-6, atol=1e-7)
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "6" / "trainer_state.pt", weights_only=False)
    sb = torch.load(ckpts / "6" / "trainer_state.pt", weights_only=False)
    for part in ("weights", "ema"):
        assert sa[part].keys() == sb[part].keys() and sa[part]
        for key in sa[part]:
            torch.testing.assert_close(sa[part][key], sb[part][key], rtol=1e-6, atol=1e-7)
    for key in sa["ema"]:  # the model saved is the EMA
        torch.testing.assert_close(pb[key], sb["ema"][key], rtol=0, atol=0)


# ---- EMA of the weights (--ema-decay) -----------------------------------------------------------

@pytest.fixture
def weights_per_step():
    """[w_0, w_1, ...]: the trained weights before the first optimizer step and after each one (the
    optimizer's step hooks), each a list in the optimizer's order."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    seen = []

    def weights(optimizer):
        return [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]

    def pre(optimizer, args, kwargs):
        if not seen:
            seen.append(weights(optimizer))

    handles = [register_optimizer_step_pre_hook(pre),
               register_optimizer_step_post_hook(lambda optimizer, args, kwargs: seen.append(weights(optimizer)))]
    yield seen
    for handle in handles:
        handle.remove()


def ema_run(tmp_path, data, monkeypatch, decay, name):
    """4 steps, evaluated (by a stand-in recording the weights it is given, success 0) at steps 2
    and 4: {step: trainable weights evaluated}, the run folder, the trainable parameter names."""
    evaluated = {}

    def success_rate(policy, args, domain, image_size, video):
        evaluated[len(evaluated) * 2 + 2] = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
        return 0.0

    monkeypatch.setattr(stage1, "success_rate", success_rate)
    stage1.main(quick_args(tmp_path, data, "--policy", "pi05", "--alpha", "0.5", "--total-steps", "4",
                           "--lr", "1e-2", "--eval-every", "2", "--eval-domains", "sim", "--ema-decay", str(decay),
                           "--run-name", name))
    policy = policies.load_policy(tmp_path / name / "checkpoints" / "final")
    return evaluated, tmp_path / name, [n for n, p in policy.named_parameters() if p.requires_grad]


def trainable_weights(ckpt, names):
    state = policies.load_policy(ckpt).state_dict()
    return [state[n] for n in names]


def assert_all_close(a, b, **tol):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


def test_ema_is_what_is_evaluated_and_saved(tmp_path, random_data, monkeypatch, weights_per_step):
    d = 0.7  # not 0.5: d and 1 - d swapped would go unnoticed
    evaluated, run_dir, names = ema_run(tmp_path, random_data, monkeypatch, d, "ema")
    w = weights_per_step
    assert len(w) == 5

    def ema(n):  # ema_n = d^n w_0 + sum_k (1 - d) d^(n - k) w_k, in float64 from the recorded weights
        return [(d ** n * w[0][i].double() + sum((1 - d) * d ** (n - k) * w[k][i].double()
                                                 for k in range(1, n + 1))).float() for i in range(len(names))]

    tol = dict(rtol=1e-5, atol=1e-6)
    assert_all_close(evaluated[2], ema(2), **tol)  # the monitoring evaluations saw the EMA
    assert_all_close(evaluated[4], ema(4), **tol)
    ckpts = run_dir / "checkpoints"
    assert_all_close(trainable_weights(ckpts / "final", names), ema(4), **tol)
    assert_all_close(trainable_weights(ckpts / "4", names), ema(4), **tol)
    assert_all_close(trainable_weights(ckpts / "best", names), ema(2), **tol)  # from step 2's evaluation
    moved = [i for i in range(len(names)) if not torch.allclose(w[4][i], w[0][i])]
    assert moved and all(not torch.allclose(ema(4)[i], w[4][i], **tol) for i in moved)  # not the weights
    state = torch.load(ckpts / "4" / "trainer_state.pt", weights_only=False)
    assert list(state["weights"]) == list(state["ema"]) == names
    assert_all_close(list(state["weights"].values()), w[4], rtol=0, atol=0)  # the training weights, exact
    assert_all_close(list(state["ema"].values()), ema(4), **tol)
    assert all(t.dtype == torch.float32 for t in state["ema"].values())
    for ckpt in ("final", "best", "4"):
        assert policies.load_policy(ckpts / ckpt).config["extra"]["ema_decay"] == d


def test_ema_decay_0_changes_nothing_and_the_ema_leaves_training_alone(tmp_path, random_data, monkeypatch,
                                                                       weights_per_step):
    evaluated, run_dir, names = ema_run(tmp_path, random_data, monkeypatch, 0.0, "plain")
    plain = list(weights_per_step)
    ckpts = run_dir / "checkpoints"
    # --ema-decay 0: evaluated and saved are the training weights, exactly; no EMA in the trainer state
    assert_all_close(evaluated[2], plain[2], rtol=0, atol=0)
    assert_all_close(trainable_weights(ckpts / "final", names), plain[4], rtol=0, atol=0)
    assert not {"weights", "ema"} & set(torch.load(ckpts / "4" / "trainer_state.pt", weights_only=False))
    assert policies.load_policy(ckpts / "final").config["extra"]["ema_decay"] == 0.0

    # with an EMA, evaluated and saved at step 2: the same training weights at every step, bit for bit
    # (were the EMA left in the parameters after step 2, steps 3 and 4 would start from it)
    weights_per_step.clear()
    ema_run(tmp_path, random_data, monkeypatch, 0.7, "ema")
    assert len(weights_per_step) == len(plain) == 5
    for a, b in zip(weights_per_step, plain):
        assert_all_close(a, b, rtol=0, atol=0)
    loss = {name: [r["train/loss"] for r in read_metrics(tmp_path / name)] for name in ("plain", "ema")}
    assert loss["ema"] == loss["plain"]


def test_swapped_in_restores_the_weights_bit_for_bit_even_on_an_error():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
    own = [p.detach().clone() for p in params]
    ema = [torch.randn(3, 2), torch.randn(5)]
    with pytest.raises(RuntimeError):
        with stage1.swapped_in(params, ema):
            assert_all_close(list(params), ema, rtol=0, atol=0)
            raise RuntimeError("evaluation failed")
    assert_all_close(list(params), own, rtol=0, atol=0)
    assert all(p.requires_grad for p in params)
    with stage1.swapped_in(params, None):  # no EMA: nothing changes
        assert_all_close(list(params), own, rtol=0, atol=0)


def test_policy_overrides_are_typed_by_the_policy_defaults(tmp_path, random_data, capsys):
    args = quick_args(tmp_path, random_data, "--total-steps", "1", "--run-name", "small",
                      "--policy-overrides", "patch_size", "8", "vision_depth", "1")
    stage1.main(args)
    policy = policies.load_policy(tmp_path / "small" / "checkpoints" / "final")
    model = policy.config["model"]
    assert (model["patch_size"], model["vision_depth"]) == (8, 1)
    assert type(model["patch_size"]) is int and type(model["vision_depth"]) is int
    assert read_metrics(tmp_path / "small")[0]["step"] == 1
    assert stage1.parse_overrides("openvla", "tiny", {
        "value_hidden": "64,32", "gradient_checkpointing": "1", "temperature": "2", "unnorm_key": "bridge_orig",
        "prompt_end_ids": "[5]"}) == {"value_hidden": (64, 32), "gradient_checkpointing": True,
                                      "temperature": 2.0, "unnorm_key": "bridge_orig", "prompt_end_ids": [5]}
    for bad, message in (({"patch_size": "8.5"}, "expected a int"), ({"nope": "1"}, "has no option 'nope'"),
                         ({"gradient_checkpointing": "maybe"}, "expected a bool")):
        with pytest.raises(SystemExit) as e:
            stage1.parse_overrides("pi05", "tiny", bad)
        assert e.value.code == 2 and message in capsys.readouterr().err


# ---- short runs on a small collected dataset (tests/conftest.py makes it) -----------------------

def run_stage1(tmp_path, data, *extra, name="run"):
    cmd = [sys.executable, str(ROOT / "stage1_sft_cotrain.py"), "--task", "open_drawer",
           "--sim-data", str(data["sim"]), "--real-data", str(data["proxy_real"]),
           "--runs-dir", str(tmp_path), "--run-name", name, "--device", "cpu",
           "--eval-domains", "sim", "--eval-episodes", "1", "--eval-max-steps", "4",
           "--eval-num-envs", "1", "--no-save-video", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp_path / name


def read_metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["pi05", "openvla"])
def test_short_run_lowers_loss_and_writes_loadable_checkpoint(tmp_path, tiny_data, kind):
    run_dir = run_stage1(tmp_path, tiny_data, "--policy", kind, "--alpha", "0.5",
                         "--total-steps", "60", "--batch-size", "16", "--lr", "1e-3",
                         "--warmup-steps", "5", "--log-every", "10", "--eval-every", "0",
                         "--no-augment", name=kind)
    rows = read_metrics(run_dir)
    first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
    assert last < 0.8 * first, (first, last)
    assert 0.2 < np.mean([r["train/sim_fraction"] for r in rows]) < 0.8
    policy = policies.load_policy(run_dir / "checkpoints" / "final")
    assert policy.kind == kind
    assert policy.config["extra"]["stage"] == "stage1"
    assert policy.config["extra"]["task"] == "open_drawer"
    args = json.loads((run_dir / "args.json").read_text())
    assert args["alpha"] == 0.5 and args["policy"] == kind


@pytest.mark.e2e
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, tiny_data):
    # constant learning rate, so a 5-step run resumed to 10 follows the 10-step run's schedule
    common = ["--policy", "pi05", "--alpha", "0.5", "--batch-size", "8", "--lr", "1e-3",
              "--warmup-steps", "0", "--min-lr-ratio", "1.0", "--log-every", "1", "--eval-every", "0"]
    straight = run_stage1(tmp_path, tiny_data, *common, "--total-steps", "10", name="straight")
    run_stage1(tmp_path, tiny_data, *common, "--total-steps", "5", name="resumed")
    resumed = run_stage1(tmp_path, tiny_data, *common, "--total-steps", "10", "--resume", name="resumed")
    a = {r["step"]: r["train/loss"] for r in read_metrics(straight)}
    b = {r["step"]: r["train/loss"] for r in read_metrics(resumed)}
    assert sorted(b) == list(range(1, 11))
    np.testing.assert_allclose([b[s] for s in range(6, 11)], [a[s] for s in range(6, 11)], rtol=1e-5)
    pa = policies.load_policy(straight / "checkpoints" / "final").state_dict()
    pb = policies.load_policy(resumed / "checkpoints" / "final").state_dict()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=1e-5, atol=1e-6)

    # killed before its first checkpoint (args.json and a metrics line, no checkpoint): --resume
    # starts it again from the beginning, the same run as the straight one
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "args.json").write_text("{}")
    (killed / "metrics.jsonl").write_text(json.dumps({"step": 3, "train/loss": -1.0}) + "\n")
    run_stage1(tmp_path, tiny_data, *common, "--total-steps", "10", "--resume", "--eval-domains", name="killed")
    c = {r["step"]: r["train/loss"] for r in read_metrics(killed)}
    assert sorted(c) == list(range(1, 11))
    np.testing.assert_allclose([c[s] for s in range(1, 11)], [a[s] for s in range(1, 11)], rtol=1e-5)


@pytest.mark.e2e
def test_two_process_torchrun_matches_single_process_on_the_same_global_batch(tmp_path, tiny_data):
    # openvla's SFT loss has no sampling noise, so the global batch fixes the gradient
    common = ["--policy", "openvla", "--alpha", "0.5", "--batch-size", "8", "--total-steps", "1",
              "--log-every", "1", "--eval-every", "0", "--no-augment", "--warmup-steps", "0"]
    single = run_stage1(tmp_path, tiny_data, *common, name="single")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(ROOT / "stage1_sft_cotrain.py"), "--task", "open_drawer",
           "--sim-data", str(tiny_data["sim"]), "--real-data", str(tiny_data["proxy_real"]),
           "--runs-dir", str(tmp_path), "--run-name", "ddp", "--device", "cpu",
           "--eval-domains", "sim", "--eval-episodes", "1", "--eval-max-steps", "4",
           "--eval-num-envs", "1", "--no-save-video", *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ddp = tmp_path / "ddp"
    g_single = read_metrics(single)[0]["train/grad_norm"]
    g_ddp = read_metrics(ddp)[0]["train/grad_norm"]
    assert g_ddp == pytest.approx(g_single, rel=1e-4)
    pa = policies.load_policy(single / "checkpoints" / "final").state_dict()
    pb = policies.load_policy(ddp / "checkpoints" / "final").state_dict()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=1e-4, atol=1e-5)


def test_clear_errors_for_missing_data_and_bad_alpha(tmp_path):
    script = str(ROOT / "stage1_sft_cotrain.py")
    out = subprocess.run([sys.executable, script, "--task", "open_drawer", "--sim-data",
                          str(tmp_path / "nope"), "--real-data", str(tmp_path / "nope2"),
                          "--runs-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "sim dataset not found" in out.stderr
    assert "collect_demos.py" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, script, "--alpha", "1.5", "--runs-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--alpha must lie in [0, 1]" in out.stderr
    out = subprocess.run([sys.executable, script, "--task", "fly", "--runs-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "unknown task" in out.stderr


def test_a_run_folder_in_use_by_another_process_is_refused_until_that_process_ends(tmp_path):
    # e.g. a stopped run's `--resume` started again while the first is in fact still running: both
    # would write the same checkpoints
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text("{}")
    open_run = "import sys, plumbing; plumbing.open_run(sys.argv[1], sys.argv[2], sys.argv[3] == 'resume')"
    holder = subprocess.Popen([sys.executable, "-c", open_run + "; print('holding', flush=True); input()",
                               str(tmp_path), "run", "resume"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert [holder.stdout.readline() for _ in range(2)][1] == "holding\n"  # after open_run's own line
        out = subprocess.run([sys.executable, "-c", open_run, str(tmp_path), "run", "resume"], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"{tmp_path / 'run'} is in use by process {holder.pid}" in out.stderr
        # another run beside it is not held up
        out = subprocess.run([sys.executable, "-c", open_run, str(tmp_path), "other", "new"], cwd=ROOT,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    finally:
        holder.kill()  # SIGKILL: no handler runs, the kernel drops the lock with the process
        holder.wait()
    out = subprocess.run([sys.executable, "-c", open_run, str(tmp_path), "run", "resume"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
