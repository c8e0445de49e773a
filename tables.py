"""The results table of the paper's evaluations: episode records (one JSON line each, {method,
task, variant, repeat, success, seed, ...}) -> success rate per cell, mean +- std over repeats, as
JSON and markdown; and the fsync'd results log those records live in. Used by eval_real.py and
reproduce.py; imports no other project module.

Statistics for a study whose repeats are training seeds, each evaluated on the same initial states
(the records' `seed`): a cell's [training seeds x initial states] success matrix gives a percentile
bootstrap CI of its mean (bootstrap_ci, resampling seeds and states; in the JSON of every such cell,
printed in the markdown from 3 seeds), and two methods are compared on the same states by a paired sign-flip permutation
test on the per-state differences (paired_test, paired_comparisons, comparisons_markdown)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

STD_NAMES = {0: "population std", 1: "sample std"}
MD_CI_MIN_SEEDS = 3  # the markdown prints a cell's CI from this many training seeds (see format_cell)


class EvalError(ValueError):
    """A problem with the user's input: printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------
# Statistics on [training seeds x initial states] success matrices (pure numpy)
# ----------------------------------------------------------------------------------------------
def _as_matrix(x) -> np.ndarray:
    m = np.asarray(x, dtype=float)
    m = m[None, :] if m.ndim == 1 else m  # one training seed
    if m.ndim != 2 or m.size == 0:
        raise EvalError(f"expected a [training seeds x initial states] array, got shape {np.shape(x)}")
    return m


def _boot_means(m: np.ndarray, state_w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Means of m over bootstrap resamples: rows (training seeds) drawn with replacement by rng,
    columns (initial states) by the given counts state_w [n_boot, n_states], the same columns for
    every row. Resampling with replacement = multinomial counts of how often each index is drawn."""
    r, s = m.shape
    seed_w = rng.multinomial(r, np.full(r, 1.0 / r), size=len(state_w))  # [n_boot, r]
    # mean over the resampled r x s grid = sum_ij w_i m_ij v_j / (r s)
    return np.einsum("bs,bs->b", seed_w @ m, state_w) / (r * s)


def _state_weights(s: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot)  # [n_boot, s]


def _percentiles(boot: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 100.0 * (1.0 - level) / 2
    lo, hi = np.percentile(100.0 * boot, [alpha, 100.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(success, n_boot: int = 10000, level: float = 0.95, rng_seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI (in %) of the mean success of a [training seeds x initial states]
    array: training seeds and initial states resampled with replacement, independently of each
    other (the resampled states shared by all resampled seeds, as the seeds share the states).
    With one training seed only the states are resampled. Resampling both ways counts episode
    noise in both (Owen 2007, the pigeonhole bootstrap): with independent episodes the interval is
    about 1.5x the binomial one (tests/test_tables.py measures it), i.e. conservative."""
    m = _as_matrix(success)
    rng = np.random.default_rng(rng_seed)
    return _percentiles(_boot_means(m, _state_weights(m.shape[1], n_boot, rng), rng), level)


def _sign_flip_p(d: np.ndarray, n_perm: int, rng: np.random.Generator, tol: float = 1e-9) -> tuple[float, bool]:
    """Two-sided p of the sign-flip test of sum(d): P(|sum_i s_i d_i| >= |sum_i d_i|) over random
    signs s_i = +-1. Exact over the 2^m sign patterns of the m non-zero d_i when m <= 20, else
    Monte Carlo with (count + 1) / (n_perm + 1). Returns (p, exact)."""
    d = d[d != 0]  # a zero difference flips to itself: it changes no sum
    if d.size == 0:
        return 1.0, True
    observed = abs(d.sum())
    if d.size <= 20:
        sums = np.zeros(1)
        for x in d:  # the sums of all 2^k sign patterns of the first k differences
            sums = np.concatenate([sums + x, sums - x])
        return float(np.mean(np.abs(sums) >= observed - tol)), True
    count, done = 0, 0
    while done < n_perm:  # in chunks: n_perm x m signs at once could be large
        k = min(10000, n_perm - done)
        signs = rng.integers(0, 2, size=(k, d.size), dtype=np.int8) * 2 - 1
        count += int(np.sum(np.abs(signs @ d) >= observed - tol))
        done += k
    return (count + 1) / (n_perm + 1), False


def paired_test(a, b, n_boot: int = 10000, n_perm: int = 100000, rng_seed: int = 0) -> dict:
    """Paired comparison of two methods evaluated on the same initial states (same column order):
    a [seeds_a x states], b [seeds_b x states]. Per state d_i = mean over seeds of a[:, i] - mean
    over seeds of b[:, i]; reports 100 * mean(d), its percentile bootstrap 95% CI (states resampled
    jointly for a and b, the seeds of a and of b independently) and the two-sided sign-flip p."""
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise EvalError(f"paired test needs the same initial states: {a.shape[1]} vs {b.shape[1]} columns")
    d = a.mean(axis=0) - b.mean(axis=0)  # per-state difference of the seed-averaged success
    boot_rng, perm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(rng_seed).spawn(2))
    state_w = _state_weights(d.size, n_boot, boot_rng)
    boot = _boot_means(a, state_w, boot_rng) - _boot_means(b, state_w, boot_rng)
    p, exact = _sign_flip_p(d, n_perm, perm_rng)
    how = "exact over all sign patterns" if exact else f"Monte Carlo, {n_perm} random sign flips"
    return {"test": "two-sided paired sign-flip permutation test on per-initial-state success "
                    f"differences (mean over training seeds), {how}",
            "diff_pct": 100.0 * float(d.mean()), "ci95": list(_percentiles(boot, 0.95)), "p_value": p,
            "n_states": int(d.size), "seeds_a": int(a.shape[0]), "seeds_b": int(b.shape[0])}


