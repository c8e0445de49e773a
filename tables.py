"""The results table of the paper's evaluations: episode records (one JSON line each, {method,
task, variant, repeat, success, ...}) -> success rate per cell, mean +- std over repeats, as JSON
and markdown; and the fsync'd results log those records live in. Used by eval_real.py and
reproduce.py; imports no other project module."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

STD_NAMES = {0: "population std", 1: "sample std"}


class EvalError(ValueError):
    """A problem with the user's input: printed as one line, no traceback."""


# ----------------------------------------------------------------------------------------------
# The table: records -> mean +- std over repeats (pure functions, reused by other scripts)
# ----------------------------------------------------------------------------------------------
def _unique(xs):
    return list(dict.fromkeys(xs))


def _mean_std(values: list[float], ddof: int) -> tuple[float, float | None]:
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=ddof)) if len(values) > ddof else None
    return mean, std


def summarize(records: list[dict], ddof: int = 0) -> dict:
    """Success-rate table from episode records (dicts with method, task, variant, repeat, success).

    A cell's success rate is computed per repeat (100 * successes / episodes of that repeat), then
    reported as mean and std over repeats; ddof=0 is the population std (half the spread of two
    repeats), ddof=1 the sample std. Columns are tasks when there is one variant (Table I, with an
    Avg column when there are several tasks), variants when there is one task (Table II, with the
    relative drop from in_distribution), else "task / variant".
    """
    if not records:
        raise EvalError("no episode records to summarize")
    for i, r in enumerate(records):
        missing = [k for k in ("method", "task", "variant", "repeat", "success") if k not in r]
        if missing:
            raise EvalError(f"record {i} lacks {missing}: {r}")
    tasks = _unique(r["task"] for r in records)
    variants = _unique(r["variant"] for r in records)

    def col_of(r):
        if len(variants) == 1:
            return r["task"]
        return r["variant"] if len(tasks) == 1 else f"{r['task']} / {r['variant']}"

    groups = defaultdict(list)  # (method, column, repeat) -> [success, ...]
    for r in records:
        groups[(r["method"], col_of(r), int(r["repeat"]))].append(bool(r["success"]))
    methods = _unique(r["method"] for r in records)
    columns = _unique(col_of(r) for r in records)
    with_avg = len(tasks) > 1
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
                        "episodes": {str(rep): len(groups[(m, c, rep)]) for rep in reps}}
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


def format_cell(cell: dict | None) -> str:
    if cell is None:
        return "-"
    text = f"{cell['mean']:.1f}" if cell["std"] is None else f"{cell['mean']:.1f} +- {cell['std']:.1f}"
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
    note = (f"Success rate (%), mean +- {table['std']} over {len(table['repeats'])} repeat(s); "
            f"{table['episodes']} episodes in all.")
    if any("drop_pct" in (c or {}) for r in table["rows"] for c in r["cells"].values()):
        note += " In brackets: change relative to in_distribution."
    protocols = table.get("protocol") or {}  # the caption states how the actions were chosen
    captions = [f"Protocol: {p}." if len(protocols) == 1 else f"Protocol of {', '.join(ms)}: {p}."
                for p, ms in protocols.items()]
    return "\n".join(lines + ["", note] + [x for c in captions for x in ("", c)]) + "\n"


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
