"""The one control interface every simulator, real robot and remote client speaks.

The Runner (evaluation, deployment) drives any `ControlInterface`; policies never see simulator APIs.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def release(owner: object, *attributes: str) -> None:
    """Close and drop each named resource of `owner` in order (renderer before the simulator it draws). Safe to call
    twice, and from a constructor that failed half-way: a missing or already released attribute is skipped."""
    for name in attributes:
        resource = getattr(owner, name, None)
        if resource is not None:
            resource.close()
            setattr(owner, name, None)


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class EnvSpec:
    """What a controller needs to know about an embodiment before the first step."""

    observation: dict[str, ArraySpec]  # e.g. {"state": (39,) float32, "image_corner2": (84, 84, 3) uint8}
    action_dim: int
    action_low: np.ndarray
    action_high: np.ndarray
    control_hz: float
    robot: str  # embodiment name, e.g. "metaworld_sawyer"
    max_episode_steps: int
    unified_slots: tuple[int, ...] = ()  # indices in the unified 128-d action space (RDT), if mapped
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def global_seed(seed: int):
    """Seed NumPy's global generator for the block, then restore it: robosuite's placement samplers (1.4 and
    1.5) draw from it, so seeding it around a reset makes one seed one layout."""
    saved = np.random.get_state()
    np.random.seed(int(seed) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


class ControlInterface(abc.ABC):
    """`reset -> obs`, `step(action) -> (obs, success, done, info)`, `close()`; obs is a dict of numpy arrays."""

    spec: EnvSpec

    @abc.abstractmethod
    def reset(self, task: str | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        """Start an episode (optionally of another task of the same family) and return the first observation."""

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool, dict[str, Any]]:
        """Apply one action in the robot's native units; `success` is the simulator's own check."""

    def render(self) -> np.ndarray | None:
        """An upright RGB frame for videos (None when the interface has no camera)."""
        return None

    def set_render(self, on: bool) -> None:  # noqa: B027 - optional hook
        """Whether the next steps' observations need their camera images. An env whose cameras cost more than
        its physics (LIBERO) skips them while off and returns observations without image keys; the evaluation
        workers switch it on for the steps a policy will look at. Envs that do not care ignore it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release simulator / hardware resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
