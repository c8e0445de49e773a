"""Stage II: GAE, PPO's terms, Eq. 5's beta, agreement of rollout and update, learning on a
one-step bandit for both policy kinds, resume, torchrun, clear errors, and a short run on the
real open_drawer twin.

The bandit (BanditEnv) has the observation format and step/reset contract of envs.TwinVecEnv:
one-step episodes whose reward is the mean of the action's 7 values. Improvement on it is
certain within a few iterations, and it reverses if the advantage sign or the log-probability is
wrong.

Run as a script (python tests/test_stage2.py ARGS), this file trains stage2_rl_cotrain on the
bandit: that is how the torchrun test starts its two processes.
"""
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demos  # noqa: E402
import envs  # noqa: E402
import policies  # noqa: E402
import stage2_rl_cotrain as stage2  # noqa: E402

IMAGE = 64
INSTRUCTION = "open the drawer"
KINDS = ("pi05", "openvla")
# Smaller tiny policies (one image patch, one or two layers) so that whole runs fit the CI
# budget. pi05 gets wider ReinFlow noise, and learns the bandit with single actions (H = 1,
# "pi05_chunk1"): otherwise its random x0 drowns the noise that PPO can give credit for.
SMALL = {"pi05": dict(image_size=16, vlm_depth=1, sigma_min=0.3, sigma_max=0.6),
         "openvla": dict(image_size=16, dino_depth=1, siglip_depth=1, llm_depth=1)}


# ---------------------------------------------------------------------------------------------
# A one-step bandit in the envs.TwinVecEnv contract, and the files Stage II starts from
# ---------------------------------------------------------------------------------------------
class BanditEnv:
    """Every episode is one step: reward = mean of the 7 action values (clipped to [-1, 1]),
    success when above 0.5, terminated at once; the observation never changes. The Stage II
    rollout resets it at the chunk boundary (envs.TwinVecEnv's contract without auto-reset)."""

    action_dim, state_dim, control_freq, max_episode_steps = 7, 8, 10, 1

    def __init__(self, num_envs, image_size=IMAGE, domain="sim", wrist_camera=False):
        self.num_envs, self.image_size, self.domain = num_envs, image_size, domain
        self.task, self.variant = "open_drawer", "in_distribution"
        self.wrist_camera = wrist_camera  # a second view, "wrist_image", of constant value 50

    def _obs(self, render=True):
        B, S = self.num_envs, self.image_size
        obs = {"image": np.full((B, S, S, 3), 100, np.uint8) if render else None,
               "state": np.zeros((B, 8), np.float32), "instruction": [INSTRUCTION] * B}
        if self.wrist_camera:
            obs["wrist_image"] = np.full((B, S, S, 3), 50, np.uint8) if render else None
        return obs

    def reset(self, seed=None, rows=None):
        return self._obs(), {}

    def dense_reward(self):
        return np.zeros(self.num_envs, np.float32)

    def step(self, action, render=True):
        action = np.asarray(action, np.float32)
        assert action.shape == (self.num_envs, 7)
        reward = np.clip(action, -1, 1).mean(1).astype(np.float32)
        success = reward > 0.5
        done = np.ones(self.num_envs, bool)
        return self._obs(render), reward, done, np.zeros(self.num_envs, bool), {"success": success}

    def render_frame(self):
        return self._obs()["image"]

    def render_views(self):
        return {k: v for k, v in self._obs().items() if k in ("image", "wrist_image")}

    def close(self):
        pass


class ScriptedEnv(BanditEnv):
    """Sub-envs whose episodes end at different inner steps, whatever the actions: sub-env i
    succeeds (terminates) at step SUCCESS_AT[i] of its episode or is cut by its own time limit
    LIMIT[i]. The dense reward (the shaping potential) is 0.1 per elapsed step, capped at 0.9;
    state[0] = elapsed steps, state[1] = the sub-env's index (so values differ per state)."""

    SUCCESS_AT, LIMIT = (2, 99, 7), (99, 5, 99)
    max_episode_steps = 8

    def __init__(self, num_envs=3, image_size=IMAGE, domain="sim"):
        super().__init__(num_envs, image_size, domain)
        self.elapsed = np.zeros(num_envs, int)

    def _obs(self, render=True):
        obs = super()._obs(render)
        obs["state"][:, 0], obs["state"][:, 1] = self.elapsed, np.arange(self.num_envs)
        return obs

    def reset(self, seed=None, rows=None):
        self.elapsed[np.arange(self.num_envs) if rows is None else rows] = 0
        return self._obs(), {}

    def dense_reward(self):
        return np.minimum(0.1 * self.elapsed, 0.9).astype(np.float32)

    def step(self, action, render=True):
        self.elapsed += 1
        success = self.elapsed == np.array(self.SUCCESS_AT)
        truncated = (self.elapsed >= np.array(self.LIMIT)) & ~success
        reward = np.where(success, 1.0, self.dense_reward()).astype(np.float32)
        return self._obs(render), reward, success, truncated, {"success": success}


class CoinEnv(BanditEnv):
    """Episodes whose outcome is fixed by their seed: half succeed at a step in 1..8, the others
    run into the 20-step time limit. Actions do not matter. Counting every episode that ends
    inside a rollout would over-count the quick successes."""

    max_episode_steps = 20

    def __init__(self, num_envs, image_size=IMAGE, domain="sim"):
        super().__init__(num_envs, image_size, domain)
        self.elapsed, self.success_at = np.zeros(num_envs, int), np.zeros(num_envs, int)

    def reset(self, seed=None, rows=None):
        rows = np.arange(self.num_envs) if rows is None else np.asarray(rows)
        for r, s in zip(rows, seed):
            rng = np.random.default_rng(int(s))
            self.success_at[r] = rng.integers(1, 9) if rng.random() < 0.5 else 999
            self.elapsed[r] = 0
        return self._obs(), {}

    def step(self, action, render=True):
        self.elapsed += 1
        success = self.elapsed == self.success_at
        truncated = (self.elapsed >= self.max_episode_steps) & ~success
        return self._obs(render), success.astype(np.float32), success, truncated, {"success": success}


def use_bandit(monkeypatch):
    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size, wrist: BanditEnv(args.num_envs, size))
    monkeypatch.setattr(stage2, "make_eval_env",
                        lambda args, domain, size, wrist: BanditEnv(args.eval_num_envs, size, domain))


