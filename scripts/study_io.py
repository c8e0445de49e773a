"""Plumbing shared by the study's driver scripts (learnability.py, rl_gain.py, gap_calibration.py):
where their datasets live, how they run a step, how they write a row of results. Not a script.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dataset_dir(data_dir: str, task: str, domain: str, episodes: int, image_size: int) -> Path:
    """A dataset folder per task, domain, size and resolution (reproduce.py's layout at 64 px):
    Stage I trains on every episode of the folder it is given, so attempts with other demo counts
    must not share one."""
    px = "" if image_size == 64 else f"_{image_size}px"
    return ROOT / data_dir / task / f"{domain}{px}_{episodes}"


def run(cmd: list[str]) -> float:
    """Run one step of the study from the repository root; stop the script if it fails. Returns
    its wall time in seconds."""
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return time.time() - t0


def upsert_row(out: Path, row: dict, key: tuple[str, ...] = ("task", "policy", "attempt")):
    """Write `row` into the JSON list at `out`, replacing the row with the same key fields. The
    file is read just before it is written: runs side by side keep each other's rows."""
    rows = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in rows if tuple(r.get(k) for k in key) != tuple(row.get(k) for k in key)]
    rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
