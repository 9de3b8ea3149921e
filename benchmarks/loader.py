"""Loader throughput: our Zarr window sampler vs reading the same windows straight from LeRobot files.

    python benchmarks/loader.py                      # ~2 min on 2 busy cores; JSON to benchmarks/results/loader.json
    python benchmarks/loader.py --seconds 4 --stream-gb 0   # quicker, no larger-than-memory run

1. Writes a LeRobot v3.0 dataset (84 px camera as an AV1 mp4 with LeRobot's default encoder settings, state,
   action; parquet + meta) and converts it with `robodit convert lerobot`.
2. Samples To=2 / Tp=16 windows in batches of 64 through `WindowDataset` + `ResumableBatchSampler` (cached in
   RAM, and streamed from Zarr) and through a LeRobot-style reader of the original files (parquet columns in
   RAM, each sample's frames decoded with PyAV: seek to the key frame, decode forward), at 0 and 2 workers.
3. Streams a store whose decompressed data is larger than a memory cap (RLIMIT_DATA on every process),
   which the cached mode cannot load.
Each measurement runs in its own process; peak memory is the process tree's summed PSS, sampled.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FPS, SIZE, STATE, ACT = 10, 84, 9, 7


def _frames(e: int, n: int) -> np.ndarray:
    """Smooth moving pattern + mild noise: compresses like a rendered scene, not like noise or flat colour."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    rng = np.random.default_rng(e)
    t = np.arange(n, dtype=np.float32)[:, None, None, None]
    c = np.arange(3, dtype=np.float32)
    img = 127 + 90 * np.sin(xx[..., None] / 9 + 0.2 * t + c + e) * np.cos(yy[..., None] / 11 - 0.1 * t)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def write_lerobot_v3(root: Path, episodes: int, length: int) -> None:
    """The v3.0 layout LeRobotDataset writes: one data parquet, one mp4 per camera, episode/task metadata."""
    import av
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    (root / "data/chunk-000").mkdir(parents=True)
    vid = root / "videos/observation.images.cam/chunk-000/file-000.mp4"
    vid.parent.mkdir(parents=True)
    cols = {k: [] for k in ("state", "action", "timestamp", "frame_index", "episode_index", "index", "task_index")}
    eps = []
    with av.open(str(vid), "w") as c:
        s = c.add_stream("libsvtav1", rate=FPS)
        s.width = s.height = SIZE
        s.pix_fmt, s.options = "yuv420p", {"g": "2", "crf": "30", "preset": "12"}
        for e in range(episodes):
            for f in _frames(e, length):
                c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            start = e * length
            cols["state"] += list(rng.normal(size=(length, STATE)).astype(np.float32))
            cols["action"] += list(rng.normal(size=(length, ACT)).astype(np.float32))
            cols["timestamp"] += list(np.arange(length, dtype=np.float32) / FPS)
            cols["frame_index"] += list(range(length))
            cols["episode_index"] += [e] * length
            cols["index"] += list(range(start, start + length))
            cols["task_index"] += [e % 2] * length
            eps.append({"episode_index": e, "tasks": [f"task {e % 2}"], "length": length,
                        "data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": start,
                        "dataset_to_index": start + length, "videos/observation.images.cam/chunk_index": 0,
                        "videos/observation.images.cam/file_index": 0,
                        "videos/observation.images.cam/from_timestamp": start / FPS,
                        "videos/observation.images.cam/to_timestamp": (start + length) / FPS})
        c.mux(s.encode())
    table = pa.table({"observation.state": pa.array(cols.pop("state"), pa.list_(pa.float32(), STATE)),
                      "action": pa.array(cols.pop("action"), pa.list_(pa.float32(), ACT)),
                      "timestamp": pa.array(cols.pop("timestamp"), pa.float32()),
                      **{k: pa.array(v, pa.int64()) for k, v in cols.items()}})
    pq.write_table(table, root / "data/chunk-000/file-000.parquet")
    pq.write_table(pa.Table.from_pylist(eps), root / "meta/episodes/chunk-000/file-000.parquet")
    pq.write_table(pa.table({"task_index": [0, 1], "task": ["task 0", "task 1"]}), root / "meta/tasks.parquet")
    scalar = {"dtype": "int64", "shape": [1], "names": None}
    info = {"codebase_version": "v3.0", "robot_type": "bench", "fps": FPS, "chunks_size": 1000,
            "total_episodes": episodes, "total_frames": episodes * length,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
            "features": {"observation.state": {"dtype": "float32", "shape": [STATE], "names": None},
                         "action": {"dtype": "float32", "shape": [ACT], "names": None},
                         "observation.images.cam": {"dtype": "video", "shape": [SIZE, SIZE, 3],
                                                    "names": ["height", "width", "channels"]},
                         "timestamp": {"dtype": "float32", "shape": [1], "names": None},
                         **{k: scalar for k in ("frame_index", "episode_index", "index", "task_index")}}}
    (root / "meta/info.json").write_text(json.dumps(info, indent=2))


