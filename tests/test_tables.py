"""tables.py statistics: the bootstrap CI over training seeds x initial states, the paired
sign-flip test (checked by hand and against scipy.stats.permutation_test), and how summarize,
paired_comparisons and the markdown use them."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit, logit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tables  # noqa: E402


def rec(method, repeat, seed, success, task="open_drawer", variant="in_distribution"):
    return {"method": method, "task": task, "variant": variant, "repeat": repeat, "seed": seed,
            "success": bool(success)}


def records_of(method, m, seeds, **kw):
    """Records of a [repeats x states] matrix m, state j having initial-state seed seeds[j]."""
    return [rec(method, r, seeds[j], m[r, j], **kw) for r in range(m.shape[0]) for j in range(m.shape[1])]


# ---------------------------------------------------------------------------------------------
# bootstrap_ci
# ---------------------------------------------------------------------------------------------
def test_bootstrap_ci_degenerate_cases():
    assert tables.bootstrap_ci(np.ones((3, 50))) == (100.0, 100.0)  # every resample has mean 1
    assert tables.bootstrap_ci(np.zeros((1, 7))) == (0.0, 0.0)
    # one seed: two states, 0 and 1. A resample of 2 states has mean 0, 0.5 or 1 with prob.
    # 1/4, 1/2, 1/4, so the 2.5 and 97.5 percentiles of 20000 resamples are 0 and 100
    assert tables.bootstrap_ci([[0, 1]], n_boot=20000) == (0.0, 100.0)
    m = np.random.default_rng(0).random((3, 20)) < 0.5
    assert tables.bootstrap_ci(m, rng_seed=5) == tables.bootstrap_ci(m, rng_seed=5)  # deterministic


def _coverage(sd_seed, sd_state, seeds=3, states=50, draws=200):
    """Fraction of draws whose 95% CI holds the true mean success, and the mean CI width: success
    ~ Bernoulli(sigmoid(logit(0.4) + u_seed + v_state)), u ~ N(0, sd_seed), v ~ N(0, sd_state)."""
    big = np.random.default_rng(99)  # the true mean over training seeds and initial states
    truth = 100 * expit(logit(0.4) + big.normal(0, sd_seed, (2000, 1)) + big.normal(0, sd_state, (1, 2000))).mean()
    hits, widths = 0, []
    for k in range(draws):
        g = np.random.default_rng(k)
        p = expit(logit(0.4) + g.normal(0, sd_seed, (seeds, 1)) + g.normal(0, sd_state, (1, states)))
        lo, hi = tables.bootstrap_ci(g.random((seeds, states)) < p, n_boot=2000, rng_seed=k)
        hits += lo <= truth <= hi
        widths.append(hi - lo)
    return hits / draws, float(np.mean(widths))


def test_bootstrap_ci_coverage_with_seed_and_state_effects():
    # Initial states of varying difficulty (sd 1.5 on the logit scale) and slightly different
    # training seeds (sd 0.3): the seeds-and-states bootstrap covers ~94.5 % of 200 draws here.
    # Measured on the same draws, wrong resampling schemes fall outside [90, 99] %:
    # states only 84 %, seeds only 60 %, states resampled separately for each seed 87.5 %.
    coverage, _ = _coverage(sd_seed=0.3, sd_state=1.5)
    assert 0.90 <= coverage <= 0.99, coverage


def test_bootstrap_ci_iid_bernoulli_is_conservative():
    # All 3 x 50 episodes iid Bernoulli(0.4): the exact 95% interval is 2 * 1.96 * sqrt(.24 / 150)
    # = 15.7 points wide. Resampling seeds and states both counts the episode noise more than once
    # (Owen 2007, "the pigeonhole bootstrap"), so the CI is about 1.5x wider and covers ~100 %.
    # (A states-only bootstrap would be 1.0x, seeds-only 0.75x, separate states per seed 1.25x.)
    coverage, width = _coverage(sd_seed=0.0, sd_state=0.0)
    exact = 2 * 1.96 * np.sqrt(0.4 * 0.6 / 150) * 100
    assert coverage >= 0.95, coverage
    assert 1.35 <= width / exact <= 1.7, width / exact


def test_bootstrap_ci_width_shrinks_with_states():
    # iid episodes: the CI width goes as 1 / sqrt(seeds x states): 8x the states, 1/sqrt(8) the width
    def mean_width(states):
        ws = []
        for k in range(10):
            m = np.random.default_rng(k).random((3, states)) < 0.4
            lo, hi = tables.bootstrap_ci(m, n_boot=2000, rng_seed=k)
            ws.append(hi - lo)
        return np.mean(ws)
    ratio = mean_width(50) / mean_width(400)
    assert ratio == pytest.approx(np.sqrt(8), rel=0.2), ratio


# ---------------------------------------------------------------------------------------------
# paired_test
# ---------------------------------------------------------------------------------------------
def test_paired_test_exact_p_by_hand():
    # d = +1 on 5 states, 0 on 45: the zeros flip to themselves, and only all-plus and all-minus
    # of the 2^5 sign patterns of the other 5 reach |sum| = 5, so p = 2 / 32 exactly (no Monte Carlo)
    a, b = np.zeros((3, 50)), np.zeros((2, 50))
    a[:, :5] = 1
    res = tables.paired_test(a, b)
    assert res["p_value"] == pytest.approx(2 / 32, abs=1e-12)
    assert res["diff_pct"] == pytest.approx(10.0)  # 100 * 5 / 50
    assert (res["n_states"], res["seeds_a"], res["seeds_b"]) == (50, 3, 2)
    assert "exact" in res["test"] and "sign-flip" in res["test"]
    # d = (+1, +1, +1, -1), sum 2: of the 16 patterns, sums are 4 (1), 2 (4), 0 (6), -2 (4), -4 (1),
    # so |sum| >= 2 (ties count) in 10 of 16
    assert tables.paired_test([[1, 1, 1, 0]], [[0, 0, 0, 1]])["p_value"] == pytest.approx(10 / 16)
    # no difference anywhere: p = 1 and the CI is the point 0 (the states resampled jointly)
    x = np.random.default_rng(1).random((1, 40)) < 0.5
    res = tables.paired_test(x, x)
    assert (res["p_value"], res["diff_pct"], res["ci95"]) == (1.0, 0.0, [0.0, 0.0])
    assert tables.paired_test(np.ones((2, 30)), np.zeros((3, 30)))["ci95"] == [100.0, 100.0]


def _scipy_p(a, b, **kw):
    """The sign-flip p from scipy: permutation_type='samples' swaps the pair (x_i, y_i) of the
    per-state means, i.e. flips the sign of d_i."""
    x, y = np.mean(a, axis=0), np.mean(b, axis=0)
    res = stats.permutation_test((x, y), lambda x, y, axis: np.mean(x - y, axis=axis), vectorized=True,
                                 permutation_type="samples", alternative="two-sided", **kw)
    return res.pvalue


def test_paired_test_matches_scipy_exact():
    # 18 states, a: 4 seeds, b: 2 seeds (means in quarters: exact in binary, ties are real ties)
    g = np.random.default_rng(3)
    a = g.random((4, 18)) < np.linspace(0.2, 0.9, 18)
    b = g.random((2, 18)) < 0.45
    d = a.mean(0) - b.mean(0)
    assert 0 < np.count_nonzero(d) <= 20 and np.count_nonzero(d) < 18  # exact, with some zero d_i
    res = tables.paired_test(a, b)
    assert res["p_value"] == pytest.approx(_scipy_p(a, b, n_resamples=np.inf), abs=1e-9)
    assert res["diff_pct"] == pytest.approx(100 * (a.mean(axis=0) - b.mean(axis=0)).mean(), abs=1e-12)
    assert res["diff_pct"] == pytest.approx(100 * (a.mean() - b.mean()), abs=1e-12)
    lo, hi = res["ci95"]
    assert lo < res["diff_pct"] < hi


def test_paired_test_matches_scipy_monte_carlo():
    # 60 states, ~45 non-zero differences: Monte Carlo on both sides, 1e5 flips each; the two
    # p-values differ by sampling error only (sd ~0.002 at p ~ 0.2)
    g = np.random.default_rng(7)
    a = g.random((3, 60)) < 0.55
    b = g.random((3, 60)) < 0.45
    assert np.count_nonzero(a.mean(0) - b.mean(0)) > 20
    res = tables.paired_test(a, b, n_perm=100000)
    ref = _scipy_p(a, b, n_resamples=100000, rng=np.random.default_rng(0))
    assert 0.02 < ref < 0.5  # a p where one-sided or un-flipped mistakes would show
    assert "Monte Carlo" in res["test"]
    assert res["p_value"] == pytest.approx(ref, abs=0.012)


# ---------------------------------------------------------------------------------------------
# summarize, to_markdown, paired_comparisons
# ---------------------------------------------------------------------------------------------
def test_summarize_adds_the_ci_of_the_seed_by_state_matrix():
    g = np.random.default_rng(11)
    m = (g.random((3, 10)) < 0.6).astype(float)
    seeds = [1_000_000 + 7 * j for j in range(10)]
    records = records_of("rlco", m, seeds)
    records = [records[i] for i in g.permutation(len(records))]  # the order of the log must not matter
    cell = tables.summarize(records)["rows"][0]["cells"]["open_drawer"]
    assert cell["mean"] == pytest.approx(100 * m.mean())  # the old keys as before
    assert cell["std"] == pytest.approx(np.std(100 * m.mean(axis=1)))
    assert cell["ci95"] == list(tables.bootstrap_ci(m)) and cell["seeds"] == [0, 1, 2]
    # the columns are the states, aligned across repeats by seed: with three identical repeats the
    # resampled seeds change nothing and the CI is that of one repeat; rows in log order would not be
    row = (g.random(20) < 0.5).astype(float)
    one = records_of("rlco", row[None], list(range(20)))
    same = [{**one[i], "repeat": k} for k in range(3) for i in g.permutation(20)]  # each in its own order
    ci = tables.summarize(same)["rows"][0]["cells"]["open_drawer"]["ci95"]
    assert ci == list(tables.bootstrap_ci(row[None]))
    assert ci != list(tables.bootstrap_ci(np.stack([row, row[g.permutation(20)], row[g.permutation(20)]])))

    # fewer training seeds: a CI all the same (one seed: over the states only)
    cell = tables.summarize([r for r in records if r["repeat"] < 2])["rows"][0]["cells"]["open_drawer"]
    assert cell["ci95"] == list(tables.bootstrap_ci(m[:2])) and cell["seeds"] == [0, 1]
    cell = tables.summarize([r for r in records if r["repeat"] == 1])["rows"][0]["cells"]["open_drawer"]
    assert cell["ci95"] == list(tables.bootstrap_ci(m[1:2])) and cell["seeds"] == [1]
    # a repeat that misses a state, or a seed twice, or records without seeds: no CI
    cell = tables.summarize(records[:-1])["rows"][0]["cells"]["open_drawer"]
    assert cell["ci95"] is None and "seeds" not in cell
    twice = records + [{**records[0]}]
    assert tables.summarize(twice)["rows"][0]["cells"]["open_drawer"]["ci95"] is None
    unseeded = [{k: v for k, v in r.items() if k != "seed"} for r in records]
    assert tables.summarize(unseeded)["rows"][0]["cells"]["open_drawer"]["ci95"] is None


def test_markdown_shows_the_ci_in_brackets():
    m = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 1]], dtype=float)
    table = tables.summarize(records_of("rlco", m, [5, 6, 7, 8]))
    cell = table["rows"][0]["cells"]["open_drawer"]
    lo, hi = cell["ci95"]
    md = tables.to_markdown(table)
    assert f"| rlco | 66.7 +- 11.8 [{lo:.1f}, {hi:.1f}] |" in md  # 3/4, 2/4, 3/4 -> 66.7 +- 11.8
    assert "95% CI: percentile bootstrap over training seeds and initial states" in md
    # 2 training seeds: the CI is in the JSON, not printed (a bootstrap over 2 seeds says little)
    table = tables.summarize(records_of("rlco", m[:2], [5, 6, 7, 8]))
    md = tables.to_markdown(table)
    assert table["rows"][0]["cells"]["open_drawer"]["ci95"] is not None
    assert "| rlco | 62.5 +- 12.5 |" in md and "95% CI" not in md


def test_paired_comparisons_build_the_matrices_from_the_records():
    g = np.random.default_rng(5)
    seeds = [30, 10, 20, 40, 50, 60]  # columns sorted by seed: 10, 20, 30, 40, 50, 60
    order = np.argsort(seeds)
    ma, mb = g.random((3, 6)) < 0.7, g.random((2, 6)) < 0.3
    records = records_of("rlco", ma, seeds) + records_of("sft", mb, seeds)
    records += records_of("rlco", ma, seeds, task="push_cube") + records_of("sim", mb, seeds, task="push_cube")
    out = tables.paired_comparisons(records, [("rlco", "sft"), ("rlco", "sim")])
    assert [(c["a"], c["b"], c["task"], c["variant"]) for c in out] == [
        ("rlco", "sft", "open_drawer", "in_distribution"), ("rlco", "sim", "push_cube", "in_distribution")]
    expected = tables.paired_test(ma[:, order], mb[:, order])
    assert {k: out[0][k] for k in expected} == expected
    assert tables.paired_comparisons(records, [("rlco", "nobody")]) == []  # absent method: skipped
    assert len(tables.paired_comparisons(records, [("rlco", "sft")], column="open_drawer")) == 1
    assert tables.paired_comparisons(records, [("rlco", "sft")], column="push_cube") == []

    md = tables.comparisons_markdown(out)
    lo, hi = out[0]["ci95"]
    assert (f"| rlco vs sft | open_drawer | in_distribution | {out[0]['diff_pct']:+.1f} [{lo:+.1f}, {hi:+.1f}] "
            f"| {out[0]['p_value']:.3g} | 6 | 3 / 2 |") in md
    assert md.count("sign-flip permutation test") == 1  # the test described once

    # two tests among the rows: each p-value names its own
    mixed = [out[0], {**out[1], "test": "another test"}]
    md = tables.comparisons_markdown(mixed)
    assert f"| {out[0]['p_value']:.3g} (1) |" in md and f"| {out[1]['p_value']:.3g} (2) |" in md
    assert f"Test (1): {out[0]['test']};" in md and "Test (2): another test;" in md


def test_paired_comparisons_reject_mismatched_states():
    m = np.ones((3, 4))
    a = records_of("rlco", m, [1, 2, 3, 4])
    with pytest.raises(tables.EvalError, match="different initial states"):
        tables.paired_comparisons(a + records_of("sft", m, [1, 2, 3, 5]), [("rlco", "sft")])
    with pytest.raises(tables.EvalError, match="sft on open_drawer: repeat 2 covers other initial states"):
        tables.paired_comparisons(a + records_of("sft", m, [1, 2, 3, 4])[:-1], [("rlco", "sft")])
    with pytest.raises(tables.EvalError, match="no column"):
        tables.paired_comparisons(a, [("rlco", "rlco")], column="push")
