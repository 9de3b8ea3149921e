"""DiT baseline policy.

Action tokens (one per future step) self-attend, cross-attend to observation tokens (state MLP / ResNet
image tokens per time step, plus a task token when the store holds several tasks), and take the noise level
through AdaLN-Zero. Condition tokens are computed once per chunk and reused at every denoising step.
"""

from __future__ import annotations

import torch
from torch import nn

from robodit.datasets.normalizer import Normalizer
from robodit.nn.attention import AdaLNFinal, AdaLNZeroBlock, StepModulation, TransformerEncoderBlock
from robodit.nn.embeddings import SinusoidalEmbedding
from robodit.nn.encoders import ObservationEncoder
from robodit.policies.base import register_policy
from robodit.policies.diffusion_policy import DiffusionPolicy

SIZES = {
    # name: (width, decoder depth, heads, obs-encoder depth, image channels)
    "tiny": (64, 2, 2, 1, (8, 16, 32, 32)),
    "base": (256, 4, 4, 1, (32, 64, 128, 256)),
    "large": (512, 12, 8, 4, (64, 128, 256, 512)),
}


@register_policy("dit")
class DiTPolicy(DiffusionPolicy):
    SIZES = SIZES  # a family built on this architecture (MDT) brings its own size table

    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, size: str = "base",
                 obs_horizon: int = 2, action_horizon: int = 16, n_action_steps: int = 8,
                 formulation: dict | None = None, sampler: str = "ddim", num_inference_steps: int = 10,
                 width: int | None = None, depth: int | None = None, heads: int | None = None,
                 dropout: float = 0.0, noise_cond_scale: float | None = None, task_conditioning: str = "token",
                 image_pooling: str = "avg", image_stem_stride: int = 1):
        super().__init__(shape_meta, normalizer, obs_horizon, action_horizon, n_action_steps, formulation,
                         sampler, num_inference_steps)
        self.set_task_conditioning(task_conditioning)
        if size not in self.SIZES:
            raise ValueError(f"unknown {self.name} size {size!r}; choose one of {sorted(self.SIZES)}")
        w, d, h, enc_depth, channels = self.SIZES[size]
        w, d, h = width or w, depth or d, heads or h
        self.size, self.image_pooling, self.image_stem_stride = size, image_pooling, image_stem_stride
        self.obs_encoder = ObservationEncoder(self.obs_shapes, w, obs_horizon, image_channels=channels,
                                              image_pooling=image_pooling, image_stem_stride=image_stem_stride)
        self.task_embedding = nn.Embedding(self.num_tasks, w) if self.num_tasks > 1 else None
        self.context_encoder = nn.ModuleList(TransformerEncoderBlock(w, h, dropout=dropout) for _ in range(enc_depth))
        self.noise_embedding = SinusoidalEmbedding(w, scale=self.noise_cond_scale(noise_cond_scale))
        self.action_in = nn.Linear(self.action_dim, w)
        self.action_pos = nn.Parameter(torch.randn(1, action_horizon, w) * 0.02)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(w, h, dropout=dropout) for _ in range(d))
        self.head = AdaLNFinal(w, self.action_dim)
        self._noise_cache: dict = {}

    # -- inference caches: everything that does not depend on the noisy actions is computed once --------------
    def on_weights_changed(self) -> None:
        self._noise_cache = {}

    def _noise_modulations(self, noise_cond: torch.Tensor, task: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-block AdaLN modulations (+ the head's, last) for a batch of noise levels [S] → [S, ...], with the
        global task vector [S, W] added to the noise embedding when the policy conditions on it."""
        c = self.noise_embedding(noise_cond)
        if task is not None:
            c = c + task
        return [block.ada(c) for block in self.blocks] + [self.head.ada(c)]

    def _inference_plan(self) -> dict:
        """What every sampling step needs beyond the noisy actions, built once per (sampler, steps) and kept until
        the weights change: each step's modulations (the sampler's noise levels are fixed, so all steps embed in
        one batched pass; keyed by schedule and step index, never by a float), split for `AdaLNZeroBlock.infer`,
        and each block's stacked Q/K/V projection."""
        key = self.formulation.schedule_key(self.sampler, self.num_inference_steps)
        plan = self._noise_cache.get(key)
        if plan is None:
            levels = torch.tensor(self.formulation.schedule(self.sampler, self.num_inference_steps),
                                  dtype=torch.float32, device=self.device)
            with torch.no_grad():
                *mods, head = self._noise_modulations(levels)
                per_block = [StepModulation.split(m) for m in mods]
                plan = {"steps": [list(step) for step in zip(*per_block)], "head": self.head.step_modulations(head),
                        "qkv": [block.attn.fused_qkv() for block in self.blocks],
                        # action_in's bias and the positions as one addend: one Add fewer per step in a graph
                        "action_in": (self.action_in.weight.t(), self.action_in.bias + self.action_pos)}
            self._noise_cache = {key: plan}
        return plan

    def encode(self, obs, goal):
        tokens = self.obs_encoder(obs)
        task = self.global_task_vector(goal)
        tokens = self.with_task_token(tokens, goal)
        for block in self.context_encoder:
            tokens = block(tokens)
        if self.training:
            return {"tokens": tokens, "kv": [None] * len(self.blocks), "task": task}
        return {"tokens": tokens, "kv": [block.cross.keys_values(tokens) for block in self.blocks], "task": task}

    def denoise(self, x_in, noise_cond, cond, step_index=None):
        task = cond.get("task")
        if step_index is not None and not self.training and task is None:  # the fast path (AdaLNZeroBlock.infer)
            plan = self._inference_plan()
            weight_t, addend = plan["action_in"]
            x = torch.matmul(x_in, weight_t) + addend
            b, n, w = x.shape
            x = x.reshape(b * n, w)  # flat tokens: each linear one Gemm in an exported graph
            for block, mod, qkv, kv in zip(self.blocks, plan["steps"][step_index], plan["qkv"], cond["kv"]):
                x = block.infer(x, mod, qkv, context_kv=kv, tokens=n)
            return self.head.infer(x, *plan["head"][step_index]).view(b, n, -1)
        # training, or per-sample tasks: depth + 1 small linears per step
        x = self.action_in(x_in) + self.action_pos
        mods = self._noise_modulations(noise_cond.reshape(-1).expand(x_in.shape[0]), task)
        for block, mod, kv in zip(self.blocks, mods, cond["kv"]):
            x = block(x, context=cond["tokens"], modulation=mod, context_kv=kv)
        return self.head(x, modulation=mods[-1])
