"""The observation history a policy was trained with: the last To frames, the first repeated at an episode's start.

It lives with the control loop, below evaluation, because both the real-time loop and every rollout keep one.
"""

from __future__ import annotations

import collections

import numpy as np


class ObservationHistory:
    """The last `horizon` observations stacked along a leading time axis."""

    def __init__(self, horizon: int):
        self.horizon = horizon
        self.frames: collections.deque = collections.deque(maxlen=horizon)

    def reset(self, obs: dict[str, np.ndarray]) -> None:
        self.frames.clear()
        for _ in range(self.horizon):
            self.frames.append(obs)

    def push(self, obs: dict[str, np.ndarray]) -> None:
        self.frames.append(obs)

    def stacked(self, keys) -> dict[str, np.ndarray]:
        return {k: np.stack([f[k] for f in self.frames])[None] for k in keys}
