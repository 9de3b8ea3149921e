"""What a demonstration store is on disk, apart from its contents: the format tag and version a reader checks,
the key specs it accepts, how each key is chunked and compressed, and the lock that admits one writer.

`store.py` (DemoStore) builds on these; they live apart so the append/commit logic reads on its own.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

FORMAT = "robodit.demos"
VERSION = 1
LOCK_NAME = "writer.lock"
_KEY_RE = re.compile(r"[A-Za-z0-9_]+\Z")
_CHUNK_TARGET_BYTES = 1 << 20


class StoreError(Exception):
    """The store is missing, not a robodit store, corrupt, too new, or locked by another writer."""


def chunk_frames(shape: tuple[int, ...], dtype) -> int:
    """Frames per chunk: the largest power of two with <= 1 MiB uncompressed, clamped to 16..2048.

    ~1 MiB keeps zstd efficient and the files few; not much more, because a sampler reading a 2-16 frame
    window decompresses whole chunks (84x84x3 uint8 -> 32 frames, small float vectors -> 2048).
    """
    frame = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
    n = 1 << max(0, int(math.floor(math.log2(max(1, _CHUNK_TARGET_BYTES // frame)))))
    return int(min(2048, max(16, n)))


def compressor(dtype: np.dtype):
    """zstd for all keys. 1-byte data (images): plain ZstdCodec, since a byte shuffle is a no-op there and
    plain zstd compressed rendered frames slightly better and faster than Blosc. Wider types (float states,
    actions): Blosc-zstd with byte shuffle, which groups the slowly-varying exponent bytes (~12% smaller)."""
    if dtype.itemsize == 1:
        return ZstdCodec(level=3)
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def normalize_keys(keys: Mapping) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    out = {}
    for name, spec in keys.items():
        if not isinstance(name, str) or not _KEY_RE.match(name):
            raise ValueError(f"key name {name!r} must match [A-Za-z0-9_]+")
        shape, dtype = spec
        shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        if any(s <= 0 for s in shape) or dtype.kind not in "biuf":
            raise ValueError(f"key {name!r}: bad spec shape={shape} dtype={dtype} (positive dims, numeric)")
        out[name] = (shape, dtype)
    if "action" not in out:
        raise ValueError(f"keys must include 'action', got {sorted(out)}")
    return out


def read_root_attrs(path: Path) -> dict:
    """Check that `path` is a robodit store of a version we can read, with a clear message if not."""
    if not path.exists():
        raise StoreError(f"{path}: no such store (path does not exist)")
    meta = path / "zarr.json"
    if not path.is_dir() or not meta.is_file():
        raise StoreError(f"{path}: not a robodit demonstration store (no zarr.json; expected a NAME.zarr dir)")
    try:
        doc = json.loads(meta.read_text())
        attrs = doc.get("attributes", {}) if doc.get("node_type") == "group" else None
    except (ValueError, OSError, AttributeError) as exc:
        raise StoreError(f"{path}: corrupt store metadata {meta.name}: {exc}") from None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: not a robodit demonstration store (root attrs lack format={FORMAT!r})")
    version = attrs.get("version")
    if not isinstance(version, int) or version < 1:
        raise StoreError(f"{path}: corrupt store metadata: bad format version {version!r}")
    if version > VERSION:
        raise StoreError(f"{path}: store format version {version} is newer than this robodit reads "
                         f"(<= {VERSION}); upgrade robodit")
    return attrs


def acquire_writer_lock(path: Path) -> int:
    """Exclusive non-blocking flock: one writer; the kernel drops it if the writer dies (no stale locks)."""
    lock_path = path / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{path} is being written by another process (lock {lock_path} is held)") from None
    return fd


def release_writer_lock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
