"""Sparse mixture of SwiGLU experts routed by a conditioning vector (MoDE's noise-level router).

Routing is per *sample*, not per token: the router sees only a condition vector (e.g. the noise embedding),
so every token of a sample takes the same experts. That is what makes the choice known ahead of time for a
fixed sampler schedule and lets `fuse_experts` turn the chosen experts into one dense SwiGLU MLP.

Expert weights are stacked in two parameters ([E, D, 2H] and [E, H, D]) rather than E modules: any batch
that uses one expert gives both parameters a gradient, so DDP never sees an unused parameter, and fusing is
slicing + concatenation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Route(NamedTuple):
    """One layer's routing for a batch: chosen experts [B, k], their mixing weights [B, k] (sum to 1),
    router probabilities and logits [B, E] (for the auxiliary losses)."""

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor


def swiglu(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """SwiGLU with w_in = [gate | up] ([D, 2H]) and w_out [H, D]; no biases (LLaMA style)."""
    gate, up = torch.matmul(x, w_in).chunk(2, dim=-1)
    return torch.matmul(F.silu(gate) * up, w_out)


class FusedSwiGLU:
    """k experts and their gates as one dense SwiGLU: hidden units side by side, gates folded into w_out.

    sum_j g_j * SwiGLU_j(x) = [h_1 | ... | h_k] @ [g_1 W_out_1; ...; g_k W_out_k], with
    [h_1 | ... | h_k] = silu(x [Wg_1 | ... | Wg_k]) * (x [Wu_1 | ... | Wu_k]).
    """

    __slots__ = ("w_in", "w_out")

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor):
        self.w_in, self.w_out = w_in, w_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w_in, self.w_out)

    def owned(self) -> tuple[torch.Tensor, ...]:
        """The tensors this MLP holds beyond the model's weights (what the cache costs in memory)."""
        return self.w_in, self.w_out


class ChosenExperts:
    """k experts and their gates applied where they are (views of the expert weights, nothing copied): the
    cache's routes without its memory. 2% slower than FusedSwiGLU for mode/base on one CPU thread."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.parts = parts  # (w_in view, w_out view, gate)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for w_in, w_out, gate in self.parts:
            y = swiglu(x, w_in, w_out) * gate.to(x.dtype)
            out = y if out is None else out + y
        return out

    def owned(self) -> tuple[torch.Tensor, ...]:
        return ()


def check_experts(num_experts, top_k) -> None:
    """Named errors for an impossible mixture (zero experts, top-k outside [1, num_experts])."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k!r} must be an int in [1, num_experts={num_experts}]")