def stage1_checkpoint(path: Path, kind: str, task="open_drawer", stage="stage1", seed=0, **overrides) -> Path:
    """A checkpoint as Stage I writes it. openvla gets an ordinal action head: the logit of each
    of the 256 action bins is its centre times one projection of the hidden state, as if
    pretraining had made neighbouring bins alike; from a random head every bin is a separate
    arm that PPO learns only by sampling it, too slowly for a test."""
    torch.manual_seed(seed)
    policy = policies.make_policy(kind, "tiny", instructions=[INSTRUCTION], **overrides)
    if kind == "openvla":
        lo, hi = policy.action_ids
        direction = torch.randn(policy.language_model.lm_head.weight.shape[1])
        with torch.no_grad():
            policy.language_model.lm_head.weight[lo:hi] = \
                policy.tokens_to_actions(torch.arange(lo, hi))[:, None] * 0.1 * direction / direction.norm()
    policy.save(path, extra={"stage": stage, "task": task, "alpha": 0.5, "args": {"size": "tiny"}})
    return path


def real_dataset(path: Path, actions_value: float, episodes=2, frames=6, seed=0) -> Path:
    """A small real dataset: images of the bandit's size, constant actions plus a little noise."""
    rng = np.random.default_rng(seed)
    writer = demos.LeRobotWriter(path, fps=10, image_shape=(IMAGE, IMAGE, 3), use_videos=False)
    for _ in range(episodes):
        writer.add_episode(rng.integers(0, 255, (frames, IMAGE, IMAGE, 3), dtype=np.uint8),
                           rng.normal(0, 0.1, (frames, 8)).astype(np.float32),
                           np.clip(actions_value + rng.normal(0, 0.05, (frames, 7)), -1, 1).astype(np.float32),
                           task=INSTRUCTION)
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    return {"root": root, "real": real_dataset(root / "real", 0.3),
            "other_real": real_dataset(root / "other_real", -0.5, seed=1),
            **{kind: stage1_checkpoint(root / f"init_{kind}", kind, **SMALL[kind]) for kind in KINDS},
            "pi05_chunk1": stage1_checkpoint(root / "init_pi05_chunk1", "pi05", chunk_size=1, **SMALL["pi05"])}


def bandit_args(files, tmp_path, kind, iterations, **kw) -> "stage2.Args":
    """Args of a bandit run: num_envs x num_steps one-step episodes per iteration."""
    num_envs, num_steps = kw.pop("num_envs", 8), kw.pop("num_steps", 4)
    base = dict(task="open_drawer", init=str(files[kind]), real_data=str(files["real"]), beta=0.1, reward="dense",
                num_envs=num_envs, num_steps=num_steps, total_env_steps=iterations * num_envs * num_steps,
                update_epochs=2, num_minibatches=2, critic_warmup_iters=0, target_kl=0.0, eval_every=0,
                eval_episodes=4, eval_num_envs=4, save_video=False, runs_dir=str(tmp_path / "runs"),
                run_name="run", seed=3)
    base.update(kw)
    return stage2.Args(**base)


