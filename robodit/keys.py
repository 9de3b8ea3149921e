"""Observation-key conventions shared by data, models and robots, kept below all of them.

An image is recognised by what it holds (uint8 H x W x C), never by its name, so a camera may be called
`wrist` or `agentview_image`. Store keys are plain identifiers so they can be Zarr paths and config keys.
"""

from __future__ import annotations

import re

_SAFE = re.compile(r"[^A-Za-z0-9_]+")


def is_image_key(shape: tuple[int, ...], dtype: str) -> bool:
    """True for an observation holding uint8 H x W x C frames (whatever its key is called)."""
    return len(shape) == 3 and str(dtype) == "uint8"


def safe_key(name: str) -> str:
    """A store key ([A-Za-z0-9_]+) from a source name: runs of other characters become one '_'."""
    return _SAFE.sub("_", name).strip("_") or "x"
