"""Read a robomimic HDF5 file (also LIBERO's, which uses the same layout) one demo at a time.

Layout: `data` group (attrs `env_args`: JSON with env_name and env_kwargs; LIBERO adds `problem_info` with
`language_instruction`), one group per demo `data/demo_N` with `actions` [T, A], `obs/<key>` [T, ...] (images
uint8 H, W, C), and optionally `states`, `rewards`, `dones`, `next_obs/*`. `mask/<filter>` lists demo names
of a split (e.g. "train", "valid"). The source episode index of `demo_N` is N.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from robodit.datasets.convert.common import ConvertError, Episode, Feature, Source, safe_key

_DEMO = re.compile(r"demo_(\d+)\Z")


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ConvertError("reading robomimic files needs h5py: pip install 'robodit[convert]'") from None
    return h5py


def _attr_json(attrs, name: str, where: str) -> dict:
    if name not in attrs:
        return {}
    raw = attrs[name]
    raw = raw.decode() if isinstance(raw, bytes) else raw
    try:
        value = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError) as exc:
        raise ConvertError(f"{where}: attribute {name!r} is not valid JSON ({exc})") from None
    return value if isinstance(value, dict) else {}


class RobomimicSource(Source):
    format = "robomimic"
    version = "hdf5"

    def __init__(self, path: str | Path, filter_key: str | None = None):
        h5py = _h5py()
        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: no such file")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise ConvertError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        if "data" not in self.file:
            raise ConvertError(f"{self.path}: no 'data' group (not a robomimic file)")
        data = self.file["data"]
        env_args = _attr_json(data.attrs, "env_args", f"{self.path}:/data")
        kwargs = env_args.get("env_kwargs") or {}
        robots = kwargs.get("robots")
        self.robot = "+".join(robots) if isinstance(robots, list) and robots else str(robots or "unknown")
        self.fps = float(kwargs.get("control_freq") or 20.0)
        self.task = str(env_args.get("env_name") or f"robomimic/{self.path.stem}")
        problem = _attr_json(data.attrs, "problem_info", f"{self.path}:/data")
        self.instruction = str(problem.get("language_instruction") or "").strip() or None
        names = {int(m.group(1)): k for k in data.keys() if (m := _DEMO.match(k))}
        if filter_key is not None:
            mask = f"mask/{filter_key}"
            if mask not in self.file:
                have = sorted(self.file["mask"].keys()) if "mask" in self.file else []
                raise ConvertError(f"{self.path}: no filter {mask!r} (filters: {have})")
            keep = {(n.decode() if isinstance(n, bytes) else str(n)) for n in self.file[mask][()]}
            names = {i: n for i, n in names.items() if n in keep}
        if not names:
            raise ConvertError(f"{self.path}: no demos (groups data/demo_N)")
        self.demos = dict(sorted(names.items()))
        self.features, self.unstorable = {}, []
        first = data[next(iter(self.demos.values()))]
        for rel in self._datasets(first):
            ds = first[rel]
            if ds.dtype.kind not in "biuf" or ds.ndim < 1:
                self.unstorable.append(rel)
                continue
            shape, dtype = tuple(int(s) for s in ds.shape[1:]) or (1,), ds.dtype
            image = dtype == np.uint8 and len(shape) == 3 and shape[-1] in (1, 3, 4)
            stored = np.dtype(np.float32) if dtype.kind == "f" else dtype
            self.features[rel] = Feature(rel, shape, stored, "image" if image else "array")

    @staticmethod
    def _datasets(group) -> list[str]:
        out = []
        group.visit(lambda name: out.append(name) if hasattr(group[name], "shape") else None)
        return sorted(out)

    def default_key(self, feature: Feature) -> str | None:
        n = feature.name
        if n == "actions":
            return "action"
        if n.startswith("obs/"):
            k = n.removeprefix("obs/")
            return "image_" + safe_key(k.removesuffix("_image")) if feature.kind == "image" else safe_key(k)
        return None  # states, rewards, dones, next_obs/*: not policy inputs unless mapped

    def episode_ids(self) -> list[int]:
        return list(self.demos)

    def num_frames(self) -> int | None:
        data = self.file["data"]
        n = [data[name].attrs.get("num_samples") for name in self.demos.values()]
        return int(sum(n)) if all(x is not None for x in n) else None

    def read_episode(self, ep: int, names: list[str]) -> Episode:
        group_name = self.demos.get(ep)
        if group_name is None:
            raise ConvertError(f"{self.path}: no demo_{ep}")
        group = self.file["data"][group_name]
        arrays = {}
        for name in names:
            where = f"{self.path}:/data/{group_name}/{name}"
            if name not in group:
                raise ConvertError(f"{where}: dataset missing")
            try:
                a = group[name][()]
            except OSError as exc:
                raise ConvertError(f"{where}: unreadable ({exc})") from None
            arrays[name] = a.reshape(len(a), *self.features[name].shape) if a.ndim == 1 else a
        n = group.attrs.get("num_samples")
        bad = {k: len(a) for k, a in arrays.items() if n is not None and len(a) != int(n)}
        if bad:
            raise ConvertError(f"{self.path}:/data/{group_name}: num_samples is {int(n)} but {bad}")
        return Episode(arrays, self.task, self.instruction)

    def close(self) -> None:
        self.file.close()