# ----------------------------------------------------------------------------------------------
# The table: records -> mean +- std over repeats (pure functions, reused by other scripts)
# ----------------------------------------------------------------------------------------------
def _unique(xs):
    return list(dict.fromkeys(xs))


def _mean_std(values: list[float], ddof: int) -> tuple[float, float | None]:
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=ddof)) if len(values) > max(ddof, 1) else None  # one repeat: no spread
    return mean, std


def _check(records: list[dict]) -> None:
    if not records:
        raise EvalError("no episode records to summarize")
    for i, r in enumerate(records):
        missing = [k for k in ("method", "task", "variant", "repeat", "success") if k not in r]
        if missing:
            raise EvalError(f"record {i} lacks {missing}: {r}")


def _column_of(records: list[dict]):
    """The table's column of a record: its task when there is one variant, its variant when there
    is one task, else "task / variant"."""
    tasks = _unique(r["task"] for r in records)
    variants = _unique(r["variant"] for r in records)

    def col_of(r):
        if len(variants) == 1:
            return r["task"]
        return r["variant"] if len(tasks) == 1 else f"{r['task']} / {r['variant']}"
    return col_of


def _cell_matrix(records: list[dict]) -> tuple[np.ndarray, list[int], list]:
    """One cell's records -> its success matrix [repeats x initial states] (rows sorted by repeat,
    columns by seed), the repeats and the seeds. Raises EvalError unless every record has a seed
    and every repeat covers the same seeds once each."""
    by_rep = defaultdict(dict)  # repeat -> {seed: success}
    for r in records:
        rep, seed = int(r["repeat"]), r.get("seed")
        if seed is None:
            raise EvalError(f"a record of repeat {rep} has no initial-state seed")
        if seed in by_rep[rep]:
            raise EvalError(f"repeat {rep} has initial-state seed {seed} twice")
        by_rep[rep][seed] = float(r["success"])
    reps = sorted(by_rep)
    states = sorted(by_rep[reps[0]])
    for rep in reps[1:]:
        if sorted(by_rep[rep]) != states:
            raise EvalError(f"repeat {rep} covers other initial states than repeat {reps[0]} "
                            f"({len(by_rep[rep])} vs {len(states)} seeds, "
                            f"{len(set(by_rep[rep]) & set(states))} in common)")
    return np.array([[by_rep[rep][s] for s in states] for rep in reps]), reps, states


def _cell_ci(records: list[dict]) -> dict:
    """{"ci95": [lo, hi], "seeds": repeats} of a cell whose repeats (training seeds) share their
    initial states, else {"ci95": None}."""
    try:
        m, reps, _ = _cell_matrix(records)
    except EvalError:
        return {"ci95": None}
    return {"ci95": list(bootstrap_ci(m)), "seeds": reps}


