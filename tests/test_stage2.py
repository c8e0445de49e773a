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
    success when above 0.5, terminated at once and reset (auto_reset); the observation never
    changes."""

    action_dim, state_dim, control_freq, max_episode_steps = 7, 8, 10, 1

    def __init__(self, num_envs, image_size=IMAGE, domain="sim"):
        self.num_envs, self.image_size, self.domain = num_envs, image_size, domain
        self.task, self.variant = "open_drawer", "in_distribution"

    def _obs(self, render=True):
        B, S = self.num_envs, self.image_size
        return {"image": np.full((B, S, S, 3), 100, np.uint8) if render else None,
                "state": np.zeros((B, 8), np.float32), "instruction": [INSTRUCTION] * B}

    def reset(self, seed=None):
        return self._obs(), {}

    def step(self, action, render=True):
        action = np.asarray(action, np.float32)
        assert action.shape == (self.num_envs, 7)
        reward = np.clip(action, -1, 1).mean(1).astype(np.float32)
        success = reward > 0.5
        done = np.ones(self.num_envs, bool)
        info = {"success": success, "final_obs": self._obs(), "final_success": success}
        return self._obs(render), reward, done, np.zeros(self.num_envs, bool), info

    def render_frame(self):
        return self._obs()["image"]

    def close(self):
        pass


class ThreeStepEnv(BanditEnv):
    """Episodes of three steps whatever the actions: dense rewards 0.2, 0.5, 1.0, success (and
    termination) at the third."""

    max_episode_steps = 10

    def __init__(self, num_envs, image_size=IMAGE, domain="sim"):
        super().__init__(num_envs, image_size, domain)
        self.t = np.zeros(num_envs, int)

    def reset(self, seed=None):
        self.t[:] = 0
        return self._obs(), {}

    def step(self, action, render=True):
        self.t += 1
        reward = np.choose(self.t - 1, [0.2, 0.5, 1.0]).astype(np.float32)
        done = self.t == 3
        self.t[done] = 0
        info = {"success": done.copy(), "final_obs": self._obs(), "final_success": done.copy()}
        return self._obs(render), reward, done, np.zeros(self.num_envs, bool), info


def use_bandit(monkeypatch):
    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size: BanditEnv(args.num_envs, size))
    monkeypatch.setattr(stage2, "make_eval_env",
                        lambda args, domain, size: BanditEnv(args.eval_num_envs, size, domain))


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
    base = dict(task="open_drawer", init=str(files[kind]), real_data=str(files["real"]), beta=0.1,
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
# PPO's terms
# ---------------------------------------------------------------------------------------------
def test_ppo_losses_hand_worked():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    new_lp = torch.log(ratio).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old_v = torch.zeros(4)
    new_v = torch.tensor([0.5, -0.1, 0.3, 2.0])
    ret = torch.tensor([1.0, 0.0, -1.0, 0.0])
    ent = torch.tensor([0.1, 0.2, 0.3, 0.4])
    t = stage2.ppo_losses(new_lp, torch.zeros(4), adv, new_v, old_v, ret, ent, clip_coef=0.2,
                          clip_vloss=True, vf_clip_coef=0.2, huber_delta=0.0)
    # per sample max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert t["pg_loss"].item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4, abs=1e-6)
    assert t["clipfrac"].item() == pytest.approx(0.75)  # |r - 1| > 0.2 for 1.5, 0.5, 0.7
    assert t["approx_kl"].item() == pytest.approx(float(((ratio - 1) - ratio.log()).mean()), abs=1e-7)
    assert t["entropy"].item() == pytest.approx(0.25)
    # value, clipped to old +- 0.2: max(0.5 (v - R)^2, 0.5 (v_clip - R)^2) per sample
    #   0.5: max(0.125, 0.5 * 0.8^2 = 0.32); -0.1: 0.005; 0.3: max(0.845, 0.72); 2.0: max(2.0, 0.02)
    assert t["v_loss"].item() == pytest.approx((0.32 + 0.005 + 0.845 + 2.0) / 4, abs=1e-6)
    # the clipped samples give no gradient; the others -A r / N
    t["pg_loss"].backward()
    torch.testing.assert_close(new_lp.grad, torch.tensor([0.0, -0.5, 1.1, 0.0]) / 4)

    huber = stage2.ppo_losses(torch.log(ratio), torch.zeros(4), adv, new_v, old_v, ret, ent, huber_delta=1.0)
    # Huber(1): 0.5 x^2 for |x| <= 1, |x| - 0.5 beyond: 0.32, 0.005, max(0.8, 0.7), max(1.5, 0.02)
    assert huber["v_loss"].item() == pytest.approx((0.32 + 0.005 + 0.8 + 1.5) / 4, abs=1e-6)
    unclipped = stage2.ppo_losses(torch.log(ratio), torch.zeros(4), adv, new_v, old_v, ret, ent, clip_vloss=False)
    assert unclipped["v_loss"].item() == pytest.approx((0.125 + 0.005 + 0.845 + 2.0) / 4, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Eq. 5 and beta, on real policies
# ---------------------------------------------------------------------------------------------
def rollout_minibatch(policy, n=6, seed=0):
    torch.manual_seed(seed)
    env = BanditEnv(n)
    obs, _ = env.reset()
    out = policy.act(obs)
    g = torch.Generator().manual_seed(seed)
    return {"obs": obs, "act_out": out,
            "logprob": out["logprob"] + 0.3 * torch.randn(n, generator=g),  # an older policy: ratios != 1
            "values": out["value"] + 0.1 * torch.randn(n, generator=g),
            "advantages": torch.randn(n, generator=g), "returns": torch.randn(n, generator=g)}


def real_batch(path, policy, n=4, seed=0):
    ds = demos.LeRobotDataset(path, chunk_size=policy.chunk_size)
    idx = np.random.default_rng(seed).integers(0, len(ds), n)
    return demos.collate([ds[int(i)] for i in idx])


def loss_args(beta):
    return stage2.Args(beta=beta, ent_coef=0.01, vf_coef=0.5, huber_delta=0.0, clip_coef=0.2, clip_vloss=True,
                       vf_clip_coef=0.2)


@pytest.mark.parametrize("kind", KINDS)
def test_total_loss_is_pg_plus_value_minus_entropy_plus_beta_sft(files, kind):
    policy = policies.load_policy(files[kind]).eval()
    mb, real = rollout_minibatch(policy), real_batch(files["real"], policy)
    args = loss_args(0.7)
    torch.manual_seed(11)
    terms = stage2.minibatch_loss(stage2.Stage2Forward(policy), mb, real, args)
    # the same terms computed here, independently (same RNG for the SFT loss's noise)
    torch.manual_seed(11)
    new = policy.evaluate(mb["obs"], mb["act_out"])
    sft = policy.sft_loss(real)
    ratio = torch.exp(new["logprob"] - mb["logprob"])
    A = mb["advantages"]
    pg = torch.mean(torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2)))
    v_clip = mb["values"] + (new["value"] - mb["values"]).clamp(-0.2, 0.2)
    v = torch.mean(0.5 * torch.maximum((new["value"] - mb["returns"]) ** 2, (v_clip - mb["returns"]) ** 2))
    expected = pg + 0.5 * v - 0.01 * new["entropy"].mean() + 0.7 * sft
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert terms["sft_loss"].item() == pytest.approx(sft.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(
        (terms["ppo_loss"] + 0.7 * terms["sft_loss"]).item(), rel=1e-6, abs=1e-7)
    assert abs(sft.item()) > 1e-3 and abs(pg.item()) > 1e-4  # both terms really take part


def grads(policy, loss):
    policy.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_beta_zero_real_batch_gives_no_gradient(files, kind):
    policy = policies.load_policy(files[kind]).eval()
    model = stage2.Stage2Forward(policy)
    mb = rollout_minibatch(policy)
    real_a, real_b = real_batch(files["real"], policy, seed=0), real_batch(files["other_real"], policy, seed=1)

    def run(beta, real, which="loss"):
        torch.manual_seed(0)
        return grads(policy, stage2.minibatch_loss(model, mb, real, loss_args(beta))[which])

    g_a, g_b, g_rl = run(0.0, real_a), run(0.0, real_b), run(0.0, real_a, "ppo_loss")
    for name in g_a:
        assert torch.equal(g_a[name], g_b[name]), name      # the real batch does not matter at all
        assert torch.equal(g_a[name], g_rl[name]), name     # the total is the RL loss alone
    torch.manual_seed(0)
    assert not stage2.minibatch_loss(model, mb, real_a, loss_args(0.0))["sft_loss"].requires_grad
    # beta > 0: the real batch moves the actor (and by exactly beta times its SFT gradient)
    h_a, h_b = run(0.5, real_a), run(0.5, real_b)
    torch.manual_seed(0)
    g_sft = grads(policy, stage2.minibatch_loss(model, mb, real_a, loss_args(0.5))["sft_loss"])
    assert any(not torch.allclose(h_a[n], h_b[n]) for n in h_a)
    for name in h_a:
        torch.testing.assert_close(h_a[name], g_rl[name] + 0.5 * g_sft[name], rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("reward", ["dense_delta", "dense"])
def test_chunk_reward_is_discounted_and_stops_where_the_episode_ends(files, tmp_path, monkeypatch, reward):
    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size: ThreeStepEnv(args.num_envs, size))
    monkeypatch.setattr(stage2, "make_eval_env", lambda args, domain, size: ThreeStepEnv(args.eval_num_envs, size))
    # pi05 executes chunks of 4; the episode ends (success) after 3 steps: one decision of 3 steps
    args = bandit_args(files, tmp_path, "pi05", iterations=1, num_envs=2, num_steps=1, reward=reward,
                       gamma=0.9, num_minibatches=1, update_epochs=1, eval_episodes=0)
    stage2.main(args)
    row = train_rows(read_metrics(args))[0]
    paid = [0.2, 0.3, 0.5] if reward == "dense_delta" else [0.2, 0.5, 1.0]  # differences of 0.2, 0.5, 1.0
    assert row["charts/decision_reward"] == pytest.approx(paid[0] + 0.9 * paid[1] + 0.81 * paid[2], abs=1e-6)
    assert row["global_step"] == 6 and row["charts/episode_length"] == 3
    assert row["charts/episode_return"] == pytest.approx(1.7) and row["charts/episode_success"] == 1.0


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

    monkeypatch.setattr(stage2, "make_train_envs", lambda args, rank, size: CtrlCBandit(args.num_envs, size))
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
    assert len(state["torch_rng"]) == 2  # both processes' RNG, for an exact resume


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
           "--eval-episodes", "2", "--eval-num-envs", "1", "--bench-env-steps", "4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (runs / "s2/metrics.jsonl").read_text().splitlines()]
    merged = {k: v for r in rows for k, v in r.items()}
    for key in ("perf/raw_env_sps_render_all_steps", "perf/raw_env_sps_render_decision_points",
                "eval/success_sim", "eval/success_proxy_real", "perf/env_sps", "charts/noise_sigma",
                "losses/explained_variance", "losses/sft_over_ppo"):
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

    stage2.make_train_envs = lambda args, rank, size: BanditEnv(args.num_envs, size)
    stage2.make_eval_env = lambda args, domain, size: BanditEnv(args.eval_num_envs, size, domain)
    stage2.main(tyro.cli(stage2.Args))
