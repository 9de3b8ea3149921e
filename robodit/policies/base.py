"""The Policy contract and the registry every family plugs into.

A policy is a `torch.nn.Module` that owns its normaliser, so `predict_action` takes raw observations and
returns actions in the robot's units; the trainer and the runner never normalise anything themselves.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch
from torch import nn

from robodit.datasets.normalizer import Normalizer
from robodit.keys import is_image_key

POLICIES: dict[str, type["Policy"]] = {}


def register_policy(name: str):
    def wrap(cls):
        POLICIES[name] = cls
        cls.name = name
        return cls

    return wrap


def _to_tensor(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return torch.as_tensor(np.asarray(x), device=device)


class Policy(nn.Module, abc.ABC):
    """`compute_loss(batch) -> dict`, `predict_action(obs, goal=None) -> [B, Tp, A]`, `reset()`.

    `shape_meta` = {"obs": {key: {"shape": [...], "dtype": str}}, "action": {"shape": [A]}, "num_tasks": int}
    is recorded in the checkpoint so `load_policy` rebuilds the exact network without the dataset.
    """

    name = "policy"

    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, obs_horizon: int = 2,
                 action_horizon: int = 16, n_action_steps: int = 8):
        super().__init__()
        if not 1 <= n_action_steps <= action_horizon:
            raise ValueError(f"n_action_steps={n_action_steps} must be in [1, action_horizon={action_horizon}]")
        self.shape_meta = shape_meta
        self.obs_shapes = {k: (tuple(v["shape"]), str(v["dtype"])) for k, v in shape_meta["obs"].items()}
        self.action_dim = int(shape_meta["action"]["shape"][0])
        self.num_tasks = int(shape_meta.get("num_tasks", 1))
        self.obs_horizon, self.action_horizon, self.n_action_steps = obs_horizon, action_horizon, n_action_steps
        self.normalizer = normalizer if normalizer is not None else Normalizer()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- normalisation --------------------------------------------------------------------------------------
    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, (shape, dtype) in self.obs_shapes.items():
            if key not in obs:
                raise KeyError(f"observation is missing key {key!r}; the policy expects {sorted(self.obs_shapes)}")
            x = obs[key]
            if is_image_key(shape, dtype):
                out[key] = x
            else:
                out[key] = self.normalizer.normalize(key, x.float()) if key in self.normalizer else x.float()
        return out

    @staticmethod
    def split_batch(batch: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in batch.items() if k.startswith(prefix + ".")}

    def prepare_obs(self, obs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Accept `state` or `obs.state` keys, numpy or torch, with or without the batch dimension; check shapes."""
        obs = {k[4:] if k.startswith("obs.") else k: v for k, v in obs.items()}
        out = {}
        for key, (shape, dtype) in self.obs_shapes.items():
            if key not in obs:
                raise KeyError(f"observation is missing key {key!r}; the policy expects {sorted(self.obs_shapes)}")
            x = _to_tensor(obs[key], self.device)
            if is_image_key(shape, dtype) and x.shape[-1] == shape[-1] and x.shape[-3] != shape[-1]:
                x = x.movedim(-1, -3)  # HWC → CHW
            frame = (shape[2], shape[0], shape[1]) if is_image_key(shape, dtype) else shape
            if tuple(x.shape[-len(frame):]) != tuple(frame):
                raise ValueError(f"observation {key!r} has shape {tuple(x.shape)}; expected [B, "
                                 f"{self.obs_horizon}, {', '.join(map(str, frame))}]")
            if x.ndim == len(frame) + 1:
                x = x[None]
            if x.ndim != len(frame) + 2 or x.shape[1] != self.obs_horizon:
                raise ValueError(f"observation {key!r} has shape {tuple(x.shape)}; expected [B, "
                                 f"{self.obs_horizon}, {', '.join(map(str, frame))}] (obs_horizon={self.obs_horizon})")
            if is_image_key(shape, dtype) and x.dtype != torch.uint8:  # a float image's range is a guess
                raise ValueError(f"observation {key!r} is {str(x.dtype).removeprefix('torch.')}; images go in as "
                                 "uint8 0-255, as the store holds them (the policy scales them itself)")
            if not is_image_key(shape, dtype) and not torch.isfinite(x).all():
                raise ValueError(f"observation {key!r} contains NaN or inf")
            out[key] = x
        return out

    # -- the contract -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training loss: {"loss": scalar, ...named parts for logging}."""

    @abc.abstractmethod
    def predict_action(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Action chunk [B, action_horizon, action_dim] in the robot's units."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`compute_loss`, reachable through `forward` so DDP's gradient hooks see the call."""
        return self.compute_loss(batch)

    def reset(self) -> None:  # noqa: B027 - stateless policies need nothing
        """Forget per-episode state (called by the runner at every reset)."""

    def on_weights_changed(self) -> None:  # noqa: B027 - hook for inference caches
        """Called by the trainer after each optimizer step and after `load_state_dict`: drop inference caches."""

    def train(self, mode: bool = True):
        """Switching train/eval drops inference caches too (their weights are about to change, or just did)."""
        self.on_weights_changed()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.on_weights_changed()
        return result
