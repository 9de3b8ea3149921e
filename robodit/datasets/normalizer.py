"""Per-key affine normalisation, computed from a store and saved with the checkpoint.

`limits` maps each dimension's [min, max] to [-1, 1] (what diffusion policies need for actions: the sampler's
prior lives there); `gaussian` maps to zero mean / unit std (good for unbounded proprioception). Dimensions
with (almost) no range are centred and left unscaled, so constants never blow up to ±inf.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MODES = ("limits", "gaussian", "identity")


def compute_stats(store, keys) -> dict[str, dict[str, np.ndarray]]:
    """min / max / mean / std per dimension over every committed frame (and only action-bearing episodes for
    `action`), streamed in blocks so a store larger than RAM works. Every frame, not a sample: `limits` maps
    min / max to the sampler's clip at ±1, so an extreme missed here could never be produced."""
    stats = {}
    for key in keys:
        lo = hi = None
        total = 0
        s1 = s2 = 0.0
        for start, stop in _runs(store, key):
            for a in range(start, stop, 65536):
                x = store.read(key, a, min(stop, a + 65536)).astype(np.float64)
                x = x.reshape(len(x), -1)
                lo = x.min(0) if lo is None else np.minimum(lo, x.min(0))
                hi = x.max(0) if hi is None else np.maximum(hi, x.max(0))
                s1 = s1 + x.sum(0)
                s2 = s2 + (x * x).sum(0)
                total += len(x)
        if total == 0:
            raise ValueError(f"cannot compute normalisation stats for {key!r}: no frames")
        mean = s1 / total
        std = np.sqrt(np.maximum(s2 / total - mean * mean, 0.0))
        stats[key] = {k: v.astype(np.float32) for k, v in
                      dict(min=lo, max=hi, mean=mean, std=std).items()}
    return stats


def _runs(store, key: str) -> list[tuple[int, int]]:
    """The frame ranges to read for `key`, adjacent episodes merged (one read per block, not per episode)."""
    runs: list[list[int]] = []
    for a, b, ok in zip(store.episode_starts, store.episode_ends, store.episode_has_actions):
        if not ok and key == "action":
            continue
        if runs and runs[-1][1] == int(a):
            runs[-1][1] = int(b)
        else:
            runs.append([int(a), int(b)])
    return [(a, b) for a, b in runs]


def normalized_bound(stats: dict[str, np.ndarray], normalizer: "Normalizer", key: str) -> float:
    """The largest |value| the data of `key` takes after normalisation (1.0 under `limits`)."""
    lo = normalizer.normalize(key, torch.as_tensor(stats["min"]).float())
    hi = normalizer.normalize(key, torch.as_tensor(stats["max"]).float())
    return float(torch.maximum(lo.abs(), hi.abs()).max())


class Normalizer(nn.Module):
    """Holds `offset` / `scale` buffers per key: normalize(x) = (x - offset) / scale."""

    def __init__(self, stats: dict[str, dict[str, np.ndarray]] | None = None,
                 modes: dict[str, str] | None = None, eps: float = 1e-4):
        super().__init__()
        self.modes = dict(modes or {})
        self._keys: list[str] = []
        for key, st in (stats or {}).items():
            mode = self.modes.get(key, "limits")
            if mode not in MODES:
                raise ValueError(f"normaliser mode for {key!r} is {mode!r}; expected one of {MODES}")
            lo, hi = np.asarray(st["min"], np.float32), np.asarray(st["max"], np.float32)
            if mode == "limits":
                offset, scale = (hi + lo) / 2, (hi - lo) / 2
            elif mode == "gaussian":
                offset, scale = np.asarray(st["mean"], np.float32), np.asarray(st["std"], np.float32)
            else:
                offset, scale = np.zeros_like(lo), np.ones_like(lo)
            scale = np.where(scale < eps, 1.0, scale).astype(np.float32)
            self.add_key(key, torch.from_numpy(offset), torch.from_numpy(scale))

    def add_key(self, key: str, offset: torch.Tensor, scale: torch.Tensor) -> None:
        self.register_buffer(f"{key}__offset", offset.float().flatten())
        self.register_buffer(f"{key}__scale", scale.float().flatten())
        self._keys.append(key)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def _params(self, key: str, x: torch.Tensor):
        if key not in self._keys:
            raise KeyError(f"normaliser has no statistics for {key!r} (has {self._keys})")
        off, sc = getattr(self, f"{key}__offset"), getattr(self, f"{key}__scale")
        if x.shape[-1] != off.numel():
            raise ValueError(f"{key!r}: last dimension {x.shape[-1]} does not match the normaliser's {off.numel()}")
        return off.to(x.dtype), sc.to(x.dtype)

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        off, sc = self._params(key, x)
        return (x - off) / sc

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        off, sc = self._params(key, x)
        return x * sc + off

    def state_dict_flat(self) -> dict[str, torch.Tensor]:
        """Flat tensors for `normalizer.safetensors`."""
        return {name: buf.detach().cpu().contiguous() for name, buf in self.named_buffers()}

    @classmethod
    def from_flat(cls, tensors: dict[str, torch.Tensor]) -> "Normalizer":
        norm = cls()
        for name in sorted(tensors):
            if name.endswith("__offset"):
                key = name[: -len("__offset")]
                norm.add_key(key, tensors[name], tensors[f"{key}__scale"])
        return norm
