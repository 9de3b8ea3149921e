"""A simulated robot for `robodit run --dry-run`: the whole deployment path (policy or server, strategy, safety
layer, timing) runs without hardware, on observations shaped exactly as the policy expects.

Kinematics are deliberately simple: the first action dimensions move the first state dimensions (a point-like
end effector, `delta` = velocity-like commands, `absolute` = position targets tracked at a bounded speed);
images show a square at that position so image policies see something that moves. The state's first three
values are the "end-effector pose", which the safety layer's workspace box can read.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from robodit.envs.base import ArraySpec, ControlInterface, EnvSpec


class DryRunRobot(ControlInterface):
    def __init__(self, observation: dict[str, tuple[tuple[int, ...], str]], action_dim: int,
                 action_low=None, action_high=None, control_hz: float = 10.0, max_episode_steps: int = 10**9,
                 mode: str = "delta", scale: float = 0.01, max_speed: float = 0.05, step_latency_s: float = 0.0,
                 seed: int = 0, robot: str = "dry_run", initial_pose: tuple | None = None):
        if mode not in ("delta", "absolute"):
            raise ValueError(f"dry-run mode must be 'delta' or 'absolute', got {mode!r}")
        self.mode, self.scale, self.max_speed = mode, float(scale), float(max_speed)
        self.latency = float(step_latency_s)
        self.obs_shapes = {k: (tuple(int(x) for x in s), str(d)) for k, (s, d) in observation.items()}
        def bound(x, default):  # None → ±1, a scalar → every dimension
            return np.broadcast_to(np.asarray(default if x is None else x, np.float32), (action_dim,)).copy()

        low, high = bound(action_low, -1.0), bound(action_high, 1.0)
        self.initial_pose = initial_pose  # (key, index, values): start there, e.g. inside the safety workspace
        self.spec = EnvSpec(observation={k: ArraySpec(s, d) for k, (s, d) in self.obs_shapes.items()},
                            action_dim=int(action_dim), action_low=low, action_high=high, control_hz=float(control_hz),
                            robot=robot, max_episode_steps=int(max_episode_steps),
                            extra={"simulator": "dry_run", "action_mode": mode})  # the safety layer's hold
        self._rng = np.random.default_rng(seed)
        self._state: dict[str, np.ndarray] = {}
        self._t = 0
        self.commands: list[np.ndarray] = []  # every command received (tests and post-mortems read it)

    @classmethod
    def from_policy(cls, policy, action_dim: int | None = None, **kwargs) -> "DryRunRobot":
        """Observation keys/shapes from a policy (local or RemotePolicy); the action size too unless given (the
        configured robot's, so a policy that does not fit it is refused as it would be on hardware)."""
        obs = {k: (shape, dtype) for k, (shape, dtype) in policy.obs_shapes.items()}
        return cls(obs, policy.action_dim if action_dim is None else int(action_dim), **kwargs)

    def reset(self, task: str | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed) if seed is not None else self._rng
        self._state = {k: (rng.uniform(-0.1, 0.1, size=s).astype(np.float32) if d.startswith("float") else None)
                       for k, (s, d) in self.obs_shapes.items()}
        if self.initial_pose is not None:
            key, index, values = self.initial_pose
            self._state[key][list(index)] = values
        self._t = 0
        self.commands.clear()
        return self._obs()

    def _pose(self) -> np.ndarray:
        for v in self._state.values():
            if v is not None and v.ndim == 1:
                return v
        return np.zeros(3, np.float32)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool, dict[str, Any]]:
        if not self._state:
            raise RuntimeError("call reset() before step()")
        a = np.clip(np.asarray(action, np.float32).reshape(self.spec.action_dim), self.spec.action_low,
                    self.spec.action_high)
        self.commands.append(a)
        if self.latency:
            time.sleep(self.latency)  # a bus round trip / camera read
        p = self._pose()
        n = min(p.size, a.size)
        if self.mode == "delta":
            p[:n] += self.scale * a[:n]
        else:
            p[:n] += np.clip(a[:n] - p[:n], -self.max_speed, self.max_speed)
        self._t += 1
        done = self._t >= self.spec.max_episode_steps
        return self._obs(), False, done, {"steps": self._t}

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {}
        p = self._pose()
        for k, (shape, dtype) in self.obs_shapes.items():
            if self._state[k] is not None:
                obs[k] = self._state[k].copy()
            else:  # an image: a bright square where the end effector is
                img = np.full(shape, 40, np.uint8)
                h, w = (shape[0], shape[1]) if shape[-1] in (1, 3) else (shape[1], shape[2])
                y = int(np.clip((p[1] if p.size > 1 else 0) * 0.5 + 0.5, 0, 1) * (h - 1))
                x = int(np.clip(p[0] * 0.5 + 0.5, 0, 1) * (w - 1))
                r = max(1, h // 10)
                if shape[-1] in (1, 3):
                    img[max(0, y - r):y + r, max(0, x - r):x + r] = 220
                else:
                    img[:, max(0, y - r):y + r, max(0, x - r):x + r] = 220
                obs[k] = img
        return obs

    def render(self) -> np.ndarray | None:
        for k, (shape, _) in self.obs_shapes.items():
            if len(shape) == 3 and shape[-1] == 3:
                return self._obs()[k]
        return None
