"""Demonstration datasets: LeRobotDataset v3.0 reading and writing, action chunks,
normalization statistics, and the alpha mixer of Stage I (Eq. 4).

A LeRobot v3.0 dataset is a folder (what `lerobot-record` writes):

    meta/info.json                          fps, features (dtype, shape, names), path templates
    meta/stats.json                         mean, std, min, max, q01..q99, count per feature
    meta/tasks.parquet                      task strings; their row index is `task_index`
    meta/episodes/chunk-000/file-000.parquet  one row per episode: length, where its rows and
                                            video frames are (dataset_from_index, ...), stats
    data/chunk-CCC/file-FFF.parquet         one row per frame: state, action, indices, timestamp
    videos/<image key>/chunk-CCC/file-FFF.mp4  camera frames (one folder per camera); an episode
                                            is the time span [from_timestamp, to_timestamp) of one file

The `lerobot` package itself is not used (it needs Python >= 3.12 and an older torch): the
files are read and written with pyarrow and PyAV directly. Datasets written here have the files,
columns and types of a `lerobot-record` dataset, so they are meant to read in LeRobot too.

Writing is crash-safe: every file is written to a temporary name and renamed into place, each
episode's video is its own mp4, and the episodes table (the list of committed episodes) is
written last. A killed writer leaves a dataset that reads; a new writer on the same folder
continues after its last committed episode.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

IMAGE_KEY = "observation.images.front"
WRIST_IMAGE_KEY = "observation.images.wrist"  # a second camera, on the robot's hand
STATE_KEY = "observation.state"
ACTION_KEY = "action"
# The project's conventions (README, docs/interfaces.md): tcp position, tcp quaternion (wxyz), gripper opening / ee delta pose
STATE_NAMES = ["tcp_x", "tcp_y", "tcp_z", "tcp_qw", "tcp_qx", "tcp_qy", "tcp_qz", "gripper"]
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder, as LeRobot
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}  # LeRobot's set


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def compute_stats(x: np.ndarray) -> dict:
    """mean, std, min, max and quantiles q01, q10, q50, q90, q99 over the frames of x [N, D]
    (or [N]), per dimension. std is the population std (ddof=0) and quantiles are numpy's
    linear ones, as LeRobot."""
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(len(x), -1)
    if len(x) == 0:
        raise ValueError("compute_stats needs at least one frame")
    stats = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0)}
    quantiles = np.quantile(x, list(QUANTILES.values()), axis=0)  # one partial sort for all
    stats.update(zip(QUANTILES, quantiles))
    return {k: v.tolist() for k, v in stats.items()}


def image_stats(images: np.ndarray) -> dict:
    """Per-channel stats of uint8 images [T, H, W, 3] scaled to [0, 1], in LeRobot's layout
    (each value a [3][1][1] list). Exact, from a 256-bin histogram per channel: the quantiles
    interpolate between sorted pixel values exactly as np.quantile does."""
    values = np.arange(256, dtype=np.float64)
    out = {name: [] for name in ("mean", "std", "min", "max", *QUANTILES)}
    for c in range(images.shape[-1]):
        hist = np.bincount(images[..., c].reshape(-1), minlength=256).astype(np.float64)
        n = hist.sum()
        mean = (hist * values).sum() / n
        cum = np.cumsum(hist)                      # cum[v] = number of pixels <= v

        def sorted_value(k):                       # the k-th smallest pixel (0-based)
            return float(np.searchsorted(cum, k, side="right"))

        present = np.nonzero(hist)[0]
        per_channel = {"mean": mean, "std": np.sqrt((hist * (values - mean) ** 2).sum() / n),
                       "min": present[0], "max": present[-1]}
        for name, q in QUANTILES.items():  # linear interpolation between sorted values
            pos = q * (n - 1)
            lo, hi = np.floor(pos), min(np.floor(pos) + 1, n - 1)
            per_channel[name] = sorted_value(lo) + (pos - lo) * (sorted_value(hi) - sorted_value(lo))
        for name, v in per_channel.items():
            out[name].append([[float(v) / 255.0]])
    return out


def merge_episode_stats(episode_stats: list[dict], counts: list[int]) -> dict:
    """Dataset stats from per-episode stats, as LeRobot aggregates image stats: exact pooled
    mean/std/min/max; the quantiles are the count-weighted mean of the episodes' quantiles (an
    approximation)."""
    w = np.asarray(counts, dtype=np.float64)[:, None, None, None] / sum(counts)
    mean_e = np.asarray([s["mean"] for s in episode_stats])
    std_e = np.asarray([s["std"] for s in episode_stats])
    mean = (w * mean_e).sum(0)
    var = (w * (std_e ** 2 + (mean_e - mean) ** 2)).sum(0)
    out = {"mean": mean, "std": np.sqrt(var),
           "min": np.min([s["min"] for s in episode_stats], axis=0),
           "max": np.max([s["max"] for s in episode_stats], axis=0)}
    for name in QUANTILES:
        out[name] = (w * np.asarray([s[name] for s in episode_stats])).sum(0)
    return {k: np.asarray(v).tolist() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------------
def _replace_atomically(path: Path, write):
    """write(tmp_path), then rename over path: a kill leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj):
    """Write a JSON file atomically (see _replace_atomically)."""
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=4)))