def read_metrics(args) -> list[dict]:
    path = Path(args.runs_dir) / args.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_rows(rows):
    return [r for r in rows if "losses/loss" in r]


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------
def test_gae_hand_worked_example_with_termination_and_truncation():
    # gamma 0.9 per env step; decisions executed 2, 1, 2 steps -> discounts 0.81, 0.9, 0.81; lambda 0.5.
    # env 0 terminates (success) in decision 1; env 1 is truncated (time limit) in decision 0
    # with V(final obs) = 0.9 and starts a new episode in decision 1.
    r = torch.tensor([[1.0, 2.0], [0.5, 0.0], [1.5, 1.0]])
    v = torch.tensor([[0.2, 0.4], [0.6, 0.1], [0.3, 0.7]])
    last_value = torch.tensor([0.8, 0.5])
    dones = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    bootstrap = torch.tensor([[0.0, 0.9], [0.0, 0.0], [0.0, 0.0]])
    disc = torch.tensor([[0.81, 0.81], [0.9, 0.9], [0.81, 0.81]])
    adv, ret = stage2.compute_gae(r, v, last_value, dones, bootstrap, disc, 0.5)
    # env 0, backwards:
    #   t2: delta = 1.5 + 0.81 * 0.8 - 0.3 = 1.848                      A = 1.848
    #   t1: terminated, no bootstrap: delta = 0.5 - 0.6 = -0.1          A = -0.1 (nothing carried)
    #   t0: delta = 1.0 + 0.81 * 0.6 - 0.2 = 1.286                      A = 1.286 + 0.81 * 0.5 * -0.1 = 1.2455
    # env 1:
    #   t2: delta = 1.0 + 0.81 * 0.5 - 0.7 = 0.705                      A = 0.705
    #   t1: delta = 0.0 + 0.9 * 0.7 - 0.1 = 0.53                        A = 0.53 + 0.9 * 0.5 * 0.705 = 0.84725
    #   t0: truncated, bootstrap V(final) = 0.9: delta = 2.0 + 0.81 * 0.9 - 0.4 = 2.329   A = 2.329
    expected = torch.tensor([[1.2455, 2.329], [-0.1, 0.84725], [1.848, 0.705]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ret, expected + v, rtol=0, atol=1e-5)


def test_gae_with_lambda_one_is_the_per_step_discounted_return():
    """Decision-level GAE(lambda=1) with discounts gamma^n must equal Eq. 3's per-step discounted
    return of a simulated chunked rollout, bootstrapped only at truncations and at the rollout end."""
    rng = np.random.default_rng(0)
    gamma, T, B, H = 0.97, 12, 3, 4
    for _ in range(5):
        steps_r = rng.normal(size=(T, B, H))         # per-step rewards of each decision's chunk
        n = rng.integers(1, H + 1, size=(T, B))      # steps executed per decision
        ended = rng.random((T, B)) < 0.3
        truncated = ended & (rng.random((T, B)) < 0.5)
        v_final = rng.normal(size=(T, B))
        values, last_value = rng.normal(size=(T, B)), rng.normal(size=B)
        rewards = np.array([[sum(gamma ** j * steps_r[t, b, j] for j in range(n[t, b])) for b in range(B)]
                            for t in range(T)])
        # reference: walk the env steps forward from each decision
        expected = np.zeros((T, B))
        for b in range(B):
            for t0 in range(T):
                g, k, t = 0.0, 0, t0
                while True:
                    for j in range(n[t, b]):
                        g += gamma ** k * steps_r[t, b, j]
                        k += 1
                    if ended[t, b]:
                        g += gamma ** k * v_final[t, b] if truncated[t, b] else 0.0
                        break
                    t += 1
                    if t == T:
                        g += gamma ** k * last_value[b]
                        break
                expected[t0, b] = g
        as_t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        _, returns = stage2.compute_gae(as_t(rewards), as_t(values), as_t(last_value), as_t(ended),
                                        as_t(np.where(truncated, v_final, 0.0)), as_t(gamma ** n), 1.0)
        np.testing.assert_allclose(returns.numpy(), expected, rtol=1e-10, atol=1e-10)
        # lambda = 0: the one-step TD error
        adv0, _ = stage2.compute_gae(as_t(rewards), as_t(values), as_t(last_value), as_t(ended),
                                     as_t(np.where(truncated, v_final, 0.0)), as_t(gamma ** n), 0.0)
        next_v = np.concatenate([values[1:], last_value[None]], 0)
        following = np.where(ended, np.where(truncated, v_final, 0.0), next_v)
        np.testing.assert_allclose(adv0.numpy(), rewards + gamma ** n * following - values, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Whole runs on the bandit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_first_minibatch_ratio_is_one_and_logged_total_adds_up(files, tmp_path, monkeypatch, kind):
    use_bandit(monkeypatch)
    args = bandit_args(files, tmp_path, kind, iterations=2, beta=0.3, ent_coef=0.01)
    stage2.main(args)
    rows = train_rows(read_metrics(args))
    assert len(rows) == 2
    for row in rows:
        # rollout and update agree on the log-probs: the first minibatch, before any step, has ratio 1
        assert row["losses/first_minibatch_ratio_dev"] < 1e-5
        assert row["losses/loss"] == pytest.approx(
            row["losses/pg_loss"] + 0.5 * row["losses/v_loss"] - 0.01 * row["losses/entropy"]
            + 0.3 * row["losses/sft_loss"], rel=1e-5, abs=1e-6)
        assert row["losses/ppo_loss"] == pytest.approx(row["losses/loss"] - 0.3 * row["losses/sft_loss"],
                                                       rel=1e-5, abs=1e-6)
        assert row["losses/minibatches"] == 4  # 2 epochs x 2 minibatches
        assert row["charts/episodes"] == 32 and row["charts/episode_length"] == 1
    assert rows[-1]["global_step"] == 64
    assert ("charts/noise_sigma" in rows[0]) == (kind == "pi05")
    final = Path(args.runs_dir) / "run" / "checkpoints" / "final"
    extra = json.loads((final / "config.json").read_text())["extra"]
    assert extra["stage"] == "stage2" and extra["task"] == "open_drawer" and extra["beta"] == 0.3
    assert policies.load_policy(final).kind == kind


@pytest.mark.e2e
@pytest.mark.parametrize("kind", KINDS)
def test_learning_improves_bandit_return(files, tmp_path, monkeypatch, kind):
    use_bandit(monkeypatch)
    init = files["pi05_chunk1" if kind == "pi05" else "openvla"]
    args = bandit_args(files, tmp_path, kind, iterations=6, init=str(init), beta=0.0, num_envs=16,
                       num_steps=2, update_epochs=4, ent_coef=0.0, value_learning_rate=3e-3,
                       learning_rate={"pi05": 1e-3, "openvla": 1e-4}[kind])
    stage2.main(args)
    returns = [r["charts/episode_return"] for r in train_rows(read_metrics(args))]
    # the return (mean action value, in [-1, 1]) starts near 0; a wrong advantage sign or a wrong
    # log-prob would push it down or nowhere
    assert np.mean(returns[-2:]) > np.mean(returns[:2]) + 0.2, returns


def test_critic_warmup_trains_only_the_value_head_and_target_kl_stops_the_update(files, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    use_bandit(monkeypatch)
    args = bandit_args(files, tmp_path, "pi05", iterations=1, critic_warmup_iters=1, beta=0.5)
    stage2.main(args)
    before = load_file(files["pi05"] / "model.safetensors")
    after = load_file(Path(args.runs_dir) / "run/checkpoints/final/model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("value_head.") for name in changed), sorted(changed)[:5]
    assert train_rows(read_metrics(args))[0]["charts/critic_warmup"] == 1.0

    stopped = bandit_args(files, tmp_path, "pi05", iterations=1, target_kl=1e-12, run_name="kl", update_epochs=3)
    stage2.main(stopped)
    # the first minibatch has KL 0 (ratio 1); the second one's KL exceeds the target: stop there
    assert train_rows(read_metrics(stopped))[0]["losses/minibatches"] == 2


def test_critic_state_trains_a_value_head_that_reads_the_state(files, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    use_bandit(monkeypatch)
    init = stage1_checkpoint(tmp_path / "nostate", "pi05", discrete_state_input=False, **SMALL["pi05"])
    args = bandit_args(files, tmp_path, "pi05", iterations=1, init=str(init), critic_state=True,
                       critic_warmup_iters=1, beta=0.0)
    stage2.main(args)
    final = Path(args.runs_dir) / "run/checkpoints/final"
    policy = policies.load_policy(final)
    assert policy.config["model"]["value_state_input"] is True
    assert policy.value_head[0].in_features == policy.config["model"]["vlm_width"] + policy.state_dim
    before, after = load_file(init / "model.safetensors"), load_file(final / "model.safetensors")
    # the actor is the Stage I one (warm-up: only the value head learnt); the head is new and trained
    assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith("value_head."))
    start = policies.load_policy(init)
    with torch.random.fork_rng():  # the head the run started from (seeded by --seed, as every process does)
        torch.manual_seed(args.seed)
        start.use_state_in_value_head()
    assert start.value_head[0].weight.shape == policy.value_head[0].weight.shape
    assert not torch.equal(start.value_head[0].weight, policy.value_head[0].weight)
    err = run_expecting_error(bandit_args(files, tmp_path, "openvla", 1, critic_state=True, run_name="ov"), capsys)
    assert "--critic-state is for pi05 policies" in err


def test_temperature_sets_the_sampling_of_rollouts_and_log_probs_and_is_saved(files, tmp_path, monkeypatch, capsys):
    use_bandit(monkeypatch)
    entropy = {}
    for temperature in (1.0, 0.25):
        args = bandit_args(files, tmp_path, "openvla", iterations=1, temperature=temperature, run_name=f"t{temperature}")
        stage2.main(args)
        row = train_rows(read_metrics(args))[0]
        assert row["losses/first_minibatch_ratio_dev"] < 1e-5  # rollout and update sample at the same temperature
        entropy[temperature] = row["losses/entropy"]
        final = Path(args.runs_dir) / args.run_name / "checkpoints/final"
        assert policies.load_policy(final).config["model"]["temperature"] == temperature
    # a colder softmax: less entropy per token (the init's logits are nearly flat: log 256 = 5.545 at 1.0)
    assert entropy[0.25] < entropy[1.0] - 0.01, entropy
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, temperature=0.5, run_name="p"), capsys)
    assert "--temperature is for openvla policies" in err
    err = run_expecting_error(bandit_args(files, tmp_path, "openvla", 1, temperature=0.0, run_name="z"), capsys)
    assert "--temperature must be > 0" in err
    # a resume keeps the run's temperature: asking for another one is an error, not a silent no-op
    resumed = bandit_args(files, tmp_path, "openvla", iterations=2, temperature=0.5, run_name="t0.25", resume=True)
    err = run_expecting_error(resumed, capsys)
    assert "samples at 0.25" in err


def test_sigma_range_bounds_the_step_noise_of_rollouts_and_log_probs_and_is_saved(files, tmp_path, monkeypatch, capsys):
    use_bandit(monkeypatch)
    sigma = {}
    for bounds in ((0.08, 0.16), (0.02, 0.04)):
        args = bandit_args(files, tmp_path, "pi05", iterations=1, sigma_range=bounds, run_name=f"s{bounds[1]}")
        stage2.main(args)
        row = train_rows(read_metrics(args))[0]
        assert row["losses/first_minibatch_ratio_dev"] < 1e-5  # rollout and update draw from the same noise
        sigma[bounds] = row["charts/noise_sigma"]  # exp of the mean log-std: inside the bounds
        assert bounds[0] <= sigma[bounds] <= bounds[1], (bounds, sigma[bounds])
        config = policies.load_policy(Path(args.runs_dir) / args.run_name / "checkpoints/final").config["model"]
        assert (config["sigma_min"], config["sigma_max"]) == bounds
    err = run_expecting_error(bandit_args(files, tmp_path, "openvla", 1, sigma_range=(0.02, 0.04), run_name="o"), capsys)
    assert "--sigma-range is for pi05 policies" in err
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, sigma_range=(0.04, 0.02), run_name="b"), capsys)
    assert "--sigma-range must be two numbers 0 < min <= max" in err
    resumed = bandit_args(files, tmp_path, "pi05", iterations=2, sigma_range=(0.08, 0.16), run_name="s0.04", resume=True)
    assert "uses 0.02 0.04" in run_expecting_error(resumed, capsys)


