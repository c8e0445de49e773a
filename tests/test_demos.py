"""demos.py: LeRobot v3.0 writing and reading, the real SO-101 fixture, action chunks,
statistics, crash safety of the writer, and the alpha mixer's determinism."""
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import demos

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests/fixtures/lerobot-v3-so101-real"  # a real lerobot-record dataset (tests/fixtures/README.md)
SIZE = 32


def make_episode(rng, length, size=SIZE):
    """Frames that are easy to tell apart after lossy video coding: a bright square that moves
    with the frame number on a background whose colour also changes with it."""
    images = np.zeros((length, size, size, 3), np.uint8)
    offset = int(rng.integers(0, 50))
    for t in range(length):
        k = t + offset
        images[t] = [(37 * k) % 200, (91 * k) % 200, (53 * k) % 200]
        y, x = (5 * k) % (size - 8), (3 * k) % (size - 8)
        images[t, y:y + 8, x:x + 8] = 255
    states = rng.normal(size=(length, 8)).astype(np.float32)
    actions = rng.uniform(-1, 1, size=(length, 7)).astype(np.float32)
    success = np.arange(length) == length - 1
    return images, states, actions, success


def write_dataset(root, episodes, tasks, use_videos=True, **kw):
    writer = demos.LeRobotWriter(root, fps=10, image_shape=(SIZE, SIZE, 3), use_videos=use_videos, **kw)
    for k, ((images, states, actions, success), task) in enumerate(zip(episodes, tasks)):
        writer.add_episode(images, states, actions, task, success=success, seed=1000 + k)
    writer.close()
    return writer


@pytest.fixture(scope="module")
def episodes():
    rng = np.random.default_rng(0)
    return [make_episode(rng, n) for n in (6, 13, 9, 4)]


TASKS = ["open the drawer", "close the drawer", "open the drawer", "close the drawer"]


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------
# cache_mb: 0.01 holds a few frames, so video frames are decoded one by one; the default holds
# the whole dataset, so each sample's whole episode is decoded at once
@pytest.mark.parametrize("use_videos,cache_mb", [(True, 2048), (True, 0.01), (False, 2048)])
def test_round_trip_every_value(tmp_path, episodes, use_videos, cache_mb):
    write_dataset(tmp_path / "ds", episodes, TASKS, use_videos=use_videos)
    ds = demos.LeRobotDataset(tmp_path / "ds", chunk_size=1, cache_mb=cache_mb)
    assert ds._whole_episodes == (cache_mb > 1)
    assert ds.num_episodes == 4 and len(ds) == sum(len(e[1]) for e in episodes)
    assert ds.tasks == ["open the drawer", "close the drawer"]
    assert (ds.state_dim, ds.action_dim) == (8, 7)
    i = 0
    for (images, states, actions, _), task in zip(episodes, TASKS):
        for t in range(len(states)):
            s = ds[i]
            np.testing.assert_array_equal(s["state"], states[t])
            np.testing.assert_array_equal(s["actions"][0], actions[t])
            assert s["instruction"] == task
            assert s["image"].dtype == np.uint8 and s["image"].shape == (SIZE, SIZE, 3)
            if use_videos:  # lossy h264: close to this frame and closer to it than to any other
                errors = np.abs(images.astype(int) - s["image"].astype(int)).mean(axis=(1, 2, 3))
                assert errors[t] < 4.0 and np.argmin(errors) == t, errors
            else:           # PNG: exact
                np.testing.assert_array_equal(s["image"], images[t])
            i += 1

    # the data parquet, read independently, holds the same frames and v3.0 bookkeeping
    data = pq.read_table(tmp_path / "ds/data/chunk-000/file-000.parquet").to_pydict()
    lengths = [len(e[1]) for e in episodes]
    assert data["episode_index"] == [e for e, n in enumerate(lengths) for _ in range(n)]
    assert data["frame_index"] == [t for n in lengths for t in range(n)]
    assert data["index"] == list(range(sum(lengths)))
    np.testing.assert_allclose(data["timestamp"], [t / 10 for n in lengths for t in range(n)], rtol=1e-6)
    assert data["task_index"] == [[0, 1, 0, 1][e] for e, n in enumerate(lengths) for _ in range(n)]
    np.testing.assert_array_equal(np.asarray(data["action"], np.float32), np.concatenate([e[2] for e in episodes]))
    assert data["next.success"] == [t == n - 1 for n in lengths for t in range(n)]
    eps = pq.read_table(tmp_path / "ds" / demos.EPISODES_PATH).to_pydict()
    assert eps["length"] == lengths and eps["seed"] == [1000, 1001, 1002, 1003]
    assert eps["dataset_from_index"] == list(np.cumsum([0] + lengths[:-1]))
    assert eps["dataset_to_index"] == list(np.cumsum(lengths))


