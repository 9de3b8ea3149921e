"""Read a local LeRobot dataset (codebase v3.0, or v2.0/v2.1) episode by episode, without lerobot installed.

Layout read (from meta/info.json's `data_path`/`video_path` templates):
- v3.0: episodes in `meta/episodes/*/*.parquet` (length, data file, per-video file and from/to timestamps);
  many episodes per data parquet and per mp4; tasks in `meta/tasks.parquet`.
- v2.x: one parquet and one mp4 per episode; `meta/episodes.jsonl`, `meta/tasks.jsonl`.
Frames of "video" features are decoded with PyAV at `from_timestamp + timestamp` of each row; "image" features
are PNG/JPEG bytes in the parquet (or a path under the dataset). Only one data file is held in memory.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from robodit.datasets.convert.common import ConvertError, Episode, Feature, Source, safe_key

# bookkeeping columns LeRobot adds to every dataset: never observations
BOOKKEEPING = ("timestamp", "frame_index", "episode_index", "index", "task_index")
_NUMERIC = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32",
            "bool"}


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConvertError("reading LeRobot datasets needs pyarrow: pip install 'robodit[convert]'") from None
    return pq


def decode_video(path: Path, timestamps: np.ndarray, fps: float, what: str = "") -> np.ndarray:
    """RGB frames [N, H, W, 3] uint8 of the mp4 at `path` whose times match `timestamps` (seconds, sorted).

    Seeks to the key frame before the first time, then decodes forward; a frame matches when its time is
    within a quarter of a frame period. A time with no frame is an error (naming `what`), never a guess.
    """
    import av

    timestamps = np.asarray(timestamps, dtype=np.float64)
    if not path.is_file():
        raise ConvertError(f"{what}: video file missing: {path}")
    tol = 0.25 / fps
    out: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if timestamps[0] > tol:
                container.seek(max(0, int((timestamps[0] - tol) / stream.time_base)), stream=stream,
                               backward=True, any_frame=False)
            j = 0
            for frame in container.decode(stream):
                t = frame.time
                if t is None:
                    continue
                if t > timestamps[j] + tol:
                    raise ConvertError(f"{what}: no frame at t={timestamps[j]:.4f}s in {path} "
                                       f"(next frame is at {t:.4f}s)")
                if abs(t - timestamps[j]) <= tol:
                    out.append(frame.to_ndarray(format="rgb24"))
                    j += 1
                    if j == len(timestamps):
                        break
    except ConvertError:
        raise
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise ConvertError(f"{what}: cannot decode video {path}: {exc}") from None
    if len(out) < len(timestamps):
        raise ConvertError(f"{what}: video {path} ends before t={timestamps[len(out)]:.4f}s "
                           f"({len(out)} of {len(timestamps)} frames found)")
    return np.stack(out)


def _column(table, name: str, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    """A (fixed-size) list column as a [rows, *shape] array."""
    if name not in table.column_names:
        raise ConvertError(f"{where}: column {name!r} missing (meta/info.json lists it as a feature)")
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    while True:
        if col.null_count:
            raise ConvertError(f"{where}: column {name!r} has {col.null_count} null values")
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                or pa.types.is_fixed_size_list(col.type)):
            break
        col = col.flatten()
    values = col.to_numpy(zero_copy_only=False)
    n = table.num_rows
    if values.size != n * int(np.prod(shape)):
        raise ConvertError(f"{where}: column {name!r} holds {values.size // max(1, n)} values per frame, "
                           f"expected shape {list(shape)}")
    return values.reshape(n, *shape).astype(dtype, copy=False)


def _image_column(table, name: str, shape: tuple[int, ...], root: Path, where: str) -> np.ndarray:
    from PIL import Image

    if name not in table.column_names:
        raise ConvertError(f"{where}: image column {name!r} missing (meta/info.json lists it as a feature)")
    frames = []
    for i, cell in enumerate(table.column(name).to_pylist()):
        cell = cell or {}
        try:
            if cell.get("bytes"):
                img = Image.open(io.BytesIO(cell["bytes"]))
            elif cell.get("path"):
                img = Image.open(root / cell["path"])
            else:
                raise ConvertError(f"{where}: image {name!r} of row {i} has neither bytes nor path")
            frames.append(np.asarray(img.convert("RGB")))
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{where}: cannot read image {name!r} of row {i}: {exc}") from None
    out = np.stack(frames)
    if out.shape[1:] != shape:
        raise ConvertError(f"{where}: images {name!r} are {list(out.shape[1:])}, expected {list(shape)}")
    return out


class LeRobotSource(Source):
    format = "lerobot"

    def __init__(self, root: str | Path):
        self.path = root = Path(root)
        info_path = root / "meta" / "info.json"
        if not info_path.is_file():
            raise ConvertError(f"{root}: not a LeRobot dataset (meta/info.json missing)")
        try:
            self.info = info = json.loads(info_path.read_text())
            self.version = str(info["codebase_version"])
            self.fps = float(info["fps"])
            raw_features = dict(info["features"])
            self.data_path = str(info["data_path"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConvertError(f"{info_path}: bad or missing field {exc}") from None
        if self.version not in ("v3.0", "v2.1", "v2.0"):
            raise ConvertError(f"{info_path}: codebase_version {self.version!r} is not supported "
                               "(reads v3.0, v2.1, v2.0)")
        self.v3 = self.version == "v3.0"
        self.robot = str(info.get("robot_type") or "unknown")
        self.video_path = info.get("video_path")
        self.chunks_size = int(info.get("chunks_size") or 1000)
        self.features, self.unstorable, self._hwc = {}, [], {}
        for name, spec in raw_features.items():
            self._add_feature(name, spec, info_path)
        self._load_episodes()
        self._tasks = self._load_tasks()
        self._file: tuple | None = None  # (path, columns, table): the one data parquet held in memory

    def _add_feature(self, name: str, spec: dict, info_path: Path) -> None:
        if name in BOOKKEEPING:
            return
        dtype, shape = spec.get("dtype"), tuple(int(s) for s in spec.get("shape") or ())
        if dtype in ("video", "image"):
            names = [str(n).lower() for n in (spec.get("names") or [])]
            if len(shape) != 3:
                raise ConvertError(f"{info_path}: feature {name!r}: image shape {list(shape)} is not 3-D")
            chw = names[:1] in (["channels"], ["channel"]) or (not names and shape[0] == 3 != shape[2])
            hwc = (shape[1], shape[2], shape[0]) if chw else shape
            if hwc[2] != 3:
                raise ConvertError(f"{info_path}: feature {name!r}: {hwc[2]} channels; only RGB is supported")
            if dtype == "video" and not self.video_path:
                raise ConvertError(f"{info_path}: feature {name!r} is a video but info has no video_path")
            self.features[name] = Feature(name, hwc, np.dtype(np.uint8), dtype)
        elif dtype in _NUMERIC and shape:
            stored = np.dtype(np.float32) if dtype.startswith("float") else np.dtype(dtype)
            self.features[name] = Feature(name, shape, stored)
        else:
            self.unstorable.append(name)

    def default_key(self, feature: Feature) -> str | None:
        n = feature.name
        if n == "action":
            return "action"
        if n == "observation.state":
            return "state"
        if n == "observation.environment_state":
            return "env_state"
        if n.startswith("observation.images.") or n == "observation.image":
            return "image_" + safe_key(n.removeprefix("observation.images.")) if n != "observation.image" \
                else "image"
        if n.startswith("observation."):
            return safe_key(n.removeprefix("observation."))
        return None  # rewards, dones, ...: not observations unless mapped

    def _read_table(self, path: Path, columns=None):
        pq = _pq()
        if not path.is_file():
            raise ConvertError(f"{self.path}: missing file {path.relative_to(self.path)}")
        try:
            return pq.read_table(path, columns=columns)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError on corrupt files
            raise ConvertError(f"{path}: corrupt or unreadable parquet ({type(exc).__name__}: {exc})") from None

    def _load_episodes(self) -> None:
        """Per-episode rows: length, data file, per-video (file, from_timestamp)."""
        self.episodes: dict[int, dict] = {}
        if self.v3:
            files = sorted((self.path / "meta" / "episodes").glob("*/*.parquet"))
            if not files:
                raise ConvertError(f"{self.path}: no episode metadata (meta/episodes/*/*.parquet)")
            for f in files:
                table = self._read_table(f)
                cols = set(table.column_names)
                need = {"episode_index", "length", "data/chunk_index", "data/file_index"}
                need |= {f"videos/{k}/{c}" for k, ft in self.features.items() if ft.kind == "video"
                         for c in ("chunk_index", "file_index", "from_timestamp")}
                if need - cols:
                    raise ConvertError(f"{f}: episode metadata lacks column(s) {sorted(need - cols)}")
                extra = {"tasks", "dataset_from_index", "dataset_to_index"} & cols
                for row in table.select(sorted(need | extra)).to_pylist():
                    self.episodes[int(row["episode_index"])] = row
        else:
            path = self.path / "meta" / "episodes.jsonl"
            if not path.is_file():
                raise ConvertError(f"{self.path}: no episode metadata (meta/episodes.jsonl)")
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        row = json.loads(line)
                        self.episodes[int(row["episode_index"])] = row
                    except (ValueError, KeyError) as exc:
                        raise ConvertError(f"{path}: line {i + 1}: bad episode record ({exc})") from None

    def _load_tasks(self) -> dict[int, str]:
        if self.v3:
            path = self.path / "meta" / "tasks.parquet"
            if not path.is_file():
                return {}
            table = self._read_table(path)
            text = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
            if text is None or "task_index" not in table.column_names:
                raise ConvertError(f"{path}: needs columns task_index and task, has {table.column_names}")
            return dict(zip(table.column("task_index").to_pylist(), table.column(text).to_pylist()))
        path = self.path / "meta" / "tasks.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        return {int(r["task_index"]): str(r["task"]) for r in rows}

    def episode_ids(self) -> list[int]:
        return sorted(self.episodes)

    def num_frames(self) -> int | None:
        return int(sum(int(e["length"]) for e in self.episodes.values()))

    def _data_file(self, ep: int, row: dict) -> Path:
        if self.v3:
            rel = self.data_path.format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
        else:
            rel = self.data_path.format(episode_chunk=ep // self.chunks_size, episode_index=ep)
        return self.path / rel

    def _video_file(self, ep: int, row: dict, key: str) -> tuple[Path, float]:
        if self.v3:
            rel = self.video_path.format(video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                                         file_index=row[f"videos/{key}/file_index"])
            return self.path / rel, float(row[f"videos/{key}/from_timestamp"])
        rel = self.video_path.format(episode_chunk=ep // self.chunks_size, video_key=key, episode_index=ep)
        return self.path / rel, 0.0

    def episode_rows(self, ep: int, columns: list[str]):
        """The parquet rows of one episode, in frame order. Only `columns` (+ bookkeeping) of the data file
        are read, and the file stays cached for the next episode (v3.0 files hold many)."""
        import pyarrow.compute as pc

        row = self.episodes[ep]
        path = self._data_file(ep, row)
        want = sorted({"episode_index", "frame_index", "timestamp", "task_index", *columns})
        if self._file is None or self._file[:2] != (path, want):
            self._file = None  # drop the previous file before reading the next
            try:
                have = set(_pq().read_schema(path).names) if path.is_file() else set()
            except Exception as exc:
                raise ConvertError(f"{path}: corrupt or unreadable parquet ({type(exc).__name__}: {exc})") from None
            missing = [c for c in want if c not in have and c != "task_index"]
            if missing and have:
                raise ConvertError(f"{path}: column(s) {missing} missing (meta/info.json lists them as features)")
            self._file = (path, want, self._read_table(path, [c for c in want if c in have]))
        table = self._file[2]
        rows = table.filter(pc.equal(table.column("episode_index"), ep))
        rows = rows.take(pc.sort_indices(rows.column("frame_index")))
        if rows.num_rows != int(row["length"]):
            raise ConvertError(f"{path}: episode {ep} has {rows.num_rows} rows, its metadata says "
                               f"length {row['length']}")
        return rows, path

    def read_episode(self, ep: int, names: list[str]) -> Episode:
        if ep not in self.episodes:
            raise ConvertError(f"{self.path}: no episode {ep}")
        row = self.episodes[ep]
        table_cols = [n for n in names if self.features[n].kind != "video"]
        rows, path = self.episode_rows(ep, table_cols)
        where = f"{path} (episode {ep})"
        arrays: dict[str, np.ndarray] = {}
        for name in names:
            feat = self.features[name]
            if feat.kind == "array":
                arrays[name] = _column(rows, name, feat.shape, feat.dtype, where)
            elif feat.kind == "image":
                arrays[name] = _image_column(rows, name, feat.shape, self.path, where)
            else:
                video, t0 = self._video_file(ep, row, name)
                ts = t0 + rows.column("timestamp").to_numpy().astype(np.float64)
                frames = decode_video(video, ts, self.fps, f"episode {ep}, feature {name!r}")
                if frames.shape[1:] != feat.shape:
                    raise ConvertError(f"{video}: frames are {list(frames.shape[1:])}, meta/info.json says "
                                       f"feature {name!r} is {list(feat.shape)}")
                arrays[name] = frames
        return Episode(arrays, *self._task(ep, row, rows))

    def _task(self, ep: int, row: dict, rows) -> tuple[str, str | None, bool]:
        names = []
        if "task_index" in rows.column_names:
            idx = np.unique(rows.column("task_index").to_numpy())
            first = int(rows.column("task_index")[0].as_py())
            if first not in self._tasks:
                raise ConvertError(f"episode {ep}: task_index {first} is not in the task table")
            names = [self._tasks[first]] + [self._tasks.get(int(i), "") for i in idx if int(i) != first]
        elif row.get("tasks"):
            names = list(row["tasks"])
        if not names or not str(names[0]).strip():
            return f"lerobot/{self.path.name}", None, False  # no language: a task name, no instruction
        return str(names[0]), str(names[0]), len(names) > 1

    def close(self) -> None:
        self._file = None