def _write_parquet(path: Path, table: pa.Table):
    _replace_atomically(path, lambda tmp: pq.write_table(table, tmp))


def _list_column(values: np.ndarray) -> pa.Array:
    """[N, D] float32 -> fixed_size_list<float>[D], LeRobot's type for vector features."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _column_to_numpy(column) -> np.ndarray:
    """A parquet column (scalar, list or fixed-size list) -> numpy [N, D]."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type) \
            or pa.types.is_large_list(arr.type):
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        if n and len(flat) % n:
            raise ValueError(f"list column of type {arr.type} has rows of different lengths")
        return flat.reshape(n, -1 if n else 0)
    return arr.to_numpy(zero_copy_only=False).reshape(n, 1)


def _tasks_table(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet as LeRobot writes it: a pandas frame whose index is the task string."""
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                            "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                     "numpy_type": "int64", "metadata": None},
                    {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
                     "numpy_type": "object", "metadata": None}],
        "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3"}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "__index_level_0__": pa.array(tasks, pa.string())})
    return table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


def read_tasks(root: Path) -> list[str]:
    """Task strings by task_index from meta/tasks.parquet (task string as the pandas index,
    as LeRobot writes it, or as a `task` column)."""
    table = pq.read_table(Path(root) / "meta/tasks.parquet")
    names = table.column_names
    meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    index_cols = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
    task_col = "task" if "task" in names else (index_cols[0] if index_cols else None)
    if task_col is None or task_col not in names or "task_index" not in names:
        raise ValueError(f"{root}/meta/tasks.parquet has no task strings (columns {names})")
    tasks = dict(zip(table["task_index"].to_pylist(), table[task_col].to_pylist()))
    return [tasks.get(i, "") for i in range(max(tasks) + 1)] if tasks else []


def read_episodes(root: Path) -> pa.Table:
    """All rows of meta/episodes/*/*.parquet (without the per-episode stats columns), sorted
    by episode_index."""
    files = sorted((Path(root) / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root} has no meta/episodes/chunk-*/file-*.parquet")
    tables = []
    for f in files:
        names = pq.read_schema(f).names
        tables.append(pq.read_table(f, columns=[c for c in names if not c.startswith("stats/")]))
    table = pa.concat_tables(tables, promote_options="default")
    return table.sort_by("episode_index")


def _encode_video(path: Path, images: np.ndarray, fps: float):
    """h264 mp4, one frame every 1/fps s from t = 0. Keyframe every 5 frames and no B-frames,
    so reading one random frame decodes at most 5."""
    def write(tmp):
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = images.shape[2], images.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18", "g": "5", "bf": "0", "preset": "veryfast"}
            for image in images:
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    _replace_atomically(path, write)


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
class LeRobotWriter:
    """Writes (or extends) a LeRobot v3.0 dataset folder, one episode at a time.

    camera_keys names the cameras, one image feature each (e.g. (IMAGE_KEY, WRIST_IMAGE_KEY)),
    all of image_shape. use_videos=True stores each camera as h264 mp4 (one file per episode and
    camera, LeRobot `video` feature); False stores PNG bytes in the data parquet (`image`
    feature). Data parquet files roll over at data_file_mb. resume=True continues a dataset this
    writer made with the same settings; a folder holding anything else is refused.
    """

    def __init__(self, root, fps, image_shape=(128, 128, 3), state_dim=8, action_dim=7,
                 use_videos=True, robot_type="panda", resume=True, data_file_mb=5.0,
                 camera_keys=(IMAGE_KEY,)):
        self.root = Path(root)
        if isinstance(camera_keys, str):
            camera_keys = (camera_keys,)
        self.camera_keys = tuple(camera_keys)
        taken = {ACTION_KEY, STATE_KEY, "next.success", *INDEX_FEATURES}
        if not self.camera_keys or len(set(self.camera_keys)) != len(self.camera_keys) or any(
                not isinstance(k, str) or not k or "/" in k or k in taken for k in self.camera_keys):
            raise ValueError(f"camera_keys must be distinct non-empty feature names without '/', "
                             f"other than {sorted(taken)}; got {camera_keys!r}")
        self.fps = fps
        self.image_shape = tuple(int(s) for s in image_shape)
        self.state_dim, self.action_dim = int(state_dim), int(action_dim)
        self.use_videos = use_videos
        self.robot_type = robot_type
        self.data_file_bytes = int(data_file_mb * 1e6)
        h, w, c = self.image_shape
        if c != 3:
            raise ValueError(f"image_shape must be (H, W, 3), got {image_shape}")
        if use_videos and (h % 2 or w % 2):
            raise ValueError(f"h264 video needs an even image height and width, got {h}x{w}; "
                             "use even sizes or store images in parquet (use_videos=False)")
        self.features = self._features()

        self.tasks: list[str] = []
        self.episodes: list[dict] = []        # rows of meta/episodes, committed so far
        self._states, self._actions = [], []  # per episode, for the dataset stats
        self._data_pieces: list[pa.Table] = []  # rows of the data file being filled
        self._data_file = (0, 0)               # (chunk_index, file_index) of that file

        existing = [p for p in self.root.iterdir()] if self.root.is_dir() else []
        if existing:
            if not (self.root / "meta/info.json").is_file():
                raise FileExistsError(
                    f"{self.root} is not empty and is not a LeRobot dataset "
                    f"(it holds {', '.join(sorted(p.name for p in existing)[:5])}); "
                    "write into a new or empty folder")
            if not resume:
                raise FileExistsError(f"{self.root} already holds a dataset; choose a new folder "
                                      "or resume it")
            self._load_existing()
        else:
            self._write_metadata()

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return self.episodes[-1]["dataset_to_index"] if self.episodes else 0

    def _features(self) -> dict:
        h, w, c = self.image_shape
        names = lambda n, default: default if n == len(default) else [f"{i}" for i in range(n)]
        image = {"dtype": "video" if self.use_videos else "image", "shape": [h, w, c],
                 "names": ["height", "width", "channels"]}
        if self.use_videos:
            image["info"] = {"video.height": h, "video.width": w, "video.codec": "h264",
                             "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                             "video.fps": self.fps, "video.channels": c, "has_audio": False}
        scalar = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}
        return {
            ACTION_KEY: {"dtype": "float32", "shape": [self.action_dim],
                         "names": names(self.action_dim, ACTION_NAMES)},
            STATE_KEY: {"dtype": "float32", "shape": [self.state_dim],
                        "names": names(self.state_dim, STATE_NAMES)},
            **{key: image for key in self.camera_keys},  # one image feature per camera
            "timestamp": scalar("float32"), "frame_index": scalar("int64"),
            "episode_index": scalar("int64"), "index": scalar("int64"),
            "task_index": scalar("int64"), "next.success": scalar("bool"),
        }

    # -- resuming -----------------------------------------------------------------------------
    def _load_existing(self):
        info = json.loads((self.root / "meta/info.json").read_text())
        if info.get("codebase_version") != CODEBASE_VERSION or info.get("features") != \
                json.loads(json.dumps(self.features)) or info.get("fps") != self.fps:
            theirs = {k: (v.get("dtype"), v.get("shape")) for k, v in info.get("features", {}).items()}
            ours = {k: (v["dtype"], v["shape"]) for k, v in self.features.items()}
            raise ValueError(
                f"{self.root} holds a dataset with other settings (fps {info.get('fps')}, "
                f"features {theirs}) than this writer (fps {self.fps}, features {ours}); "
                "write into a new folder or use the same settings")
        self.tasks = read_tasks(self.root) if (self.root / "meta/tasks.parquet").exists() else []
        episodes_file = self.root / EPISODES_PATH
        if episodes_file.exists():
            self.episodes = pq.read_table(episodes_file).to_pylist()
        # Data rows written after the last committed episode (a kill mid-episode) are dropped.
        total = self.num_frames
        files = sorted({(e["data/chunk_index"], e["data/file_index"]) for e in self.episodes})
        for chunk, file in files:
            table = pq.read_table(self.root / DATA_PATH.format(chunk_index=chunk, file_index=file),
                                  columns=[STATE_KEY, ACTION_KEY, "index"])
            table = table.filter(pa.compute.less(table["index"], total))
            self._states.append(_column_to_numpy(table[STATE_KEY]).astype(np.float32))
            self._actions.append(_column_to_numpy(table[ACTION_KEY]).astype(np.float32))
        if files:  # the last data file is the one being filled
            self._data_file = files[-1]
            table = pq.read_table(self.root / DATA_PATH.format(chunk_index=files[-1][0], file_index=files[-1][1]))
            kept = table.filter(pa.compute.less(table["index"], total))
            self._data_pieces = [kept]
            if kept.num_rows < table.num_rows:  # rewritten only when rows were dropped
                self._write_data_file()
        self._write_metadata()
        for tmp in self.root.rglob(".*.tmp"):  # leftovers of a killed write
            tmp.unlink()

    # -- writing ------------------------------------------------------------------------------
    def add_episode(self, images, states, actions, task: str, success=None, seed=None):
        """Append one episode: images uint8 [T, H, W, 3] (a writer with one camera) or a dict
        {camera key: uint8 [T, H, W, 3]} with every camera of the writer, states [T, S],
        actions [T, A], task string, success bool [T] (next.success, optional), seed
        (provenance, optional). The episode is on disk, and the folder a valid dataset, when
        this returns."""
        if not isinstance(images, dict):
            if len(self.camera_keys) != 1:
                raise ValueError(f"this writer has cameras {list(self.camera_keys)}: pass images as a "
                                 "dict {camera key: uint8 [T, H, W, 3]}")
            images = {self.camera_keys[0]: images}
        missing = [k for k in self.camera_keys if k not in images]
        extra = [k for k in images if k not in self.camera_keys]
        if missing or extra:
            raise ValueError(f"images must hold exactly the cameras {list(self.camera_keys)}; "
                             f"missing {missing}, extra {extra}")
        images = {key: np.asarray(images[key]) for key in self.camera_keys}
        states = np.asarray(states, dtype=np.float32)
        actions = np.asarray(actions, dtype=np.float32)
        t = len(states)
        if t == 0:
            raise ValueError("an episode needs at least one frame")
        for key, frames in images.items():
            if frames.shape != (t, *self.image_shape) or frames.dtype != np.uint8:
                raise ValueError(f"images must be uint8 [{t}, {', '.join(map(str, self.image_shape))}], "
                                 f"got {frames.dtype} {list(frames.shape)}"
                                 + (f" for '{key}'" if len(images) > 1 else ""))
        if states.shape != (t, self.state_dim) or actions.shape != (t, self.action_dim):
            raise ValueError(f"states must be [{t}, {self.state_dim}] and actions [{t}, "
                             f"{self.action_dim}], got {list(states.shape)} and {list(actions.shape)}")
        if not (np.isfinite(states).all() and np.isfinite(actions).all()):
            raise ValueError("states and actions must be finite")
        if not isinstance(task, str) or not task:
            raise ValueError(f"task must be a non-empty string, got {task!r}")
        success = [None] * t if success is None else [bool(s) for s in np.asarray(success).reshape(t)]

        episode_index, start = self.num_episodes, self.num_frames
        if task not in self.tasks:
            self.tasks.append(task)
            _write_parquet(self.root / "meta/tasks.parquet", _tasks_table(self.tasks))
        task_index = self.tasks.index(task)

        # one data table for this episode's frames (LeRobot column layout)
        columns = {
            ACTION_KEY: _list_column(actions),
            STATE_KEY: _list_column(states),
            "timestamp": pa.array((np.arange(t) / self.fps).astype(np.float32)),
            "frame_index": pa.array(np.arange(t, dtype=np.int64)),
            "episode_index": pa.array(np.full(t, episode_index, dtype=np.int64)),
            "index": pa.array(np.arange(start, start + t, dtype=np.int64)),
            "task_index": pa.array(np.full(t, task_index, dtype=np.int64)),
            "next.success": pa.array(success, pa.bool_()),
        }
        if not self.use_videos:
            for key, frames in images.items():
                columns[key] = pa.StructArray.from_arrays(
                    [pa.array([_encode_png(im) for im in frames], pa.binary()),
                     pa.array([None] * t, pa.string())], names=["bytes", "path"])
        table = pa.table(columns)

        # roll over to a new data file once the current one is full
        if self._data_pieces and sum(p.nbytes for p in self._data_pieces) + table.nbytes > self.data_file_bytes:
            chunk, file = self._data_file
            self._data_file = (chunk + 1, 0) if file + 1 == CHUNKS_SIZE else (chunk, file + 1)
            self._data_pieces = []
        self._data_pieces.append(table)

        row = {"episode_index": episode_index, "tasks": [task], "length": t,
               "data/chunk_index": self._data_file[0], "data/file_index": self._data_file[1],
               "dataset_from_index": start, "dataset_to_index": start + t}
        if self.use_videos:  # one mp4 per episode and camera: a kill never truncates a file others need
            chunk, file = divmod(episode_index, CHUNKS_SIZE)
            for key, frames in images.items():
                _encode_video(self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk,
                                                            file_index=file), frames, self.fps)
                row.update({f"videos/{key}/chunk_index": chunk,
                            f"videos/{key}/file_index": file,
                            f"videos/{key}/from_timestamp": 0.0,
                            f"videos/{key}/to_timestamp": t / self.fps})
        self._write_data_file()

        # per-episode stats, in the episodes table as LeRobot keeps them
        per_episode = {ACTION_KEY: compute_stats(actions), STATE_KEY: compute_stats(states),
                       **{key: image_stats(frames) for key, frames in images.items()}}
        for key in INDEX_FEATURES:
            per_episode[key] = compute_stats(columns[key].to_numpy())
        for key, stats in per_episode.items():
            for name, value in stats.items():
                row[f"stats/{key}/{name}"] = value
            row[f"stats/{key}/count"] = [t]
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0, "seed": seed})

        # commit: the episodes table is what readers trust; info and stats follow it
        self._states.append(states)
        self._actions.append(actions)
        self.episodes.append(row)
        self._write_metadata()

    def _write_data_file(self):
        chunk, file = self._data_file
        table = pa.concat_tables(self._data_pieces)
        hf = {"info": {"features": {k: self._hf_feature(k) for k in table.column_names}}}
        table = table.replace_schema_metadata({"huggingface": json.dumps(hf)})
        _write_parquet(self.root / DATA_PATH.format(chunk_index=chunk, file_index=file), table)

    def _hf_feature(self, key):
        """The HuggingFace `datasets` feature of a data column (read by LeRobot)."""
        if key in self.camera_keys:
            return {"_type": "Image"}
        if key in (ACTION_KEY, STATE_KEY):
            return {"feature": {"dtype": "float32", "_type": "Value"},
                    "length": self.features[key]["shape"][0], "_type": "List"}
        return {"dtype": self.features[key]["dtype"], "_type": "Value"}

    def _write_metadata(self):
        """episodes table (the commit), then info.json and stats.json derived from it."""
        if self.episodes:
            table = pa.Table.from_pylist(self.episodes)
            if table.schema.field("seed").type == pa.null():
                table = table.set_column(table.column_names.index("seed"), "seed",
                                         pa.array([None] * len(table), pa.int64()))
            _write_parquet(self.root / EPISODES_PATH, table)
        n_frames, n_eps = self.num_frames, self.num_episodes
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
            "total_episodes": n_eps, "total_frames": n_frames, "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": self.data_file_bytes / 1e6,
            "video_files_size_in_mb": 500, "fps": self.fps, "splits": {"train": f"0:{n_eps}"},
            "data_path": DATA_PATH, "video_path": VIDEO_PATH if self.use_videos else None,
            "features": self.features,
        }
        write_json(self.root / "meta/info.json", info)
        if not self.episodes:
            return
        lengths = [e["length"] for e in self.episodes]
        columns = {ACTION_KEY: np.concatenate(self._actions), STATE_KEY: np.concatenate(self._states),
                   "timestamp": np.concatenate([(np.arange(n) / self.fps).astype(np.float32) for n in lengths]),
                   "frame_index": np.concatenate([np.arange(n) for n in lengths]),
                   "episode_index": np.repeat(np.arange(n_eps), lengths),
                   "index": np.arange(n_frames),
                   "task_index": np.repeat([self.tasks.index(e["tasks"][0]) for e in self.episodes], lengths)}
        stats = {}
        for key, values in columns.items():
            stats[key] = {**compute_stats(values), "count": [n_frames]}
        for key in self.camera_keys:
            per_episode = [{name: e[f"stats/{key}/{name}"] for name in ("mean", "std", "min", "max", *QUANTILES)}
                           for e in self.episodes]
            stats[key] = {**merge_episode_stats(per_episode, lengths), "count": [n_frames]}
        write_json(self.root / "meta/stats.json", stats)

    def close(self):
        """Nothing is buffered (every episode is on disk when add_episode returns)."""
        self._data_pieces = []


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def decode_video_frames(path, start_s: float, end_s: float, tolerance_s: float):
    """Frames of an mp4 with start_s - tol <= time <= end_s + tol, as (times [K], uint8
    [K, H, W, 3]). Seeks to the keyframe before start_s, so the cost is the frames between."""
    times, frames = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        container.seek(max(0, int((start_s - tolerance_s) / stream.time_base)), stream=stream,
                       backward=True)
        for frame in container.decode(stream):
            if frame.time is None or frame.time < start_s - tolerance_s:
                continue
            if frame.time > end_s + tolerance_s:
                break
            times.append(frame.time)
            frames.append(frame.to_ndarray(format="rgb24"))
    return np.asarray(times), (np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8))


