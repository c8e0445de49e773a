"""Shared fixtures: a small demo collection that several test files train on."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# One torch thread: the env worker processes share the 2 cores, and two threads contending
# with them were several times slower than one.
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """open_drawer demos at 64 px: 4 sim episodes and 3 proxy_real episodes, written by
    collect_demos.py exactly as a user would run it."""
    root = tmp_path_factory.mktemp("data")
    paths = {}
    for domain, n in (("sim", 4), ("proxy_real", 3)):
        out = root / domain
        cmd = [sys.executable, str(ROOT / "collect_demos.py"), "--task", "open_drawer",
               "--domain", domain, "--num-episodes", str(n), "--out", str(out),
               "--image-size", "64", "--num-envs", "1"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        paths[domain] = out
    return paths
