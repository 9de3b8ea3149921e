"""DemoStore: the Zarr v3 demonstration store (format "robodit.demos", version 1).

Layout (see DESIGN.md, "Demonstration store"): ``data/<key>`` time-major arrays chunked along time only;
``meta/episode_*`` per-episode arrays; the task table in the ``meta`` group's attrs.

``meta/episode_seed`` is the simulator seed an episode was collected from (-1: none, e.g. converted data), a
row of the same commit as the episode: the seeds a store has used are its committed episodes' seeds, so a
collection killed between two writes can neither drop a layout nor misalign seeds and episodes. Stores
written before it existed kept the seeds in ``env.seeds_used`` (outside the commit); they read as -1 and a
writer adds the array, filled from that list when it matches the episodes one to one.

Crash safety rests on two facts. (1) zarr's LocalStore writes every object (a chunk or a zarr.json) to a
temp file and ``os.replace``s it into place, so any single object is either old or new, never torn; a chunk
that also holds committed frames is rewritten whole, with those frames unchanged. (2) The number of committed
episodes lives in ``meta/episode_ends``'s attrs (``committed``) and is written LAST by every append. An
append killed at any instant therefore leaves at most uncommitted rows (and ``*.partial`` temp files), which
readers ignore and the next writer truncates. Resize + chunk writes are separate objects, so array shapes
are never trusted as counts. No fsync: this survives a killed process, not a power cut.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from robodit.datasets.store_format import (FORMAT, LOCK_NAME, VERSION, StoreError,  # noqa: F401 - re-exported
                                           acquire_writer_lock, chunk_frames, compressor, normalize_keys,
                                           read_root_attrs, release_writer_lock)

# name -> dtype; episode_ends goes last on purpose (its attrs are the commit point)
_META = {"episode_task": np.dtype(np.int32), "episode_instruction": np.dtype(np.int32),
         "episode_has_language": np.dtype(bool), "episode_has_actions": np.dtype(bool),
         "episode_seed": np.dtype(np.int64), "episode_chain": np.dtype(np.int64),
         "episode_chain_pos": np.dtype(np.int32), "episode_ends": np.dtype(np.int64)}
# rows with no value: -1 (no seed recorded; not a segment of a chain)
_META_FILL = {"episode_seed": -1, "episode_chain": -1, "episode_chain_pos": -1}
_META_CHUNK = 4096
_RESERVED_ATTRS = {"format", "version", "keys", "chunks_complete"}


def _ro(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class DemoStore:
    """A demonstration store opened for reading ("r") or appending ("a", holds the writer lock).

    Meta arrays and zarr array handles are loaded once on open, so `read`/`episode` cost one zarr slice per
    key. A reader sees the episodes committed when it opened (reopen to see later ones).
    """

    def __init__(self, path: Path, mode: str, lock_fd: int | None):
        self.path, self.mode, self._lock_fd = path, mode, lock_fd
        self._load()

    @classmethod
    def create(cls, path, keys, *, fps: float, robot: str, env: dict | None = None,
               overwrite: bool = False) -> DemoStore:
        """Create an empty store and return it opened for append. A new store is built in a temp dir and
        renamed into place, so a killed `create` never leaves a half-made store at `path`."""
        path = Path(path)
        keys = normalize_keys(keys)
        fps = float(fps)
        if not (math.isfinite(fps) and fps > 0) or not isinstance(robot, str) or not robot:
            raise ValueError(f"fps must be > 0 and robot a non-empty string, got fps={fps}, robot={robot!r}")
        env = dict(env or {})
        json.dumps(env)  # TypeError early if not JSON-serialisable
        exists = path.exists()
        if exists and (not overwrite or not path.is_dir()):
            raise StoreError(f"{path} already exists (use overwrite=True, or open it with mode='a')"
                             if path.is_dir() else f"{path} exists and is not a directory")
        if exists and any(p.name != LOCK_NAME for p in path.iterdir()):
            read_root_attrs(path)  # refuse to wipe something that is not a robodit store
        if not exists:
            path.parent.mkdir(parents=True, exist_ok=True)
        root = path if exists else path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
        root.mkdir(exist_ok=True)
        fd = acquire_writer_lock(root)  # for a new store the fd follows the inode through the rename
        try:
            for p in root.iterdir() if exists else ():
                if p.name != LOCK_NAME:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            cls._build(root, keys, fps, robot, env)
            if not exists:
                os.rename(root, path)
        except BaseException as exc:
            release_writer_lock(fd)
            if not exists:
                shutil.rmtree(root, ignore_errors=True)
                if isinstance(exc, OSError):
                    why = "it already exists" if path.exists() else exc
                    raise StoreError(f"{path}: cannot create store ({why})") from None
            raise
        return cls(path, "a", fd)

    @staticmethod
    def _build(root: Path, keys, fps, robot, env) -> None:
        keys_attr = {k: {"shape": list(s), "dtype": d.name, "chunk_frames": chunk_frames(s, d)}
                     for k, (s, d) in keys.items()}
        # chunks_complete: every chunk of committed frames is written, all-zero ones too (zarr skips those by
        # default), so a missing chunk object means damage, not zeros (see missing_chunks)
        attrs = {"format": FORMAT, "version": VERSION, "fps": fps, "robot": robot, "env": env, "keys": keys_attr,
                 "chunks_complete": True}
        g = zarr.create_group(store=LocalStore(root), zarr_format=3, attributes=attrs)
        data = g.create_group("data")
        for k, (shape, dtype) in keys.items():
            data.create_array(k, shape=(0, *shape), chunks=(keys_attr[k]["chunk_frames"], *shape),
                              dtype=dtype, fill_value=0, compressors=compressor(dtype))
        meta = g.create_group("meta", attributes={"tasks": []})
        for name, dtype in _META.items():
            meta.create_array(name, shape=(0,), chunks=(_META_CHUNK,), dtype=dtype, fill_value=_META_FILL.get(name, 0),
                              compressors=ZstdCodec(level=3),
                              attributes={"committed": 0} if name == "episode_ends" else None)

    @classmethod
    def open(cls, path, mode: str = "r") -> DemoStore:
        """Open read-only ("r", no lock) or for append ("a": takes the writer lock, drops uncommitted rows)."""
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        read_root_attrs(path)
        fd = acquire_writer_lock(path) if mode == "a" else None
        try:
            return cls(path, mode, fd)
        except BaseException:
            release_writer_lock(fd)
            raise

    @classmethod
    def open_or_create(cls, path, keys, *, fps, robot, env=None) -> DemoStore:
        """For `collect`: append to an existing store if its keys, fps and robot match, else create it.
        An existing store's env is kept (use `set_attr("env", ...)` to change it)."""
        path = Path(path)
        if not path.exists():
            try:
                return cls.create(path, keys, fps=fps, robot=robot, env=env)
            except StoreError:
                if not (path / "zarr.json").exists():
                    raise
        store = cls.open(path, "a")
        want = normalize_keys(keys)
        problems = []
        if want != store.keys:
            problems.append(f"keys {_fmt_keys(store.keys)} != requested {_fmt_keys(want)}")
        if float(fps) != store.fps or robot != store.robot:
            problems.append(f"fps/robot {store.fps}/{store.robot!r} != requested {float(fps)}/{robot!r}")
        if problems:
            store.close()
            raise StoreError(f"{path}: existing store does not match: " + "; ".join(problems))
        return store

    def _load(self) -> None:
        try:
            self._group = zarr.open_group(store=LocalStore(self.path, read_only=self.mode == "r"),
                                          mode="r" if self.mode == "r" else "r+", use_consolidated=False)
            self.attrs = dict(self._group.attrs)
            self.keys = {k: (tuple(v["shape"]), np.dtype(v["dtype"])) for k, v in self.attrs["keys"].items()}
            self.fps, self.robot = float(self.attrs["fps"]), str(self.attrs["robot"])
            self.env = dict(self.attrs.get("env") or {})
            # Read the commit count first: rows below it were written before it, in every array.
            ends_arr = self._group["meta/episode_ends"]
            committed = int(ends_arr.attrs["committed"])
            self._meta_group = self._group["meta"]
            if "episode_seed" not in self._meta_group.array_keys() and self.mode == "a":
                self._add_seed_array(committed)
            for name in ("episode_chain", "episode_chain_pos"):  # a store from before chains: none is a segment
                if name not in self._meta_group.array_keys() and self.mode == "a":
                    self._meta_group.create_array(name, shape=(committed,), chunks=(_META_CHUNK,), dtype=_META[name],
                                                  fill_value=-1, compressors=ZstdCodec(level=3))
            present = set(self._meta_group.array_keys())
            self._marr = {n: ends_arr if n == "episode_ends" else self._group[f"meta/{n}"] for n in _META
                          if n in present}
            self._meta = {n: _ro(a[:committed]) for n, a in self._marr.items()}
            for name, fill in _META_FILL.items():  # an older store opened read-only: its episodes have none
                if name not in self._meta:
                    self._meta[name] = _ro(np.full(committed, fill, _META[name]))
            self._meta = {n: self._meta[n] for n in _META}
            tasks = [{"name": t["name"], "instructions": list(t["instructions"])}
                     for t in self._meta_group.attrs.get("tasks", [])]
            self._data = {k: self._group[f"data/{k}"].with_config({"write_empty_chunks": True}) for k in self.keys}
        except StoreError:
            raise
        except Exception as exc:  # missing arrays/attrs, bad JSON, zarr errors
            raise StoreError(f"{self.path}: corrupt or incomplete store ({type(exc).__name__}: {exc})") from None
        ends = self._meta["episode_ends"]
        n = int(ends[-1]) if committed else 0
        bad = [m for m, a in self._meta.items() if len(a) != committed]
        bad += [k for k, a in self._data.items() if a.shape[0] < n or tuple(a.shape[1:]) != self.keys[k][0]
                or a.dtype != self.keys[k][1]]
        if bad or (committed and (ends[0] <= 0 or np.any(np.diff(ends) <= 0))):
            raise StoreError(f"{self.path}: corrupt store: inconsistent arrays {bad or ['meta/episode_ends']}")
        # Entries no committed episode uses can only come from an append killed before its commit: drop them.
        ti, ii = self._meta["episode_task"], self._meta["episode_instruction"]
        if committed and (ti.min() < 0 or ti.max() >= len(tasks)):
            raise StoreError(f"{self.path}: corrupt store: episode_task out of range of the task table")
        tasks = tasks[: int(ti.max()) + 1 if committed else 0]
        for t, task in enumerate(tasks):
            task["instructions"] = task["instructions"][: int(ii[ti == t].max(initial=-1)) + 1]
        self._tasks, self._num_frames = tasks, n
        if self.mode == "a":
            self._truncate()

    def _add_seed_array(self, committed: int) -> None:
        """Give a store from before `meta/episode_seed` the array (writer side). Its seeds, if any, are the old
        `env.seeds_used` list, which a collection killed between recording a seed and committing its episode
        left longer than the episodes: only a list of exactly one seed per episode says which is whose."""
        arr = self._meta_group.create_array("episode_seed", shape=(committed,), chunks=(_META_CHUNK,),
                                            dtype=np.int64, fill_value=-1, compressors=ZstdCodec(level=3))
        legacy = (self.env.get("seeds_used") or []) if committed else []
        if len(legacy) == committed and all(isinstance(x, int) and x >= 0 for x in legacy):
            arr[:] = np.asarray(legacy, np.int64)

    def _truncate(self) -> None:
        """Writer-side recovery: drop rows past the commit point and leftover temp files of a killed write."""
        for k, a in self._data.items():
            if a.shape[0] != self._num_frames:
                a.resize((self._num_frames, *a.shape[1:]))
        for n, a in self._marr.items():
            if a.shape[0] != len(self):
                a.resize((len(self),))
        if self._meta_group.attrs.get("tasks", []) != self._tasks:
            self._meta_group.update_attributes({"tasks": self._tasks})
        for dirpath, _, files in os.walk(self.path):
            for f in files:
                if f.endswith(".partial"):
                    os.unlink(os.path.join(dirpath, f))

    def __len__(self) -> int:
        return len(self._meta["episode_ends"])

    num_frames = property(lambda self: self._num_frames, doc="committed frames")
    episode_ends = property(lambda self: self._meta["episode_ends"])
    episode_task = property(lambda self: self._meta["episode_task"])
    episode_instruction = property(lambda self: self._meta["episode_instruction"])
    episode_has_language = property(lambda self: self._meta["episode_has_language"])
    episode_has_actions = property(lambda self: self._meta["episode_has_actions"])
    episode_seed = property(lambda self: self._meta["episode_seed"], doc="collection seed per episode, -1: none")
    episode_chain = property(lambda self: self._meta["episode_chain"],
                             doc="chain id per episode (the chain's env seed; -1: not part of a chain)")
    episode_chain_pos = property(lambda self: self._meta["episode_chain_pos"],
                                 doc="position of the episode in its chain (0 = first subtask; -1: no chain)")

    @property
    def seeds_used(self) -> list[int]:
        """Seeds no new episode may be collected from: the committed episodes' seeds in episode order, then
        any seeds a store from before `meta/episode_seed` listed in `env.seeds_used` and no episode names."""
        own = [int(x) for x in self._meta["episode_seed"] if x >= 0]
        mine = set(own)
        return own + [int(x) for x in self.env.get("seeds_used") or [] if int(x) not in mine]
    tasks = property(lambda self: [dict(t, instructions=list(t["instructions"])) for t in self._tasks])
    task_names = property(lambda self: [t["name"] for t in self._tasks])

    @property
    def episode_starts(self) -> np.ndarray:
        ends = self._meta["episode_ends"]
        return _ro(np.concatenate([np.zeros(1, np.int64), ends[:-1]]) if len(ends) else ends.copy())

    def _index(self, i: int) -> int:
        j = int(i) + len(self) if int(i) < 0 else int(i)
        if not 0 <= j < len(self):
            raise IndexError(f"episode index {i} out of range for {len(self)} episodes")
        return j

    def _bounds(self, i: int) -> tuple[int, int]:
        i = self._index(i)
        return (int(self._meta["episode_ends"][i - 1]) if i else 0), int(self._meta["episode_ends"][i])

    def episode(self, i: int) -> dict[str, np.ndarray]:
        start, end = self._bounds(i)
        return {k: a[start:end] for k, a in self._data.items()}

    def episode_info(self, i: int) -> dict:
        j = self._index(i)
        start, end = self._bounds(j)
        t, ins = int(self._meta["episode_task"][j]), int(self._meta["episode_instruction"][j])
        return {"index": j, "start": start, "end": end, "length": end - start, "task": self._tasks[t]["name"],
                "instruction": self._tasks[t]["instructions"][ins] if ins >= 0 else None,
                "has_language": bool(self._meta["episode_has_language"][j]),
                "has_actions": bool(self._meta["episode_has_actions"][j]),
                "seed": int(self._meta["episode_seed"][j]) if self._meta["episode_seed"][j] >= 0 else None,
                "chain": int(self._meta["episode_chain"][j]), "chain_pos": int(self._meta["episode_chain_pos"][j])}

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) of one key; only committed frames may be read."""
        if key not in self._data:
            raise KeyError(f"unknown key {key!r}; the store has {sorted(self._data)}")
        if not 0 <= start <= stop <= self._num_frames:
            raise IndexError(f"frame range [{start}, {stop}) outside the committed [0, {self._num_frames})")
        return self._data[key][start:stop]

    def missing_chunks(self) -> dict[str, list[int]]:
        """{key: indices of chunks along time} holding committed frames whose object is absent, {} when none.
        zarr reads an absent chunk as zeros without a word, so a store damaged by an interrupted copy or sync
        would train on zeros. Stores created before `chunks_complete` was recorded cannot tell an absent chunk
        from an all-zero one that zarr skipped writing: {} for them."""
        if not self.attrs.get("chunks_complete"):
            return {}
        out = {}
        for k, arr in self._data.items():
            zeros = (0,) * (arr.ndim - 1)
            absent = [i for i in range(-(-self._num_frames // arr.chunks[0]))
                      if not (self.path / "data" / k / arr.metadata.encode_chunk_key((i, *zeros))).exists()]
            if absent:
                out[k] = absent
        return out

    def verify(self) -> None:
        """StoreError naming the damage when any chunk of committed frames is missing (see missing_chunks)."""
        missing = self.missing_chunks()
        if missing:
            key, chunks = next(iter(missing.items()))
            arr, i = self._data[key], chunks[0]
            frames = (i * arr.chunks[0], min(self._num_frames, (i + 1) * arr.chunks[0]))
            raise StoreError(f"{self.path}: {sum(map(len, missing.values()))} chunk(s) of committed frames are "
                             f"missing in {sorted(missing)} (first: data/{key}/"
                             f"{arr.metadata.encode_chunk_key((i, *(0,) * (arr.ndim - 1)))}, frames "
                             f"{frames[0]}..{frames[1] - 1}): the store is damaged (an interrupted copy?) and would "
                             "read zeros there; copy it again")

    def array(self, key: str) -> zarr.Array:
        """The zarr array of `key` (rows at or past `num_frames` are not data)."""
        return self._data[key]

    def nbytes_stored(self) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.path) for f in fs
                   if f != LOCK_NAME)

    def nbytes_uncompressed(self) -> int:
        data = sum(self._num_frames * math.prod(s) * d.itemsize for s, d in self.keys.values())
        return data + sum(a.nbytes for a in self._meta.values())

    def _writer(self) -> None:
        if self.mode != "a" or self._lock_fd is None:
            why = "closed" if self.mode == "a" else "opened read-only; use mode='a'"
            raise StoreError(f"{self.path} is not open for writing ({why})")

    def _validate(self, arrays: Mapping, has_actions: bool) -> dict[str, np.ndarray]:
        """Float keys accept any float dtype (simulators return float64; it is rounded to the stored
        float32); every other key (uint8 images, ints, bools) needs its exact dtype, so nothing is silently
        wrapped or truncated. Values must be finite."""
        if not isinstance(arrays, Mapping):
            raise ValueError(f"episode must be a dict of arrays, got {type(arrays).__name__}")
        given, want = set(arrays), set(self.keys)
        optional = set() if has_actions else {"action"}
        if want - given - optional:
            raise ValueError(f"episode is missing key(s) {sorted(want - given - optional)}; "
                             f"store keys: {sorted(want)}")
        if given - want:
            raise ValueError(f"episode has unknown key(s) {sorted(given - want)}; store keys: {sorted(want)}")
        out = {}
        for k in sorted(given):
            shape, dtype = self.keys[k]
            a = np.asarray(arrays[k])
            if a.ndim != len(shape) + 1 or a.shape[1:] != shape:
                want_shape = ", ".join(["T", *map(str, shape)])
                raise ValueError(f"key {k!r}: expected shape [{want_shape}] (time-major), got {list(a.shape)}")
            if a.dtype != dtype and not (dtype.kind == "f" and a.dtype.kind == "f"):
                raise ValueError(f"key {k!r}: expected dtype {dtype}, got {a.dtype}")
            if dtype.kind == "f":
                with np.errstate(over="ignore"):
                    a = a.astype(dtype, copy=False)
                if not np.isfinite(a).all():
                    frame = int(np.argwhere(~np.isfinite(a.reshape(len(a), -1)))[0, 0])
                    raise ValueError(f"key {k!r}: non-finite value (NaN/inf, or too large for {dtype}) "
                                     f"at frame {frame}")
            out[k] = np.ascontiguousarray(a)
        lengths = {k: len(a) for k, a in out.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"keys have different lengths (frames): {lengths}")
        T = next(iter(lengths.values()))
        if T == 0:
            raise ValueError(f"zero-length episode (keys {sorted(lengths)} have 0 frames)")
        if not has_actions:
            if "action" in out and out["action"].any():
                raise ValueError("key 'action': has_actions=False but the actions are not all zero")
            out["action"] = np.zeros((T, *self.keys["action"][0]), self.keys["action"][1])
        return out

    def append_episode(self, arrays: dict[str, np.ndarray], task: str, instruction: str | None = None,
                       has_actions: bool = True, seed: int | None = None, chain: int = -1, chain_pos: int = -1) -> int:
        """Append one episode and commit it; returns its index. Everything is validated before anything is
        written. Order: task table, data, meta rows, then the commit count (one atomic zarr.json write).
        With has_actions=False "action" may be omitted (stored as zeros: action-free video). `seed`: the
        simulator seed the episode was collected from (`meta/episode_seed`, committed with the episode).
        `chain` / `chain_pos`: the chain the episode is a segment of and its place there (-1: none)."""
        return self.append_episodes([dict(arrays=arrays, task=task, instruction=instruction, has_actions=has_actions,
                                          seed=seed, chain=chain, chain_pos=chain_pos)])[0]

    def append_episodes(self, episodes: list[dict]) -> list[int]:
        """Append several episodes under ONE commit (all of them or, after a kill, none): a chain's segments
        stay whole. Each item holds `append_episode`'s arguments (arrays, task, instruction, has_actions, seed,
        chain, chain_pos). Returns their indices."""
        self._writer()
        if not episodes:
            return []
        tasks = self.tasks
        rows, datas = [], []
        for ep in episodes:
            unknown = sorted(set(ep) - {"arrays", "task", "instruction", "has_actions", "seed", "chain", "chain_pos"})
            if unknown:
                raise ValueError(f"append_episodes: unknown field(s) {unknown}")
            task, instruction, seed = ep.get("task"), ep.get("instruction"), ep.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
                raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
            if not isinstance(task, str) or not task:
                raise ValueError(f"task must be a non-empty string, got {task!r}")
            if instruction is not None and (not isinstance(instruction, str) or not instruction):
                raise ValueError(f"instruction must be a non-empty string or None, got {instruction!r}")
            chain, pos = int(ep.get("chain", -1)), int(ep.get("chain_pos", -1))
            if (chain < 0) != (pos < 0):
                raise ValueError(f"chain={chain} and chain_pos={pos}: give both (>= 0) or neither")
            has_actions = bool(ep.get("has_actions", True))
            arrays = self._validate(ep["arrays"], has_actions)
            names = [t["name"] for t in tasks]
            if task not in names:
                tasks.append({"name": task, "instructions": []})
                names.append(task)
            t = names.index(task)
            ins = -1
            if instruction is not None:
                if instruction not in tasks[t]["instructions"]:
                    tasks[t]["instructions"].append(instruction)
                ins = tasks[t]["instructions"].index(instruction)
            datas.append(arrays)
            rows.append({"episode_task": t, "episode_instruction": ins, "episode_has_language": instruction is not None,
                         "episode_has_actions": has_actions, "episode_seed": -1 if seed is None else int(seed),
                         "episode_chain": chain, "episode_chain_pos": pos, "episode_ends": len(arrays["action"])})
        if tasks != self._tasks:
            self._meta_group.update_attributes({"tasks": tasks})
        n, e = self._num_frames, len(self)
        T = sum(r["episode_ends"] for r in rows)
        for k, arr in self._data.items():  # chunks holding committed frames are rewritten whole, atomically
            arr.resize((n + T, *arr.shape[1:]))
            arr[n:n + T] = np.concatenate([d[k] for d in datas])
        ends = n + np.cumsum([r["episode_ends"] for r in rows])
        for r, end in zip(rows, ends):
            r["episode_ends"] = int(end)
        new = {m: np.asarray([r[m] for r in rows], _META[m]) for m in _META}
        for name, arr in self._marr.items():
            arr.resize((e + len(rows),))
            arr[e:e + len(rows)] = new[name]
        self._marr["episode_ends"] = self._marr["episode_ends"].update_attributes(
            {"committed": e + len(rows)})  # COMMIT
        self._meta = {m: _ro(np.append(a, new[m])) for m, a in self._meta.items()}
        self._tasks, self._num_frames = tasks, int(ends[-1])
        return list(range(e, e + len(rows)))

    def set_attr(self, name: str, value) -> None:
        """Update one root attr (e.g. env) in one atomic zarr.json write. format/version/keys are fixed."""
        self._writer()
        if name in _RESERVED_ATTRS:
            raise ValueError(f"root attr {name!r} is fixed at creation")
        json.dumps(value)  # TypeError if not JSON-serialisable
        ok = {"fps": lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
              "robot": lambda v: isinstance(v, str) and v, "env": lambda v: isinstance(v, dict)}
        if name in ok and not ok[name](value):
            raise ValueError(f"bad value for root attr {name!r}: {value!r}")
        self._group.update_attributes({name: value})
        self.attrs[name] = value
        if name == "env":
            self.env = dict(value)
        elif name in ("fps", "robot"):
            self.fps, self.robot = float(self.attrs["fps"]), str(self.attrs["robot"])

    # -- instruction embeddings (meta/lang_emb) ----------------------------------------------------------------
    def instructions(self) -> list[str]:
        """Every distinct instruction of the committed episodes, in task-table order."""
        seen: dict[str, None] = {}
        for task in self._tasks:
            for text in task["instructions"]:
                seen.setdefault(text, None)
        return list(seen)

    def language_embeddings(self) -> tuple[str, dict[str, np.ndarray]] | None:
        """(encoder name, {instruction: [D] float32}) from ``meta/lang_emb``, or None when none are stored.

        The rows and their instructions are written first and the array's attrs (encoder, instructions) last,
        so a killed write leaves either the previous table or none, never rows paired with the wrong text."""
        if "lang_emb" not in self._meta_group.array_keys():
            return None
        arr = self._meta_group["lang_emb"]
        texts, encoder = arr.attrs.get("instructions"), arr.attrs.get("encoder")
        if not isinstance(texts, list) or not encoder or len(texts) != arr.shape[0]:
            return None
        emb = np.asarray(arr[:], dtype=np.float32)
        return str(encoder), {t: emb[i] for i, t in enumerate(texts)}

    def set_language_embeddings(self, encoder: str, table: Mapping[str, np.ndarray]) -> None:
        """Replace ``meta/lang_emb`` with `table` ({instruction: [D]}), recording the encoder's name."""
        self._writer()
        texts = list(table)
        emb = np.stack([np.asarray(table[t], np.float32) for t in texts]) if texts else np.zeros((0, 1), np.float32)
        if emb.ndim != 2 or not np.isfinite(emb).all():
            raise ValueError(f"language embeddings must be finite [N, D] rows, got shape {emb.shape}")
        # overwrite=True drops the old table first; the new one is valid only once its attrs land (last write)
        arr = self._meta_group.create_array("lang_emb", shape=emb.shape, chunks=(max(1, len(emb)), emb.shape[1]),
                                            dtype=np.float32, fill_value=0, overwrite=True,
                                            compressors=ZstdCodec(level=3))
        if len(emb):
            arr[:] = emb
        arr.update_attributes({"encoder": str(encoder), "instructions": texts})

    def close(self) -> None:
        """Release the writer lock (reads keep working)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        release_writer_lock(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> DemoStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DemoStore({str(self.path)!r}, mode={self.mode!r}, episodes={len(self)}, "
                f"frames={self._num_frames}, keys={_fmt_keys(self.keys)})")


def _fmt_keys(keys) -> str:
    return "{" + ", ".join(f"{k}: {list(s)} {d}" for k, (s, d) in sorted(keys.items())) + "}"