def test_noise_steps_draws_the_noise_at_the_listed_steps_only_and_is_saved(files, tmp_path, monkeypatch, capsys):
    use_bandit(monkeypatch)
    K = policies.load_policy(files["pi05"]).config["model"]["num_steps"]
    args = bandit_args(files, tmp_path, "pi05", iterations=2, noise_steps=[K - 1, K - 1], run_name="last")
    stage2.main(args)
    rows = train_rows(read_metrics(args))
    # the update recomputes the noise-free steps from the rollout's weights: the same log-probs
    assert rows[0]["losses/first_minibatch_ratio_dev"] < 1e-5
    assert rows[-1]["losses/approx_kl"] > 0  # and the second iteration's policy has moved
    policy = policies.load_policy(Path(args.runs_dir) / "last/checkpoints/final")
    assert policy.config["model"]["noise_steps"] == [K - 1]  # saved, duplicates dropped
    # the checkpoint's rollouts: the noise-free chain up to x_{K-1}, then the noise
    obs = {"image": np.zeros((2, 64, 64, 3), np.uint8), "state": np.zeros((2, policy.state_dim), np.float32),
           "instruction": [INSTRUCTION] * 2}
    noisy = policy.act(obs, generator=torch.Generator().manual_seed(0), x0_seeds=[1, 2])["chain"]
    noise_free = policy.act(obs, deterministic=True, x0_seeds=[1, 2])["chain"]
    assert torch.allclose(noisy[:, :K], noise_free[:, :K], atol=1e-6) and not torch.allclose(noisy[:, K], noise_free[:, K])
    err = run_expecting_error(bandit_args(files, tmp_path, "openvla", 1, noise_steps=[0], run_name="o"), capsys)
    assert "--noise-steps is for pi05 policies" in err
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, noise_steps=[K], run_name="b"), capsys)
    assert f"--noise-steps must list denoising steps in 0..{K - 1}" in err
    resumed = bandit_args(files, tmp_path, "pi05", iterations=3, noise_steps=[0], run_name="last", resume=True)
    assert f"draws noise at steps [{K - 1}]" in run_expecting_error(resumed, capsys)


