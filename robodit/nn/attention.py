"""Transformer blocks shared by the policy families: RMSNorm, QK-norm attention, AdaLN-Zero modulation.

Attention goes through `F.scaled_dot_product_attention` so CUDA gets flash/memory-efficient kernels and the
CPU gets its fused path; masks follow SDPA's convention (bool True = may attend).

Inference fast path. At batch 1 a small policy's chunk is a few thousand tiny ops, and on a CPU their dispatch
costs more than their arithmetic. For a sampling step whose noise conditioning the whole batch shares (what the
families' inference caches precompute per step index), `AdaLNZeroBlock.infer` computes `forward` in fewer ops:
norm and modulation in one `layer_norm`, each gated residual in one `addcmul`, Q/K/V in one GEMM (`FusedQKV`,
stacked from the trained q and kv weights at inference, so checkpoints keep their layout) and Q, K, V as
slices of one view. tests/test_nn.py holds `infer` to `forward`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class RMSNorm(nn.Module):
    """torch's rms_norm (statistics in fp32, output in the input's dtype, also under autocast; fused where torch
    has a kernel): 30% less time per call than the same arithmetic written out, on this CPU."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)  # bf16 activations: the fused kernel
        return F.rms_norm(x, (self.dim,), weight, self.eps)


def make_norm(kind: str, dim: int, affine: bool = True) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
    if kind == "rmsnorm":
        return RMSNorm(dim, affine=affine)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


class Attention(nn.Module):
    """Multi-head self- or cross-attention with optional QK-norm (stabilises training at any width)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, qk_norm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        kv_dim = kv_dim or dim
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised K, V of `context`: cross-attention to a fixed context computes these once per chunk."""
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        return self.k_norm(k), v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q = self.q_norm(rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads))
        k, v = kv if kv is not None else self.keys_values(x if context is None else context)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.out(rearrange(y, "b h n d -> b n (h d)"))

    def fused_qkv(self) -> "FusedQKV":
        """This self-attention's projections stacked for `attend`: built once per inference cache."""
        norms = (self.q_norm.weight, self.k_norm.weight) if isinstance(self.q_norm, RMSNorm) else (None, None)
        return FusedQKV(torch.cat([self.q.weight, self.kv.weight]), torch.cat([self.q.bias, self.kv.bias]), *norms)

    def attend(self, x: torch.Tensor, qkv: "FusedQKV", mask: torch.Tensor | None = None,
               tokens: int | None = None) -> torch.Tensor:
        """`forward(x, mask=mask)` (self-attention, eval) through the stacked projection `qkv`: one GEMM for Q, K
        and V; heads are slices of one [B, 3H, N, d] view (no copies, and few nodes in an exported graph: one Split,
        then each QK-norm one RMSNormalization with its weight). `x` is [B, N, D], or [B·N, D] with `tokens` = N
        (see `AdaLNZeroBlock.infer`); the output has x's shape."""
        n = x.shape[1] if tokens is None else tokens
        h = self.heads
        heads = F.linear(x, qkv.weight, qkv.bias).view(-1, n, 3 * h, self.head_dim).transpose(1, 2)
        q, k, v = heads[:, :h], heads[:, h:2 * h], heads[:, 2 * h:]
        if qkv.q_norm is not None:
            q = F.rms_norm(q, (self.head_dim,), qkv.q_norm, self.q_norm.eps)
            k = F.rms_norm(k, (self.head_dim,), qkv.k_norm, self.k_norm.eps)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(x.shape))

    def attend_kv(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
                  tokens: int | None = None) -> torch.Tensor:
        """`forward(x, mask=mask, kv=kv)` (eval) for `x` [B, N, D] or [B·N, D] with `tokens` = N; the output has
        x's shape."""
        n = x.shape[1] if tokens is None else tokens
        q = self.q_norm(self.q(x).view(-1, n, self.heads, self.head_dim).transpose(1, 2))
        y = F.scaled_dot_product_attention(q, *kv, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(x.shape))


class FusedQKV(NamedTuple):
    """A self-attention's q and kv projections as one (weight [3D, D], bias [3D]), and its q and k RMSNorm weights
    ([head_dim] each, None without QK-norm)."""

    weight: torch.Tensor
    bias: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: per-sample shift/scale ([B, D]) applied to normalised tokens ([B, N, D])."""
    return x * (1 + scale[:, None]) + shift[:, None]


def norm_modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
    """`modulate(norm(x), shift, scale1 - 1)` for one shift / scale shared by the batch ([D]), in one op for a
    LayerNorm without affine (the modulation becomes its weight and bias)."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, scale1, shift, norm.eps)
    return torch.add(shift, F.rms_norm(x, (norm.dim,), scale1, norm.eps))


