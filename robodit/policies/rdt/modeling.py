"""RDT: a diffusion transformer over the unified 128-d action space, with alternating condition injection.

Main sequence: [timestep, control frequency, state × To (unified value ⊕ mask), noisy action × Tp (unified
value ⊕ mask)], non-causal self-attention with QK-norm and RMSNorm. Conditions never enter the sequence:
block 0, 2, … cross-attend to language tokens and block 1, 3, … to observation tokens (images and the
native low-dim observation, which carries object poses the unified state leaves out). Alternating keeps each
cross-attention's keys homogeneous and halves their cost (RDT paper). Without language the language tokens
are the task embedding (multi-task store) or a learned null token. The head (RMSNorm → MLP → 128, last layer
zero) is multiplied by the robot's availability mask, so unused slots are exactly zero.

The policy keeps the store's native units at its boundary: native actions are normalised per dimension, then
scattered into the unified space by the robot's adapter (an index map, so the two commute), and predictions are
gathered back and unnormalised. DDPM x0-prediction, squaredcos_cap_v2, DPM-Solver++ 5 steps; each condition
(language, observation, frequency, state) is dropped per sample with probability `cond_dropout` in training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robodit.datasets.normalizer import Normalizer
from robodit.envs.action_space import UNIFIED_DIM, adapter_for
from robodit.nn.attention import MLP, Attention, RMSNorm
from robodit.nn.embeddings import SinusoidalEmbedding
from robodit.nn.encoders import ObservationEncoder
from robodit.policies.base import register_policy
from robodit.policies.diffusion_policy import DiffusionPolicy

SIZES = {
    # name: (width, depth, heads, image channels)
    "tiny": (64, 4, 2, (8, 16, 32, 32)),
    "base": (256, 8, 4, (32, 64, 128, 256)),
    "1b": (2048, 28, 32, (64, 128, 256, 512)),  # RDT-1B
}

DEFAULT_FORMULATION = {"name": "ddpm", "prediction": "sample", "beta_schedule": "squaredcos_cap_v2",
                       "num_train_timesteps": 1000, "clip_sample": 1.0}


class _ScalarEmbedding(SinusoidalEmbedding):
    """Sin/cos features → MLP with hidden = width (RDT's timestep / frequency embedders; 4x would add 67M at 1b)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class RDTBlock(nn.Module):
    """RMSNorm pre-norm: self-attention → cross-attention to this block's condition → FFN (hidden = width)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=True, dropout=dropout)
        self.cross = Attention(dim, heads, qk_norm=True, dropout=dropout)
        self.ffn = MLP(dim, dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm2(x), context, kv=kv)  # context passed even with kv: hooks can see it
        return x + self.ffn(self.norm3(x))


@register_policy("rdt")
class RDTPolicy(DiffusionPolicy):
    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, size: str = "base",
                 robot: str | None = None, control_hz: float | None = None, state_key: str = "state",
                 obs_horizon: int = 2, action_horizon: int = 16, n_action_steps: int = 8,
                 formulation: dict | None = None, sampler: str = "dpmsolver++", num_inference_steps: int = 5,
                 width: int | None = None, depth: int | None = None, heads: int | None = None,
                 lang_dim: int = 384, cond_dropout: float = 0.1, dropout: float = 0.0):
        super().__init__(shape_meta, normalizer, obs_horizon, action_horizon, n_action_steps,
                         formulation or DEFAULT_FORMULATION, sampler, num_inference_steps)
        if size not in SIZES:
            raise ValueError(f"unknown rdt size {size!r}; choose one of {sorted(SIZES)}")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        w, d, h, channels = SIZES[size]
        w, d, h = width or w, depth or d, heads or h
        self.size, self.cond_dropout = size, float(cond_dropout)

        # -- embodiment: the store's robot (shape_meta["robot"] once the trainer records it, else the config) --
        meta_robot = shape_meta.get("robot")
        if robot and meta_robot and str(robot).lower() != str(meta_robot).lower():
            raise ValueError(f"config says robot={robot!r} but the store records robot={meta_robot!r}")
        self.robot = robot or meta_robot
        self.adapter = adapter_for(self.robot)
        if self.adapter.action_dim != self.action_dim:
            raise ValueError(f"robot {self.robot!r} has {self.adapter.action_dim}-d actions in the unified space "
                             f"adapter, but the store's actions are {self.action_dim}-d")
        self.state_key = state_key if state_key in self.obs_shapes and self.adapter.state_index else None
        if self.state_key is not None and self.obs_shapes[state_key][0][-1] <= max(self.adapter.state_index):
            raise ValueError(f"robot {self.robot!r} reads state[{max(self.adapter.state_index)}] but observation "
                             f"{state_key!r} has shape {self.obs_shapes[state_key][0]}")
        hz = control_hz or shape_meta.get("control_hz") or shape_meta.get("fps") or self.adapter.control_hz
        if not hz:
            raise ValueError(f"no control frequency for robot {self.robot!r}: set policy.control_hz")
        self.control_hz = float(hz)
        self.register_buffer("action_mask", torch.as_tensor(self.adapter.action_mask), persistent=False)
        self.register_buffer("state_mask", torch.as_tensor(self.adapter.state_mask), persistent=False)

        # -- conditions (cross-attention keys) --------------------------------------------------------------
        self.obs_encoder = ObservationEncoder(self.obs_shapes, w, obs_horizon, image_channels=channels)
        self.task_embedding = nn.Embedding(self.num_tasks, w) if self.num_tasks > 1 else None
        self.lang_dim = lang_dim
        self.lang_adaptor = MLP(lang_dim, w, w)
        self.null_lang = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.null_obs = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.cond_norm = RMSNorm(w)
        # -- main sequence ------------------------------------------------------------------------------------
        self.time_embedding = _ScalarEmbedding(w)
        self.freq_embedding = _ScalarEmbedding(w)
        self.null_freq = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.state_adaptor = MLP(2 * UNIFIED_DIM, w, w)
        self.action_adaptor = MLP(2 * UNIFIED_DIM, w, w)
        self.pos = nn.Parameter(torch.randn(1, 2 + obs_horizon + action_horizon, w) * 0.02)
        self.blocks = nn.ModuleList(RDTBlock(w, h, dropout) for _ in range(d))
        self.final_norm = RMSNorm(w)
        self.head = MLP(w, w, UNIFIED_DIM)
        nn.init.zeros_(self.head.net[-1].weight)
        nn.init.zeros_(self.head.net[-1].bias)

    # -- conditions ---------------------------------------------------------------------------------------------
    def _drop(self, batch: int, device) -> torch.Tensor | None:
        """Per-sample bool [B, 1, 1]: True = replace this condition by its null (training only)."""
        if not self.training or self.cond_dropout == 0.0:
            return None
        return (torch.rand(batch, device=device) < self.cond_dropout)[:, None, None]

    def _language(self, goal: dict[str, torch.Tensor] | None, batch: int, device) -> torch.Tensor:
        goal = goal or {}
        if self.task_embedding is not None and "task_id" in goal:
            task = torch.as_tensor(goal["task_id"], device=device).long().reshape(-1).expand(batch)
            fallback = self.task_embedding(task)[:, None]
        elif self.task_embedding is not None and "lang_emb" not in goal:
            raise ValueError(f"this policy was trained on {self.num_tasks} tasks: pass goal={{'task_id': ...}} "
                             "or goal={'lang_emb': ...}")
        else:
            fallback = self.null_lang.expand(batch, 1, -1)
        lang = goal.get("lang_emb")
        if lang is None:
            return fallback
        lang = torch.as_tensor(lang, device=device).float()
        lang = lang[:, None] if lang.dim() == 2 else lang  # [B, D] → one token
        if lang.shape[-1] != self.lang_dim:
            raise ValueError(f"goal lang_emb has {lang.shape[-1]} features; the policy was built with "
                             f"lang_dim={self.lang_dim}")
        tokens = self.lang_adaptor(lang.to(self.null_lang.dtype)).expand(batch, -1, -1)
        has = goal.get("has_lang")
        if has is not None:  # samples without language keep the task / null token
            has = torch.as_tensor(has, device=device).bool().reshape(-1, 1, 1)
            tokens = torch.where(has, tokens, fallback.expand_as(tokens))
        return tokens

    def _optional_parameters(self):
        yield from self.lang_adaptor.parameters()
        yield from (self.null_lang, self.null_obs, self.null_freq)
        if self.task_embedding is not None:
            yield from self.task_embedding.parameters()

    def unified_state(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised native state [B, To, S] → unified value ⊕ mask [B, To, 256] (zeros when the store has none)."""
        ref = next(iter(obs.values()))
        if self.state_key is None:
            return torch.zeros(ref.shape[0], self.obs_horizon, 2 * UNIFIED_DIM, device=self.pos.device)
        value, mask = self.adapter.state_to_unified(obs[self.state_key].float())
        return torch.cat([value, mask.to(value).expand_as(value)], dim=-1)

    def encode(self, obs: dict[str, torch.Tensor], goal: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        obs_tokens = self.obs_encoder(obs)
        batch, device = obs_tokens.shape[0], obs_tokens.device
        lang = self._language(goal, batch, device)
        state = self.unified_state(obs).to(obs_tokens.dtype)
        freq = self.freq_embedding(torch.full((batch,), self.control_hz, device=device))[:, None]
        for drop, null in ((self._drop(batch, device), self.null_lang), (self._drop(batch, device), self.null_obs),
                           (self._drop(batch, device), self.null_freq), (self._drop(batch, device), None)):
            if drop is None:
                continue
            if null is None:  # a dropped state is "no state available": zero value, zero mask
                state = torch.where(drop, torch.zeros_like(state), state)
            elif null is self.null_lang:
                lang = torch.where(drop, null.expand_as(lang), lang)
            elif null is self.null_obs:
                obs_tokens = torch.where(drop, null.expand_as(obs_tokens), obs_tokens)
            else:
                freq = torch.where(drop, null.expand_as(freq), freq)
        if self.training:  # DDP needs every parameter in the graph, whichever conditions this batch carried
            freq = freq + 0.0 * sum(p.sum() for p in self._optional_parameters())
        lang, obs_tokens = self.cond_norm(lang), self.cond_norm(obs_tokens)
        contexts = [lang if i % 2 == 0 else obs_tokens for i in range(len(self.blocks))]
        kv = ([None] * len(self.blocks) if self.training else
              [block.cross.keys_values(ctx) for block, ctx in zip(self.blocks, contexts)])
        return {"lang": lang, "obs": obs_tokens, "contexts": contexts, "kv": kv,
                "prefix": torch.cat([freq, self.state_adaptor(state)], dim=1)}

    # -- one denoiser evaluation on the unified, normalised action chunk [B, Tp, 128] -------------------------
    def denoise(self, x_in, noise_cond, cond, step_index=None):
        batch = x_in.shape[0]
        mask = self.action_mask.to(x_in.dtype)
        x_in = x_in * mask
        t = self.time_embedding(noise_cond.reshape(-1).expand(batch))[:, None]
        actions = self.action_adaptor(torch.cat([x_in, mask.expand_as(x_in)], dim=-1))
        x = torch.cat([t, cond["prefix"], actions], dim=1) + self.pos
        for block, ctx, kv in zip(self.blocks, cond["contexts"], cond["kv"]):
            x = block(x, ctx, kv=kv)
        return self.head(self.final_norm(x[:, -self.action_horizon:])) * mask

    # -- training and inference in native units -------------------------------------------------------------------
    def diffusion_target(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised native actions mapped into the unified space; unused slots never enter the loss."""
        unified, mask = self.adapter.action_to_unified(self.normalizer.normalize("action", batch["action"].float()))
        return unified, (~batch["action_is_pad"]).float()[..., None] * mask.to(unified)

    @torch.no_grad()
    def predict_unified(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised unified chunk [B, Tp, 128] (zero in the robot's unused slots)."""
        return self.sample_chunk(obs, goal, generator, dim=UNIFIED_DIM)

    @torch.no_grad()
    def predict_action(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        unified = self.predict_unified(obs, goal, generator)
        return self.normalizer.unnormalize("action", self.adapter.action_from_unified(unified.float()))