@pytest.mark.parametrize("kind", ["pi05"])
def test_resume_continues_exactly(files, tmp_path, monkeypatch, kind):
    from safetensors.torch import load_file
    use_bandit(monkeypatch)
    small = dict(num_envs=4, num_steps=2, update_epochs=1)
    straight = bandit_args(files, tmp_path, kind, iterations=4, run_name="straight", **small)
    stage2.main(straight)
    stage2.main(bandit_args(files, tmp_path, kind, iterations=2, run_name="resumed", **small))
    stage2.main(bandit_args(files, tmp_path, kind, iterations=4, run_name="resumed", resume=True, **small))
    a = load_file(Path(straight.runs_dir) / "straight/checkpoints/final/model.safetensors")
    b = load_file(Path(straight.runs_dir) / "resumed/checkpoints/final/model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ra = train_rows(read_metrics(straight))
    rb = train_rows(read_metrics(bandit_args(files, tmp_path, kind, 4, run_name="resumed", **small)))
    assert [r["iteration"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert x["losses/loss"] == y["losses/loss"] and x["global_step"] == y["global_step"]


def test_ctrl_c_finishes_the_iteration_saves_it_and_resume_continues_exactly(files, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    use_bandit(monkeypatch)
    small = dict(num_envs=4, num_steps=2, update_epochs=1)
    straight = bandit_args(files, tmp_path, "pi05", iterations=4, run_name="straight", **small)
    stage2.main(straight)

    class CtrlCBandit(BanditEnv):  # Ctrl-C in the middle of iteration 2's rollout (2 steps each)
        calls = 0

        def step(self, action, render=True):
            CtrlCBandit.calls += 1
            if CtrlCBandit.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return super().step(action, render)

    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size, wrist: CtrlCBandit(args.num_envs, size))
    interrupted = bandit_args(files, tmp_path, "pi05", iterations=4, run_name="resumed", **small)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        stage2.main(interrupted)
    assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) == handler_before  # handler restored
    ckpts = Path(interrupted.runs_dir) / "resumed/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2"]  # iteration 2 finished and saved, no final
    assert [r["iteration"] for r in train_rows(read_metrics(interrupted))] == [1, 2]

    use_bandit(monkeypatch)
    stage2.main(bandit_args(files, tmp_path, "pi05", iterations=4, run_name="resumed", resume=True, **small))
    a = load_file(Path(straight.runs_dir) / "straight/checkpoints/final/model.safetensors")
    b = load_file(ckpts / "final/model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint_without_evaluating_there(files, tmp_path,
                                                                                         monkeypatch):
    from safetensors.torch import load_file
    use_bandit(monkeypatch)
    small = dict(num_envs=4, num_steps=2, update_epochs=1, checkpoint_every=2)
    straight = bandit_args(files, tmp_path, "pi05", iterations=5, run_name="straight", **small)
    stage2.main(straight)

    class KilledBandit(BanditEnv):  # dies in iteration 4's rollout, no signal, nothing saved on the way out
        calls = 0

        def step(self, action, render=True):
            KilledBandit.calls += 1
            if KilledBandit.calls == 7:
                raise RuntimeError("killed")
            return super().step(action, render)

    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size, wrist: KilledBandit(args.num_envs, size))
    killed = bandit_args(files, tmp_path, "pi05", iterations=5, run_name="resumed", **small)
    with pytest.raises(RuntimeError, match="killed"):
        stage2.main(killed)
    ckpts = Path(killed.runs_dir) / "resumed/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2"]  # iteration 2's, the older ones pruned
    evaluated = [r["iteration"] for r in read_metrics(killed) if "eval/success_sim" in r]
    assert evaluated == [0]  # the start's evaluation only: the periodic checkpoint evaluates nothing
    with open(Path(killed.runs_dir) / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "global_st')  # a row torn by the kill in mid-write

    use_bandit(monkeypatch)
    stage2.main(bandit_args(files, tmp_path, "pi05", iterations=5, run_name="resumed", resume=True, **small))
    # iteration 3, run again, logged once; the torn row gone
    assert [r["iteration"] for r in train_rows(read_metrics(killed))] == [1, 2, 3, 4, 5]
    a = load_file(Path(straight.runs_dir) / "straight/checkpoints/final/model.safetensors")
    b = load_file(ckpts / "final/model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(files, tmp_path, monkeypatch, capsys):
    use_bandit(monkeypatch)
    args = bandit_args(files, tmp_path, "pi05", iterations=2, num_envs=2, num_steps=2)
    run_dir = Path(args.runs_dir) / "run"
    run_dir.mkdir(parents=True)  # what a SIGKILL during the first iteration leaves behind
    (run_dir / "args.json").write_text(json.dumps({"init": args.init}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "global_step": 0, "stale": 1}) + "\n")
    assert "already holds a run" in run_expecting_error(args, capsys)
    args.resume, args.init = True, None  # the init comes from the run's args.json
    stage2.main(args)
    assert "starting it from the beginning" in capsys.readouterr().out
    rows = read_metrics(args)
    assert not any("stale" in r for r in rows) and [r["iteration"] for r in train_rows(rows)] == [1, 2]
    assert (run_dir / "checkpoints/final/model.safetensors").exists()
    nothing = bandit_args(files, tmp_path, "pi05", iterations=2, run_name="never_ran", resume=True)
    assert "--resume: no run in" in run_expecting_error(nothing, capsys)


@pytest.mark.e2e
def test_torchrun_two_processes(files, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__)), "--init", str(files["pi05"]), "--real-data", str(files["real"]),
           "--runs-dir", str(runs), "--run-name", "ddp", "--num-envs", "2", "--num-steps", "2",
           "--total-env-steps", "16", "--update-epochs", "1", "--num-minibatches", "2",
           "--eval-every", "1", "--eval-episodes", "2", "--no-save-video"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (runs / "ddp/metrics.jsonl").read_text().splitlines()]
    train = train_rows(rows)
    # 2 processes x 2 envs x 2 one-step decisions per iteration, until 16 steps
    assert [r["global_step"] for r in train] == [8, 16]
    assert all(r["charts/episodes"] == 8 for r in train)
    assert all(r["losses/first_minibatch_ratio_dev"] < 1e-5 for r in train)
    assert sum("eval/success_sim" in r for r in rows) == 3  # before, after iteration 1, final
    assert (runs / "ddp/checkpoints/final/model.safetensors").exists()
    assert (runs / "ddp/checkpoints/2/trainer_state.pt").exists()
    state = torch.load(runs / "ddp/checkpoints/2/trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2  # both processes' RNG, for an exact resume


# ---------------------------------------------------------------------------------------------
# The rollout: each env's chunk its own, by hand
# ---------------------------------------------------------------------------------------------
def test_rollout_by_hand_envs_end_at_different_inner_steps(files):
    policy = policies.load_policy(files["pi05"]).eval()  # chunk 4, all executed
    env = ScriptedEnv(3)
    args = stage2.Args(reward="shaped", gamma=0.9, success_reward=1.0)
    torch.manual_seed(0)
    buf = stage2.rollout(policy, env, num_steps=2, exec_horizon=4, args=args, first_seed=0)
    # sub-env 0 succeeds at its 2nd step (twice: it resets at the boundary), 1 is cut by its time
    # limit at step 5, 2 succeeds at step 7. Shaped reward gamma phi(s') - phi(s) (+1, phi = 0 at
    # success), phi = 0.1 per step: decision 0 pays env 0: 0.09 + 0.9 * (1 - 0.1); envs 1, 2:
    # 0.09 + 0.9 * 0.08 + 0.81 * 0.07 + 0.729 * 0.06. Decision 1: env 0 as before; env 1: 0.45 - 0.4;
    # env 2: 0.05 + 0.9 * 0.04 + 0.81 * (1 - 0.6).
    expected_rewards = [[0.9, 0.26244, 0.26244], [0.9, 0.05, 0.41]]
    torch.testing.assert_close(buf["rewards"], torch.tensor(expected_rewards), atol=1e-5, rtol=0)
    torch.testing.assert_close(buf["discounts"], torch.tensor([[0.81, 0.6561, 0.6561], [0.81, 0.9, 0.729]]))
    assert buf["dones"].tolist() == [[1, 0, 0], [1, 1, 1]]
    # executed chunk steps: the rest of an ended env's chunk idles and is masked
    assert buf["step_mask"].tolist() == [[[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]],
                                         [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]]
    # only the time-limit cut bootstraps, from V(the observation it was cut at: 5 steps, env 1)
    cut_obs = {"image": np.full((1, IMAGE, IMAGE, 3), 100, np.uint8),
               "state": np.array([[5, 1, 0, 0, 0, 0, 0, 0]], np.float32), "instruction": [INSTRUCTION]}
    v_cut = policy.act(cut_obs, deterministic=True)["value"].item()
    assert buf["bootstrap"][1, 1].item() == pytest.approx(v_cut, abs=1e-5) and v_cut != 0
    assert buf["bootstrap"].abs().sum().item() == pytest.approx(abs(v_cut), abs=1e-5)
    # the next decision's observation of a reset env is its new episode's first one
    assert [o["state"][0, 0] for o in buf["obs"]] == [0, 0] and buf["obs"][1]["state"][1, 0] == 4
    assert buf["live_steps"] == 2 + 4 + 4 + 2 + 1 + 3
    first = [(e["success"], e["length"]) for e in buf["episodes"] if e["first"]]
    assert sorted(first) == [(False, 5), (True, 2), (True, 7)]
    assert [(e["success"], e["length"]) for e in buf["episodes"] if not e["first"]] == [(True, 2)]


def test_critic_potential_feeds_each_decisions_phi_to_the_value_in_rollout_and_update(files, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    policy = policies.load_policy(files["pi05"]).eval()
    policy.use_potential_in_value_head()
    args = stage2.Args(reward="shaped", gamma=0.9, success_reward=1.0, critic_potential=True)
    buf = stage2.rollout(policy, ScriptedEnv(3), num_steps=2, exec_horizon=4, args=args, first_seed=0)
    # phi = 0.1 per elapsed step: every env starts at 0; at decision 1 env 0 has just been reset,
    # envs 1 and 2 have run 4 steps
    np.testing.assert_allclose(np.stack([o["potential"] for o in buf["obs"]]), [[0, 0, 0], [0, 0.4, 0.4]], atol=1e-6)
    def value(elapsed, row, phi):
        obs = {"image": np.full((1, IMAGE, IMAGE, 3), 100, np.uint8), "instruction": [INSTRUCTION],
               "state": np.array([[elapsed, row, 0, 0, 0, 0, 0, 0]], np.float32), "potential": np.array([phi])}
        return policy.act(obs, deterministic=True)["value"].item()
    assert buf["values"][1, 2].item() == pytest.approx(value(4, 2, 0.4), abs=1e-5)
    assert value(4, 2, 0.4) != pytest.approx(value(4, 2, 0.0), abs=1e-4)  # the head reads phi
    # env 1's time-limit cut bootstraps from V(s, phi(s)) of the state it was cut at (5 steps)
    assert buf["bootstrap"][1, 1].item() == pytest.approx(value(5, 1, 0.5), abs=1e-5)
    assert buf["last_value"][1].item() == pytest.approx(value(0, 1, 0.0), abs=1e-5)

    # in a run, the update's value reads the stored phi: its weight gets a gradient (phi is 0.1-0.9
    # there), and nothing becomes NaN as it would without phi
    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size, wrist: ScriptedEnv(args.num_envs, size))
    monkeypatch.setattr(stage2, "make_eval_env", lambda args, domain, size, wrist: BanditEnv(args.eval_num_envs, size))
    run = bandit_args(files, tmp_path, "pi05", iterations=1, num_envs=3, num_steps=2, reward="shaped",
                      critic_potential=True, critic_warmup_iters=1, eval_episodes=0)
    run.total_env_steps = 16
    stage2.main(run)
    final = Path(run.runs_dir) / "run/checkpoints/final"
    trained = policies.load_policy(final)
    assert trained.config["model"]["value_potential_input"] is True
    start = policies.load_policy(files["pi05"])
    with torch.random.fork_rng():  # the head the run started from
        torch.manual_seed(run.seed + 1)
        start.use_potential_in_value_head()
    w0, w1 = start.value_head[0].weight, trained.value_head[0].weight
    assert torch.isfinite(w1).all()
    assert (w1[:, -1] - w0[:, -1]).abs().max() > 1e-6  # phi's column learnt
    before, after = load_file(files["pi05"] / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith("value_head."))  # warm-up
    # a resume without the option still feeds phi to the run's critic (the checkpoint's config holds it)
    resumed = bandit_args(files, tmp_path, "pi05", iterations=1, num_envs=3, num_steps=2, reward="shaped",
                          critic_warmup_iters=1, eval_episodes=0, resume=True)
    resumed.total_env_steps = 32
    stage2.main(resumed)
    rows = train_rows(read_metrics(resumed))
    assert len(rows) == 2 and all(math.isfinite(r["losses/v_loss"]) for r in rows), rows
    assert torch.isfinite(policies.load_policy(final).value_head[0].weight).all()
    # the options' checks give clear errors
    err = run_expecting_error(bandit_args(files, tmp_path, "openvla", 1, critic_potential=True, run_name="ov"), capsys)
    assert "--critic-potential is for pi05 policies" in err
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, critic_potential=True, run_name="d"), capsys)
    assert "needs --reward shaped" in err


