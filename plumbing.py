"""Run plumbing the stage scripts share and no ablation edits: errors, torchrun set-up, the run
folder and its resume point, checkpoints (atomic save, prune, latest), RNG capture and restore,
the stop flag for Ctrl-C / SIGTERM, and the metrics log (metrics.jsonl + TensorBoard).

It imports no other project module: a policy is anything with .save(path, extra=...).
"""
from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


def fail(msg: str, code: int = 2):
    """A clear error for the user, not a traceback: message on stderr, exit code 2 (bad input) or 3
    (a run that went wrong, e.g. a non-finite loss)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


# ---- torchrun ------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Read torchrun's variables and start the process group (nccl on GPU, gloo on CPU).
    device: "auto", "cpu" or "cuda"; each process takes the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
    return Dist(rank, world_size, dev)


def finish_distributed(world_size: int):
    if world_size > 1:
        dist.destroy_process_group()


def all_sum(values: list[float], world_size: int) -> list[float]:
    """Sum a list of numbers over all processes (identity for one process)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def average_gradients(params: list[torch.Tensor], world_size: int):
    """Data-parallel training by hand (as CleanRL's multi-GPU PPO): average each gradient over the
    processes. A parameter without a gradient on some process counts as a zero there; one without
    a gradient on every process keeps none (so that weight decay leaves it alone)."""
    if world_size == 1:
        return
    has_grad = all_sum([float(p.grad is not None) for p in params], world_size)
    for p, n in zip(params, has_grad):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size


def broadcast_parameters(module: torch.nn.Module, world_size: int):
    """Every process starts from process 0's weights."""
    if world_size > 1:
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def gather(obj, world_size: int) -> list:
    """[obj of process 0, obj of process 1, ...] on every process."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


# ---- run folder, checkpoints, resume ---------------------------------------------------------------
def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The newest checkpoints/<number>/ that holds a trainer state (the resume point)."""
    found = [p for p in Path(ckpt_root).glob("*") if p.name.isdigit() and (p / "trainer_state.pt").exists()]
    return max(found, key=lambda p: int(p.name)) if found else None


_held_locks = {}  # run folder -> the open file whose flock marks it as in use; released when the process ends


def lock_run_folder(run_dir: Path):
    """Marks run_dir as in use by this process (an flock on run_dir/.lock, released by the kernel when
    the process ends, however it ends), or fails if another process holds it: two processes
    resuming one run would write the same checkpoints. Under torchrun only rank 0 takes it."""
    key = run_dir.resolve()
    if int(os.environ.get("RANK", "0")) != 0 or key in _held_locks:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        fail(f"{run_dir} is in use by {holder}; wait for it to finish, or stop it (Ctrl-C writes a "
             f"checkpoint) and run again with --resume")
    except OSError as e:  # a filesystem without locks: run unguarded rather than not at all
        print(f"warning: cannot lock {run_dir}/.lock ({e}); make sure no other process uses this run")
        return
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    _held_locks[key] = f


