"""RDT: a diffusion transformer over the unified 128-d action space, with alternating condition injection.

Main sequence: [timestep, control frequency, state × To (unified value ⊕ mask), noisy action × Tp (unified
value ⊕ mask)], non-causal self-attention with QK-norm and RMSNorm. Conditions never enter the sequence:
block 0, 2, … cross-attend to language tokens and block 1, 3, … to observation tokens (images and the
native low-dim observation, which carries object poses the unified state leaves out). Alternating keeps each
cross-attention's keys homogeneous and halves their cost (RDT paper). Without language the language tokens
are the task embedding (multi-task store) or a learned null token. The head (RMSNorm → MLP → 128, last layer
zero) is multiplied by the robot's availability mask, so unused slots are exactly zero.

The policy keeps the store's native units at its boundary. Inside, every sample is in the unified layout
(`UnifiedLayout`): proprioception and actions in the 128 slots, the other low-dim observation values (object
poses) in a zero-padded `context` vector of `context_dim`, images by camera key (blank frames for a camera a
robot lacks, as RDT pads). So one policy trains on several stores of different robots at once
(`dataset.paths=[...]`, robodit.datasets.multi): `shape_meta["stores"]` lists them, the normaliser holds each
store's native stats under `<key>@<i>`, and every sample is normalised with its own store's stats — slots
shared by robots with different ranges (a Sawyer's and a Panda's EEF deltas) each span [-1, 1] for their robot
instead of one pooled range squeezing the narrower robot. Predictions are unnormalised with the active store's
stats (`select_store`; chosen automatically from the observation layout) and gathered back to native actions.
Weights never depend on the store count, so a multi-store checkpoint fine-tunes on one store (`init_from`).
DDPM x0-prediction, squaredcos_cap_v2, DPM-Solver++ 5 steps; each condition (language, observation,
frequency, state) is dropped per sample with probability `cond_dropout` in training.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import torch
from torch import nn

from robodit.datasets.normalizer import Normalizer
from robodit.action_space import UNIFIED_DIM, UnifiedLayout
from robodit.nn.attention import MLP, Attention, RMSNorm
from robodit.nn.embeddings import SinusoidalEmbedding
from robodit.keys import is_image_key
from robodit.nn.encoders import ObservationEncoder
from robodit.policies.base import keep_in_graph, register_policy
from robodit.policies.diffusion_policy import X0_DDPM, DiffusionPolicy

SIZES = {
    # name: (width, depth, heads, image channels)
    "tiny": (64, 4, 2, (8, 16, 32, 32)),
    "base": (256, 8, 4, (32, 64, 128, 256)),
    "1b": (2048, 28, 32, (64, 128, 256, 512)),  # RDT-1B
}


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


def _stores(shape_meta: dict) -> list[dict]:
    """The stores a policy serves: `shape_meta["stores"]` (multi-store training) or the one store itself."""
    return list(shape_meta.get("stores") or [shape_meta])


@register_policy("rdt")
class RDTPolicy(DiffusionPolicy):
    default_formulation = {**X0_DDPM, "num_train_timesteps": 1000}  # RDT's 1000 levels

    supports_multi_store = True  # trains on robodit.datasets.multi batches (dataset.paths=[...])
    language_goals = language_tokens = True  # language tokens are cross-attention keys: any number per row

    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, size: str = "base",
                 robot: str | None = None, control_hz: float | None = None, state_key: str = "state",
                 obs_horizon: int = 2, action_horizon: int = 16, n_action_steps: int = 8,
                 formulation: dict | None = None, sampler: str = "dpmsolver++", num_inference_steps: int = 5,
                 width: int | None = None, depth: int | None = None, heads: int | None = None,
                 lang_dim: int = 384, cond_dropout: float = 0.1, dropout: float = 0.0, context_dim: int = 64,
                 language_encoder: str | None = None, image_pooling: str = "avg", image_stem_stride: int = 1):
        super().__init__(shape_meta, normalizer, obs_horizon, action_horizon, n_action_steps,
                         formulation, sampler, num_inference_steps)
        # with an encoder the sampler hands it the store's meta/lang_emb and goal={"instruction": ...} works
        self.language_encoder = language_encoder
        if size not in SIZES:
            raise ValueError(f"unknown rdt size {size!r}; choose one of {sorted(SIZES)}")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        w, d, h, channels = SIZES[size]
        w, d, h = width or w, depth or d, heads or h
        self.size, self.cond_dropout, self.state_key = size, float(cond_dropout), state_key

        # -- embodiments: one per training store (the store's robot, else the config's) ---------------------------
        stores = _stores(shape_meta)
        if len(stores) > 1 and (robot or control_hz):
            raise ValueError("policy.robot / policy.control_hz set one robot, but the policy trains on "
                             f"{len(stores)} stores, each with its own robot and rate: leave them null")
        self.layouts: list[UnifiedLayout] = []
        self.store_names, hz = [], []
        for i, meta in enumerate(stores):
            name = str(meta.get("name") or (f"store {i}" if len(stores) > 1 else "the store"))
            meta_robot = meta.get("robot")
            if robot and meta_robot and str(robot).lower() != str(meta_robot).lower():
                raise ValueError(f"config says robot={robot!r} but the store records robot={meta_robot!r}")
            obs = {k: (tuple(v["shape"]), str(v["dtype"])) for k, v in meta["obs"].items()}
            layout = UnifiedLayout.build(robot or meta_robot, obs, state_key, context_dim,
                                         where=name if len(stores) > 1 else "")
            a_dim = int(meta["action"]["shape"][0])
            if layout.adapter.action_dim != a_dim:
                raise ValueError(f"{name}: robot {layout.adapter.robot!r} has {layout.adapter.action_dim}-d actions "
                                 f"in the unified space adapter, but the store's actions are {a_dim}-d")
            rate = control_hz or meta.get("control_hz") or meta.get("fps") or layout.adapter.control_hz
            if not rate:
                raise ValueError(f"no control frequency for robot {layout.adapter.robot!r}: set policy.control_hz")
            self.layouts.append(layout)
            self.store_names.append(name)
            hz.append(float(rate))
        self.store_obs = [{k: (tuple(v["shape"]), str(v["dtype"])) for k, v in m["obs"].items()} for m in stores]
        self.image_shapes = self._union_images()
        self.context_dim = int(context_dim)
        self._hz = hz
        self.register_buffer("store_hz", torch.tensor(hz), persistent=False)
        self.register_buffer("action_masks", torch.as_tensor(np.stack([lay.action_mask for lay in self.layouts])),
                             persistent=False)
        self.register_buffer("state_masks", torch.as_tensor(np.stack([lay.state_mask for lay in self.layouts])),
                             persistent=False)
        self._register_affine()
        self.select_store(0)

        # -- conditions (cross-attention keys) --------------------------------------------------------------
        encoder_shapes = {"context": ((self.context_dim,), "float32"), **self.image_shapes}
        self.image_pooling, self.image_stem_stride = image_pooling, image_stem_stride
        self.obs_encoder = ObservationEncoder(encoder_shapes, w, obs_horizon, image_channels=channels,
                                              image_pooling=image_pooling, image_stem_stride=image_stem_stride)
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

    # -- stores -------------------------------------------------------------------------------------------------
    def _union_images(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Every camera any store has (a store without one gets blank frames); one shape per camera key."""
        images: dict[str, tuple[tuple[int, ...], str]] = {}
        for name, obs in zip(self.store_names, self.store_obs):
            for key, (shape, dtype) in obs.items():
                if is_image_key(shape, dtype):
                    if key in images and images[key] != (shape, dtype):
                        raise ValueError(f"camera {key!r} is {images[key][0]} in one store but {shape} in {name}: "
                                         "re-collect at one image size, or rename one camera")
                    images[key] = (shape, dtype)
        return dict(sorted(images.items()))

    def _register_affine(self) -> None:
        """Per-store unified normalisation [S, 128] / [S, C] from the normaliser's native per-store keys."""
        parts: dict[str, list[np.ndarray]] = {}
        for i, layout in enumerate(self.layouts):
            suffix = f"@{i}" if len(self.layouts) > 1 else ""
            stats = {}
            for key in [k for k, _ in layout.lowdim] + ["action"]:
                if f"{key}{suffix}" in self.normalizer:
                    stats[key] = (getattr(self.normalizer, f"{key}{suffix}__offset").cpu().numpy(),
                                  getattr(self.normalizer, f"{key}{suffix}__scale").cpu().numpy())
            for name, value in layout.affine(stats).items():
                parts.setdefault(name, []).append(value)
        for name, values in parts.items():
            self.register_buffer(f"u_{name}", torch.as_tensor(np.stack(values)), persistent=False)

    def select_store(self, which: int | str) -> int:
        """Serve one of the training stores (index, name, robot or env name): its robot, rate and action units."""
        if isinstance(which, str):
            hits = [i for i, (n, lay) in enumerate(zip(self.store_names, self.layouts))
                    if which in (n, lay.adapter.robot)]
            if not hits:
                raise ValueError(f"no training store matches {which!r}; stores: {self.store_names}")
            which = hits[0]
        if not 0 <= int(which) < len(self.layouts):
            raise ValueError(f"store index {which} out of range: the policy has {len(self.layouts)} store(s)")
        self.store_index = int(which)
        layout = self.layouts[self.store_index]
        self.adapter, self.robot = layout.adapter, layout.adapter.robot
        self.obs_shapes = self.store_obs[self.store_index]
        self.action_dim = layout.adapter.action_dim
        self.control_hz = self._hz[self.store_index]
        return self.store_index

    @property
    def action_mask(self) -> torch.Tensor:
        """[128] availability of the active store's robot."""
        return self.action_masks[self.store_index]

    def _fits(self, i: int, obs: dict[str, Any]) -> bool:
        """Store i's keys are all there and its low-dim ones have its widths (images may be HWC or CHW)."""
        obs = {k[4:] if k.startswith("obs.") else k: v for k, v in obs.items()}
        return set(self.store_obs[i]) <= set(obs) and all(
            np.shape(obs[k])[-1] == shape[0] for k, (shape, _) in self.store_obs[i].items() if len(shape) == 1)

    def prepare_obs(self, obs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """As `Policy.prepare_obs`; an observation laid out like another training store's switches to that store."""
        if len(self.layouts) > 1 and not self._fits(self.store_index, obs):
            fits = [i for i in range(len(self.layouts)) if self._fits(i, obs)]
            if fits:
                self.select_store(fits[0])
        return super().prepare_obs(obs)

    # -- unified layout -------------------------------------------------------------------------------------------
    def unify(self, obs: dict[str, torch.Tensor], action: torch.Tensor | None = None,
              store: int | None = None) -> dict[str, torch.Tensor]:
        """Native obs {key: [B, To, ...]} (and actions [B, Tp, A]) of one store → the raw unified batch that
        robodit.datasets.multi yields: obs.state [B, To, 128], obs.context [B, To, C], obs.<camera>,
        state_mask / action_mask [B, 128], store_id [B] (and action [B, Tp, 128])."""
        store = self.store_index if store is None else store
        layout = self.layouts[store]
        ref = next(iter(obs.values()))
        lowdim = {k: obs[k].float() for k, _ in layout.lowdim} or {"_": ref.new_zeros(*ref.shape[:2], 1).float()}
        batch = {"obs.state": layout.state(lowdim), "obs.context": layout.context(lowdim)}
        for key, (shape, _) in self.image_shapes.items():  # a camera this robot lacks: blank frames (RDT)
            batch[f"obs.{key}"] = obs[key] if key in obs else torch.zeros(
                *ref.shape[:2], shape[2], shape[0], shape[1], dtype=torch.uint8, device=ref.device)
        b = ref.shape[0]
        batch["state_mask"] = self.state_masks[store].expand(b, -1)
        batch["action_mask"] = self.action_masks[store].expand(b, -1)
        batch["store_id"] = torch.full((b,), store, dtype=torch.long, device=ref.device)
        if action is not None:
            batch["action"] = layout.action(action.float())
        return batch

    def _normalized(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw unified batch → normalised model inputs, each sample with its own store's statistics."""
        sid = batch["store_id"].long()
        out = {key: batch[f"obs.{key}"] for key in self.image_shapes}  # cameras by dtype/shape, never by name
        out["state"] = (batch["obs.state"] - self.u_state_offset[sid, None]) / self.u_state_scale[sid, None]
        out["state"] = out["state"] * batch["state_mask"][:, None]
        out["context"] = (batch["obs.context"] - self.u_context_offset[sid, None]) / self.u_context_scale[sid, None]
        out["state_mask"], out["store_id"] = batch["state_mask"], sid
        out["action_mask"] = batch["action_mask"]
        return out

    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Native observations of the active store → normalised unified model inputs."""
        return self._normalized(self.unify(obs))

    def unified_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch in the raw unified layout: multi-store batches already are; a native one-store batch
        (robodit.datasets.sampler) is mapped with this policy's store."""
        if "store_id" in batch:
            return batch
        native = self.split_batch(batch, "obs")
        rest = {k: v for k, v in batch.items() if not k.startswith("obs.") and k != "action"}
        return {**rest, **self.unify(native, batch["action"])}

    # -- conditions ---------------------------------------------------------------------------------------------
    def _drop(self, batch: int, device) -> torch.Tensor | None:
        """Per-sample bool [B, 1, 1]: True = replace this condition by its null (training only)."""
        if not self.training or self.cond_dropout == 0.0:
            return None
        return (torch.rand(batch, device=device) < self.cond_dropout)[:, None, None]

    def _language(self, goal: dict[str, torch.Tensor] | None, batch: int) -> torch.Tensor:
        """Language tokens [B, L, W] from the resolved goal (`resolve_goal`); rows without an instruction take the
        task embedding (multi-task store) or the learned null token."""
        goal = goal or {}
        if self.task_embedding is not None and "task_id" in goal:
            fallback = self.task_embedding(goal["task_id"].expand(batch))[:, None]
        else:
            fallback = self.null_lang.expand(batch, 1, -1)
        lang = goal.get("lang_emb")
        if lang is None:
            return fallback
        lang = lang[:, None] if lang.dim() == 2 else lang  # [B, D] → one token
        tokens = self.lang_adaptor(lang.to(self.null_lang.dtype)).expand(batch, -1, -1)
        has = goal.get("has_lang")
        if has is not None:  # samples without language keep the task / null token
            tokens = torch.where(has.reshape(-1, 1, 1), tokens, fallback.expand_as(tokens))
        return tokens

    def _optional_parameters(self):
        yield from self.lang_adaptor.parameters()
        yield from (self.null_lang, self.null_obs, self.null_freq)
        if self.task_embedding is not None:
            yield from self.task_embedding.parameters()

    def encode(self, obs: dict[str, torch.Tensor], goal: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """`obs`: normalised unified inputs (`normalize_obs` / `_normalized`): state, state_mask, context, cameras,
        store_id, action_mask."""
        obs_tokens = self.obs_encoder({k: obs[k] for k in ("context", *self.image_shapes)})
        batch, device = obs_tokens.shape[0], obs_tokens.device
        lang = self._language(goal, batch)
        value = obs["state"].to(obs_tokens.dtype)
        state = torch.cat([value, obs["state_mask"][:, None].to(value).expand_as(value)], dim=-1)
        freq = self.freq_embedding(self.store_hz[obs["store_id"]].to(device))[:, None]
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
        if self.training:  # whichever conditions this batch carried
            freq = keep_in_graph(freq, self._optional_parameters())
        lang, obs_tokens = self.cond_norm(lang), self.cond_norm(obs_tokens)
        contexts = [lang if i % 2 == 0 else obs_tokens for i in range(len(self.blocks))]
        kv = ([None] * len(self.blocks) if self.training else
              [block.cross.keys_values(ctx) for block, ctx in zip(self.blocks, contexts)])
        return {"lang": lang, "obs": obs_tokens, "contexts": contexts, "kv": kv,
                "prefix": torch.cat([freq, self.state_adaptor(state)], dim=1),
                "action_mask": obs["action_mask"][:, None].to(obs_tokens.dtype)}

    # -- one denoiser evaluation on the unified, normalised action chunk [B, Tp, 128] -------------------------
    def denoise(self, x_in, noise_cond, cond, step_index=None):
        batch = x_in.shape[0]
        mask = cond["action_mask"].to(x_in.dtype).expand(batch, 1, -1)  # each sample's robot
        x_in = x_in * mask
        t = self.time_embedding(noise_cond.reshape(-1).expand(batch))[:, None]
        actions = self.action_adaptor(torch.cat([x_in, mask.expand_as(x_in)], dim=-1))
        x = torch.cat([t, cond["prefix"], actions], dim=1) + self.pos
        for block, ctx, kv in zip(self.blocks, cond["contexts"], cond["kv"]):
            x = block(x, ctx, kv=kv)
        return self.head(self.final_norm(x[:, -self.action_horizon:])) * mask

    # -- training and inference in native units -------------------------------------------------------------------
    def diffusion_target(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised unified actions (each sample with its store's stats); unused slots never enter the loss."""
        batch = self.unified_batch(batch)
        sid, mask = batch["store_id"].long(), batch["action_mask"][:, None]
        target = (batch["action"].float() - self.u_action_offset[sid, None]) / self.u_action_scale[sid, None]
        return target * mask, (~batch["action_is_pad"]).float()[..., None] * mask

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = self.unified_batch(batch)
        cond = self.encode(self._normalized(batch), self.resolve_goal(self.goal_from_batch(batch),
                                                                       batch["action"].shape[0]))
        x0, mask = self.diffusion_target(batch)
        loss = self.formulation.loss(lambda x, c: self.denoise(x, c, cond), x0, mask=mask).mean()
        return {"loss": loss, "diffusion_loss": loss.detach()}

    @torch.no_grad()
    def predict_unified(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised unified chunk [B, Tp, 128] (zero in the robot's unused slots)."""
        return self.sample_chunk(obs, goal, generator, dim=UNIFIED_DIM)

    noise_dim = UNIFIED_DIM  # the chunk is denoised in the unified 128-d space

    def chunk_to_actions(self, unified: torch.Tensor) -> torch.Tensor:
        """Normalised unified chunk → the active store's robot's native actions."""
        i = self.store_index
        return self.layouts[i].native_action(unified * self.u_action_scale[i] + self.u_action_offset[i])
