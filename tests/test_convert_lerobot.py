"""LeRobot -> DemoStore: round trips against datasets LeRobot itself wrote, resume, mapping, clear errors.

Datasets are written by `LeRobotDataset.create` (lerobot==0.4.4, installed with --no-deps, see the Makefile)
in a subprocess, so its torchvision stub never leaks into this process. Without lerobot those tests skip;
the v2.1 and decode tests use files written here with PyAV and pyarrow.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from robodit.cli import main as cli_main
from robodit.datasets.convert import ConvertError, convert_lerobot
from robodit.datasets.convert.lerobot import decode_video
from robodit.datasets.store import DemoStore, StoreError

pytest.importorskip("pyarrow", reason="pip install 'robodit[convert]'")
HAVE_LEROBOT = all(importlib.util.find_spec(m) for m in ("lerobot", "datasets", "accelerate"))
needs_lerobot = pytest.mark.skipif(not HAVE_LEROBOT, reason=(
    "lerobot not installed: pip install --no-deps lerobot==0.4.4 accelerate && pip install 'datasets>=4,<5' "
    "jsonlines (what `make install` does)"))
TASKS = ["pick up the red block", "open the drawer"]

_WRITER = textwrap.dedent('''
    import sys, types
    import datasets  # noqa: F401 -- imported before the stub below: it probes for torchvision
    # lerobot imports torchvision at module level only for training-time transforms; none is installed here
    tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
    tv.transforms = tr
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr})
    import numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root, use_videos, tasks = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split("|")
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": None},
        "observation.images.top": {"dtype": "video" if use_videos else "image", "shape": (48, 64, 3),
                                   "names": ["height", "width", "channels"]},
        "action": {"dtype": "float32", "shape": (4,), "names": None},
        # not (1,): lerobot 0.4.4 rejects numpy scalars there and `datasets` rejects (1,) arrays (numpy 2.4)
        "complementary_info.force": {"dtype": "float32", "shape": (2,), "names": None},
    }
    ds = LeRobotDataset.create("test/toy", fps=10, root=root, features=features, use_videos=use_videos,
                               robot_type="toy_arm", image_writer_threads=0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    want = {"state": [], "image": [], "action": [], "force": [], "lengths": []}
    for e in range(4):
        n = 10 + 2 * e
        for t in range(n):
            ch = [np.sin(xx / 6.0 + 0.6 * t + c + e) * np.cos(yy / 8.0 - 0.3 * t) for c in range(3)]
            img = (127.5 + 110 * np.stack(ch, -1)).astype(np.uint8)  # smooth: survives a lossy codec
            frame = {"observation.state": rng.normal(size=6).astype(np.float32),
                     "action": rng.normal(size=4).astype(np.float32),
                     "complementary_info.force": np.array([t / n, -t], np.float32),
                     "observation.images.top": img, "task": tasks[e % 2]}
            ds.add_frame(frame)
            for k, f in (("state", "observation.state"), ("image", "observation.images.top"),
                         ("action", "action"), ("force", "complementary_info.force")):
                want[k].append(frame[f])
        ds.save_episode()
        want["lengths"].append(n)
    ds.finalize()
    np.savez(root + ".expected.npz", **{k: np.stack(v) if k != "lengths" else np.array(v)
                                        for k, v in want.items()})
''')


def _write_lerobot(root, use_videos):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", SVT_LOG="0")
    r = subprocess.run([sys.executable, "-c", _WRITER, str(root), "1" if use_videos else "0", "|".join(TASKS)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, dict(np.load(str(root) + ".expected.npz"))


@pytest.fixture(scope="module")
def lerobot_video(tmp_path_factory):
    return _write_lerobot(tmp_path_factory.mktemp("lr") / "video_ds", True)


@pytest.fixture(scope="module")
def lerobot_images(tmp_path_factory):
    return _write_lerobot(tmp_path_factory.mktemp("lr") / "image_ds", False)


def _check_roundtrip(store_path, want, exact_images, keys=("action", "image_top", "state")):
    store = DemoStore.open(store_path)
    assert len(store) == 4 and store.fps == 10 and store.robot == "toy_arm"
    assert sorted(store.keys) == sorted(keys)
    ends = np.cumsum(want["lengths"])
    assert store.episode_ends.tolist() == ends.tolist()
    np.testing.assert_array_equal(store.read("state", 0, ends[-1]), want["state"])
    np.testing.assert_array_equal(store.read("action", 0, ends[-1]), want["action"])
    for e in range(4):
        info = store.episode_info(e)
        assert info["task"] == info["instruction"] == TASKS[e % 2] and info["has_language"]
    got = store.read("image_top", 0, ends[-1]).astype(np.float32)
    ref = want["image"].astype(np.float32)
    if exact_images:
        np.testing.assert_array_equal(got, ref)
    else:  # lossy AV1: every frame close to its source frame, and closer to it than to any other frame
        err = np.abs(got - ref).mean(axis=(1, 2, 3))
        assert err.max() < 6.0, err.max()
        dist = np.abs(got[:, None] - ref[None]).mean(axis=(2, 3, 4))
        assert (dist.argmin(axis=1) == np.arange(len(ref))).all()
    return store


@needs_lerobot
def test_video_dataset_roundtrip(lerobot_video, tmp_path):
    root, want = lerobot_video
    lines = []
    summary = convert_lerobot(root, tmp_path / "s.zarr", progress=False, log=lines.append)
    text = "\n".join(lines)
    assert "observation.images.top  ->  image_top" in text and "uint8 (video)" in text
    assert "not stored: complementary_info.force" in text and summary["converted"] == 4
    store = _check_roundtrip(tmp_path / "s.zarr", want, exact_images=False)
    assert store.env["converted_from"][0]["episodes"] == [[0, 4]]


@needs_lerobot
def test_image_dataset_roundtrip_exact_via_cli_with_map(lerobot_images, tmp_path, capsys):
    root, want = lerobot_images
    out = tmp_path / "s.zarr"
    argv = ["convert", "lerobot", str(root), "--out", str(out), "--map", "force=complementary_info.force"]
    assert cli_main(argv) == 0
    assert "complementary_info.force  ->  force" in capsys.readouterr().err
    store = _check_roundtrip(out, want, exact_images=True, keys=("action", "image_top", "state", "force"))
    np.testing.assert_array_equal(store.read("force", 0, store.num_frames), want["force"])
    # a different mapping on the same store is refused, naming both
    with pytest.raises(StoreError, match="existing store does not match: keys"):
        convert_lerobot(root, out, progress=False, log=lambda m: None)


@needs_lerobot
def test_resume_after_partial_run_and_after_a_kill(lerobot_images, tmp_path, monkeypatch):
    from robodit.datasets.convert import common

    root, want = lerobot_images
    out, quiet = tmp_path / "s.zarr", dict(progress=False, log=lambda m: None)
    assert convert_lerobot(root, out, limit=1, **quiet)["remaining"] == 3
    # killed after the store committed episode 1 but before the ledger recorded it
    monkeypatch.setattr(common.Ledger, "commit", lambda self, ep: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert_lerobot(root, out, **quiet)
    monkeypatch.undo()
    assert len(DemoStore.open(out)) == 2
    # killed after announcing episode 2 but before its append committed
    real_append = DemoStore.append_episode
    monkeypatch.setattr(DemoStore, "append_episode", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert_lerobot(root, out, **quiet)
    monkeypatch.setattr(DemoStore, "append_episode", real_append)
    summary = convert_lerobot(root, out, **quiet)
    assert (summary["skipped_existing"], summary["converted"], summary["total_episodes"]) == (2, 2, 4)
    store = _check_roundtrip(out, want, exact_images=True)
    assert store.env["converted_from"][0]["episodes"] == [[0, 4]] and store.env["convert_pending"] is None
    assert convert_lerobot(root, out, **quiet)["converted"] == 0  # nothing left


@needs_lerobot
def test_corrupt_parquet_and_missing_video_are_named(lerobot_video, tmp_path):
    import shutil

    root, _ = lerobot_video
    quiet = dict(progress=False, log=lambda m: None)
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    video = next((bad / "videos").rglob("*.mp4"))
    video.unlink()
    with pytest.raises(ConvertError, match=r"feature 'observation.images.top': video file missing: .*file-000.mp4"):
        convert_lerobot(bad, tmp_path / "a.zarr", **quiet)
    assert len(DemoStore.open(tmp_path / "a.zarr")) == 0  # the store stays valid
    data = next((bad / "data").rglob("*.parquet"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ConvertError, match=r"file-000.parquet: corrupt or unreadable parquet"):
        convert_lerobot(bad, tmp_path / "b.zarr", **quiet)
    with pytest.raises(ConvertError, match=r"unknown feature 'observation.nope'"):
        convert_lerobot(root, tmp_path / "c.zarr", overrides={"x": "observation.nope"}, **quiet)
    import pyarrow.parquet as pq

    nocol = tmp_path / "nocol"
    shutil.copytree(root, nocol)
    data = next((nocol / "data").rglob("*.parquet"))
    pq.write_table(pq.read_table(data).drop_columns(["action"]), data)
    with pytest.raises(ConvertError, match=r"file-000.parquet: column\(s\) \['action'\] missing"):
        convert_lerobot(nocol, tmp_path / "f.zarr", **quiet)
    info = json.loads((bad / "meta/info.json").read_text())
    del info["fps"]
    (bad / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ConvertError, match=r"info.json: bad or missing field 'fps'"):
        convert_lerobot(bad, tmp_path / "d.zarr", **quiet)
    assert cli_main(["convert", "lerobot", str(tmp_path), "--out", str(tmp_path / "e.zarr")]) == 2


def _encode(path, frames, fps):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"  # near-lossless with qp 0
        s.options = {"qp": "0", "g": "4"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


def _smooth_frames(n, h=32, w=40, seed=0):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(127.5 + 100 * np.stack([np.sin(xx / 5 + 0.5 * t + c + seed) * np.cos(yy / 6)
                                              for c in range(3)], -1)).astype(np.uint8) for t in range(n)])


def test_decode_video_seeks_and_names_gaps(tmp_path):
    frames = _smooth_frames(20)
    _encode(tmp_path / "v.mp4", frames, 10)
    got = decode_video(tmp_path / "v.mp4", np.arange(7, 15) / 10, 10, "x")  # starts mid-GOP: seek + skip
    assert got.shape == (8, 32, 40, 3)
    err = np.abs(got[:, None].astype(int) - frames[None]).mean(axis=(2, 3, 4))  # [got, source frame]
    assert (err.argmin(axis=1) == np.arange(7, 15)).all() and err.min(axis=1).max() < 2
    with pytest.raises(ConvertError, match=r"x: video .* ends before t=2.0000s"):
        decode_video(tmp_path / "v.mp4", np.array([1.9, 2.0]), 10, "x")
    with pytest.raises(ConvertError, match=r"x: no frame at t=0.3500s"):
        decode_video(tmp_path / "v.mp4", np.array([0.3, 0.35]), 10, "x")


def test_v21_layout_written_here(tmp_path):
    """v2.1: one parquet and one mp4 per episode, jsonl metadata (LeRobot <= 0.3 wrote these)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, fps, rng = tmp_path / "v21", 10, np.random.default_rng(0)
    info = {"codebase_version": "v2.1", "robot_type": "so100", "fps": fps, "chunks_size": 1000,
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {"observation.state": {"dtype": "float32", "shape": [2], "names": None},
                         "observation.images.wrist": {"dtype": "video", "shape": [3, 32, 40],
                                                      "names": ["channels", "height", "width"]},
                         "action": {"dtype": "float32", "shape": [2], "names": None},
                         "language_instruction": {"dtype": "string", "shape": [1], "names": None},
                         "next.reward": {"dtype": "float32", "shape": [1], "names": None},
                         **{k: {"dtype": "int64", "shape": [1], "names": None}
                            for k in ("frame_index", "episode_index", "index", "task_index")},
                         "timestamp": {"dtype": "float32", "shape": [1], "names": None}}}
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info))
    (root / "meta/tasks.jsonl").write_text('{"task_index": 0, "task": "stack the cups"}\n')
    eps, want = [], []
    for e, n in enumerate((9, 6)):
        frames, state = _smooth_frames(n, seed=e), rng.normal(size=(n, 2)).astype(np.float32)
        _encode(root / f"videos/chunk-000/observation.images.wrist/episode_{e:06d}.mp4", frames, fps)
        table = pa.table({"observation.state": pa.array(list(state), pa.list_(pa.float32(), 2)),
                          "action": pa.array(list(-state), pa.list_(pa.float32(), 2)),
                          "timestamp": pa.array(np.arange(n) / fps, pa.float32()),
                          "next.reward": pa.array(np.linspace(0, 1, n), pa.float32()),  # scalar column
                          "frame_index": np.arange(n), "episode_index": np.full(n, e),
                          "index": np.arange(n) + sum(len(w[1]) for w in want), "task_index": np.zeros(n, int)})
        (root / "data/chunk-000").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / f"data/chunk-000/episode_{e:06d}.parquet")
        eps.append(json.dumps({"episode_index": e, "tasks": ["stack the cups"], "length": n}))
        want.append((frames, state))
    (root / "meta/episodes.jsonl").write_text("\n".join(eps) + "\n")
    lines = []
    convert_lerobot(root, tmp_path / "s.zarr", {"reward": "next.reward", "joints": "observation.state"},
                    progress=False, log=lines.append)
    assert "not stored: language_instruction" in "\n".join(lines)
    store = DemoStore.open(tmp_path / "s.zarr")
    assert store.robot == "so100" and sorted(store.keys) == ["action", "image_wrist", "joints", "reward"]
    for e, (frames, state) in enumerate(want):
        ep = store.episode(e)
        np.testing.assert_array_equal(ep["joints"], state)
        np.testing.assert_allclose(ep["reward"][:, 0], np.linspace(0, 1, len(state)), rtol=1e-6)
        np.testing.assert_array_equal(ep["action"], -state)
        assert np.abs(ep["image_wrist"].astype(int) - frames).mean() < 3
        assert store.episode_info(e)["instruction"] == "stack the cups"