def test_truncation_bootstrap_reaches_the_advantages_in_a_run(files, tmp_path, monkeypatch):
    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size, wrist: ScriptedEnv(args.num_envs, size))
    monkeypatch.setattr(stage2, "make_eval_env", lambda args, domain, size, wrist: BanditEnv(args.eval_num_envs, size))
    seen = []
    real_gae = stage2.compute_gae

    def spy(*a):
        seen.append([x.clone() for x in a[:6]] + [a[6]])
        return real_gae(*a)

    monkeypatch.setattr(stage2, "compute_gae", spy)
    args = bandit_args(files, tmp_path, "pi05", iterations=1, num_envs=3, num_steps=2, reward="shaped",
                       gamma=0.9, eval_episodes=0)
    args.total_env_steps = 16
    stage2.main(args)
    rewards, values, last_value, dones, bootstrap, discounts, lam = seen[0]
    assert bootstrap[1, 1] != 0 and bootstrap.count_nonzero() == 1
    adv, _ = real_gae(rewards, values, last_value, dones, bootstrap, discounts, lam)
    adv0, _ = real_gae(rewards, values, last_value, dones, torch.zeros_like(bootstrap), discounts, lam)
    # decision 1 of env 1: delta = r + gamma^1 V(cut) - V, and it flows back to decision 0
    assert (adv - adv0)[1, 1].item() == pytest.approx(0.9 * bootstrap[1, 1].item(), abs=1e-5)
    assert (adv - adv0)[0, 1].item() == pytest.approx(0.6561 * 0.95 * 0.9 * bootstrap[1, 1].item(), abs=1e-5)
    row = train_rows(read_metrics(args))[0]
    assert row["global_step"] == 16 and row["charts/episodes"] == 4
    assert row["charts/episode_success"] == pytest.approx(2 / 3)  # first episodes only


