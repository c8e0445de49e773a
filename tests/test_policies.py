"""policies.py: the maths of act/evaluate/sft_loss for both kinds, freezing, checkpoints, and the
mapping of the published checkpoints (checked against the tensor manifests, without weights)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import policies

MANIFESTS = Path(__file__).resolve().parent / "fixtures" / "reference"  # see tests/fixtures/README.md
INSTRUCTIONS = ["pick up the red cube", "open the drawer", "push the blue cube", "close the drawer"]


def make_obs(batch_size=4, image_size=96, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
            "state": rng.uniform(-1, 1, (batch_size, 8)).astype(np.float32),
            "instruction": [INSTRUCTIONS[i % 4] for i in range(batch_size)]}


def make_batch(policy, batch_size=4, seed=0):
    rng = np.random.default_rng(seed + 1)
    H = policy.chunk_size
    mask = np.ones((batch_size, H), dtype=bool)
    if H > 1:
        mask[0, -1] = False  # the chunk ran past the episode's end
    return dict(make_obs(batch_size, seed=seed),
                actions=rng.uniform(-1, 1, (batch_size, H, 7)).astype(np.float32), action_mask=mask)


def new_policy(kind, seed=0, **overrides):
    torch.manual_seed(seed)
    return policies.make_policy(kind, instructions=INSTRUCTIONS, **overrides)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The tiny models are too small to gain from a second thread, and on a CPU shared with other
    jobs a busy-waiting second thread made training steps ~50x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pi05():
    return new_policy("pi05")


# ------------------------------------------------------------------------------------------------
# act / evaluate agree
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,overrides", [("openvla", {}), ("openvla", {"chunk_size": 2}),
                                            ("pi05", {}), ("pi05", {"num_steps": 2, "chunk_size": 3})])
def test_evaluate_recomputes_act_logprob(kind, overrides):
    policy = new_policy(kind, **overrides)
    obs = make_obs()
    out = policy.act(obs, generator=torch.Generator().manual_seed(1))
    assert out["actions"].shape == (4, policy.chunk_size, 7) and out["actions"].dtype == torch.float32
    ev = policy.evaluate(obs, out)
    assert torch.allclose(ev["logprob"], out["logprob"], atol=1e-5, rtol=0)
    assert torch.allclose(ev["value"], out["value"], atol=1e-5, rtol=0)
    assert ev["logprob"].requires_grad and ev["entropy"].shape == (4,)
    # per chunk step: the same in act and evaluate, summing to the whole log-prob / averaging to the entropy
    H = policy.chunk_size
    assert out["step_logprob"].shape == ev["step_logprob"].shape == ev["step_entropy"].shape == (4, H)
    assert torch.allclose(ev["step_logprob"], out["step_logprob"], atol=1e-5, rtol=0)
    assert torch.allclose(ev["step_logprob"].sum(-1), ev["logprob"], atol=1e-5, rtol=0)
    assert torch.allclose(ev["step_entropy"].mean(-1), ev["entropy"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# openvla maths
# ------------------------------------------------------------------------------------------------

def test_openvla_logprob_is_log_softmax_over_action_ids():
    policy = new_policy("openvla", chunk_size=2, temperature=0.7)
    obs = make_obs()
    out = policy.act(obs, generator=torch.Generator().manual_seed(3))
    tokens = out["action_tokens"]
    lo, hi = policy.action_ids
    assert hi == len(policy.tokenizer) and ((tokens >= lo) & (tokens < hi)).all()
    with torch.no_grad():
        logits, _ = policy._teacher_forced(obs["image"], obs["instruction"], tokens)
    z = logits.double().numpy()[..., lo:hi] / 0.7
    log_softmax = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    by_hand = np.take_along_axis(log_softmax, (tokens - lo).numpy()[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(out["logprob"].numpy(), by_hand, atol=1e-5)
    # each chunk step's log-prob: the sum over its 7 tokens (chunk_size 2 here)
    per_token = np.take_along_axis(log_softmax, (tokens - lo).numpy()[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["step_logprob"].numpy(), per_token.reshape(4, 2, 7).sum(-1), atol=1e-5)
    # entropy: mean over tokens of -sum p log p, at the same temperature
    entropy = (-(np.exp(log_softmax) * log_softmax).sum(-1)).mean(-1)
    np.testing.assert_allclose(policy.evaluate(obs, out)["entropy"].detach().numpy(), entropy, atol=1e-5)
    # greedy decoding picks the arg-max action id at every step
    greedy = policy.act(obs, deterministic=True)["action_tokens"]
    with torch.no_grad():
        logits, _ = policy._teacher_forced(obs["image"], obs["instruction"], greedy)
    assert torch.equal(greedy, logits[..., lo:hi].argmax(-1) + lo)


def test_openvla_action_tokens_follow_openvla_binning():
    policy = new_policy("openvla")
    vocab = policy.action_ids[1]
    a = torch.tensor(np.random.default_rng(0).uniform(-1, 1, (500, 7)), dtype=torch.float32)
    a[0, :3] = torch.tensor([-1.0, 1.0, 0.0])
    edges = np.linspace(-1, 1, 256)
    expected = vocab - np.digitize(a.numpy(), edges)           # OpenVLA ActionTokenizer.__call__
    tokens = policy.actions_to_tokens(a)
    np.testing.assert_array_equal(tokens.numpy(), expected)
    centres = (edges[:-1] + edges[1:]) / 2                      # OpenVLA decode_token_ids_to_actions
    decoded = centres[np.clip(vocab - expected - 1, 0, 254)]
    np.testing.assert_allclose(policy.tokens_to_actions(tokens).numpy(), decoded, atol=1e-6)
    assert np.abs(decoded - a.numpy()).max() <= 2 / 255 + 1e-6  # within one bin


def test_actions_are_denormalised_with_q01_q99():
    rng = np.random.default_rng(0)
    q01, q99 = rng.uniform(-3, -1, 7), rng.uniform(1, 4, 7)
    stats = {"action": {"q01": q01.tolist(), "q99": q99.tolist()},
             "observation.state": {"q01": [-2.0] * 8, "q99": [2.0] * 8}}
    for kind in ("openvla", "pi05"):
        policy = new_policy(kind, norm_stats=stats)
        obs = make_obs()
        out = policy.act(obs, generator=torch.Generator().manual_seed(0))
        if kind == "openvla":
            normalized = policy.tokens_to_actions(out["action_tokens"]).view(4, 1, 7).numpy()
        else:
            normalized = out["chain"][:, -1].clamp(-1, 1).numpy()
        np.testing.assert_allclose(out["actions"].numpy(), q01 + (normalized + 1) / 2 * (q99 - q01), atol=1e-5)
        raw = torch.tensor(q01 + 0.25 * (q99 - q01), dtype=torch.float32)
        np.testing.assert_allclose(policy.normalize_actions(raw).numpy(), -0.5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# pi05 maths
# ------------------------------------------------------------------------------------------------

def test_pi05_chain_logprob_is_sum_of_gaussian_densities(pi05):
    obs = make_obs()
    out = pi05.act(obs, generator=torch.Generator().manual_seed(5))
    chain = out["chain"]
    K = pi05.config["model"]["num_steps"]
    assert chain.shape == (4, K + 1, pi05.chunk_size, 7)
    with torch.no_grad():
        image, state, instructions = pi05._obs(obs)
        prefix = pi05._prefix(image, state, instructions)
        total = torch.distributions.Normal(0.0, 1.0).log_prob(chain[:, 0].double()).sum((1, 2))
        residuals = []
        for k in range(K):
            t = torch.full((4,), 1.0 - k / K)
            v, expert_out = pi05.velocity(prefix, chain[:, k], t)
            mean, std = chain[:, k] - v / K, pi05.noise_std(expert_out)
            step = torch.distributions.Normal(mean.double(), std.double())
            total += step.log_prob(chain[:, k + 1].double()).sum((1, 2))
            residuals.append((chain[:, k + 1] - mean) / std)
    expected = total / (K + 1)
    assert torch.allclose(out["logprob"].double(), expected, atol=1e-5, rtol=0)
    # chunk step h's share: its x0 entries and its K transitions, by hand, on step 0 and the last
    with torch.no_grad():
        for h in (0, pi05.chunk_size - 1):
            by_hand = torch.distributions.Normal(0.0, 1.0).log_prob(chain[:, 0, h].double()).sum(-1)
            for k in range(K):
                v, expert_out = pi05.velocity(prefix, chain[:, k], torch.full((4,), 1.0 - k / K))
                step = torch.distributions.Normal((chain[:, k] - v / K)[:, h].double(),
                                                  pi05.noise_std(expert_out)[:, h].double())
                by_hand += step.log_prob(chain[:, k + 1, h].double()).sum(-1)
            assert torch.allclose(out["step_logprob"][:, h].double(), by_hand / (K + 1), atol=1e-5, rtol=0)
    # the stored transitions really are N(mean, std^2): standardised residuals look standard normal
    z = torch.cat([r.flatten() for r in residuals])
    assert abs(z.mean().item()) < 0.15 and 0.85 < z.std().item() < 1.15


def _chain_logprob_by_hand(policy, obs, x0, stored, noisy, recompute=True):
    """log-prob of the stored chain's noisy draws with every noise-free step recomputed from the
    current weights: (log N(x0; 0, I) + sum_{k noisy} log N(x_{k+1}; mu_k, sigma_k^2)) / (#noisy + 1),
    mu_k from the recomputed x_k (recompute=False: from the stored x_k instead, what an evaluate
    that skipped the recomputation would give). Differentiable (no no_grad)."""
    K = stored.shape[1] - 1
    image, state, instructions = policy._obs(obs)
    prefix = policy._prefix(image, state, instructions)
    total = torch.distributions.Normal(0.0, 1.0).log_prob(x0.double()).sum((1, 2))
    x = x0
    for k in range(K):
        v, expert_out = policy.velocity(prefix, x, torch.full((x.shape[0],), 1.0 - k / K))
        mean = x - v / K
        if k in noisy:
            step = torch.distributions.Normal(mean.double(), policy.noise_std(expert_out).double())
            total = total + step.log_prob(stored[:, k + 1].double()).sum((1, 2))
            x = stored[:, k + 1]
        else:
            x = mean if recompute else stored[:, k + 1]
    return total / (len(noisy) + 1)


def test_pi05_noise_at_some_steps_keeps_the_log_prob_exact_and_trains_the_noise_free_steps():
    """noise_steps: the listed denoising steps draw the noise, the others are x_{k+1} = mu_k, and
    evaluate recomputes those from the current weights, so after an update the log-prob (and its
    gradient) follows the new noise-free path, not the stored one."""
    policy = new_policy("pi05")
    with torch.no_grad():  # pi0.5's adaptive norms start at zero (openpi), which zeroes most gradients
        for n, p in policy.named_parameters():
            if n.endswith("norm.dense.weight"):
                p.normal_(0, 0.1)
    K = policy.config["model"]["num_steps"]
    obs, seeds = make_obs(), [11, 12, 13, 14]
    everywhere = policy.act(obs, generator=torch.Generator().manual_seed(3), x0_seeds=seeds)
    policy.config["model"]["noise_steps"] = list(range(K))  # listing all K is the default
    same = policy.act(obs, generator=torch.Generator().manual_seed(3), x0_seeds=seeds)
    assert torch.equal(same["chain"], everywhere["chain"]) and torch.equal(same["logprob"], everywhere["logprob"])

    policy.config["model"]["noise_steps"] = [K - 1]  # the noise-free chain plus noise on its output
    out = policy.act(obs, generator=torch.Generator().manual_seed(3), x0_seeds=seeds)
    noise_free = policy.act(obs, deterministic=True, x0_seeds=seeds)
    assert torch.allclose(out["chain"][:, :K], noise_free["chain"][:, :K], atol=1e-6)  # the same path up to x_{K-1}
    assert (out["chain"][:, K] - noise_free["chain"][:, K]).abs().mean() > 0.05  # then the noise
    with torch.no_grad():
        by_hand = _chain_logprob_by_hand(policy, obs, out["chain"][:, 0], out["chain"], [K - 1])
        assert torch.allclose(out["logprob"].double(), by_hand, atol=1e-5, rtol=0)
        assert torch.allclose(policy.evaluate(obs, out)["logprob"].double(), by_hand, atol=1e-5, rtol=0)
    # entropy: the Gaussian one of the noisy step alone (here pinned to sigma_min)
    with torch.no_grad():
        policy.noise_head[-1].weight.zero_()
        policy.noise_head[-1].bias.fill_(-50.0)
    sigma_min = policy.config["model"]["sigma_min"]
    assert torch.allclose(policy.evaluate(obs, out)["entropy"],
                          torch.tensor(0.5 * math.log(2 * math.pi * math.e * sigma_min ** 2)), atol=1e-5)

    # a change of the velocity moves the recomputed noise-free path: evaluate follows it
    policy.config["model"]["noise_steps"] = [1, K - 1]
    out = policy.act(obs, generator=torch.Generator().manual_seed(4), x0_seeds=seeds)
    with torch.no_grad():
        policy.action_out_proj.bias.add_(0.3)
    evaluated = policy.evaluate(obs, out)["logprob"]
    by_hand = _chain_logprob_by_hand(policy, obs, out["chain"][:, 0], out["chain"], [1, K - 1])
    assert torch.allclose(evaluated.double(), by_hand, atol=1e-5, rtol=0)
    stored_path = _chain_logprob_by_hand(policy, obs, out["chain"][:, 0], out["chain"], [1, K - 1], recompute=False)
    assert not torch.allclose(evaluated.double(), stored_path, atol=1e-3)  # not from the stored x_k's
    # the gradient reaches the noise-free steps: the same as autograd of the by-hand log-prob
    params = [policy.action_in_proj.weight, policy.time_mlp_in.weight, policy.action_out_proj.weight]
    got = torch.autograd.grad(evaluated.sum(), params)
    expected = torch.autograd.grad(by_hand.sum(), params)
    for g, e in zip(got, expected):
        assert g.abs().max() > 0 and torch.allclose(g.double(), e.double(), atol=1e-5, rtol=1e-4)

    policy.config["model"]["noise_steps"] = [K]
    with pytest.raises(ValueError, match="noise_steps"):
        policy.act(obs)


def test_pi05_noise_std_stays_in_bounds(pi05):
    m = pi05.config["model"]
    x = torch.randn(16, pi05.chunk_size, m["expert_width"]) * 100
    std = pi05.noise_std(x)
    assert (std >= m["sigma_min"] - 1e-7).all() and (std <= m["sigma_max"] + 1e-7).all()
    policy = new_policy("pi05")
    last = policy.noise_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(50.0)
        assert torch.allclose(policy.noise_std(x), torch.tensor(m["sigma_max"]))
        last.bias.fill_(-50.0)
        assert torch.allclose(policy.noise_std(x), torch.tensor(m["sigma_min"]))
    # entropy of the step noise is the Gaussian one at that std
    out = policy.act(make_obs(), generator=torch.Generator().manual_seed(0))
    expected = 0.5 * math.log(2 * math.pi * math.e * m["sigma_min"] ** 2)
    assert torch.allclose(policy.evaluate(make_obs(), out)["entropy"], torch.tensor(expected), atol=1e-5)


def test_pi05_sampling_is_reproducible_and_euler(pi05):
    obs = make_obs()
    keys = [5, 6, 7, 8]
    a, b = pi05.act(obs, deterministic=True, x0_seeds=keys), pi05.act(obs, deterministic=True, x0_seeds=keys)
    assert torch.equal(a["actions"], b["actions"]) and torch.equal(a["chain"], b["chain"])
    # the evaluation protocol integrates on the training chain's grid (the same K as the noisy chain)
    K = pi05.config["model"]["num_steps"]
    assert a["chain"].shape[1] == K + 1 == pi05.act(obs)["chain"].shape[1]
    # x0 is fresh per decision: another key, another x0; each x0 is N(0, I) from its key's generator
    c = pi05.act(obs, deterministic=True, x0_seeds=[5, 6, 7, 9])
    assert torch.equal(a["chain"][:3, 0], c["chain"][:3, 0]) and not torch.equal(a["chain"][3, 0], c["chain"][3, 0])
    assert torch.equal(a["chain"][1, 0], torch.randn((4, 7), generator=torch.Generator().manual_seed(6)))
    with torch.no_grad():  # each deterministic step is x_{k+1} = x_k - v(x_k, t_k) / K
        image, state, instructions = pi05._obs(obs)
        prefix = pi05._prefix(image, state, instructions)
        for k in (0, K - 1):
            v, _ = pi05.velocity(prefix, a["chain"][:, k], torch.full((4,), 1.0 - k / K))
            assert torch.allclose(a["chain"][:, k + 1], a["chain"][:, k] - v / K, atol=1e-6)
    s1 = pi05.act(obs, generator=torch.Generator().manual_seed(7))
    s2 = pi05.act(obs, generator=torch.Generator().manual_seed(7))
    s3 = pi05.act(obs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(s1["chain"], s2["chain"]) and not torch.equal(s1["chain"], s3["chain"])


@pytest.mark.parametrize("kind", ["openvla", "pi05"])
def test_deterministic_action_does_not_depend_on_the_batch(kind):
    # evaluation runs 1 or N envs at a time: each observation must get the same action either way
    policy = new_policy(kind).eval()
    obs = make_obs()
    keys = [101, 102, 103, 104]  # envs.decision_key of each sub-env's decision
    with torch.no_grad():
        batch = policy.act(obs, deterministic=True, x0_seeds=keys)
        for i in range(len(obs["instruction"])):
            one = policy.act({k: v[i:i + 1] for k, v in obs.items()}, deterministic=True, x0_seeds=keys[i:i + 1])
            assert torch.allclose(batch["actions"][i], one["actions"][0], atol=1e-5), i
            assert torch.allclose(batch["value"][i], one["value"][0], atol=1e-5), i


def test_pi05_state_tokens_follow_openpi_binning(pi05):
    state = torch.tensor(np.random.default_rng(0).uniform(-1.2, 1.2, (3, 8)), dtype=torch.float32)
    state[0, :2] = torch.tensor([1.0, -1.0])
    prompts = pi05._prompts(state, ["pick_up the cube"] * 3)
    expected = np.digitize(np.clip(state.numpy(), -1, 1), np.linspace(-1, 1, 257)[:-1]) - 1
    for prompt, row in zip(prompts, expected):
        assert prompt == f"Task: pick up the cube, State: {' '.join(map(str, row))};\nAction: "


def test_pi05_without_discrete_state_input_ignores_the_state():
    # openpi's discrete_state_input=False: pi0's text prompt, no state anywhere in the model
    policy = new_policy("pi05", discrete_state_input=False).eval()
    state = torch.zeros(2, 8)
    assert policy._prompts(state, ["pick_up the cube", "open the drawer"]) == ["pick up the cube\n", "open the drawer\n"]
    obs, moved = make_obs(2), make_obs(2)
    moved["state"] = moved["state"] + 0.5
    with torch.no_grad():
        a = policy.act(obs, deterministic=True, x0_seeds=[1, 2])["actions"]
        b = policy.act(moved, deterministic=True, x0_seeds=[1, 2])["actions"]
    assert torch.equal(a, b)
    # the default policy, same weights, reads the state: the same change moves its actions
    policy.config["model"]["discrete_state_input"] = True
    with torch.no_grad():
        c = policy.act(obs, deterministic=True, x0_seeds=[1, 2])["actions"]
        d = policy.act(moved, deterministic=True, x0_seeds=[1, 2])["actions"]
    assert (c - d).abs().max() > 1e-3


def test_pi05_wrist_camera_puts_both_views_in_the_prefix_and_reads_the_wrist_image():
    policy = new_policy("pi05", wrist_camera=True).eval()
    m = policy.config["model"]
    patches = (m["image_size"] // m["patch_size"]) ** 2
    obs = make_obs(2)
    obs["wrist_image"] = np.random.default_rng(5).integers(0, 256, obs["image"].shape, dtype=np.uint8)
    state, instructions = torch.as_tensor(obs["state"]), obs["instruction"]
    with torch.no_grad():
        two = policy._prefix([obs["image"], obs["wrist_image"]], state, instructions)
        one = policy._prefix([obs["image"]], state, instructions)
    assert two["mask"].shape[1] == one["mask"].shape[1] + patches  # a second block of image tokens
    # each view is embedded on its own: with the wrist view equal to the fixed one, the two blocks
    # of the first layer's keys are equal (same pixels, same rotary positions are not: values are)
    with torch.no_grad():
        same = policy._prefix([obs["image"], obs["image"]], state, instructions)
    values = same["kv"][0][1]  # [B, kv heads, T, head dim]
    assert torch.allclose(values[:, :, :patches], values[:, :, patches:2 * patches], atol=1e-5)
    # the actions and the SFT loss read the wrist image; a single-view policy ignores it
    moved = {**obs, "wrist_image": 255 - obs["wrist_image"]}
    with torch.no_grad():
        a = policy.act(obs, deterministic=True, x0_seeds=[1, 2])["actions"]
        b = policy.act(moved, deterministic=True, x0_seeds=[1, 2])["actions"]
        batch = dict(make_batch(policy, 2), wrist_image=obs["wrist_image"])
        loss = policy.sft_loss(batch, torch.Generator().manual_seed(0))
        moved_loss = policy.sft_loss({**batch, "wrist_image": moved["wrist_image"]}, torch.Generator().manual_seed(0))
    assert (a - b).abs().max() > 1e-3 and abs(loss.item() - moved_loss.item()) > 1e-6
    policy.config["model"]["wrist_camera"] = False
    with torch.no_grad():
        c = policy.act(obs, deterministic=True, x0_seeds=[1, 2])["actions"]
        d = policy.act(moved, deterministic=True, x0_seeds=[1, 2])["actions"]
    assert torch.equal(c, d)
    policy.config["model"]["wrist_camera"] = True
    with pytest.raises(ValueError, match="wrist_camera=True"):
        policy.act({k: v for k, v in obs.items() if k != "wrist_image"}, deterministic=True)
    with pytest.raises(ValueError, match="wrist_camera"):  # OpenVLA stays single-view, as published
        new_policy("openvla", wrist_camera=True)


def test_pi05_critic_state_reads_the_state_in_the_value_only_and_survives_save_and_load(tmp_path):
    # Stage II's --critic-state: a policy without the state gets a critic that reads it
    policy = new_policy("pi05", discrete_state_input=False).eval()
    obs, moved = make_obs(2), make_obs(2)
    moved["state"] = moved["state"] + 0.5
    def both(p):
        with torch.no_grad():
            return (p.act(obs, deterministic=True, x0_seeds=[1, 2]), p.act(moved, deterministic=True, x0_seeds=[1, 2]))
    a, b = both(policy)
    assert torch.equal(a["value"], b["value"])  # the plain critic reads the prefix alone
    width = policy.value_head[0].in_features
    policy.use_state_in_value_head()
    assert policy.value_head[0].in_features == width + policy.state_dim
    c, d = both(policy)
    assert torch.equal(c["actions"], a["actions"]) and torch.equal(d["actions"], a["actions"])  # actor unchanged
    assert (c["value"] - d["value"]).abs().max() > 1e-4
    # the value is the head applied to [pooled prefix, normalised state], computed here by hand
    with torch.no_grad():
        image, state, instructions = policy._obs(moved)
        prefix = policy._prefix(image, state, instructions)
        mask = prefix["mask"][..., None].float()
        pooled = (prefix["out"] * mask).sum(1) / mask.sum(1)
        by_hand = policy.value_head(torch.cat([pooled, policy.normalize_state(state)], -1)).squeeze(-1)
    torch.testing.assert_close(d["value"], by_hand)
    policy.save(tmp_path / "ckpt", extra={"stage": "stage2"})
    loaded = policies.load_policy(tmp_path / "ckpt").eval()
    e, f = both(loaded)
    torch.testing.assert_close(e["value"], c["value"])
    torch.testing.assert_close(f["value"], d["value"])


def test_pi05_critic_potential_reads_phi_in_the_value_only_and_survives_save_and_load(tmp_path):
    # Stage II's --critic-potential: the value head also reads obs["potential"], the shaping potential
    policy = new_policy("pi05").eval()
    obs = make_obs(2)
    with torch.no_grad():
        plain = policy.act(obs, deterministic=True, x0_seeds=[1, 2])
    width = policy.value_head[0].in_features
    policy.use_potential_in_value_head()
    assert policy.value_head[0].in_features == width + 1
    low, high = {**obs, "potential": np.array([0.1, 0.2], np.float32)}, {**obs, "potential": np.array([0.8, 0.9], np.float32)}
    with torch.no_grad():
        a = policy.act(low, deterministic=True, x0_seeds=[1, 2])
        b = policy.act(high, deterministic=True, x0_seeds=[1, 2])
        missing = policy.act(obs, deterministic=True, x0_seeds=[1, 2])
    assert torch.equal(a["actions"], plain["actions"]) and torch.equal(b["actions"], plain["actions"])  # actor unchanged
    assert (a["value"] - b["value"]).abs().min() > 1e-5
    assert torch.isnan(missing["value"]).all() and torch.equal(missing["actions"], plain["actions"])  # evaluation
    with torch.no_grad():  # the value by hand: the head on [pooled prefix, phi]
        image, state, instructions = policy._obs(high)
        prefix = policy._prefix(image, state, instructions)
        mask = prefix["mask"][..., None].float()
        pooled = (prefix["out"] * mask).sum(1) / mask.sum(1)
        by_hand = policy.value_head(torch.cat([pooled, torch.tensor([[0.8], [0.9]])], -1)).squeeze(-1)
    torch.testing.assert_close(b["value"], by_hand)
    policy.save(tmp_path / "ckpt", extra={"stage": "stage2"})
    loaded = policies.load_policy(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.act(high, deterministic=True, x0_seeds=[1, 2])["value"], b["value"])


def test_pi05_state_input_dims_keeps_only_the_chosen_state_dimensions():
    # (3, ..., 7): the tcp orientation and the gripper reach the prompt, the tcp position does not
    policy = new_policy("pi05", state_input_dims=(3, 4, 5, 6, 7)).eval()
    full = new_policy("pi05")
    state = torch.randn(2, 8)
    def state_bins(prompt):
        return prompt.split("State: ")[1].split(";")[0].split()
    for kept, every in zip(policy._prompts(state, ["push"] * 2), full._prompts(state, ["push"] * 2)):
        assert state_bins(kept) == state_bins(every)[3:] and len(state_bins(every)) == 8
    obs = make_obs(2)
    moved_position, moved_orientation = make_obs(2), make_obs(2)
    moved_position["state"][:, :3] += 0.5
    moved_orientation["state"][:, 3:7] += 0.5
    with torch.no_grad():
        a = policy.act(obs, deterministic=True, x0_seeds=[1, 2])["actions"]
        b = policy.act(moved_position, deterministic=True, x0_seeds=[1, 2])["actions"]
        c = policy.act(moved_orientation, deterministic=True, x0_seeds=[1, 2])["actions"]
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="state_input_dims"):
        new_policy("pi05", state_input_dims=(0, 8))


def test_pi05_flow_matching_loss_by_hand():
    """sft_loss = masked mean of (v(x_t, t) - (noise - a))^2 with t = u^(1/1.5) * 0.999 + 0.001."""
    policy = new_policy("pi05")
    batch = make_batch(policy)
    loss = policy.sft_loss(batch, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    actions = policy.normalize_actions(torch.tensor(batch["actions"]))
    noise = torch.randn(actions.shape, generator=gen)
    t = torch.rand(4, generator=gen) ** (1 / 1.5) * 0.999 + 0.001
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    image, state, instructions = policy._obs(batch)
    v, _ = policy.velocity(policy._prefix(image, state, instructions), x_t, t)
    mask = torch.tensor(batch["action_mask"], dtype=torch.float32)[..., None].expand_as(v)
    expected = (((v - (noise - actions)) ** 2) * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    # t = u^(1/1.5) is Beta(1.5, 1): its mean is 1.5 / 2.5
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) ** (1 / 1.5)
    assert abs(u.mean().item() - 0.6) < 0.005


# ------------------------------------------------------------------------------------------------
# SFT learns
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,batch_size,lr,max_steps", [("openvla", 4, 1e-3, 150), ("pi05", 2, 2e-3, 400)])
def test_sft_loss_drops_tenfold_on_a_fixed_batch(kind, batch_size, lr, max_steps):
    policy = new_policy(kind)
    batch = make_batch(policy, batch_size)

    def fixed_loss():  # the same noise/time draws every time (pi05), so the values are comparable
        with torch.no_grad():
            return np.mean([policy.sft_loss(batch, generator=torch.Generator().manual_seed(s)).item()
                            for s in range(4 if kind == "pi05" else 1)])

    initial = fixed_loss()
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=lr, foreach=True)
    final = initial
    for step in range(1, max_steps + 1):
        loss = policy.sft_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            final = fixed_loss()
            if final < initial / 10:
                break
    assert final < initial / 10, (initial, final)


# ------------------------------------------------------------------------------------------------
# ReinFlow PPO learns at the real settings (H = 4, K = 4, sigma in [0.08, 0.16])
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise_steps,sigma_range", [(None, None), ([3], (0.16, 0.32))])
def test_pi05_reinflow_ppo_learns_a_continuous_bandit_at_real_settings(noise_steps, sigma_range):
    """One-step bandit: one fixed observation, reward = -||a - a*||^2 over the 4 x 7 chunk, a* =
    +-0.8 per entry. PPO as Stage II does it on a one-step task: sampled act, advantages = reward
    minus the batch mean (the exact value of the single state), normalised; ratio of evaluate's
    logprob to act's, clipped surrogate, 2 epochs per batch of 64. (test_stage2's bandit learns at
    H = 1 with sigma in [0.3, 0.6]; here the step noise is 6-10x smaller than x0's spread, so the
    gradient is noisy and the learning rate of 3e-3 with gradient clipping is what made 100
    iterations enough.) Smaller network than `tiny` (one image token, one layer) for time only.

    Measured (seeds 0-7, mean reward of 256 seeded samples): before -32.6 ... -36.5 (random init:
    std 1.5, range 3.9); gain after 100 iterations +10.4 (seed 0, the slowest), +15.9 ... +19.8
    (the others). A gain of 6 is beyond what init differences give and leaves headroom.

    noise_steps [3] (noise on the last step only, the noise-free steps recomputed in evaluate, so
    the gradient runs through them) with sigma in [0.16, 0.32], about the output spread of four
    noisy steps at [0.08, 0.16]: gains +12.7, +12.0, +9.9, +11.1 (seeds 0-3). At [0.08, 0.16] on
    the last step alone it gained -0.2, +2.2, -0.1 (seeds 0-2): too little exploration to learn in
    100 iterations."""
    torch.manual_seed(0)
    policy = policies.make_policy("pi05", "tiny", chunk_size=4, instructions=["open the drawer"],
                                  image_size=16, vlm_depth=1)
    m = policy.config["model"]
    assert (m["num_steps"], m["sigma_min"], m["sigma_max"]) == (4, 0.08, 0.16)  # the real settings
    if noise_steps is not None:
        m["noise_steps"], (m["sigma_min"], m["sigma_max"]) = noise_steps, sigma_range
    target = torch.as_tensor(0.8 * np.sign(np.random.default_rng(100).uniform(-1, 1, (4, 7))), dtype=torch.float32)

    def obs(n):
        return {"image": np.full((n, 16, 16, 3), 100, np.uint8), "state": np.zeros((n, 8), np.float32),
                "instruction": ["open the drawer"] * n}

    def reward(actions):
        return -((actions - target) ** 2).sum((1, 2))

    def mean_reward():  # the same 256 draws every time, so values before and after compare
        return reward(policy.act(obs(256), generator=torch.Generator().manual_seed(123))["actions"]).mean().item()

    before = mean_reward()
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=3e-3)
    batch, generator = obs(64), torch.Generator().manual_seed(1)
    for _ in range(100):
        out = policy.act(batch, generator=generator)
        r = reward(out["actions"])
        advantage = (r - r.mean()) / (r.std() + 1e-8)
        for _ in range(2):
            ratio = torch.exp(policy.evaluate(batch, out)["logprob"] - out["logprob"])
            loss = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
            optimizer.step()
    after = mean_reward()
    assert after > before + 6, (before, after)


# ------------------------------------------------------------------------------------------------
# freezing and LoRA
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,overrides,expect_trainable", [
    ("openvla", {"lora_rank": 0}, lambda n: True),
    ("openvla", {"lora_rank": 4}, lambda n: "lora_" in n or n.startswith("value_head.")),
    ("pi05", {"train_expert_only": False}, lambda n: True),
    ("pi05", {"train_expert_only": True}, lambda n: not n.startswith("vlm.")),
])
def test_gradients_reach_exactly_the_trainable_parameters(kind, overrides, expect_trainable):
    policy = new_policy(kind, **overrides)
    names = [n for n, _ in policy.named_parameters()]
    if overrides.get("lora_rank"):
        assert sum("lora_" in n for n in names) == 2 * 7 * policy.config["model"]["llm_depth"]
        with torch.no_grad():  # LoRA B starts at zero, which would zero A's gradient
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    with torch.no_grad():  # pi0.5's adaptive norms start with zero weights (openpi), which would
        for n, p in policy.named_parameters():  # zero the time MLP's gradient
            if n.endswith("layernorm.dense.weight") or n.endswith("norm.dense.weight"):
                p.normal_(0, 0.1)
    for n, p in policy.named_parameters():
        assert p.requires_grad == expect_trainable(n), n
    obs, batch = make_obs(), make_batch(policy)
    out = policy.act(obs, generator=torch.Generator().manual_seed(0))
    ev = policy.evaluate(obs, out)
    loss = policy.sft_loss(batch) + ev["logprob"].mean() + ev["entropy"].mean() + ev["value"].mean()
    loss.backward()
    for n, p in policy.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    actor = {id(p) for p in policy.actor_parameters()}
    critic = {id(p) for p in policy.critic_parameters()}
    named = dict(policy.named_parameters())
    assert critic == {id(p) for n, p in named.items() if n.startswith("value_head.")}
    assert actor | critic == {id(p) for p in policy.trainable_parameters()} and not actor & critic


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,overrides", [("openvla", {"lora_rank": 4}), ("pi05", {"train_expert_only": True})])
def test_save_load_round_trip_is_exact(kind, overrides, tmp_path):
    stats = {"action": {k: v for k, v in zip(("q01", "q99"), ([-0.5] * 7, [0.7] * 7))},
             "observation.state": {"q01": [-1.5] * 8, "q99": [1.5] * 8}}
    policy = new_policy(kind, norm_stats=stats, **overrides)
    with torch.no_grad():  # make the adapters / heads non-trivial before saving
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.save(tmp_path / "ckpt", extra={"task": "open_drawer", "stage": 1})
    loaded = policies.load_policy(tmp_path / "ckpt")
    assert type(loaded) is type(policy) and loaded.config == json.loads(json.dumps(policy.config))
    assert loaded.config["extra"] == {"task": "open_drawer", "stage": 1}
    original, restored = policy.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
           [n for n, p in policy.named_parameters() if p.requires_grad]
    obs = make_obs()
    a = policy.act(obs, generator=torch.Generator().manual_seed(2))
    b = loaded.act(obs, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = list(range(len(obs["instruction"])))
    assert torch.equal(policy.act(obs, deterministic=True, x0_seeds=keys)["actions"],
                       loaded.act(obs, deterministic=True, x0_seeds=keys)["actions"])


def test_load_policy_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a policy checkpoint"):
        policies.load_policy(tmp_path)


def test_unknown_words_map_to_unk_and_unknown_options_are_rejected():
    policy = new_policy("openvla")
    ids = policy.tokenizer.encode("pick up the zebra")
    assert ids[-1] == policy.tokenizer.unk_token_id and policy.tokenizer.unk_token_id not in ids[:-1]
    with pytest.raises(ValueError, match="unknown openvla options"):
        policies.make_policy("openvla", num_steps=3)


# ------------------------------------------------------------------------------------------------
# published checkpoints (manifests; no weights)
# ------------------------------------------------------------------------------------------------

def read_manifest(name):
    rows = [line.rstrip("\n").split("\t") for line in (MANIFESTS / name).read_text().splitlines()]
    return {n: tuple(int(d) for d in shape.split("x")) for n, shape, _ in rows}


EXPECTED_UNUSED = {
    # OpenVLA reads the second-to-last block of each ViT, without its final norm or pooling head
    "openvla": lambda n: n.startswith(("vision_backbone.featurizer.blocks.23.", "vision_backbone.featurizer.norm.",
                                       "vision_backbone.fused_featurizer.blocks.26.",
                                       "vision_backbone.fused_featurizer.norm.",
                                       "vision_backbone.fused_featurizer.attn_pool.")),
    # the expert's text head: pi0.5's action path never reads it
    "pi05": lambda n: n == "paligemma_with_expert.gemma_expert.lm_head.weight",
}


@pytest.mark.parametrize("kind,manifest,rows", [("openvla", "openvla-7b.params.tsv", 982),
                                                ("pi05", "pi05-base.params.tsv", 812)])
def test_published_tensors_map_one_to_one_onto_the_full_model(kind, manifest, rows):
    published = read_manifest(manifest)
    assert len(published) == rows
    policy = policies.empty_policy(policies.full_config(kind))
    assert all(p.is_meta for p in policy.parameters())
    ours = {n: tuple(p.shape) for n, p in policy.named_parameters()}
    heads = policies.ADDED_HEADS[kind]
    targets = {}
    for name, shape in published.items():
        target = policies.published_to_ours(kind, name, policy.config["model"])
        if EXPECTED_UNUSED[kind](name):
            assert target is None, name
            continue
        assert target in ours and ours[target] == shape, (name, shape, target, ours.get(target))
        assert target not in targets, (name, targets.get(target))
        targets[target] = name
    assert set(ours) - set(targets) == {n for n in ours if n.startswith(heads)}
    report = policies.match_published(policy, published)
    assert not (report["missing"] or report["unexpected"] or report["shape_mismatch"] or report["duplicate"])
    assert len(report["unused"]) == sum(map(EXPECTED_UNUSED[kind], published))


def test_loader_lists_missing_and_unexpected_tensors():
    published = read_manifest("pi05-base.params.tsv")
    policy = policies.empty_policy(policies.full_config("pi05"))
    tensors = {n: torch.empty(s, device="meta") for n, s in published.items()}
    policies.load_published_weights(policy, tensors)  # the complete set loads
    del tensors["action_out_proj.bias"]
    tensors["paligemma_with_expert.some_new_head.weight"] = torch.empty(3, device="meta")
    tensors["time_mlp_in.weight"] = torch.empty(5, 5, device="meta")
    with pytest.raises(ValueError) as error:
        policies.load_published_weights(policies.empty_policy(policies.full_config("pi05")), tensors)
    message = str(error.value)
    assert "missing (1): action_out_proj.bias" in message
    assert "unexpected (1): paligemma_with_expert.some_new_head.weight" in message
    assert "time_mlp_in.weight (5, 5)" in message


def ours_to_published(kind, name):
    for published, ours in policies.PUBLISHED_NAME_MAP[kind]:
        if name.startswith(ours):
            return published + name[len(ours):]
    raise KeyError(name)


# A "full" configuration shrunk to tiny sizes, so the whole published-loading path runs on a CPU.
SHRUNK_FULL = {
    "openvla": dict(image_size=32, patch_size=16, dino_width=32, dino_depth=1, dino_heads=2, dino_mlp=64,
                    siglip_width=32, siglip_depth=1, siglip_heads=2, siglip_mlp=64, llm_width=64, llm_depth=2,
                    llm_heads=2, llm_mlp=128, vocab_size=320, action_token_end=300, bos_token_id=1,
                    pad_token_id=300, prompt_end_ids=[3], lora_rank=4, dtype="float32", unnorm_key="bridge_orig"),
    "pi05": dict(image_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2, vision_mlp=64,
                 vlm_width=32, vlm_depth=2, vlm_mlp=64, num_heads=2, num_kv_heads=1, head_dim=16, expert_width=16,
                 expert_mlp=32, max_state_dim=12, max_action_dim=10, vocab_size=400, bos_token_id=2,
                 pad_token_id=0, dtype="float32"),
}


def write_word_tokenizer(folder, vocab_size, bos, pad):
    """A transformers tokenizer (word level) saved like a published one, ids unique below vocab_size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = [f"w{i}" for i in range(vocab_size)]
    prompt_words = ["In", ":", "What", "action", "should", "the", "robot", "take", "to", "?", "Out", "open",
                    "drawer", "pick", "up", "red", "cube", "Task", ",", "State", ";", "Action"]
    vocab[10:10 + len(prompt_words)] = prompt_words
    vocab[40:40 + 256] = [str(b) for b in range(256)]  # pi05 state bins are words
    vocab[0], vocab[bos], vocab[pad] = "<unk>", "<s>", "<pad>"
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