def test_layout_matches_the_lerobot_recorded_fixture(tmp_path, episodes):
    write_dataset(tmp_path / "ds", episodes, TASKS)
    ours, theirs = tmp_path / "ds", FIXTURE
    info = json.loads((ours / "meta/info.json").read_text())
    ref = json.loads((theirs / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert info["total_episodes"] == 4 and info["total_tasks"] == 2
    assert info["total_frames"] == sum(len(e[1]) for e in episodes)
    assert set(ref) <= set(info), set(ref) - set(info)
    assert info["data_path"] == ref["data_path"] and info["video_path"] == ref["video_path"]
    for key in ("action", "observation.state", "timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert info["features"][key]["dtype"] == ref["features"][key]["dtype"]
    assert info["features"]["observation.state"]["shape"] == [8]
    assert info["features"][demos.IMAGE_KEY]["dtype"] == "video"
    assert info["features"][demos.IMAGE_KEY]["shape"] == [SIZE, SIZE, 3]
    assert set(ref["features"][demos.IMAGE_KEY]["info"]) <= set(info["features"][demos.IMAGE_KEY]["info"])
    # the same parquet schemas: data columns, tasks table, and the episode bookkeeping columns
    data_ours = pq.read_schema(ours / "data/chunk-000/file-000.parquet")
    data_ref = pq.read_schema(theirs / "data/chunk-000/file-000.parquet")
    for field in data_ref:  # same types; vectors of another length (7-D action vs 6-D)
        ours_type = data_ours.field(field.name).type
        if pa.types.is_fixed_size_list(field.type):
            assert pa.types.is_fixed_size_list(ours_type) and ours_type.value_type == field.type.value_type
        else:
            assert ours_type == field.type, field.name
    assert pq.read_schema(ours / "meta/tasks.parquet").types == pq.read_schema(theirs / "meta/tasks.parquet").types
    assert pq.read_schema(ours / "meta/tasks.parquet").names == pq.read_schema(theirs / "meta/tasks.parquet").names
    eps_ours = set(pq.read_schema(ours / demos.EPISODES_PATH).names)
    eps_ref = {n for n in pq.read_schema(theirs / demos.EPISODES_PATH).names
               if "observation.images.top" not in n}
    assert eps_ref <= eps_ours, eps_ref - eps_ours
    # videos: one h264 mp4 per episode, with the episode's frames from t = 0
    video = ours / "videos" / demos.IMAGE_KEY / "chunk-000" / "file-001.mp4"
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        times = [frame.time for frame in container.decode(stream)]
    np.testing.assert_allclose(times, np.arange(13) / 10, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def test_stats_json_against_numpy(tmp_path, episodes):
    write_dataset(tmp_path / "ds", episodes, TASKS)
    stats = json.loads((tmp_path / "ds/meta/stats.json").read_text())
    columns = {"observation.state": np.concatenate([e[1] for e in episodes]).astype(np.float64),
               "action": np.concatenate([e[2] for e in episodes]).astype(np.float64),
               "frame_index": np.concatenate([np.arange(len(e[1])) for e in episodes])[:, None],
               "episode_index": np.concatenate([np.full(len(e[1]), k) for k, e in enumerate(episodes)])[:, None],
               "task_index": np.concatenate([np.full(len(e[1]), [0, 1, 0, 1][k]) for k, e in enumerate(episodes)])[:, None]}
    n = len(columns["action"])
    for key, x in columns.items():
        s = stats[key]
        np.testing.assert_allclose(s["mean"], x.mean(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s["std"], np.sqrt(((x - x.mean(axis=0)) ** 2).mean(axis=0)), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s["min"], x.min(axis=0))
        np.testing.assert_allclose(s["max"], x.max(axis=0))
        for name, q in (("q01", 0.01), ("q10", 0.1), ("q50", 0.5), ("q99", 0.99)):  # linear interpolation
            xs = np.sort(x, axis=0)
            pos = q * (n - 1)
            lo = int(np.floor(pos))
            expected = xs[lo] + (pos - lo) * (xs[min(lo + 1, n - 1)] - xs[lo])
            np.testing.assert_allclose(s[name], expected, rtol=1e-9, atol=1e-12)
        assert s["count"] == [n]
    # images: per channel, in [0, 1]; mean/std/min/max exact over every pixel of every frame
    pixels = np.concatenate([e[0] for e in episodes]).reshape(-1, 3).astype(np.float64) / 255
    img = stats[demos.IMAGE_KEY]
    np.testing.assert_allclose(np.asarray(img["mean"]).reshape(3), pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(img["std"]).reshape(3), pixels.std(0), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(img["min"]).reshape(3), pixels.min(0))
    np.testing.assert_allclose(np.asarray(img["max"]).reshape(3), pixels.max(0))


def test_image_stats_equal_numpy_on_pixels():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(5, 7, 9, 3)).astype(np.uint8)
    images[..., 1] //= 3  # a skewed channel
    s = demos.image_stats(images)
    for c in range(3):
        x = images[..., c].reshape(-1).astype(np.float64) / 255
        for name, expected in (("mean", x.mean()), ("std", x.std()), ("min", x.min()), ("max", x.max()),
                               ("q01", np.quantile(x, 0.01)), ("q50", np.quantile(x, 0.5)),
                               ("q99", np.quantile(x, 0.99))):
            assert s[name][c][0][0] == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, c)


def test_compute_stats_against_numpy():
    rng = np.random.default_rng(4)
    x = rng.standard_t(3, size=(501, 4))
    s = demos.compute_stats(x)
    assert set(s) == {"mean", "std", "min", "max", "q01", "q10", "q50", "q90", "q99"}
    xs = np.sort(x, axis=0)
    np.testing.assert_allclose(s["q01"], xs[5], rtol=1e-12)   # 0.01 * 500 = 5: an exact order statistic
    np.testing.assert_allclose(s["q99"], xs[495], rtol=1e-12)
    np.testing.assert_allclose(s["mean"], x.sum(0) / 501, rtol=1e-12)
    np.testing.assert_allclose(s["std"], np.sqrt(((x - x.sum(0) / 501) ** 2).sum(0) / 501), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Action chunks
# ---------------------------------------------------------------------------------------------
def test_action_chunks_pad_with_last_action_at_episode_end(tmp_path, episodes):
    write_dataset(tmp_path / "ds", episodes, TASKS)
    horizon = 5
    ds = demos.LeRobotDataset(tmp_path / "ds", chunk_size=horizon, load_images=False)
    i = 0
    for _, _, actions, _ in episodes:
        n = len(actions)
        for t in range(n):
            s = ds[i]
            assert "image" not in s
            assert s["actions"].shape == (horizon, 7) and s["action_mask"].shape == (horizon,)
            for h in range(horizon):
                if t + h < n:
                    assert s["action_mask"][h]
                    np.testing.assert_array_equal(s["actions"][h], actions[t + h])
                else:  # never the next episode's actions
                    assert not s["action_mask"][h]
                    np.testing.assert_array_equal(s["actions"][h], actions[n - 1])
            i += 1
    batch = demos.collate([ds[0], ds[len(ds) - 1]])
    assert batch["actions"].dtype == torch.float32 and batch["actions"].shape == (2, horizon, 7)
    assert batch["action_mask"].dtype == torch.bool and batch["action_mask"][1].tolist() == [True] + [False] * 4
    assert batch["state"].shape == (2, 8) and batch["instruction"] == [TASKS[0], TASKS[-1]]


def test_episode_subset_and_its_stats(tmp_path, episodes):
    write_dataset(tmp_path / "ds", episodes, TASKS)
    ds = demos.LeRobotDataset(tmp_path / "ds", episodes=[1, 3], load_images=True)
    assert ds.num_episodes == 2 and len(ds) == 13 + 4
    np.testing.assert_array_equal(ds[13]["state"], episodes[3][1][0])
    errors = np.abs(episodes[3][0].astype(int) - ds[13]["image"].astype(int)).mean(axis=(1, 2, 3))
    assert np.argmin(errors) == 0
    actions = np.concatenate([episodes[1][2], episodes[3][2]]).astype(np.float64)
    np.testing.assert_allclose(ds.stats["action"]["mean"], actions.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="episodes \\[7\\]"):
        demos.LeRobotDataset(tmp_path / "ds", episodes=[1, 7])


# ---------------------------------------------------------------------------------------------
# A dataset not written here
# ---------------------------------------------------------------------------------------------
def test_real_so101_fixture_reads_without_images():
    ds = demos.LeRobotDataset(FIXTURE, chunk_size=3, load_images=False)
    info = json.loads((FIXTURE / "meta/info.json").read_text())
    assert ds.info == info and ds.fps == 30
    assert ds.num_episodes == 4 and len(ds) == 1492
    assert ds.tasks == ["Pick the orange cube and place it in the box"]
    assert (ds.state_dim, ds.action_dim) == (6, 6)
    # episode boundaries and per-frame values against the parquet files read directly
    eps = pq.read_table(FIXTURE / demos.EPISODES_PATH, columns=["length", "dataset_from_index"]).to_pydict()
    data = pq.read_table(FIXTURE / "data/chunk-000/file-000.parquet").to_pydict()
    np.testing.assert_array_equal(ds.states, np.asarray(data["observation.state"], np.float32))
    np.testing.assert_array_equal(ds.actions, np.asarray(data["action"], np.float32))
    for start, length in zip(eps["dataset_from_index"], eps["length"]):
        last = start + length - 1
        assert data["episode_index"][start] == data["episode_index"][last]
        s = ds[last - 1]  # two frames before the end: one real action, then padding
        assert s["action_mask"].tolist() == [True, True, False]
        np.testing.assert_array_equal(s["actions"][2], np.asarray(data["action"][last], np.float32))
        assert s["instruction"] == "Pick the orange cube and place it in the box"
    stats = json.loads((FIXTURE / "meta/stats.json").read_text())
    assert ds.stats["action"]["q99"] == stats["action"]["q99"]
    batch = demos.collate([ds[0], ds[1]])
    assert "image" not in batch and batch["state"].shape == (2, 6)


def test_real_fixture_missing_video_is_named():
    with pytest.raises(FileNotFoundError) as err:
        demos.LeRobotDataset(FIXTURE)
    missing = FIXTURE / "videos/observation.images.front/chunk-000/file-000.mp4"
    assert str(missing) in str(err.value) and not missing.exists()
    with pytest.raises(FileNotFoundError, match="observation.images.top/chunk-000/file-000.mp4"):
        demos.LeRobotDataset(FIXTURE, image_key="observation.images.top")


def test_feature_mapping_and_dimension_checks():
    with pytest.raises(ValueError, match="--state-key"):
        demos.LeRobotDataset(FIXTURE, state_key="observation.joints", load_images=False)
    with pytest.raises(ValueError, match="--image-key"):
        demos.LeRobotDataset(FIXTURE, image_key="observation.images.wrist")
    # map the action feature onto the state: any numeric feature can be chosen by name
    ds = demos.LeRobotDataset(FIXTURE, state_key="action", load_images=False, chunk_size=4)
    np.testing.assert_array_equal(ds[10]["state"], ds[10]["actions"][0])

    class PandaPolicy:  # what check_dims reads of a policy
        kind, chunk_size = "pi05", 4
        config = {"action_dim": 7, "state_dim": 8}

    with pytest.raises(ValueError, match="6 dims but the pi05 policy expects 7"):
        demos.check_dims(ds, PandaPolicy())
    PandaPolicy.config = {"action_dim": 6, "state_dim": 6}
    demos.check_dims(ds, PandaPolicy())
    PandaPolicy.chunk_size = 8
    with pytest.raises(ValueError, match="chunk"):
        demos.check_dims(ds, PandaPolicy())


@pytest.mark.parametrize("cache_mb", [2048, 0.01])
def test_foreign_dataset_with_episodes_concatenated_in_one_video(tmp_path, cache_mb):
    """The layout lerobot-record writes: all episodes in one mp4 (AV1 there; h264 here), each
    episode a time span of it, timestamps restarting at 0 in the data, other feature names.
    Built by hand with pyarrow and PyAV, independently of LeRobotWriter."""
    rng = np.random.default_rng(7)
    root, fps, key = tmp_path / "foreign", 15, "observation.images.top"
    eps = [make_episode(rng, n) for n in (7, 5, 8)]
    frames = np.concatenate([e[0] for e in eps])
    video = root / f"videos/{key}/chunk-000/file-000.mp4"
    video.parent.mkdir(parents=True)
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width = stream.height = SIZE
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "15", "g": "4", "bf": "0"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    lengths = [len(e[1]) for e in eps]
    starts = np.cumsum([0] + lengths[:-1])
    data = pa.table({
        "action": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([e[2][:, :6] for e in eps]).reshape(-1)), 6),
        "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([e[1][:, :6] for e in eps]).reshape(-1)), 6),
        "timestamp": pa.array(np.concatenate([np.arange(n) / fps for n in lengths]).astype(np.float32)),
        "frame_index": pa.array(np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)),
        "episode_index": pa.array(np.repeat(np.arange(3), lengths).astype(np.int64)),
        "index": pa.array(np.arange(sum(lengths)).astype(np.int64)),
        "task_index": pa.array(np.zeros(sum(lengths), np.int64))})
    (root / "data/chunk-000").mkdir(parents=True)
    pq.write_table(data, root / "data/chunk-000/file-000.parquet")
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.table({
        "episode_index": list(range(3)), "tasks": [["stack the cups"]] * 3, "length": lengths,
        "data/chunk_index": [0] * 3, "data/file_index": [0] * 3,
        "dataset_from_index": starts.tolist(), "dataset_to_index": (starts + lengths).tolist(),
        f"videos/{key}/chunk_index": [0] * 3, f"videos/{key}/file_index": [0] * 3,
        f"videos/{key}/from_timestamp": (starts / fps).tolist(),
        f"videos/{key}/to_timestamp": ((starts + lengths) / fps).tolist()}),
        root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task": ["stack the cups"], "task_index": [0]}), root / "meta/tasks.parquet")
    scalar = {"shape": [1], "names": None}
    (root / "meta/info.json").write_text(json.dumps({
        "codebase_version": "v3.0", "fps": fps, "data_path": demos.DATA_PATH, "video_path": demos.VIDEO_PATH,
        "features": {"action": {"dtype": "float32", "shape": [6]},
                     "observation.state": {"dtype": "float32", "shape": [6]},
                     key: {"dtype": "video", "shape": [SIZE, SIZE, 3]},
                     **{k: {"dtype": "int64", **scalar} for k in ("frame_index", "episode_index", "index", "task_index")},
                     "timestamp": {"dtype": "float32", **scalar}}}))

    ds = demos.LeRobotDataset(root, image_key=key, chunk_size=2, episodes=[1, 2], cache_mb=cache_mb)
    assert len(ds) == 13 and ds.tasks == ["stack the cups"] and "action" in ds.stats  # no stats.json
    expected = [(images, states, t) for images, states, _, _ in eps[1:] for t in range(len(states))]
    for i in np.random.default_rng(0).permutation(len(ds)):  # any order, as training reads
        images, states, t = expected[i]
        s = ds[i]
        errors = np.abs(images.astype(int) - s["image"].astype(int)).mean(axis=(1, 2, 3))
        assert errors[t] < 4.0 and np.argmin(errors) == t
        np.testing.assert_array_equal(s["state"], states[t, :6])


# ---------------------------------------------------------------------------------------------
# Two cameras: front and wrist
# ---------------------------------------------------------------------------------------------
TWO_CAMERAS = (demos.IMAGE_KEY, demos.WRIST_IMAGE_KEY)
SMALL = 16


def make_two_camera_episode(rng, length):
    """Dark front frames with a brighter top half and bright wrist frames with a darker left
    half, both changing colour with the frame number: each frame is told apart from the others
    after h264 coding, and a swapped or shifted camera shows."""
    _, states, actions, success = make_episode(rng, length, size=SMALL)
    front = np.zeros((length, SMALL, SMALL, 3), np.uint8)
    wrist = np.zeros_like(front)
    offset = int(rng.integers(0, 50))
    for t in range(length):
        k = t + offset
        front[t] = [(37 * k) % 100, (91 * k) % 100, (53 * k) % 100]
        front[t, : SMALL // 2] += 60
        wrist[t] = [250 - 12 * t, 150 + 12 * t, 230 - 6 * t - 10 * (offset % 4)]
        wrist[t, :, : SMALL // 2] -= 30  # a darker left half
    return {demos.IMAGE_KEY: front, demos.WRIST_IMAGE_KEY: wrist}, states, actions, success


@pytest.fixture(scope="module")
def two_camera_episodes():
    rng = np.random.default_rng(5)
    return [make_two_camera_episode(rng, n) for n in (5, 8, 3)]


def write_two_camera_dataset(root, episodes, use_videos):
    writer = demos.LeRobotWriter(root, fps=10, image_shape=(SMALL, SMALL, 3), use_videos=use_videos,
                                 camera_keys=TWO_CAMERAS)
    for k, (images, states, actions, success) in enumerate(episodes):
        writer.add_episode(images, states, actions, TASKS[k], success=success, seed=k)
    return writer


# cache_mb 0.02 holds 13 frames of both cameras (27 of one), fewer than the dataset's 16, so
# frames are decoded one by one and each camera's cache is evicted on its own
@pytest.mark.parametrize("use_videos,cache_mb", [(True, 2048), (True, 0.02), (False, 2048)])
def test_two_cameras_round_trip(tmp_path, two_camera_episodes, use_videos, cache_mb):
    root = tmp_path / "ds"
    write_two_camera_dataset(root, two_camera_episodes, use_videos)
    ds = demos.LeRobotDataset(root, wrist_image_key=demos.WRIST_IMAGE_KEY, cache_mb=cache_mb)
    assert ds._whole_episodes == (cache_mb > 1)
    assert len(ds) == 5 + 8 + 3
    i = 0
    for images, states, _, _ in two_camera_episodes:
        for t in range(len(states)):
            s = ds[i]
            np.testing.assert_array_equal(s["state"], states[t])
            for field, key in (("image", demos.IMAGE_KEY), ("wrist_image", demos.WRIST_IMAGE_KEY)):
                assert s[field].dtype == np.uint8 and s[field].shape == (SMALL, SMALL, 3)
                if use_videos:  # lossy h264: close to this frame and closer to it than to any other
                    errors = np.abs(images[key].astype(int) - s[field].astype(int)).mean(axis=(1, 2, 3))
                    assert errors[t] < 8.0 and np.argmin(errors) == t, (field, errors)
                else:
                    np.testing.assert_array_equal(s[field], images[key][t])
            i += 1
    # read in reverse too: with a small cache, each camera decodes its own frames again
    for i in reversed(range(len(ds))):
        s = ds[i]
        assert np.abs(s["wrist_image"].astype(int) - s["image"].astype(int)).mean() > 40
    cached = sum(len(camera["cache"]) for camera in ds._cameras.values())
    assert cached * SMALL * SMALL * 3 <= cache_mb * 2**20  # cache_mb is the budget of all cameras
    # without wrist_image_key the sample has the front camera only
    assert "wrist_image" not in demos.LeRobotDataset(root)[0]

    batch = demos.collate([ds[0], ds[len(ds) - 1]])
    assert batch["wrist_image"].dtype == torch.uint8 and batch["wrist_image"].shape == (2, SMALL, SMALL, 3)
    assert torch.equal(batch["wrist_image"][1], torch.from_numpy(ds[len(ds) - 1]["wrist_image"]))
    assert torch.equal(batch["image"][0], torch.from_numpy(ds[0]["image"]))
    with pytest.raises(ValueError, match="wrist_image"):
        demos.collate([ds[0], demos.LeRobotDataset(root)[0]])


@pytest.mark.parametrize("use_videos", [True, False])
def test_two_cameras_features_stats_and_files(tmp_path, two_camera_episodes, use_videos):
    root = tmp_path / "ds"
    write_two_camera_dataset(root, two_camera_episodes, use_videos)
    info = json.loads((root / "meta/info.json").read_text())
    cameras = [k for k, v in info["features"].items() if v["dtype"] in ("video", "image")]
    assert cameras == list(TWO_CAMERAS)  # the front camera first
    assert info["features"][demos.WRIST_IMAGE_KEY] == info["features"][demos.IMAGE_KEY]
    assert info["features"][demos.WRIST_IMAGE_KEY]["dtype"] == ("video" if use_videos else "image")
    assert info["features"][demos.WRIST_IMAGE_KEY]["shape"] == [SMALL, SMALL, 3]

    stats = json.loads((root / "meta/stats.json").read_text())
    eps = pq.read_table(root / demos.EPISODES_PATH).to_pydict()
    for key in TWO_CAMERAS:
        pixels = np.concatenate([e[0][key] for e in two_camera_episodes]).reshape(-1, 3).astype(np.float64) / 255
        np.testing.assert_allclose(np.asarray(stats[key]["mean"]).reshape(3), pixels.mean(0), rtol=1e-9)
        np.testing.assert_allclose(np.asarray(stats[key]["std"]).reshape(3), pixels.std(0), rtol=1e-9)
        np.testing.assert_allclose(np.asarray(stats[key]["max"]).reshape(3), pixels.max(0))
        assert stats[key]["count"] == [5 + 8 + 3]
        first = two_camera_episodes[0][0][key].reshape(-1, 3).astype(np.float64) / 255  # per-episode stats
        np.testing.assert_allclose(np.asarray(eps[f"stats/{key}/mean"][0]).reshape(3), first.mean(0), rtol=1e-9)
        if use_videos:  # one mp4 per episode and camera, named in the episodes table
            assert eps[f"videos/{key}/file_index"] == [0, 1, 2]
            assert eps[f"videos/{key}/to_timestamp"] == pytest.approx([0.5, 0.8, 0.3])
            assert len(list((root / "videos" / key / "chunk-000").glob("file-*.mp4"))) == 3
    if not use_videos:  # one PNG column per camera, each an HF Image feature
        schema = pq.read_schema(root / "data/chunk-000/file-000.parquet")
        hf = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        assert hf[demos.IMAGE_KEY] == hf[demos.WRIST_IMAGE_KEY] == {"_type": "Image"}
        assert not (root / "videos").exists()


def test_two_camera_writer_refuses_wrong_images_and_other_cameras(tmp_path, two_camera_episodes, episodes):
    images, states, actions, _ = two_camera_episodes[0]
    writer = write_two_camera_dataset(tmp_path / "ds", two_camera_episodes[:1], use_videos=False)
    with pytest.raises(ValueError, match=r"missing \['observation.images.wrist'\]"):
        writer.add_episode({demos.IMAGE_KEY: images[demos.IMAGE_KEY]}, states, actions, "t")
    with pytest.raises(ValueError, match=r"extra \['observation.images.top'\]"):
        writer.add_episode({**images, "observation.images.top": images[demos.IMAGE_KEY]}, states, actions, "t")
    with pytest.raises(ValueError, match="pass images as a dict"):
        writer.add_episode(images[demos.IMAGE_KEY], states, actions, "t")
    with pytest.raises(ValueError, match="images must be uint8.*'observation.images.wrist'"):
        writer.add_episode({**images, demos.WRIST_IMAGE_KEY: images[demos.WRIST_IMAGE_KEY][:, :8]},
                           states, actions, "t")
    assert writer.num_episodes == 1  # nothing written by the refused calls
    with pytest.raises(ValueError, match="camera_keys"):
        demos.LeRobotWriter(tmp_path / "other", fps=10, camera_keys=(demos.IMAGE_KEY, demos.IMAGE_KEY))
    # a one-camera writer accepts its camera as a dict too
    one = demos.LeRobotWriter(tmp_path / "one", fps=10, image_shape=(SMALL, SMALL, 3), use_videos=False)
    one.add_episode({demos.IMAGE_KEY: images[demos.IMAGE_KEY]}, states, actions, "t")
    np.testing.assert_array_equal(demos.LeRobotDataset(tmp_path / "one")[2]["image"], images[demos.IMAGE_KEY][2])
    # resuming with other cameras is refused, either way round
    with pytest.raises(ValueError, match="other settings"):
        demos.LeRobotWriter(tmp_path / "ds", fps=10, image_shape=(SMALL, SMALL, 3), use_videos=False)
    with pytest.raises(ValueError, match="other settings"):
        demos.LeRobotWriter(tmp_path / "one", fps=10, image_shape=(SMALL, SMALL, 3), use_videos=False,
                            camera_keys=TWO_CAMERAS)
    # the same cameras resume
    again = demos.LeRobotWriter(tmp_path / "ds", fps=10, image_shape=(SMALL, SMALL, 3), use_videos=False,
                                camera_keys=TWO_CAMERAS)
    assert again.num_episodes == 1


def test_wrist_image_key_missing_from_the_dataset_is_named(tmp_path, episodes):
    write_dataset(tmp_path / "ds", episodes[:1], TASKS[:1], use_videos=False)
    with pytest.raises(ValueError, match="'observation.images.wrist' is not an image or video.*--wrist-image-key"):
        demos.LeRobotDataset(tmp_path / "ds", wrist_image_key=demos.WRIST_IMAGE_KEY)
    with pytest.raises(ValueError, match="--wrist-image-key"):
        demos.LeRobotDataset(FIXTURE, wrist_image_key="observation.state")
    # not read at all without images
    assert "wrist_image" not in demos.LeRobotDataset(tmp_path / "ds", wrist_image_key=demos.WRIST_IMAGE_KEY,
                                                     load_images=False)[0]


# ---------------------------------------------------------------------------------------------
# Writer: refusal, resume, crash safety
# ---------------------------------------------------------------------------------------------
def test_writer_refuses_a_folder_holding_something_else(tmp_path, episodes):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a LeRobot dataset"):
        demos.LeRobotWriter(tmp_path / "notes", fps=10, image_shape=(SIZE, SIZE, 3))
    write_dataset(tmp_path / "ds", episodes[:1], TASKS[:1])
    with pytest.raises(ValueError, match="other settings"):
        demos.LeRobotWriter(tmp_path / "ds", fps=20, image_shape=(SIZE, SIZE, 3))
    with pytest.raises(ValueError, match="other settings"):
        demos.LeRobotWriter(tmp_path / "ds", fps=10, image_shape=(SIZE, SIZE, 3), use_videos=False)
    with pytest.raises(FileExistsError, match="already holds"):
        demos.LeRobotWriter(tmp_path / "ds", fps=10, image_shape=(SIZE, SIZE, 3), resume=False)
    with pytest.raises(ValueError, match="images must be uint8"):
        demos.LeRobotWriter(tmp_path / "ds", fps=10, image_shape=(SIZE, SIZE, 3)).add_episode(
            episodes[0][0][:, :16], episodes[0][1], episodes[0][2], "t")


def test_writer_resume_drops_a_half_written_episode(tmp_path, episodes, monkeypatch):
    root = tmp_path / "ds"
    write_dataset(root, episodes[:2], TASKS[:2], use_videos=False)
    # die after the episode's data rows are written but before it is committed
    writer = demos.LeRobotWriter(root, fps=10, image_shape=(SIZE, SIZE, 3), use_videos=False)
    monkeypatch.setattr(writer, "_write_metadata", lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        writer.add_episode(*episodes[2][:3], TASKS[2])
    assert pq.read_table(root / "data/chunk-000/file-000.parquet").num_rows == 6 + 13 + 9
    assert len(demos.LeRobotDataset(root)) == 6 + 13  # readers see committed episodes only
    writer = demos.LeRobotWriter(root, fps=10, image_shape=(SIZE, SIZE, 3), use_videos=False)
    assert writer.num_episodes == 2
    writer.add_episode(*episodes[3][:3], TASKS[3])
    ds = demos.LeRobotDataset(root)
    assert ds.num_episodes == 3 and len(ds) == 6 + 13 + 4
    np.testing.assert_array_equal(ds[19]["image"], episodes[3][0][0])
    assert pq.read_table(root / "data/chunk-000/file-000.parquet")["index"].to_pylist() == list(range(23))


def test_data_files_roll_over(tmp_path, episodes):
    write_dataset(tmp_path / "ds", episodes, TASKS, use_videos=False, data_file_mb=0.001)
    files = sorted((tmp_path / "ds/data/chunk-000").glob("file-*.parquet"))
    assert len(files) > 1
    ds = demos.LeRobotDataset(tmp_path / "ds")
    np.testing.assert_array_equal(ds[len(ds) - 1]["image"], episodes[-1][0][-1])
    np.testing.assert_array_equal(ds.states, np.concatenate([e[1] for e in episodes]))


WRITER_LOOP = """
import sys, numpy as np
sys.path.insert(0, {root!r})
import demos
writer = demos.LeRobotWriter({out!r}, fps=10, image_shape=(32, 32, 3), use_videos={videos})
rng = np.random.default_rng(writer.num_episodes)
while writer.num_episodes < 60:
    n = int(rng.integers(3, 12))
    images = np.full((n, 32, 32, 3), writer.num_episodes % 256, np.uint8)
    states = np.full((n, 8), writer.num_episodes, np.float32)
    writer.add_episode(images, states, np.zeros((n, 7), np.float32), "t", seed=writer.num_episodes)
    print(writer.num_episodes, flush=True)
"""


@pytest.mark.parametrize("use_videos", [True, False])
def test_writer_killed_at_random_moments_leaves_a_readable_dataset(tmp_path, use_videos):
    out = tmp_path / "ds"
    script = WRITER_LOOP.format(root=str(ROOT), out=str(out), videos=use_videos)
    rng = np.random.default_rng(0)
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()                    # at least one episode written in this run
        time.sleep(float(rng.uniform(0.0, 0.3)))  # then die anywhere in the writing
        proc.send_signal(signal.SIGKILL if attempt % 2 == 0 else signal.SIGINT)
        proc.wait()
        ds = demos.LeRobotDataset(out)
        seeds = pq.read_table(out / demos.EPISODES_PATH)["seed"].to_pylist()
        assert seeds == list(range(ds.num_episodes))  # no gap, no duplicate
        for e in range(ds.num_episodes):              # each episode's rows are its own
            rows = np.nonzero(ds.frame_episode == e)[0]
            assert (ds.states[rows] == e).all()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ds = demos.LeRobotDataset(out)
    assert ds.num_episodes == 60
    assert (ds[len(ds) - 1]["image"].astype(int) - 59).__abs__().max() <= 2
    info = json.loads((out / "meta/info.json").read_text())
    assert info["total_episodes"] == 60 and info["total_frames"] == len(ds)


# ---------------------------------------------------------------------------------------------
# The alpha mixer (its statistics are tested with Stage I)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_and_real(tmp_path_factory, episodes):
    root = tmp_path_factory.mktemp("mix")
    write_dataset(root / "sim", episodes, ["sim task"] * 4, use_videos=False)
    write_dataset(root / "real", episodes[:2], ["real task"] * 2, use_videos=False)
    return (demos.LeRobotDataset(root / "sim", chunk_size=2),
            demos.LeRobotDataset(root / "real", chunk_size=2))


def test_mixer_is_deterministic_and_resumes_exactly(sim_and_real):
    sim, real = sim_and_real
    a = demos.AlphaMixer(sim, real, alpha=0.5, batch_size=8, seed=11)
    first = [a.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (checkpoints)
    rest = [a.next_batch() for _ in range(4)]
    b = demos.AlphaMixer(sim, real, alpha=0.5, batch_size=8, seed=999)
    b.load_state_dict(state)
    for (batch_a, sim_a), (batch_b, sim_b) in zip(rest, [b.next_batch() for _ in range(4)]):
        np.testing.assert_array_equal(sim_a, sim_b)
        assert torch.equal(batch_a["state"], batch_b["state"]) and torch.equal(batch_a["image"], batch_b["image"])
        assert torch.equal(batch_a["actions"], batch_b["actions"])
    c = demos.AlphaMixer(sim, real, alpha=0.5, batch_size=8, seed=11)
    for batch, is_sim in first:
        batch_c, sim_c = c.next_batch()
        np.testing.assert_array_equal(is_sim, sim_c)
        assert torch.equal(batch["state"], batch_c["state"])
    # each sample comes from the dataset its flag names
    for batch, is_sim in first + rest:
        assert [t == "sim task" for t in batch["instruction"]] == is_sim.tolist()
    assert not all(np.concatenate([s for _, s in first + rest]))  # both sources appear
    assert any(np.concatenate([s for _, s in first + rest]))
    with pytest.raises(ValueError, match="alpha"):
        demos.AlphaMixer(sim, real, alpha=0.9, batch_size=8, seed=0).load_state_dict(state)


def test_mixer_draws_episode_starts_start_weight_times_as_often(sim_and_real):
    # 4 episodes, 32 frames: uniform draws hit a first frame with p = 4/32; with the first frame of
    # each episode weighted 7, p = 28/56 = 0.5. 3200 draws: binomial std <= 0.009.
    sim, _ = sim_and_real
    assert len(sim) == 32 and len(set(sim.episode_end)) == 4
    for start_frames, start_weight, expected in ((0, 1.0, 4 / 32), (1, 7.0, 28 / 56), (2, 3.0, 24 / 48)):
        mixer = demos.AlphaMixer(sim, None, alpha=1.0, batch_size=32, seed=3,
                                 start_frames=start_frames, start_weight=start_weight)
        states = torch.cat([mixer.next_batch()[0]["state"] for _ in range(100)]).numpy()
        counted = max(start_frames, 1)  # the frames whose share is measured
        starts = {tuple(sim.states[e - n + k]) for e, n in zip(sim.episode_end, sim.episode_length)
                  for k in range(counted)}
        hit = np.mean([tuple(row) in starts for row in states])
        assert abs(hit - expected) < 0.045, (start_frames, start_weight, hit)
    with pytest.raises(ValueError, match="start_weight"):
        demos.AlphaMixer(sim, None, alpha=1.0, batch_size=4, seed=0, start_frames=1, start_weight=0.0)


def test_mixer_extremes_need_only_one_dataset(sim_and_real):
    sim, real = sim_and_real
    batch, is_sim = demos.AlphaMixer(sim, None, alpha=1.0, batch_size=16, seed=0).next_batch()
    assert is_sim.all() and set(batch["instruction"]) == {"sim task"}
    batch, is_sim = demos.AlphaMixer(None, real, alpha=0.0, batch_size=16, seed=0).next_batch()
    assert not is_sim.any() and set(batch["instruction"]) == {"real task"}
    with pytest.raises(ValueError, match="real dataset is missing"):
        demos.AlphaMixer(sim, None, alpha=0.95, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="sim dataset is missing"):
        demos.AlphaMixer(None, real, alpha=0.05, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="alpha must be"):
        demos.AlphaMixer(sim, real, alpha=1.5, batch_size=4, seed=0)