class LeRobotDataset(torch.utils.data.Dataset):
    """Training samples from any LeRobot v3.0 folder: one sample per frame, holding

        image  uint8 [H, W, 3]   (not present when load_images=False)
        wrist_image  uint8 [H, W, 3]   the second camera (only when wrist_image_key is given
                                       and load_images=True)
        state  float32 [S]
        instruction  str         (the episode's task)
        actions  float32 [chunk_size, A]   this and the next chunk_size - 1 actions; past the
                                           episode end padded with its last action
        action_mask  bool [chunk_size]     False on the padding

    image_key/wrist_image_key/state_key/action_key map a foreign dataset's features onto ours.
    episodes (list of episode indices) keeps a subset; stats then describe that subset.

    Video frames are decoded on demand and kept in an LRU cache of cache_mb, shared out among
    the cameras. When all decoded frames fit in it, a sample's whole episode is decoded at once
    (each episode is decoded once in all); otherwise only the sample's frame is (a seek, then at
    most a keyframe interval).
    """

    def __init__(self, root, chunk_size=1, image_key=IMAGE_KEY, state_key=STATE_KEY,
                 action_key=ACTION_KEY, load_images=True, episodes=None, cache_mb=2048,
                 wrist_image_key=None):
        self.root = Path(root)
        self.chunk_size = int(chunk_size)
        self.image_key, self.state_key, self.action_key = image_key, state_key, action_key
        self.wrist_image_key = wrist_image_key
        self.load_images = load_images
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        info_path = self.root / "meta/info.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a LeRobot dataset: {info_path} is missing")
        self.info = json.loads(info_path.read_text())
        version = str(self.info.get("codebase_version", "?"))
        if not version.startswith("v3"):
            raise ValueError(f"{self.root} is a LeRobot {version} dataset; this loader reads v3.0 "
                             "(convert it with LeRobot's convert_dataset_v21_to_v30)")
        features = self.info.get("features", {})
        self.fps = float(self.info["fps"])

        def need(key, option, kinds, what):
            if key not in features or features[key].get("dtype") not in kinds:
                fitting = [k for k, v in features.items() if v.get("dtype") in kinds]
                raise ValueError(f"'{key}' is not {what} feature of {self.root}; "
                                 f"it has {fitting} (choose one with {option})")
        numeric = {"float32", "float64", "int64", "int32"}
        need(state_key, "--state-key", numeric, "a numeric")
        need(action_key, "--action-key", numeric, "a numeric")
        # sample field -> feature key of each camera read
        camera_keys = {"image": image_key, "wrist_image": wrist_image_key} if load_images else {}
        camera_keys = {field: key for field, key in camera_keys.items() if key is not None}
        for field, key in camera_keys.items():
            need(key, "--image-key" if field == "image" else "--wrist-image-key",
                 {"video", "image"}, "an image or video")

        self.tasks = read_tasks(self.root)
        eps = read_episodes(self.root)
        all_episodes = eps["episode_index"].to_pylist()
        if episodes is not None:
            missing = sorted(set(episodes) - set(all_episodes))
            if missing:
                raise ValueError(f"episodes {missing[:10]} are not in {self.root} "
                                 f"(it has {len(all_episodes)}: {all_episodes[0]}..{all_episodes[-1]})")
            keep = pa.array(sorted(set(int(e) for e in episodes)), pa.int64())
            eps = eps.filter(pa.compute.is_in(eps["episode_index"], value_set=keep))
        self.episode_indices = eps["episode_index"].to_numpy()
        self.num_episodes = len(self.episode_indices)

        if self.num_episodes == 0:
            raise ValueError(f"{self.root} holds no episodes" + (f" among {list(episodes)}" if episodes is not None else ""))

        # frames of the kept episodes, in episode order
        png_keys = [key for key in camera_keys.values() if features[key]["dtype"] == "image"]
        columns = [state_key, action_key, "episode_index", "index", "task_index", "timestamp", *png_keys]
        columns = list(dict.fromkeys(columns))  # a feature may serve twice (e.g. state = action)
        data_path = self.info.get("data_path", DATA_PATH)
        pieces = []
        for chunk, file in sorted(set(zip(eps["data/chunk_index"].to_pylist(), eps["data/file_index"].to_pylist()))):
            path = self.root / data_path.format(chunk_index=chunk, file_index=file)
            if not path.is_file():
                raise FileNotFoundError(f"data file missing: {path}")
            pieces.append(pq.read_table(path, columns=columns))
        data = pa.concat_tables(pieces).sort_by("index")
        index, episode_of_row = data["index"].to_numpy(), data["episode_index"].to_numpy()
        rows = []
        for e, lo, hi in zip(self.episode_indices, eps["dataset_from_index"].to_numpy(),
                             eps["dataset_to_index"].to_numpy()):
            r = np.arange(np.searchsorted(index, lo), np.searchsorted(index, hi))
            if len(r) != hi - lo or (episode_of_row[r] != e).any():
                raise ValueError(f"{self.root}: the data rows of episode {e} do not match "
                                 f"meta/episodes (index {lo}..{hi})")
            rows.append(r)
        lengths = [len(r) for r in rows]
        data = data.take(pa.array(np.concatenate(rows)))
        self.episode_end = np.repeat(np.cumsum(lengths), lengths)  # per frame: its episode's end
        self.episode_length = np.repeat(lengths, lengths)             # per frame: its episode's length
        self.num_frames = len(data)
        self.states = _column_to_numpy(data[state_key]).astype(np.float32)
        self.actions = _column_to_numpy(data[action_key]).astype(np.float32)
        self.task_index = data["task_index"].to_numpy()
        self.timestamps = data["timestamp"].to_numpy().astype(np.float64)
        self.frame_episode = data["episode_index"].to_numpy()
        self.state_dim = int(features[state_key]["shape"][0])
        self.action_dim = int(features[action_key]["shape"][0])
        for name, arr, dim in (("state", self.states, self.state_dim), ("action", self.actions, self.action_dim)):
            if arr.shape[1] != dim:
                raise ValueError(f"{self.root}: {name} rows have {arr.shape[1]} values but "
                                 f"meta/info.json declares {dim}")
        if self.task_index.max() >= len(self.tasks):
            raise ValueError(f"{self.root}: task_index {self.task_index.max()} is not in meta/tasks.parquet")

        # stats: meta/stats.json; recomputed for state/action when it lacks them or a subset is kept
        stats_path = self.root / "meta/stats.json"
        self.stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        for key, values in ((state_key, self.states), (action_key, self.actions)):
            if episodes is not None or key not in self.stats:
                self.stats[key] = {**compute_stats(values), "count": [self.num_frames]}

        # images: per camera, its PNG column or its video file and start time per frame
        self._cameras = {}  # sample field -> {"key", "png", "video_files", "video_start", "cache"}
        for field, key in camera_keys.items():
            camera = {"key": key, "png": None, "video_files": None, "video_start": None,
                      "cache": OrderedDict()}  # cache: frame row -> decoded image, least recently used first
            if key in png_keys:
                camera["png"] = data[key].combine_chunks().field("bytes")
            else:
                cols = [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
                if any(c not in eps.column_names for c in cols):
                    raise ValueError(f"{self.root}: meta/episodes lacks {cols[0]} etc. for video '{key}'")
                video_path = self.info.get("video_path") or VIDEO_PATH
                per_episode = [self.root / video_path.format(video_key=key, chunk_index=c, file_index=f)
                               for c, f in zip(eps[cols[0]].to_pylist(), eps[cols[1]].to_pylist())]
                for e, path in zip(self.episode_indices, per_episode):
                    if not path.is_file():
                        raise FileNotFoundError(
                            f"video file missing: {path} (frames of '{key}', episode {e}); "
                            "read states and actions only with load_images=False")
                ep_pos = np.searchsorted(self.episode_indices, self.frame_episode)
                camera["video_files"] = [str(per_episode[p]) for p in ep_pos]  # per frame
                camera["video_start"] = eps[cols[2]].to_numpy()[ep_pos]         # per frame
            self._cameras[field] = camera
        # each camera caches as many frames as cache_mb holds of one frame of every camera
        frame_bytes = sum(int(np.prod(features[key]["shape"][:2])) * 3 for key in camera_keys.values())
        self._cache_frames = max(1, int(cache_mb * 2**20) // max(1, frame_bytes))
        self._whole_episodes = self.num_frames <= self._cache_frames

    def __len__(self):
        return self.num_frames

    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < self.num_frames:
            raise IndexError(f"sample {i} out of range (dataset has {self.num_frames} frames)")
        end = int(self.episode_end[i])
        stop = min(i + self.chunk_size, end)
        actions = np.empty((self.chunk_size, self.action_dim), np.float32)
        actions[: stop - i] = self.actions[i:stop]
        actions[stop - i:] = self.actions[end - 1]  # past the episode end: repeat its last action
        mask = np.arange(self.chunk_size) < stop - i
        sample = {"state": self.states[i].copy(), "instruction": self.tasks[self.task_index[i]],
                  "actions": actions, "action_mask": mask}
        for field, camera in self._cameras.items():
            sample[field] = self._image(camera, i)
        return sample

    def _image(self, camera, i):
        """Frame i of one camera (an entry of self._cameras)."""
        if camera["png"] is not None:
            return np.asarray(Image.open(io.BytesIO(camera["png"][i].as_py())).convert("RGB"))
        cache = camera["cache"]
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        if self._whole_episodes:  # the decoded dataset fits in the cache: each episode once
            rows = np.arange(self.episode_end[i] - self.episode_length[i], self.episode_end[i])
        else:                     # decode frame i only (from the keyframe before it)
            rows = np.array([i])
        # frame r is at from_timestamp + timestamp in its video file (v3.0 concatenates episodes)
        wanted = camera["video_start"][rows] + self.timestamps[rows]
        tol = 0.5 / self.fps
        path = camera["video_files"][i]
        times, frames = decode_video_frames(path, wanted[0], wanted[-1], tol)
        nearest = np.abs(times[None, :] - wanted[:, None]).argmin(1) if len(times) else None
        if nearest is None or np.abs(times[nearest] - wanted).max() > tol:
            raise ValueError(f"{path} lacks frames of episode {self.frame_episode[i]} "
                             f"between {wanted[0]:.3f} s and {wanted[-1]:.3f} s")
        frames.flags.writeable = False  # shared with the cache
        for r, k in zip(rows, nearest):
            cache[int(r)] = frames[k]
        while len(cache) > self._cache_frames:
            cache.popitem(last=False)
        return frames[nearest[rows == i][0]]


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch of torch tensors (instruction stays a list of str)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch = {"state": torch.from_numpy(np.stack([s["state"] for s in samples])),
             "instruction": [s["instruction"] for s in samples],
             "actions": torch.from_numpy(np.stack([s["actions"] for s in samples])),
             "action_mask": torch.from_numpy(np.stack([s["action_mask"] for s in samples]))}
    for field, setting in (("image", "load_images"), ("wrist_image", "load_images or wrist_image_key")):
        if all(field in s for s in samples):
            batch[field] = torch.from_numpy(np.stack([s[field] for s in samples]))
        elif any(field in s for s in samples):
            raise ValueError(f"collate got samples with and without {field} ({setting} differs)")
    return batch


def augment_images(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The usual VLA recipe: a random crop of 90% of the area resized back, then brightness,
    contrast and saturation jitter. uint8 [B, H, W, 3] in, uint8 out."""
    b, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).float() / 255.0
    scale = math.sqrt(0.9)
    ch, cw = int(round(h * scale)), int(round(w * scale))
    tops = torch.randint(0, h - ch + 1, (b,), generator=generator)
    lefts = torch.randint(0, w - cw + 1, (b,), generator=generator)
    crops = torch.stack([x[i, :, t:t + ch, l:l + cw] for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist()))])
    x = torch.nn.functional.interpolate(crops, size=(h, w), mode="bilinear", align_corners=False)
    brightness = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.4
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.4
    saturation = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.4
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * saturation + gray
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def check_dims(dataset: LeRobotDataset, policy):
    """Clear ValueError when a dataset's action/state size or chunk length does not fit the
    policy (e.g. a 6-D SO-101 dataset for a 7-D Panda policy)."""
    config = getattr(policy, "config", {}) or {}
    kind = getattr(policy, "kind", "policy")
    for what, key, have, option in (("action", dataset.action_key, dataset.action_dim, "--action-key"),
                                    ("state", dataset.state_key, dataset.state_dim, "--state-key")):
        want = getattr(policy, f"{what}_dim", None) or config.get(f"{what}_dim")
        if want is not None and int(want) != have:
            raise ValueError(f"{dataset.root}: '{key}' has {have} dims but the {kind} policy expects "
                             f"{want}; pick a {want}-D feature with {option} or a policy made for "
                             f"{have}-D {what}s")
    want_chunk = getattr(policy, "chunk_size", None) or config.get("chunk_size")
    if want_chunk is not None and int(want_chunk) != dataset.chunk_size:
        raise ValueError(f"{dataset.root}: dataset yields action chunks of {dataset.chunk_size} but the "
                         f"{kind} policy predicts {want_chunk}; open it with chunk_size={want_chunk}")


class AlphaMixer:
    """Stage I batches of the sim-real mixture, Eq. 4: every sample comes from the sim dataset
    with probability alpha and from the real one with 1 - alpha, drawn independently per
    sample (not by concatenating the datasets), and uniformly among that dataset's frames.

    alpha = 1 needs no real dataset and alpha = 0 no sim dataset (pass None). state_dict()
    holds the generator state: load_state_dict() on a fresh mixer reproduces the same batches.

    start_frames, start_weight: within a dataset, the first start_frames frames of every episode
    are drawn start_weight times as often as the others (default 0, 1: uniform). A lever of the
    miniature, not of the paper: the first decision is the one frame where only the image and the
    instruction say where to go (later frames show the motion already made).
    """

    def __init__(self, sim_ds, real_ds, alpha: float, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_frames: int = 0, start_weight: float = 1.0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if alpha > 0 and not sim_ds:
            raise ValueError(f"alpha = {alpha} draws sim samples, but the sim dataset is missing or empty")
        if alpha < 1 and not real_ds:
            raise ValueError(f"alpha = {alpha} draws real samples, but the real dataset is missing or empty")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size must be >= 1 and divisible by {world_size} processes, got {batch_size}")
        # under torchrun every rank draws the same global batch and loads only its own slice, so
        # N processes train on exactly the samples one process with the global batch would
        share = batch_size // world_size
        self.mine = slice(rank * share, (rank + 1) * share)
        self.sim_ds, self.real_ds = sim_ds, real_ds
        self.alpha, self.batch_size = float(alpha), int(batch_size)
        self.rng = np.random.default_rng(seed)
        self.batches_drawn = 0
        if start_frames < 0 or start_weight <= 0:
            raise ValueError(f"start_frames must be >= 0 and start_weight > 0, got {start_frames}, {start_weight}")
        self.cdf = {}  # id(dataset) -> cumulative frame probabilities (None: uniform)
        for ds in (sim_ds, real_ds):
            if ds and start_frames > 0 and start_weight != 1.0:
                position = np.arange(len(ds)) - (ds.episode_end - ds.episode_length)  # frame within its episode
                weights = np.where(position < start_frames, start_weight, 1.0)
                self.cdf[id(ds)] = np.cumsum(weights) / weights.sum()

    def next_batch(self):
        """(this process's part of the batch as collate() makes it, is_sim bool [B] of the
        whole global batch)."""
        # the same random numbers are drawn whatever alpha is, so runs differ only in the mix
        is_sim = self.rng.random(self.batch_size) < self.alpha        # Eq. 4: P(sim) = alpha
        position = self.rng.random(self.batch_size)                    # uniform within a dataset (or start-weighted)
        samples = []
        for from_sim, u in zip(is_sim[self.mine], position[self.mine]):
            ds = self.sim_ds if from_sim else self.real_ds
            cdf = self.cdf.get(id(ds))
            i = min(int(u * len(ds)) if cdf is None else int(np.searchsorted(cdf, u, side="right")), len(ds) - 1)
            samples.append(ds[i])
        self.batches_drawn += 1
        return collate(samples), is_sim

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn,
                "alpha": self.alpha, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict):
        if state["alpha"] != self.alpha or state["batch_size"] != self.batch_size:
            raise ValueError(f"mixer state was saved with alpha {state['alpha']}, batch size "
                             f"{state['batch_size']}; this mixer has {self.alpha}, {self.batch_size}")
        self.rng.bit_generator.state = state["rng"]
        self.batches_drawn = state["batches_drawn"]