class StepModulation(NamedTuple):
    """One AdaLN-Zero block's modulation for one sampling step, shared by the batch: [D] each, the scales as
    1 + scale (what `AdaLNZeroBlock.infer` takes)."""

    shift1: torch.Tensor
    scale1: torch.Tensor
    gate1: torch.Tensor
    shift2: torch.Tensor
    scale2: torch.Tensor
    gate2: torch.Tensor

    @classmethod
    def split(cls, modulation: torch.Tensor) -> list["StepModulation"]:
        """`ada(cond)` for the steps of a schedule, [S, 6D] → one StepModulation per step."""
        sh1, sc1, g1, sh2, sc2, g2 = modulation.chunk(6, dim=-1)
        sc1, sc2 = 1 + sc1, 1 + sc2
        return [cls(sh1[s], sc1[s], g1[s], sh2[s], sc2[s], g2[s]) for s in range(modulation.shape[0])]


class AdaLNZeroBlock(nn.Module):
    """DiT block with AdaLN-Zero noise conditioning and optional cross-attention to condition tokens.

    self-attention → cross-attention → MLP, each residual branch gated by a gate that starts at zero, so a fresh
    block is the identity (the DiT paper's best-performing conditioning): the self-attention and MLP gates come
    from the conditioning (AdaLN-Zero), the cross-attention's is a learned per-channel vector (`cross_gate`).
    A checkpoint saved before the cross gate existed loads with the gate at one, which is how it was trained.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross_attention: bool = True,
                 context_dim: int | None = None, qk_norm: bool = True, dropout: float = 0.0,
                 norm: str = "layernorm"):
        super().__init__()
        self.norm1 = make_norm(norm, dim, affine=False)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, dropout=dropout)
        self.cross = None
        if cross_attention:
            self.norm_x = make_norm(norm, dim)
            self.cross = Attention(dim, heads, kv_dim=context_dim or dim, qk_norm=qk_norm, dropout=dropout)
            self.cross_gate = nn.Parameter(torch.zeros(dim))
        self.norm2 = make_norm(norm, dim, affine=False)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                modulation: torch.Tensor | None = None,
                context_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`modulation` (= self.ada(cond), [B or 1, 6D]) and `context_kv` may be precomputed by inference caches."""
        mod = self.ada(cond) if modulation is None else modulation
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), mask=mask)
        if self.cross is not None and (context is not None or context_kv is not None):
            x = x + self.cross_gate * self.cross(self.norm_x(x), context, mask=context_mask, kv=context_kv)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))

    def infer(self, x: torch.Tensor, mod: StepModulation, qkv: FusedQKV, mask: torch.Tensor | None = None,
              context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
              context_mask: torch.Tensor | None = None, tokens: int | None = None) -> torch.Tensor:
        """`forward` (eval) for a modulation the batch shares, in fewer ops (see the module's docstring); `qkv` is
        `self.attn.fused_qkv()`, `context_kv` the cross-attention's precomputed keys and values. `x` may be the
        tokens flat, [B·N, D] with `tokens` = N: every linear then exports as one Gemm (bias included) instead of
        MatMul + Add."""
        h = norm_modulate(self.norm1, x, mod.shift1, mod.scale1)
        x = torch.addcmul(x, mod.gate1, self.attn.attend(h, qkv, mask, tokens))
        if self.cross is not None and context_kv is not None:
            x = torch.addcmul(x, self.cross_gate, self.cross.attend_kv(self.norm_x(x), context_kv, context_mask, tokens))
        return torch.addcmul(x, mod.gate2, self.mlp(norm_modulate(self.norm2, x, mod.shift2, mod.scale2)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Older checkpoints have no `cross_gate`: their cross-attention was ungated, i.e. a gate of one."""
        if "cross_gate" in self._parameters and f"{prefix}cross.q.weight" in state_dict \
                and f"{prefix}cross_gate" not in state_dict:
            state_dict[f"{prefix}cross_gate"] = torch.ones_like(self.cross_gate)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class AdaLNFinal(nn.Module):
    """Last AdaLN + zero-initialised projection: the denoiser starts by predicting zeros."""

    def __init__(self, dim: int, out_dim: int, norm: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm, dim, affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, out_dim)
        for layer in (self.ada[-1], self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                modulation: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale = (self.ada(cond) if modulation is None else modulation).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))

    def step_modulations(self, modulation: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`ada(cond)` for the steps of a schedule, [S, 2D] → (shift, 1 + scale) per step, for `infer`."""
        shift, scale = modulation.chunk(2, dim=-1)
        scale = 1 + scale
        return [(shift[s], scale[s]) for s in range(modulation.shape[0])]

    def infer(self, x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
        """`forward` for a modulation the batch shares ([D] each, the scale as 1 + scale)."""
        return self.proj(norm_modulate(self.norm, x, shift, scale1))


class TransformerEncoderBlock(nn.Module):
    """Pre-norm non-causal self-attention block (for observation / goal encoders)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 dropout: float = 0.0, norm: str = "layernorm"):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, dropout=dropout)
        self.norm2 = make_norm(norm, dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))