def open_run(runs_dir: str, run_name: str, resume: bool) -> tuple[Path, Optional[Path]]:
    """(run folder, checkpoint to resume from or None). A new run must not overwrite an old one;
    --resume of a run stopped before its first checkpoint starts it again from the beginning; a run
    another process is using (lock_run_folder) is refused."""
    run_dir = Path(runs_dir) / run_name
    has_run = (run_dir / "args.json").exists()
    if not resume and has_run:
        fail(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-name")
    resume_from = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and resume_from is None and not has_run:
        fail(f"--resume: no run in {run_dir}")
    lock_run_folder(run_dir)
    if resume and resume_from is None:
        print(f"--resume: {run_dir} stopped before its first checkpoint; starting it from the beginning")
    return run_dir, resume_from


def read_checkpoint_extra(path) -> Optional[dict]:
    """The "extra" block of a checkpoint's config.json (stage, task, ...), or None if it is none."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("extra") or {}
    except (OSError, json.JSONDecodeError):
        return None


def save_checkpoint(policy, ckpt_dir: Path, extra: dict, trainer_state: Optional[dict] = None):
    """Write to a temporary folder, then rename: an interrupted save never leaves a broken
    checkpoint behind."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp, extra=extra)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tmp.rename(ckpt_dir)


def prune_checkpoints(ckpt_root: Path, keep: Path):
    """Delete every checkpoints/<number>/ but `keep` (named ones such as final/ and best/ stay)."""
    for old in Path(ckpt_root).glob("*"):
        if old.name.isdigit() and old != Path(keep):
            shutil.rmtree(old)


# ---- RNG state --------------------------------------------------------------------------------------
def capture_rng(generators: dict, device: torch.device, world_size: int) -> list[dict]:
    """Every process's RNG state (torch's global one, CUDA's, and the named torch / numpy
    generators), gathered: a resumed run, torchrun or not, continues exactly."""
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            **{name: g.get_state() if isinstance(g, torch.Generator) else g.bit_generator.state
               for name, g in generators.items()}}
    return gather(mine, world_size)


def restore_rng(states: list[dict], generators: dict, device: torch.device, rank: int):
    mine = states[rank]
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)
    for name, g in generators.items():
        if isinstance(g, torch.Generator):
            g.set_state(mine[name])
        else:
            g.bit_generator.state = mine[name]


# ---- stop flag ----------------------------------------------------------------------------------------
class StopFlag:
    """Ctrl-C or SIGTERM (a cluster's preemption) sets .requested: the loop finishes the unit of
    work under way, saves it and stops; a second Ctrl-C stops at once (KeyboardInterrupt). Use as a
    context manager: the previous handlers come back on exit."""

    def __init__(self, what: str, verbose: bool = True):
        self.what, self.verbose, self.signal = what, verbose, None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: finishing {self.what}, then saving a checkpoint "
                  f"(Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---- metrics ------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl (one JSON object per log call) and TensorBoard events in the run folder; only
    process 0 writes. A resumed run, resume_at = (index key, value) of its checkpoint, keeps the rows
    up to that point and appends: the rows of iterations lost after the checkpoint are dropped, as
    they are about to be run again (TensorBoard's event files keep them: read metrics.jsonl)."""

    def __init__(self, run_dir: Path, resume_at: Optional[tuple] = None, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        path = Path(run_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is not None and path.exists():
            key, upto = resume_at

            def kept(line: str) -> bool:
                try:
                    return json.loads(line).get(key, upto) <= upto
                except json.JSONDecodeError:  # the last line, torn by a kill in mid-write
                    return False

            rows = [line for line in path.read_text().splitlines() if line.strip() and kept(line)]
            path.write_text("".join(line + "\n" for line in rows))
        self.writer = SummaryWriter(str(run_dir))
        self.file = open(path, "a" if resume_at is not None else "w")

    def log(self, index: dict, values: dict, x: int):
        """index: the row's position (e.g. {"step": 10} or {"iteration": 3, "global_step": 1200});
        x: the TensorBoard x-axis value."""
        if not self.enabled:
            return
        self.file.write(json.dumps({**index, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, x)

    def close(self):
        if self.enabled:
            self.writer.close()
            self.file.close()


def write_args(run_dir: Path, args: dict):
    """args.json: every argument as the run resolved it (presets filled in)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "args.json").write_text(json.dumps(args, indent=2, default=str))


def save_video(frames: list, path: Path, fps: float):
    """An mp4 of uint8 [H, W, 3] frames (imageio / ffmpeg)."""
    import imageio.v2 as imageio
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(str(path), [np.asarray(f) for f in frames], fps=max(float(fps), 1.0), macro_block_size=1)


# ---- memory (bench.py, scripts/full_size_cpu.py) ----------------------------------------------------
def rss_mib() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss():
    """Start the peak-RSS high-water mark (VmHWM) afresh (Linux >= 4.0), so that the imports' own
    transient peak is not mistaken for what is measured after them."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak may include the imports': an upper bound


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