def test_logged_rollout_success_agrees_with_an_evaluation_on_the_same_seeds(files):
    policy = policies.load_policy(files["pi05"]).eval()
    env = CoinEnv(64)
    args = stage2.Args(reward="sparse")
    T = -(-CoinEnv.max_episode_steps // policy.chunk_size)  # one episode: 5 decisions of 4 steps
    buf = stage2.rollout(policy, env, num_steps=T, exec_horizon=4, args=args, first_seed=100)
    first = [e["success"] for e in buf["episodes"] if e["first"]]
    assert len(first) == 64  # every env's first episode ends within the rollout
    records, _ = envs.evaluate_success(CoinEnv(8), policies.eval_act_fn(policy), list(range(100, 164)), 4)
    assert np.mean(first) == np.mean([r["success"] for r in records])
    # what counting every episode that ended would have logged: quick successes counted twice
    every = [e["success"] for e in buf["episodes"]]
    assert np.mean(every) > np.mean(first) + 0.05


def test_value_error_squared_and_huber_by_hand():
    x = torch.tensor([0.5, -0.1, 1.3, -2.0])
    torch.testing.assert_close(stage2.value_error(x, 0.0), 0.5 * x ** 2)
    # Huber(1): 0.5 x^2 for |x| <= 1, |x| - 0.5 beyond
    torch.testing.assert_close(stage2.value_error(x, 1.0), torch.tensor([0.125, 0.005, 0.8, 1.5]))


def evaluate_with(offset_fn):
    """Pi05Policy.evaluate with offset_fn(act_out) [B, H] added to its per-step log-probs."""
    real = policies.Pi05Policy.evaluate

    def evaluate(self, obs, act_out):
        out = real(self, obs, act_out)
        step = out["step_logprob"] + offset_fn(act_out)
        return {**out, "step_logprob": step, "logprob": step.sum(-1)}
    return evaluate


def test_ppo_terms_of_the_update_by_an_independent_computation(files, tmp_path, monkeypatch):
    """One minibatch, one epoch, ratios made != 1 by known log-prob offsets on the executed chunk
    step (and huge ones on the never-executed steps, which must not count): the logged clipped
    surrogate, value loss and entropy equal a computation from the rollout's own buffers."""
    use_bandit(monkeypatch)  # one-step episodes: chunk step 0 executed, steps 1-3 masked
    bufs, gae = [], []
    real_rollout, real_gae = stage2.rollout, stage2.compute_gae
    monkeypatch.setattr(stage2, "rollout", lambda *a, **k: bufs.append(real_rollout(*a, **k)) or bufs[-1])
    monkeypatch.setattr(stage2, "compute_gae", lambda *a: gae.append(real_gae(*a)) or gae[-1])

    def offset(act_out):  # +-0.5 on step 0 by the sign of x0, 50 on the unexecuted steps
        d = torch.full(act_out["chain"].shape[:1] + act_out["chain"].shape[2:3], 50.0)
        d[:, 0] = 0.5 * torch.sign(act_out["chain"][:, 0, 0, 0])
        return d
    monkeypatch.setattr(policies.Pi05Policy, "evaluate", evaluate_with(offset))
    args = bandit_args(files, tmp_path, "pi05", iterations=1, num_envs=8, num_steps=2, update_epochs=1,
                       num_minibatches=1, beta=0.0, ent_coef=0.01, clip_coef=0.2)
    stage2.main(args)
    row = train_rows(read_metrics(args))[0]
    buf, (adv, ret) = bufs[0], gae[0]
    chain = torch.cat([a["chain"] for a in buf["act"]])
    logratio = 0.5 * torch.sign(chain[:, 0, 0, 0])
    ratio = logratio.exp()
    A = adv.reshape(-1)
    A = (A - A.mean()) / (A.std() + 1e-8)
    pg = torch.max(-A * ratio, -A * ratio.clamp(0.8, 1.2)).mean()
    values = buf["values"].reshape(-1)
    v_loss = (0.5 * (values - ret.reshape(-1)) ** 2).mean()  # the value head is unchanged before the step
    assert row["losses/pg_loss"] == pytest.approx(pg.item(), rel=1e-4, abs=1e-6)
    assert row["losses/v_loss"] == pytest.approx(v_loss.item(), rel=1e-4, abs=1e-6)
    assert row["losses/clipfrac"] == pytest.approx(1.0)  # |exp(+-0.5) - 1| > 0.2 everywhere
    assert row["losses/approx_kl"] == pytest.approx(((ratio - 1) - logratio).mean().item(), rel=1e-4)
    # entropy: chunk step 0 only (the noise std of the first step's dims), not the mean over 4 steps
    with torch.no_grad():
        obs = {k: (np.concatenate([o[k] for o in buf["obs"]]) if k != "instruction"
                   else [s for o in buf["obs"] for s in o[k]]) for k in ("image", "state", "instruction")}
        step_entropy = policies.load_policy(files["pi05"]).eval().evaluate(obs, {"chain": chain})["step_entropy"]
    assert row["losses/entropy"] == pytest.approx(step_entropy[:, 0].mean().item(), rel=1e-4)
    assert not np.isclose(row["losses/entropy"], step_entropy.mean().item(), rtol=1e-3)


def test_beta_reaches_the_gradient_and_beta_zero_runs_no_sft(files, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    use_bandit(monkeypatch)

    def final_weights(beta, real, name):
        args = bandit_args(files, tmp_path, "pi05", iterations=1, beta=beta, real_data=str(files[real]), run_name=name)
        stage2.main(args)
        return load_file(Path(args.runs_dir) / name / "checkpoints/final/model.safetensors"), \
            train_rows(read_metrics(args))[0]

    real_sft = policies.Pi05Policy.sft_loss

    def no_sft(self, batch, generator=None):
        raise AssertionError("beta = 0 must not run the real SFT pass")
    monkeypatch.setattr(policies.Pi05Policy, "sft_loss", no_sft)
    a0, row0 = final_weights(0.0, "real", "a0")
    b0, _ = final_weights(0.0, "other_real", "b0")
    assert all(torch.equal(a0[k], b0[k]) for k in a0)  # the real data does not matter at all
    assert "losses/grad_norm_actor_sft" not in row0 and row0["losses/grad_norm_actor_ppo"] > 0
    monkeypatch.setattr(policies.Pi05Policy, "sft_loss", real_sft)
    a1, row1 = final_weights(0.5, "real", "a1")
    b1, _ = final_weights(0.5, "other_real", "b1")
    changed = [k for k in a1 if not torch.equal(a1[k], b1[k])]
    assert any(k.startswith("action_out_proj.") for k in changed)  # the actor moved, through Eq. 5
    assert row1["losses/grad_norm_actor_sft"] > 0 and row1["losses/grad_norm_actor_ppo"] > 0


def test_a_wrist_camera_policy_gets_both_views_in_rollout_update_and_real_sft(files, tmp_path, monkeypatch):
    # the env's wrist view (value 50) must reach the PPO update beside the fixed one (100), and the
    # real demos' wrist frames (200) the SFT term; a view left out anywhere stops the run
    wrists = []
    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size, wrist: BanditEnv(args.num_envs, size,
                                                                                            wrist_camera=wrist))
    monkeypatch.setattr(stage2, "make_eval_env", lambda args, domain, size, wrist: wrists.append(wrist) or
                        BanditEnv(args.eval_num_envs, size, domain, wrist_camera=wrist))
    init = stage1_checkpoint(tmp_path / "init_wrist", "pi05", wrist_camera=True, **SMALL["pi05"])
    real = demos.LeRobotWriter(tmp_path / "real_wrist", fps=10, image_shape=(IMAGE, IMAGE, 3), use_videos=False,
                               camera_keys=(demos.IMAGE_KEY, demos.WRIST_IMAGE_KEY))
    for _ in range(2):
        real.add_episode({demos.IMAGE_KEY: np.full((6, IMAGE, IMAGE, 3), 100, np.uint8),
                          demos.WRIST_IMAGE_KEY: np.full((6, IMAGE, IMAGE, 3), 200, np.uint8)},
                         np.zeros((6, 8), np.float32), np.full((6, 7), 0.3, np.float32), task=INSTRUCTION)
    seen = set()
    update, sft = policies.Pi05Policy.evaluate, policies.Pi05Policy.sft_loss

    def views_of(obs):
        return tuple(int(torch.as_tensor(obs[k]).float().mean()) for k in ("image", "wrist_image"))

    monkeypatch.setattr(policies.Pi05Policy, "evaluate",
                        lambda self, obs, act_out: seen.add(("update", views_of(obs))) or update(self, obs, act_out))
    monkeypatch.setattr(policies.Pi05Policy, "sft_loss",
                        lambda self, batch, generator=None: seen.add(("sft", views_of(batch))) or sft(self, batch, generator))
    stage2.main(bandit_args(files, tmp_path, "pi05", iterations=1, init=str(init), real_data=str(tmp_path / "real_wrist")))
    assert seen == {("update", (100, 50)), ("sft", (100, 200))}
    assert wrists and all(wrists)  # the evaluation envs have the wrist camera too


# ---------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------
def run_expecting_error(args, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        stage2.main(args)
    assert e.value.code == code
    return capsys.readouterr().err


def test_clear_errors(files, tmp_path, monkeypatch, capsys):
    use_bandit(monkeypatch)
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, beta=-0.1), capsys)
    assert "--beta must be >= 0" in err
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, real_data=str(tmp_path / "nope")), capsys)
    assert "real dataset not found" in err and "collect_demos.py" in err
    stage2_ckpt = stage1_checkpoint(tmp_path / "s2", "pi05", stage="stage2")
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, init=str(stage2_ckpt)), capsys)
    assert "not a Stage I policy" in err
    (tmp_path / "empty").mkdir()
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, init=str(tmp_path / "empty")), capsys)
    assert "not a policy checkpoint" in err
    err = run_expecting_error(bandit_args(files, tmp_path, "pi05", 1, init=None,
                                          runs_dir=str(tmp_path / "no_runs")), capsys)
    assert "no Stage I checkpoint for task open_drawer" in err
    assert "python stage1_sft_cotrain.py --task open_drawer" in err