@pytest.mark.parametrize("kind", ["openvla", "pi05"])
def test_full_size_path_loads_a_published_layout_folder(kind, tmp_path):
    """make_policy(size="full") on a folder in the published layout: sharded safetensors with the
    published names (plus a tensor the model never reads), the tokenizer, OpenVLA's statistics."""
    shrunk = SHRUNK_FULL[kind]
    plain = dict(shrunk, lora_rank=0) if kind == "openvla" else shrunk  # the published model has no adapters
    source = policies.POLICY_CLASSES[kind](policies.full_config(kind, **plain), None)
    published = {ours_to_published(kind, n): t.detach().clone() for n, t in source.state_dict().items()
                 if not n.startswith(policies.ADDED_HEADS[kind])}
    if kind == "openvla":
        published["vision_backbone.fused_featurizer.attn_pool.latent"] = torch.zeros(1, 1, 32)
        q01, q99 = [-0.1] * 7, [0.2] * 6 + [1.0]
        config = {"norm_stats": {"bridge_orig": {"action": {"q01": q01, "q99": q99, "mask": [True] * 6 + [False]}}}}
        (tmp_path / "config.json").write_text(json.dumps(config))
    else:
        published["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(400, 16)
    names = sorted(published)
    save_file({n: published[n] for n in names[::2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({n: published[n] for n in names[1::2]}, tmp_path / "model-00002-of-00002.safetensors")
    write_word_tokenizer(tmp_path, shrunk["vocab_size"], shrunk["bos_token_id"], shrunk["pad_token_id"])

    policy = policies.make_policy(kind, "full", str(tmp_path), instructions=INSTRUCTIONS, **shrunk)
    # every published tensor arrived (LoRA wraps the LM's linear layers as `.base_layer`)
    state = {n.replace(".base_layer", ""): t for n, t in policy.state_dict().items() if "lora_" not in n}
    for name, tensor in source.state_dict().items():
        if not name.startswith(policies.ADDED_HEADS[kind]):
            assert torch.equal(state[name], tensor), name
    if kind == "openvla":
        assert policy.config["norm_stats"]["action"]["q01"][6] == -1.0  # gripper not normalised
        assert any("lora_A" in n for n in policy.state_dict()) and not any(p.is_meta for p in policy.parameters())
    obs = make_obs(2)
    out = policy.act(obs, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(policy.evaluate(obs, out)["logprob"], out["logprob"], atol=1e-5)
    policy.save(tmp_path / "ckpt")
    loaded = policies.load_policy(tmp_path / "ckpt")
    assert torch.equal(loaded.act(obs, deterministic=True, x0_seeds=[1, 2])["actions"],
                       policy.act(obs, deterministic=True, x0_seeds=[1, 2])["actions"])


def test_full_size_dtypes_bf16_frozen_fp32_trainable():
    # on the meta device: the full pi05 trains its expert (fp32) against a frozen bf16 VLM
    config = policies.full_config("pi05")
    policy = policies.empty_policy(config)
    policy.configure_training()
    policies._cast_for_training(policy)
    for name, p in policy.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
        assert p.requires_grad == (not name.startswith("vlm."))