class NoiseRoutedMoE(nn.Module):
    """FFN = sparse mixture of `num_experts` SwiGLU experts, top-k per sample, router = 2-layer MLP on `cond`.

    Training (`stochastic=True`): k experts drawn without replacement from the router softmax (explores every
    expert, unlike a hard top-k that can lock in early); evaluation: top-k. Mixing weights are the chosen
    experts' probabilities renormalised to sum to 1 in both cases, so the router gets gradient from the task.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int = 4, top_k: int = 2, cond_dim: int | None = None,
                 router_hidden: int | None = None):
        super().__init__()
        check_experts(num_experts, top_k)
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        cond_dim = cond_dim or dim
        router_hidden = router_hidden or cond_dim
        self.router = nn.Sequential(nn.Linear(cond_dim, router_hidden), nn.SiLU(),
                                    nn.Linear(router_hidden, num_experts))
        nn.init.normal_(self.router[-1].weight, std=0.02)  # near-uniform start: every expert gets explored
        nn.init.zeros_(self.router[-1].bias)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        nn.init.uniform_(self.w_in, -dim ** -0.5, dim ** -0.5)  # nn.Linear's default range, per expert
        nn.init.uniform_(self.w_out, -hidden ** -0.5, hidden ** -0.5)

    @property
    def expert_params(self) -> int:
        """Parameters of one expert."""
        return 3 * self.dim * self.hidden

    def route(self, cond: torch.Tensor, stochastic: bool = False,
              generator: torch.Generator | None = None) -> Route:
        logits = self.router(cond).float()
        probs = logits.softmax(-1)
        if stochastic:
            experts = torch.multinomial(probs, self.top_k, replacement=False, generator=generator)
        else:
            experts = probs.topk(self.top_k, dim=-1).indices
        weights = probs.gather(-1, experts)
        return Route(experts, weights / weights.sum(-1, keepdim=True), probs, logits)

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [B, N, D]; each sample's tokens go through its k experts, mixed by its weights."""
        # One unbind, not an index per expert: indexing's backward writes each expert's gradient into a zero tensor
        # of the whole stack (E x the expert's size, per expert and layer); unbind's stacks them once. 7-10% off a
        # mode/base training step on this CPU (batch 64, 1 thread, interleaved A/B).
        w_ins, w_outs = self.w_in.unbind(0), self.w_out.unbind(0)
        out = None
        for e in range(self.num_experts):
            hit = experts == e  # [B, k]
            rows = hit.any(-1).nonzero().flatten()
            if rows.numel() == 0:
                continue
            gate = (weights * hit).sum(-1)[rows].to(x.dtype)
            y = swiglu(x[rows], w_ins[e], w_outs[e]) * gate[:, None, None]
            out = torch.zeros(x.shape, dtype=y.dtype, device=x.device) if out is None else out
            out = out.index_add(0, rows, y.to(out.dtype))
        return torch.zeros_like(x) if out is None else out

    def forward(self, x: torch.Tensor, cond: torch.Tensor, stochastic: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, Route]:
        route = self.route(cond, stochastic, generator)
        return self.dispatch(x, route.experts, route.weights), route

    @torch.no_grad()
    def chosen(self, experts: list[int], weights: torch.Tensor) -> ChosenExperts:
        """sum_j weights[j] * expert_{experts[j]} over views of the expert weights (no copies)."""
        return ChosenExperts([(self.w_in[e].detach(), self.w_out[e].detach(), weights[j].detach())
                              for j, e in enumerate(experts)])

    @torch.no_grad()
    def fuse(self, experts: list[int], weights: torch.Tensor, w_in_memo: dict | None = None) -> FusedSwiGLU:
        """One dense SwiGLU equal to sum_j weights[j] * expert_{experts[j]}. Experts are put in index order so
        steps that pick the same set share one first-layer matrix through `w_in_memo`."""
        order = sorted(range(len(experts)), key=lambda j: experts[j])
        chosen = tuple(int(experts[j]) for j in order)
        w_in = None if w_in_memo is None else w_in_memo.get(chosen)
        if w_in is None:
            h = self.hidden
            w_in = torch.cat([self.w_in[e, :, :h] for e in chosen] + [self.w_in[e, :, h:] for e in chosen], dim=1)
            if w_in_memo is not None:
                w_in_memo[chosen] = w_in
        w_out = torch.cat([self.w_out[e] * weights[j].to(self.w_out.dtype) for e, j in zip(chosen, order)], dim=0)
        return FusedSwiGLU(w_in, w_out)


def dispatch_mask(route: Route, num_experts: int) -> torch.Tensor:
    """[B, E] float: 1 where the sample was sent to the expert."""
    mask = torch.zeros(route.experts.shape[0], num_experts, device=route.experts.device)
    return mask.scatter(1, route.experts, 1.0)


def load_balancing_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss E * sum_i f_i * P_i (f_i = share of dispatches to expert i, P_i = mean
    router probability). Equals 1 when usage is uniform; when usage follows the router (f = P, what stochastic
    routing gives in expectation) it is E * sum_i P_i^2 >= 1, with equality only at uniform usage."""
    num_experts = probs.shape[-1]
    f = mask.float().sum(0) / mask.float().sum().clamp_min(1.0)
    return num_experts * (f * probs.float().mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition, keeps router logits small (numerically tame in bf16)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