def test_default_init_is_the_newest_stage1_checkpoint_of_the_task(tmp_path):
    runs = tmp_path / "runs"
    old = stage1_checkpoint(runs / "a/checkpoints/final", "pi05")
    new = stage1_checkpoint(runs / "b/checkpoints/final", "pi05")
    stage1_checkpoint(runs / "c/checkpoints/final", "pi05", task="close_drawer")   # other task
    stage1_checkpoint(runs / "d/checkpoints/final", "pi05", stage="stage2")        # not Stage I
    now = (new / "config.json").stat().st_mtime
    os.utime(old / "config.json", (now - 100, now - 100))
    os.utime(runs / "c/checkpoints/final/config.json", (now + 100, now + 100))
    os.utime(runs / "d/checkpoints/final/config.json", (now + 100, now + 100))
    assert stage2.newest_stage1_checkpoint(str(runs), "open_drawer") == new
    os.utime(old / "config.json", (now + 50, now + 50))
    assert stage2.newest_stage1_checkpoint(str(runs), "open_drawer") == old
    assert stage2.newest_stage1_checkpoint(str(runs), "push_cube") is None


def test_nan_loss_stops_names_the_term_and_keeps_the_last_good_checkpoint(files, tmp_path, monkeypatch, capsys):
    use_bandit(monkeypatch)
    args = bandit_args(files, tmp_path, "pi05", iterations=3, eval_every=1)
    calls = {"n": 0}
    real_sft = policies.Pi05Policy.sft_loss

    def sft_goes_bad(self, batch, generator=None):
        calls["n"] += 1
        loss = real_sft(self, batch, generator)
        return loss * float("nan") if calls["n"] > 4 else loss  # fine in iteration 1 (2 x 2 minibatches)

    monkeypatch.setattr(policies.Pi05Policy, "sft_loss", sft_goes_bad)
    err = run_expecting_error(args, capsys, code=3)
    ckpts = Path(args.runs_dir) / "run" / "checkpoints"
    assert "non-finite sft_loss at iteration 2" in err
    assert f"last good checkpoint: {ckpts / '1'}" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["1"]  # nothing new was saved


# ---------------------------------------------------------------------------------------------
# A short run on the real open_drawer twin, as a user runs it
# ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_short_run_on_open_drawer(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    stage1_checkpoint(runs / "stage1_run/checkpoints/final", "pi05")  # found by the default --init
    cmd = [sys.executable, "stage2_rl_cotrain.py", "--task", "open_drawer", "--beta", "0.1",
           "--real-data", str(tiny_data["proxy_real"]), "--runs-dir", str(runs), "--run-name", "s2",
           "--num-envs", "2", "--max-episode-steps", "8", "--total-env-steps", "32",
           "--update-epochs", "1", "--num-minibatches", "2",
           "--eval-episodes", "2", "--eval-num-envs", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (runs / "s2/metrics.jsonl").read_text().splitlines()]
    merged = {k: v for r in rows for k, v in r.items()}
    for key in ("eval/success_sim", "eval/success_proxy_real", "perf/env_sps", "charts/noise_sigma",
                "losses/explained_variance", "losses/grad_norm_actor_ppo", "losses/grad_norm_actor_sft",
                "charts/executed_fraction"):
        assert key in merged, key
    train = train_rows(rows)
    # chunks of 4, 8-step episodes: 2 decisions per rollout, 2 envs -> 16 steps per iteration
    assert [r["global_step"] for r in train] == [16, 32]
    assert all(r["losses/first_minibatch_ratio_dev"] < 1e-5 for r in train)
    assert (runs / "s2/videos/iter0_proxy_real.mp4").exists() and (runs / "s2/videos/iter2_sim.mp4").exists()
    args = json.loads((runs / "s2/args.json").read_text())
    assert args["init"].endswith("stage1_run/checkpoints/final") and args["exec_horizon"] == 4


if __name__ == "__main__":  # one process of the torchrun test: Stage II on the bandit
    import tyro

    stage2.make_train_envs = lambda args, rank, size, wrist: BanditEnv(args.num_envs, size)
    stage2.make_eval_env = lambda args, domain, size, wrist: BanditEnv(args.eval_num_envs, size, domain)
    stage2.main(tyro.cli(stage2.Args))