class LeRobotWindows:
    """The same (episode, frame) windows as WindowDataset, read from the LeRobot files for every sample: rows
    taken from the memory-mapped parquet table (as LeRobotDataset's Arrow-backed HF dataset does) and the
    observation frames decoded from the mp4 (a fresh decoder per sample, as LeRobot's video readers do).
    Leaner than LeRobotDataset itself (no HF datasets/torch conversion per row), so the ratio is conservative."""

    def __init__(self, root: Path, to: int = 2, tp: int = 16):
        import pyarrow.parquet as pq

        from robodit.datasets.convert.lerobot import LeRobotSource

        src = LeRobotSource(root)
        self.to, self.tp, self.videos, self.index = to, tp, {}, []
        self.tables, first = {}, {}
        for ep in src.episode_ids():  # in order: a data file's first episode starts at its row 0
            row = src.episodes[ep]
            data = src._data_file(ep, row)
            if data not in self.tables:
                self.tables[data] = pq.read_table(data, memory_map=True,
                                                  columns=["observation.state", "action", "timestamp"])
                first[data] = int(row["dataset_from_index"])
            start, n = int(row["dataset_from_index"]) - first[data], int(row["length"])
            path, t0 = src._video_file(ep, row, "observation.images.cam")
            self.index += [(data, start, n, path, t0, t) for t in range(n)]
        src.close()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item):
        import torch

        from robodit.datasets.convert.lerobot import decode_video

        data, start, n, path, t0, t = self.index[item[0] if isinstance(item, tuple) else item]
        obs = np.clip(np.arange(t - self.to + 1, t + 1), 0, n - 1)
        act = np.arange(t, t + self.tp)
        table = self.tables[data]
        rows = table.take(start + np.concatenate([obs, np.minimum(act, n - 1)]))
        state = np.stack(rows.column("observation.state").to_numpy(zero_copy_only=False)[:self.to])
        action = np.stack(rows.column("action").to_numpy(zero_copy_only=False)[self.to:])
        ts = t0 + rows.column("timestamp").to_numpy()[:self.to].astype(np.float64)
        uniq, inv = np.unique(ts, return_inverse=True)
        images = decode_video(path, uniq, FPS, "bench")[inv]
        return {"obs.image_cam": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                "obs.state": torch.from_numpy(state), "action": torch.from_numpy(action),
                "action_is_pad": torch.from_numpy(act >= n), "task_id": torch.tensor(0)}


def _peak_rss(stop: threading.Event, out: list) -> None:
    try:
        import psutil
    except ImportError:  # then only this process's own peak (ru_maxrss) is reported
        return
    me = psutil.Process()
    while not stop.is_set():  # PSS: pages shared by forked workers are counted once, not once per process
        try:
            pss = sum(p.memory_full_info().pss for p in [me, *me.children(recursive=True)])
            out[0] = max(out[0], pss)
        except psutil.Error:
            pass
        time.sleep(0.1)


def measure(spec: dict) -> dict:
    """One configuration, in this (child) process: samples/s over `seconds` after 2 warm-up batches."""
    if spec.get("cap_bytes"):
        resource.setrlimit(resource.RLIMIT_DATA, (spec["cap_bytes"], spec["cap_bytes"]))
    import torch
    from torch.utils.data import DataLoader

    from robodit.datasets.sampler import ResumableBatchSampler, WindowConfig, WindowDataset

    torch.set_num_threads(1)
    peak, stop = [0], threading.Event()
    threading.Thread(target=_peak_rss, args=(stop, peak), daemon=True).start()
    t0 = time.perf_counter()
    if spec["reader"] == "lerobot":
        ds = LeRobotWindows(Path(spec["path"]))
    else:
        cfg = WindowConfig(obs_horizon=2, action_horizon=16, cache=spec["reader"] == "zarr-cached")
        ds = WindowDataset(spec["path"], cfg, train=True)
    setup_s = time.perf_counter() - t0
    sampler = ResumableBatchSampler(len(ds), spec["batch"], seed=0)
    w = spec["workers"]
    loader = iter(DataLoader(ds, batch_sampler=sampler, num_workers=w, prefetch_factor=4 if w else None,
                             persistent_workers=w > 0))
    for _ in range(2):
        next(loader)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < spec["seconds"]:
        n += len(next(loader)["action"])
    rate = n / (time.perf_counter() - t0)
    stop.set()
    peak[0] = peak[0] or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {**{k: v for k, v in spec.items() if k != "path"}, "samples_per_s": round(rate, 1),
            "peak_pss_mb": round(peak[0] / 2**20), "setup_s": round(setup_s, 2)}


