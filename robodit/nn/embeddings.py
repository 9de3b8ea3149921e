"""Embeddings of scalars (noise level) and positions shared by every denoiser."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Fixed sin/cos features of a float per sample, then an MLP — the standard noise-level embedding.

    The diffusion core feeds very different ranges (DDPM timesteps 0..999, EDM log(σ)/4 ≈ -2..1.1, flow t·1000),
    so `scale` lets a policy bring them onto one footing; frequencies span 1..1/10000 as in DDPM/DiT.
    """

    def __init__(self, dim: int, scale: float = 1.0, max_period: float = 10000.0):
        super().__init__()
        self.dim, self.scale, self.max_period = dim, scale, max_period
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.SiLU(), nn.Linear(dim * 4, dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        args = (x.float() * self.scale)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(x).to(self.mlp[0].weight.dtype))