def summarize(records: list[dict], ddof: int = 0, avg: bool = True) -> dict:
    """Success-rate table from episode records (dicts with method, task, variant, repeat, success).

    A cell's success rate is computed per repeat (100 * successes / episodes of that repeat), then
    reported as mean and std over repeats; ddof=0 is the population std (half the spread of two
    repeats), ddof=1 the sample std. Columns are tasks when there is one variant (Table I, with an
    Avg column when there are several tasks), variants when there is one task (Table II, with the
    relative drop from in_distribution), else "task / variant".

    When the records carry their initial state (`seed`) and the repeats of a cell (training seeds)
    all cover the same states, the cell also gets "ci95": the percentile bootstrap 95% CI of
    bootstrap_ci over its [repeats x states] matrix, and "seeds": its repeats; otherwise "ci95" is
    None. The Avg cell has no CI. avg=False leaves the Avg column out (columns that are not tasks,
    e.g. the proxy_real gaps of one task).
    """
    _check(records)
    tasks = _unique(r["task"] for r in records)
    variants = _unique(r["variant"] for r in records)
    col_of = _column_of(records)

    groups = defaultdict(list)  # (method, column, repeat) -> [success, ...]
    cell_records = defaultdict(list)  # (method, column) -> its records, for the CI
    for r in records:
        groups[(r["method"], col_of(r), int(r["repeat"]))].append(bool(r["success"]))
        cell_records[(r["method"], col_of(r))].append(r)
    methods = _unique(r["method"] for r in records)
    columns = _unique(col_of(r) for r in records)
    with_avg = avg and len(tasks) > 1
    with_drop = len(tasks) == 1 and len(variants) > 1 and "in_distribution" in variants

    rows = []
    for m in methods:
        rates = {}  # column -> {repeat: rate}
        cells = {}
        for c in columns:
            reps = sorted(rep for (mm, cc, rep) in groups if mm == m and cc == c)
            if not reps:
                cells[c] = None
                continue
            rates[c] = {rep: 100.0 * float(np.mean(groups[(m, c, rep)])) for rep in reps}
            mean, std = _mean_std(list(rates[c].values()), ddof)
            cells[c] = {"mean": mean, "std": std,
                        "per_repeat": {str(rep): rate for rep, rate in rates[c].items()},
                        "episodes": {str(rep): len(groups[(m, c, rep)]) for rep in reps},
                        **_cell_ci(cell_records[(m, c)])}
        if with_drop and cells.get("in_distribution"):
            base = cells["in_distribution"]["mean"]
            for c in columns:
                if c != "in_distribution" and cells[c]:
                    cells[c]["drop_pct"] = 100.0 * (base - cells[c]["mean"]) / base if base else None
        if with_avg:
            # Avg per repeat over the columns, then mean +- std over the repeats every column has.
            common = set.intersection(*(set(rates.get(c, {})) for c in columns))
            if common and all(cells[c] for c in columns):
                per_rep = {rep: float(np.mean([rates[c][rep] for c in columns])) for rep in sorted(common)}
                mean, std = _mean_std(list(per_rep.values()), ddof)
                cells["Avg"] = {"mean": mean, "std": std,
                                "per_repeat": {str(k): v for k, v in per_rep.items()}}
            else:
                cells["Avg"] = None
        rows.append({"method": m, "cells": cells})
    protocols = defaultdict(list)  # evaluation protocol (policies.Policy.protocol) -> methods using it
    for r in records:
        if r.get("protocol") and r["method"] not in protocols[r["protocol"]]:
            protocols[r["protocol"]].append(r["method"])
    return {"columns": columns + (["Avg"] if with_avg else []), "rows": rows,
            "std": STD_NAMES.get(ddof, f"std ddof={ddof}"), "protocol": dict(protocols),
            "repeats": sorted({int(r["repeat"]) for r in records}),
            "episodes": len(records)}


def _shows_ci(cell: dict | None) -> bool:
    # a bootstrap over 1 or 2 training seeds says little about seed-to-seed variation: the JSON
    # keeps such a CI, the markdown prints it from MD_CI_MIN_SEEDS seeds
    return bool(cell and cell.get("ci95") and len(cell.get("seeds", [])) >= MD_CI_MIN_SEEDS)


def format_cell(cell: dict | None) -> str:
    """A cell's text: "mean +- std", then " [lo, hi]" (its 95% CI, from MD_CI_MIN_SEEDS training
    seeds) and " (change %)" relative to in_distribution where the cell has them."""
    if cell is None:
        return "-"
    text = f"{cell['mean']:.1f}" if cell["std"] is None else f"{cell['mean']:.1f} +- {cell['std']:.1f}"
    if _shows_ci(cell):
        text += f" [{cell['ci95'][0]:.1f}, {cell['ci95'][1]:.1f}]"
    if cell.get("drop_pct") is not None:
        text += f" ({-cell['drop_pct']:+.1f}%)"
    return text