def _run_child(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, "--_measure", json.dumps(spec)], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if r.returncode:
        return {**spec, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_big_store(path: Path, gb: float, length: int = 500) -> int:
    """A store of ~`gb` GB decompressed (84 px frames), written directly (no LeRobot step)."""
    from robodit.datasets.store import DemoStore

    frame_bytes = SIZE * SIZE * 3 + 4 * (STATE + ACT)
    episodes = max(1, int(gb * 2**30 / frame_bytes / length))
    base = _frames(0, 64)
    keys = {"image_cam": ((SIZE, SIZE, 3), "uint8"), "state": ((STATE,), "float32"), "action": ((ACT,), "float32")}
    rng = np.random.default_rng(0)
    with DemoStore.create(path, keys, fps=FPS, robot="bench", overwrite=True) as store:
        for e in range(episodes):
            idx = (np.arange(length) + 7 * e) % len(base)
            store.append_episode({"image_cam": base[idx], "state": rng.normal(size=(length, STATE)),
                                  "action": rng.normal(size=(length, ACT))}, task="big")
        return store.nbytes_uncompressed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--length", type=int, default=150)
    p.add_argument("--seconds", type=float, default=8.0, help="measuring time per configuration")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--stream-gb", type=float, default=1.0, help="decompressed size of the streaming store (0: skip)")
    p.add_argument("--cap-gb", type=float, default=0.5, help="RLIMIT_DATA per process in the streaming run")
    p.add_argument("--work", default=str(ROOT / "benchmarks/results/loader_work"))
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/loader.json"))
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._measure:
        print(json.dumps(measure(json.loads(args._measure))))
        return
    import shutil

    from robodit.datasets.convert import convert_lerobot

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    write_lerobot_v3(work / "lerobot", args.episodes, args.length)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    convert_lerobot(work / "lerobot", work / "demos.zarr", progress=False, log=lambda m: None)
    convert_s = time.perf_counter() - t0
    frames = args.episodes * args.length
    print(f"LeRobot v3.0 dataset: {args.episodes} episodes x {args.length} frames, {SIZE} px AV1 "
          f"(written in {write_s:.1f}s); converted at {frames / convert_s:.0f} frames/s", flush=True)
    results = []
    base = {"batch": args.batch, "seconds": args.seconds}
    for reader, path in (("zarr-cached", work / "demos.zarr"), ("zarr-stream", work / "demos.zarr"),
                         ("lerobot", work / "lerobot")):
        for w in args.workers:
            results.append(_run_child({**base, "reader": reader, "workers": w, "path": str(path)}))
            print(json.dumps(results[-1]), flush=True)
    stream = None
    if args.stream_gb > 0:
        cap = int(args.cap_gb * 2**30)
        data_bytes = make_big_store(work / "big.zarr", args.stream_gb)
        stream = {"store_decompressed_mb": round(data_bytes / 2**20), "cap_mb_per_process": cap >> 20, "runs": []}
        for reader in ("zarr-stream", "zarr-cached"):  # the cached run is expected to fail under the cap
            stream["runs"].append(_run_child({**base, "reader": reader, "workers": max(args.workers),
                                              "path": str(work / "big.zarr"), "cap_bytes": cap}))
            print(json.dumps(stream["runs"][-1]), flush=True)
    by = {(r["reader"], r["workers"]): r.get("samples_per_s") for r in results}
    print(f"\n{'reader':<12} {'workers':>7} {'samples/s':>10} {'peak MB':>8}  vs lerobot")
    for r in results:
        ref = by.get(("lerobot", r["workers"]))
        ratio = f"{r['samples_per_s'] / ref:.1f}x" if ref and r.get("samples_per_s") else "-"
        print(f"{r['reader']:<12} {r['workers']:>7} {r.get('samples_per_s', 'error'):>10} "
              f"{r.get('peak_pss_mb', '-'):>8}  {ratio}")
    out = {"machine": f"{os.cpu_count()} cpus (shared; numbers are noisy)", "image_px": SIZE, "obs_horizon": 2,
           "action_horizon": 16, "episodes": args.episodes, "length": args.length,
           "convert_frames_per_s": round(frames / convert_s), "results": results, "streaming": stream}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
