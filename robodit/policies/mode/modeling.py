"""MoDE policy: one decoder-only transformer whose FFNs are mixtures of SwiGLU experts routed by noise level.

Tokens [noise, goal, observations..., noisy actions] attend to each other in every block, where the goal token
is the task embedding (several tasks) or, with a language encoder, the instruction's embedding through a small
MLP (MDT's language path; a learned null token for samples without an instruction); RMSNorm pre-norm, QK-norm, and the noise embedding added to the normalised tokens before every
self-attention. The routers see only the noise embedding (never the goal or the observations), so for a fixed sampler schedule the experts of
every (step, layer) are known in advance: the expert cache fuses them into one dense MLP per (step, layer),
keyed by (schedule_key, step index), and drops the routers and the dispatch at inference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from robodit.datasets.normalizer import Normalizer
from robodit.nn.attention import Attention, FusedQKV, RMSNorm
from robodit.nn.embeddings import SinusoidalEmbedding
from robodit.nn.encoders import ObservationEncoder
from robodit.nn.moe import (ChosenExperts, FusedSwiGLU, NoiseRoutedMoE, Route, check_experts, dispatch_mask,
                            load_balancing_loss, router_z_loss)
from robodit.policies.base import register_policy
from robodit.policies.diffusion_policy import DiffusionPolicy

# Diffusion process: the families' x0-prediction DDPM (DiffusionPolicy.default_formulation), sampled with DDIM-5.
# The paper's EDM (`{"name": "edm"}`) is one override away, but on Meta-World reach-v3 (2500 steps, 50 held-out
# episodes) it reached 56% against 98% with this process: EDM's 5-step sampler visits sigma 80 and 4.8 first, and
# the log-logistic training law (loc log 0.5, scale 0.5) puts 0.004% of its mass above 80 and 1.1% above 4.8, so
# the first steps - and their noise routes - run at levels the network has hardly seen.

SIZES = {
    # name: (width, depth, heads, image channels)
    "tiny": (64, 2, 2, (8, 16, 32, 32)),
    "base": (256, 6, 4, (32, 64, 128, 256)),
    "paper": (1024, 12, 8, (64, 128, 256, 512)),
}


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class MoDEBlock(nn.Module):
    """Noise-conditioned self-attention → noise-routed mixture of SwiGLU experts (both pre-RMSNorm)."""

    def __init__(self, dim: int, heads: int, hidden: int, num_experts: int, top_k: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=True, dropout=dropout)
        self.norm2 = RMSNorm(dim)
        self.moe = NoiseRoutedMoE(dim, hidden, num_experts, top_k, cond_dim=dim)

    def forward(self, x: torch.Tensor, noise_emb: torch.Tensor, fused: FusedSwiGLU | ChosenExperts | None = None,
                stochastic: bool = False, attn_cond: torch.Tensor | None = None,
                qkv: FusedQKV | None = None) -> tuple[torch.Tensor, Route | None]:
        """`attn_cond` (default: the noise embedding) is what is added before self-attention; the router always
        sees the noise embedding alone. `qkv` (inference caches: `self.attn.fused_qkv()`) runs the attention's
        stacked projection."""
        h = self.norm1(x) + (noise_emb if attn_cond is None else attn_cond)[:, None]
        x = x + (self.attn(h) if qkv is None else self.attn.attend(h, qkv))
        h = self.norm2(x)
        if fused is not None:
            return x + fused(h), None
        y, route = self.moe(h, noise_emb, stochastic=stochastic)
        return x + y, route


class CachedStep(NamedTuple):
    """Everything one denoising step needs that depends only on its noise level (and the weights)."""

    noise_emb: torch.Tensor  # [1, D]
    mlps: list[FusedSwiGLU | ChosenExperts]  # one per block
    experts: list[tuple[int, ...]]  # per block, for inspection
    weights: list[tuple[float, ...]]
    qkv: list[FusedQKV | None]  # per block, the same for every step: the self-attention's stacked projection


@register_policy("mode")
class MoDEPolicy(DiffusionPolicy):

    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, size: str = "base",
                 obs_horizon: int = 1, action_horizon: int = 10, n_action_steps: int = 10,
                 formulation: dict | str | None = None, sampler: str = "ddim", num_inference_steps: int = 5,
                 width: int | None = None, depth: int | None = None, heads: int | None = None,
                 num_experts: int = 4, top_k: int = 2, expert_hidden: int | None = None,
                 load_balance_weight: float = 0.01, router_z_weight: float = 0.0, expert_cache: bool | str = True,
                 dropout: float = 0.0, noise_cond_scale: float | None = None, task_conditioning: str = "token",
                 language_encoder: str | None = None, lang_dim: int = 384, image_pooling: str = "avg",
                 image_stem_stride: int = 1):
        check_experts(num_experts, top_k)  # before any module is built
        for name, value in (("load_balance_weight", load_balance_weight), ("router_z_weight", router_z_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if size not in SIZES:
            raise ValueError(f"unknown mode size {size!r}; choose one of {sorted(SIZES)}")
        super().__init__(shape_meta, normalizer, obs_horizon, action_horizon, n_action_steps,
                         formulation, sampler, num_inference_steps)
        self.set_task_conditioning(task_conditioning)
        w, d, h, channels = SIZES[size]
        w, d, h = width or w, depth or d, heads or h
        hidden = expert_hidden or _round_up(8 * w // 3, 64)  # SwiGLU at ~8/3·width: a 4x GELU MLP's parameters
        self.size, self.width, self.depth, self.heads = size, w, d, h
        self.num_experts, self.top_k, self.expert_hidden = num_experts, top_k, hidden
        self.load_balance_weight, self.router_z_weight = float(load_balance_weight), float(router_z_weight)
        self.set_expert_cache(expert_cache)
        self.image_pooling, self.image_stem_stride = image_pooling, image_stem_stride
        self.obs_encoder = ObservationEncoder(self.obs_shapes, w, obs_horizon, image_channels=channels,
                                              image_pooling=image_pooling, image_stem_stride=image_stem_stride)
        # a language goal stands where the task id would (as in MDT): the instruction says which task
        self.language_encoder, self.lang_dim = language_encoder or None, int(lang_dim)
        self.language_goals = self.language_encoder is not None
        self.task_goals = not self.language_goals
        self.goal_modality = "language" if self.language_goals else None  # what eval.py goal= may select
        self.task_embedding = nn.Embedding(self.num_tasks, w) if self.takes_task else None
        if self.language_goals:
            self.lang_goal = nn.Sequential(nn.Linear(self.lang_dim, w), nn.SiLU(), nn.Linear(w, w))
            self.null_lang = nn.Parameter(torch.zeros(w))
        self.noise_embedding = SinusoidalEmbedding(w, scale=self.noise_cond_scale(noise_cond_scale))
        self.action_in = nn.Linear(self.action_dim, w)
        self.action_pos = nn.Parameter(torch.randn(1, action_horizon, w) * 0.02)
        self.blocks = nn.ModuleList(MoDEBlock(w, h, hidden, num_experts, top_k, dropout) for _ in range(d))
        self.norm_out = RMSNorm(w)
        self.head = nn.Linear(w, self.action_dim)
        nn.init.zeros_(self.head.weight)  # EDM: a fresh denoiser outputs c_skip·x
        nn.init.zeros_(self.head.bias)
        self._route_log: list | None = None

    # -- sizes ------------------------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """total; active = what one denoiser evaluation touches (top-k experts per layer + router);
        active_cached = the same with the expert cache (no router). Works on the meta device."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = sum(b.moe.expert_params for b in self.blocks)
        router = sum(p.numel() for b in self.blocks for p in b.moe.router.parameters())
        active = total - (self.num_experts - self.top_k) * per_expert
        return {"total": total, "active": active, "active_cached": active - router,
                "experts": self.num_experts * per_expert, "router": router}

    # -- expert cache -------------------------------------------------------------------------------------------
    def set_expert_cache(self, mode: bool | str) -> None:
        """True / "fused": one dense MLP per (step, layer), copies of the chosen experts, and each block's Q/K/V
        projections stacked into one (the fastest, the most memory); "in_place": the same precomputed routes over
        the experts where they are (no copies); False / "off":
        route and dispatch at every step. Also on a loaded policy (e.g. a deployment short of memory); the next
        sampling call builds what the new mode needs."""
        modes = {True: "fused", "fused": "fused", "in_place": "in_place", False: None, "off": None}
        if not isinstance(mode, (bool, str)) or mode not in modes:
            raise ValueError(f"expert_cache={mode!r}: choose true (fused), 'in_place' or false")
        self.expert_cache = modes[mode] is not None
        self.expert_cache_fused = modes[mode] != "in_place"
        self.on_weights_changed()  # drop entries of the old mode now rather than at the next call

    def on_weights_changed(self) -> None:
        self._expert_cache, self._cache_fingerprint = {}, None

    def _fingerprint(self) -> tuple:
        """Storage and in-place version of every tensor the cache is derived from: a change the trainer's hook
        did not announce (an EMA swap, a manual copy_) still invalidates the cache, as does switching between
        fused and in-place entries."""
        params = list(self.noise_embedding.parameters()) + [p for b in self.blocks
                                                            for m in (b.moe, b.attn.q, b.attn.kv, b.attn.q_norm,
                                                                      b.attn.k_norm) for p in m.parameters()]
        return (self.expert_cache_fused, *((p.data_ptr(), p._version) for p in params))

    @torch.no_grad()
    def _build_cache(self, key: tuple) -> None:
        levels = self.formulation.schedule(self.sampler, self.num_inference_steps)
        emb = self.noise_embedding(torch.tensor(levels, dtype=torch.float32, device=self.device))
        routes = [block.moe.route(emb) for block in self.blocks]  # eval routing: top-k, renormalised
        memos: list[dict] = [{} for _ in self.blocks]  # steps that pick the same experts share w_in
        qkv = [block.attn.fused_qkv() if self.expert_cache_fused else None for block in self.blocks]  # copies
        cache = {}
        for s in range(len(levels)):
            experts = [tuple(r.experts[s].tolist()) for r in routes]
            weights = [tuple(r.weights[s].tolist()) for r in routes]
            if self.expert_cache_fused:
                mlps = [block.moe.fuse(list(e), r.weights[s], memo)
                        for block, e, r, memo in zip(self.blocks, experts, routes, memos)]
            else:
                mlps = [block.moe.chosen(list(e), r.weights[s]) for block, e, r in zip(self.blocks, experts, routes)]
            cache[(key, s)] = CachedStep(emb[s:s + 1], mlps, experts, weights, qkv)
        self._expert_cache, self._cache_fingerprint = cache, self._fingerprint()

    def cached_step(self, step_index: int) -> CachedStep:
        """The fused step for the current (sampler, steps), built on first use and after any weight change. The
        weights are fingerprinted at each chunk's first step (~60 tensors: a chunk's last steps need not pay it),
        so an unannounced change between chunks is caught; weights do not change within a chunk."""
        key = self.formulation.schedule_key(self.sampler, self.num_inference_steps)
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # a traced graph folds the
        # cache in as constants (built before the trace); fake tensors have no storage to fingerprint
        if (key, 0) not in self._expert_cache or (step_index == 0 and not tracing
                                                 and self._cache_fingerprint != self._fingerprint()):
            self._build_cache(key)
        entry = self._expert_cache.get((key, step_index))
        if entry is None:
            raise IndexError(f"step_index {step_index} is outside the {self.sampler!r} schedule of "
                             f"{self.num_inference_steps} steps")
        return entry

    def inference_routing(self) -> list[dict]:
        """Per network evaluation of the inference schedule: noise_cond and each layer's experts and weights."""
        levels = self.formulation.schedule(self.sampler, self.num_inference_steps)
        steps = [self.cached_step(i) for i in range(len(levels))]
        return [{"noise_cond": lv, "experts": st.experts, "weights": st.weights} for lv, st in zip(levels, steps)]

    def expert_cache_bytes(self) -> int:
        """What the inference cache holds beyond the weights: fused experts, noise embeddings, stacked Q/K/V."""
        seen: dict[int, int] = {}
        for entry in self._expert_cache.values():
            for t in [entry.noise_emb, *(w for m in entry.mlps for w in m.owned()),
                      *(w for qkv in entry.qkv if qkv is not None for w in qkv if w is not None)]:
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- the network --------------------------------------------------------------------------------------------
    def encode(self, obs, goal):
        tokens = self.obs_encoder(obs)
        if self.language_goals:  # a condition token, as the task token; the routers never see it
            return {"tokens": torch.cat([self.language_token(goal)[:, None], tokens], dim=1), "task": None}
        task = self.global_task_vector(goal)
        tokens = self.with_task_token(tokens, goal)
        return {"tokens": tokens, "task": task}

    def language_token(self, goal: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, W] from a resolved goal: the instruction embedding through `lang_goal`, the null token where
        `has_lang` is False (unlabelled training samples)."""
        if "lang_emb" not in goal:
            raise ValueError(f"mode was trained with language goals ({self.language_encoder!r}): pass "
                             f"goal={{'instruction': str}} or {{'lang_emb': [B, {self.lang_dim}]}}, got {sorted(goal)}")
        token = self.lang_goal(goal["lang_emb"].to(self.null_lang.dtype))
        return torch.where(goal["has_lang"][:, None], token, self.null_lang.expand_as(token))

    def goal_for_task(self, task: str, instruction: str | None = None, goal_image: str | None = None) -> dict:
        """The evaluator's goal for `task`: its instruction's embedding (language policies); the task id, which
        the evaluator adds itself, otherwise."""
        if not self.language_goals:
            return {}
        if self.goal_modality != "language":
            raise ValueError(f"mode takes language goals only, not goal={self.goal_modality!r}")
        if not instruction:
            raise ValueError(f"task {task!r} has no instruction for a language goal")
        return {"lang_emb": self.embed_instructions([instruction])[0]}

    def denoise(self, x_in, noise_cond, cond, step_index=None):
        """With a step index (sampling in eval mode) the cached step of this policy's (sampler, steps) replaces
        noise_cond: the caller's step index must come from that schedule, as `predict_action`'s does."""
        batch = x_in.shape[0]
        if step_index is not None and self.expert_cache and not self.training:
            step = self.cached_step(step_index)
            noise_emb, mlps, qkvs = step.noise_emb.expand(batch, -1), step.mlps, step.qkv
        else:
            noise_emb = self.noise_embedding(noise_cond.reshape(-1).expand(batch))
            mlps = qkvs = [None] * len(self.blocks)
        actions = self.action_in(x_in) + self.action_pos
        x = torch.cat([noise_emb[:, None].to(actions.dtype), cond["tokens"], actions], dim=1)
        task = cond.get("task")
        attn_cond = None if task is None else noise_emb + task.to(noise_emb.dtype)
        routes = []
        for block, mlp, qkv in zip(self.blocks, mlps, qkvs):
            x, route = block(x, noise_emb, fused=mlp, stochastic=self.training, attn_cond=attn_cond, qkv=qkv)
            routes.append(route)
        if self._route_log is not None:
            self._route_log.append((noise_cond.reshape(-1).expand(batch), routes))
        return self.head(self.norm_out(x[:, -self.action_horizon:]))

    def route(self, noise_cond: torch.Tensor, stochastic: bool = False) -> list[Route]:
        """Each layer's routing for noise levels [B]: a function of the noise level alone."""
        emb = self.noise_embedding(noise_cond.reshape(-1))
        return [block.moe.route(emb, stochastic) for block in self.blocks]

    # -- training -----------------------------------------------------------------------------------------------
    def compute_loss(self, batch):
        self._route_log = []
        try:
            out = super().compute_loss(batch)
            (noise_cond, routes), = self._route_log
        finally:
            self._route_log = None
        masks = torch.stack([dispatch_mask(r, self.num_experts) for r in routes])  # [L, B, E]
        balance = torch.stack([load_balancing_loss(r.probs, m) for r, m in zip(routes, masks)]).mean()
        z_loss = torch.stack([router_z_loss(r.logits) for r in routes]).mean()
        out["loss"] = out["loss"] + self.load_balance_weight * balance + self.router_z_weight * z_loss
        out["load_balance_loss"], out["router_z_loss"] = balance.detach(), z_loss.detach()
        # Usage = share of dispatches per expert (uniform = 1/E), overall and for the lower / upper half of the
        # batch's noise levels: diverging halves are the experts specialising by noise level.
        low = noise_cond <= noise_cond.median()
        for name, sel in (("expert_usage", slice(None)), ("expert_usage_low_noise", low),
                          ("expert_usage_high_noise", ~low)):
            m = masks[:, sel]
            if m.shape[1] == 0:
                continue
            usage = m.sum((0, 1)) / m.sum().clamp_min(1.0)
            out.update({f"{name}/{i}": usage[i].detach() for i in range(self.num_experts)})
        return out