def to_markdown(table: dict) -> str:
    """The table in the paper's layout: rows = methods, columns = tasks or variants; the caption
    states the evaluation protocol(s) of the records (sampler, K, chunk executed) when they say."""
    head = ["method"] + table["columns"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        lines.append("| " + " | ".join([row["method"]] + [format_cell(row["cells"].get(c))
                                                          for c in table["columns"]]) + " |")
    spread = (f"mean +- {table['std']} over {len(table['repeats'])} repeats" if len(table["repeats"]) > 1
              else "one repeat (no spread)")
    note = f"Success rate (%), {spread}; {table['episodes']} episodes in all."
    if any("drop_pct" in (c or {}) for r in table["rows"] for c in r["cells"].values()):
        note += " In brackets: change relative to in_distribution."
    if any(_shows_ci(c) for r in table["rows"] for c in r["cells"].values()):
        note += " 95% CI: percentile bootstrap over training seeds and initial states."
    protocols = table.get("protocol") or {}  # the caption states how the actions were chosen
    captions = [f"Protocol: {p}." if len(protocols) == 1 else f"Protocol of {', '.join(ms)}: {p}."
                for p, ms in protocols.items()]
    return "\n".join(lines + ["", note] + [x for c in captions for x in ("", c)]) + "\n"


def paired_comparisons(records: list[dict], pairs: list[tuple[str, str]], column: str | None = None) -> list[dict]:
    """paired_test of method a against method b for each (a, b) in pairs, in each column of
    summarize's table (or only `column`): rows = repeats, columns = initial states sorted by seed.
    A pair/column where either method has no records is skipped; states that differ between the
    two methods, or between the repeats of one, are an EvalError."""
    _check(records)
    col_of = _column_of(records)
    by_cell = defaultdict(list)  # (method, column) -> records
    for r in records:
        by_cell[(r["method"], col_of(r))].append(r)
    columns = _unique(col_of(r) for r in records)
    if column is not None and column not in columns:
        raise EvalError(f"no column {column!r} in the records; they have {columns}")
    out = []
    for a, b in pairs:
        for c in [column] if column is not None else columns:
            if not by_cell[(a, c)] or not by_cell[(b, c)]:
                continue
            mats = {}
            for m in (a, b):
                try:
                    mats[m] = _cell_matrix(by_cell[(m, c)])
                except EvalError as e:
                    raise EvalError(f"{m} on {c}: {e}") from None
            (ma, _, sa), (mb, _, sb) = mats[a], mats[b]
            if sa != sb:
                raise EvalError(f"{a} vs {b} on {c}: the methods were evaluated on different initial states "
                                f"({len(sa)} and {len(sb)} seeds, {len(set(sa) & set(sb))} in common)")
            first = by_cell[(a, c)][0]
            out.append({"a": a, "b": b, "task": first["task"], "variant": first["variant"],
                        **paired_test(ma, mb)})
    return out


def comparisons_markdown(comparisons: list[dict]) -> str:
    """paired_comparisons as a markdown table: difference a - b in percentage points with its 95%
    CI, the p-value, the number of initial states and of training seeds; the test(s) below."""
    if not comparisons:
        return "No paired comparisons.\n"
    tests = _unique(c["test"] for c in comparisons)
    # where the rows used different tests (exact where the sign patterns are few enough, Monte
    # Carlo elsewhere), each p-value names its test by number
    number = {t: f" ({i + 1})" if len(tests) > 1 else "" for i, t in enumerate(tests)}
    lines = ["| a vs b | task | variant | a - b (points) [95% CI] | p-value | states | seeds a / b |",
             "|" + "---|" * 7]
    for c in comparisons:
        lo, hi = c["ci95"]
        lines.append(f"| {c['a']} vs {c['b']} | {c['task']} | {c['variant']} | {c['diff_pct']:+.1f} "
                     f"[{lo:+.1f}, {hi:+.1f}] | {c['p_value']:.3g}{number[c['test']]} | {c['n_states']} | "
                     f"{c['seeds_a']} / {c['seeds_b']} |")
    return "\n".join(lines + [""] + [f"Test{number[t]}: {t}; CI: percentile bootstrap over training seeds and "
                                      "initial states." for t in tests]) + "\n"


def write_table(table: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # out.name + suffix, not with_suffix: a name such as "alpha0.95" must keep its ".95"
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    json_path.write_text(json.dumps(table, indent=2) + "\n")
    md_path.write_text(to_markdown(table))
    print(f"wrote {json_path} and {md_path}")


# ----------------------------------------------------------------------------------------------
# Results log: one JSON line per episode/trial, fsync'd, so a crash loses nothing
# ----------------------------------------------------------------------------------------------
def load_records(path: Path, repair: bool = False) -> list[dict]:
    """Read a results .jsonl. A torn last line (process killed mid-write) is dropped with a
    warning; with repair=True it is also cut from the file so that appends start on a clean line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good_end = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_end += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
            good_end += len(line) + 1
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # last line without newline: a write that never finished
                print(f"warning: {path}: ignoring an unfinished last line ({len(line)} bytes)")
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_end)
                        os.fsync(f.fileno())
                break
            raise EvalError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}")
    return records


def append_record(path: Path, record: dict) -> None:
    """Append one line and fsync it: durable once this returns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
