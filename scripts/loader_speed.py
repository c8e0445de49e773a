"""How fast demos.LeRobotDataset feeds training: samples/s of the loader alone.

    python scripts/loader_speed.py --root data/open_drawer/sim

Draws uniformly random frames in batches (as Stage I does: every sample an independent draw)
and collates them, with nothing else running. Reports the time to open the dataset and the
samples/s over the batches; video frames are decoded on demand, so the first pass over a large
dataset is the pessimistic (cold cache) number.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demos  # noqa: E402


@dataclass
class Args:
    root: str = "data/open_drawer/sim"
    """LeRobot v3.0 dataset folder to read"""
    batch_size: int = 32
    """samples per batch"""
    num_batches: int = 200
    """batches to time"""
    chunk_size: int = 4
    """action chunk length H of each sample"""
    image_key: str = demos.IMAGE_KEY
    """dataset feature holding the camera image"""
    state_key: str = demos.STATE_KEY
    """dataset feature holding the robot state"""
    action_key: str = demos.ACTION_KEY
    """dataset feature holding the action"""
    no_images: bool = False
    """read states and actions only"""
    cache_mb: int = 2048
    """decoded-frame cache of the loader (MB)"""
    seed: int = 0
    """seed of the sample draws"""


def main(args: Args):
    rng = np.random.default_rng(args.seed)
    if not Path(args.root).is_dir():
        sys.exit(f"error: dataset not found: {args.root}\n  make one with: python collect_demos.py "
                 f"--task open_drawer --domain sim --out {args.root}")
    start = time.perf_counter()
    try:
        ds = demos.LeRobotDataset(args.root, chunk_size=args.chunk_size, image_key=args.image_key,
                                  state_key=args.state_key, action_key=args.action_key,
                                  load_images=not args.no_images, cache_mb=args.cache_mb)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: cannot read {args.root}: {e}")
    open_s = time.perf_counter() - start
    print(f"{args.root}: {ds.num_episodes} episodes, {len(ds)} frames, opened in {open_s:.2f} s")

    start = time.perf_counter()
    for _ in tqdm(range(args.num_batches), desc="batches"):
        idx = rng.integers(0, len(ds), args.batch_size)
        demos.collate([ds[int(i)] for i in idx])
    elapsed = time.perf_counter() - start
    n = args.num_batches * args.batch_size
    image = "no images" if args.no_images else f"images {ds.info['features'][args.image_key]['dtype']}"
    print(f"{n} samples ({image}, chunk {args.chunk_size}) in {elapsed:.2f} s: "
          f"{n / elapsed:.0f} samples/s, {1000 * elapsed / args.num_batches:.1f} ms per batch of {args.batch_size}")


if __name__ == "__main__":
    main(tyro.cli(Args))
