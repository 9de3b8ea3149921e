"""PAD: joint denoising of future frames and the action chunk in one DiT (issue 5, notes/policies.md).

Tokens: for each camera, the patches of k noisy future frames stacked on channels, concatenated on channels with
the clean current frame; then one token per future action step (noisy action + current robot state). One
AdaLN-Zero DiT over all of them, conditioned on noise level + instruction embedding (`language_encoder`, the
store's cached `goal.lang_emb`) or, without one, a task embedding. Image
tokens do not attend to action tokens, so video prediction never depends on actions and action-free video can
train it; action tokens attend to everything. One shared noise level, separate noise, separate weighted losses.

Pixels, not latents: the paper denoises a frozen VAE's latents, but no pretrained autoencoder ships offline and
training one is a project of its own; at 64 px an 8-px patch gives 64 tokens per camera, as many as a 256-px
image through an 8x VAE with 2x2 patches, so the transformer's cost is the same order and nothing is frozen.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from robodit.datasets.normalizer import Normalizer
from robodit.diffusion.base import masked_mean, randn
from robodit.nn.attention import AdaLNFinal, AdaLNZeroBlock, StepModulation
from robodit.nn.embeddings import SinusoidalEmbedding
from robodit.keys import is_image_key
from robodit.nn.encoders import images_to_float
from robodit.policies.base import keep_in_graph, register_policy
from robodit.policies.diffusion_policy import DiffusionPolicy

SIZES = {"tiny": (64, 2, 2), "base": (256, 6, 4), "large": (512, 12, 8)}  # width, depth, heads

# The families' x0 default; the paper's process (DDPM epsilon, linear betas, 1000 training levels, DDIM-50) gave 40%
# on reach-v3 from 64 px at an 8-min CPU budget against 100% (configs/policy/pad.yaml says how to set it).


def image_attention_mask(num_image: int, num_action: int, device=None) -> torch.Tensor:
    """[N, N] SDPA bool mask (True = may attend): image rows see only image columns, action rows see all."""
    mask = torch.ones(num_image + num_action, num_image + num_action, dtype=torch.bool, device=device)
    mask[:num_image, num_image:] = False
    return mask


@register_policy("pad")
class PADPolicy(DiffusionPolicy):
    run_state_keys = ("train_steps",)

    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, size: str = "base",
                 obs_horizon: int = 1, action_horizon: int = 16, n_action_steps: int = 8,
                 formulation: dict | None = None, sampler: str = "ddim", num_inference_steps: int = 10,
                 future_frames: int = 2, future_stride: int = 8, image_size: int = 64, patch_size: int = 8,
                 image_loss_weight: float = 1.0, action_loss_weight: float = 1.0, action_loss_start_step: int = 0,
                 width: int | None = None, depth: int | None = None, heads: int | None = None,
                 dropout: float = 0.0, noise_cond_scale: float | None = None, inference_cache: bool = True,
                 language_encoder: str | None = None, lang_dim: int = 384):
        super().__init__(shape_meta, normalizer, obs_horizon, action_horizon, n_action_steps,
                         formulation, sampler, num_inference_steps)
        self.language_encoder, self.lang_dim = language_encoder, int(lang_dim)
        self.language_goals = bool(language_encoder)  # instructions replace the task id where given
        if size not in SIZES:
            raise ValueError(f"unknown pad size {size!r}; choose one of {sorted(SIZES)}")
        if future_frames < 1 or future_stride < 1:
            raise ValueError(f"future_frames and future_stride must be >= 1, got {future_frames}, {future_stride}")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        self.image_keys = sorted(k for k, (s, d) in self.obs_shapes.items() if is_image_key(s, d))
        self.state_keys = sorted(k for k in self.obs_shapes if k not in self.image_keys)
        if not self.image_keys:
            raise ValueError("pad predicts future frames: it needs at least one uint8 image key among its "
                             f"observation keys, which are {sorted(self.obs_shapes)} (the store's, or "
                             "dataset.obs_keys)")
        channels = {self.obs_shapes[k][0][-1] for k in self.image_keys}
        if len(channels) != 1:
            raise ValueError(f"pad needs the same channel count for every camera, got {channels}")
        w, d, h = SIZES[size]
        w, d, h = width or w, depth or d, heads or h
        self.size, self.channels = size, channels.pop()
        self.future_frames, self.future_stride = future_frames, future_stride
        self.image_size, self.patch_size = image_size, patch_size
        self.image_loss_weight, self.action_loss_weight = float(image_loss_weight), float(action_loss_weight)
        self.action_loss_start_step = int(action_loss_start_step)
        self.patches = (image_size // patch_size) ** 2  # tokens per camera
        self.num_image_tokens = self.patches * len(self.image_keys)
        patch_dim = self.channels * patch_size * patch_size
        self.frame_dim = future_frames * patch_dim  # one token's slice of the noisy future frames

        self.current_in = nn.Linear(patch_dim, w)  # clean current frame: its half of the channel concatenation
        self.future_in = nn.Linear(self.frame_dim, w, bias=False)  # noisy future frames: the other half
        self.image_pos = nn.Parameter(torch.randn(1, self.num_image_tokens, w) * 0.02)  # also tells cameras apart
        state_dim = sum(self.obs_shapes[k][0][0] for k in self.state_keys) * obs_horizon
        self.state_in = nn.Linear(state_dim, w) if state_dim else None
        self.action_in = nn.Linear(self.action_dim, w)
        self.action_pos = nn.Parameter(torch.randn(1, action_horizon, w) * 0.02)
        self.noise_embedding = SinusoidalEmbedding(w, scale=self.noise_cond_scale(noise_cond_scale))
        self.task_embedding = nn.Embedding(self.num_tasks, w)
        nn.init.normal_(self.task_embedding.weight, std=0.02)
        # instruction conditioning (the MDT language encoder's cached embeddings); the task embedding stays for
        # samples without an instruction (action-free video of unlabelled tasks, stores without language)
        self.lang_proj = (nn.Sequential(nn.Linear(self.lang_dim, w), nn.SiLU(), nn.Linear(w, w))
                          if language_encoder else None)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(w, h, cross_attention=False, dropout=dropout) for _ in range(d))
        self.image_head = AdaLNFinal(w, self.frame_dim)
        self.action_head = AdaLNFinal(w, self.action_dim)
        self.register_buffer("attn_mask", image_attention_mask(self.num_image_tokens, action_horizon),
                             persistent=False)
        # optimizer steps seen by compute_loss: decides when the action loss switches on; saved, so resume agrees;
        # a run-progress counter (run_state_keys), so a fine-tune counts its own steps from 0
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        self.inference_cache = bool(inference_cache)  # off: every step recomputes its modulations (benchmarks)
        self._mod_cache: dict = {}

    # -- inference cache: the AdaLN modulations depend on (noise level, task) only, never on the noisy input ----
    def on_weights_changed(self) -> None:
        self._mod_cache = {}

    def _modulations(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Per-block AdaLN modulations, then the image head's and the action head's, for conditions c [..., W]."""
        return [block.ada(c) for block in self.blocks] + [self.image_head.ada(c), self.action_head.ada(c)]

    def _step_cache(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The sampler's levels are fixed by (sampler, steps): compute every (step, task) modulation for the tasks
        of this chunk in one batched pass and keep it until the weights change (keyed by schedule, step index and
        task ids, never by a float). Saves depth + 2 linears per denoising step. With one task the batch shares
        each step's modulation: the entry also holds it split for `AdaLNZeroBlock.infer` (the fast path), with
        each block's stacked Q/K/V projection."""
        key = (self.formulation.schedule_key(self.sampler, self.num_inference_steps), cond["task_rows"])
        entry = self._mod_cache.get(key)
        if entry is None:
            with torch.no_grad():
                levels = torch.tensor(self.formulation.schedule(self.sampler, self.num_inference_steps),
                                      dtype=torch.float32, device=self.device)
                rows = torch.tensor(cond["task_rows"], dtype=torch.long, device=self.device)
                mods = self._modulations(self.noise_embedding(levels)[:, None] + self.task_embedding(rows)[None])
                entry = {"mods": mods}  # each [steps, tasks, dim]
                if len(cond["task_rows"]) == 1:
                    *blocks, image, action = (m[:, 0] for m in mods)
                    entry.update(steps=list(zip(*(StepModulation.split(m) for m in blocks))),
                                 image=self.image_head.step_modulations(image),
                                 action=self.action_head.step_modulations(action),
                                 qkv=[block.attn.fused_qkv() for block in self.blocks])
            if len(self._mod_cache) >= 16:  # bounded: a few schedules x task sets
                self._mod_cache = {}
            self._mod_cache[key] = entry
        return entry

    # -- pixels <-> tokens --------------------------------------------------------------------------------------
    def to_model_frames(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] → float [-1, 1] at image_size (area resize when the store's size differs)."""
        x = images_to_float(x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            lead = x.shape[:-3]
            x = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=(self.image_size, self.image_size), mode="area")
            x = x.reshape(*lead, *x.shape[-3:])
        return x

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, k, C, H, W] → [B, patches, k*C*p*p] (frames stacked on channels within each patch)."""
        return rearrange(frames, "b k c (h p) (w q) -> b (h w) (k c p q)", p=self.patch_size, q=self.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.image_size // self.patch_size
        return rearrange(tokens, "b (h w) (k c p q) -> b k c (h p) (w q)", h=n, w=n, k=self.future_frames,
                         c=self.channels, p=self.patch_size, q=self.patch_size)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat sampler state [B, D] → (future-frame tokens [B, N_img, frame_dim], actions [B, Tp, A])."""
        n = self.num_image_tokens * self.frame_dim
        return (x[:, :n].reshape(x.shape[0], self.num_image_tokens, self.frame_dim),
                x[:, n:].reshape(x.shape[0], self.action_horizon, self.action_dim))

    @property
    def flat_dim(self) -> int:
        return self.num_image_tokens * self.frame_dim + self.action_horizon * self.action_dim

    # -- the network ---------------------------------------------------------------------------------------------
    def encode(self, obs: dict[str, torch.Tensor], goal: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        """What does not depend on the noisy streams, once per chunk (not once per step): the clean current frame's
        patch embedding + positions, the action tokens' positions + state, the task."""
        batch = obs[self.image_keys[0]].shape[0]
        device = obs[self.image_keys[0]].device
        current = torch.cat([self.patchify(self.to_model_frames(obs[k][:, -1:])) for k in self.image_keys], 1)
        image = self.current_in(current) + self.image_pos
        state = None
        if self.state_in is not None:
            state = self.state_in(torch.cat([obs[k].flatten(1) for k in self.state_keys], -1))[:, None]
        goal = goal or {}  # resolved (`resolve_goal`): task_id [B] unless every row has an instruction
        task = goal.get("task_id")
        task = torch.zeros(batch, dtype=torch.long, device=device) if task is None else task.expand(batch)
        action = self.action_pos if state is None else self.action_pos + state  # the action tokens' clean part
        goal_vec = self.task_embedding(task)
        lang = goal.get("lang_emb")
        if lang is not None:
            has_lang = goal.get("has_lang", torch.ones(batch, dtype=torch.bool, device=device))
            lang_vec = self.lang_proj(lang.reshape(-1, self.lang_dim).to(goal_vec.dtype))
            goal_vec = torch.where(has_lang.reshape(-1, 1), lang_vec.expand(batch, -1), goal_vec)
        elif self.lang_proj is not None and self.training:
            goal_vec = keep_in_graph(goal_vec, self.lang_proj.parameters())
        out = {"image": image, "action": action, "task": goal_vec}
        if self.inference_cache and not self.training and lang is None:  # cache rows: the chunk's tasks
            if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # a graph cannot read task ids
                out.update(task_rows=tuple(range(self.num_tasks)), task_index=task)
            else:
                rows, index = torch.unique(task, return_inverse=True)
                out.update(task_rows=tuple(rows.tolist()), task_index=index)
        return out

    def denoise(self, x_in: torch.Tensor, noise_cond: torch.Tensor, cond: dict[str, Any],
                step_index: int | None = None) -> torch.Tensor:
        """One evaluation on the flat [B, D] state (future-frame tokens then actions); returns the same layout."""
        frames, actions = self._split(x_in)
        x = torch.cat([cond["image"] + self.future_in(frames), cond["action"] + self.action_in(actions)], dim=1)
        n = self.num_image_tokens
        if step_index is None or self.training or "task_rows" not in cond:
            mods = self._modulations(self.noise_embedding(noise_cond.reshape(-1).expand(x_in.shape[0])) + cond["task"])
        else:
            entry = self._step_cache(cond)
            if "steps" in entry:  # one task: the fast path (AdaLNZeroBlock.infer)
                for block, mod, qkv in zip(self.blocks, entry["steps"][step_index], entry["qkv"]):
                    x = block.infer(x, mod, qkv, mask=self.attn_mask)
                out_image = self.image_head.infer(x[:, :n], *entry["image"][step_index])
                out_action = self.action_head.infer(x[:, n:], *entry["action"][step_index])
                return torch.cat([out_image.flatten(1), out_action.flatten(1)], dim=1)
            mods = [m[step_index, cond["task_index"]] for m in entry["mods"]]
        for block, mod in zip(self.blocks, mods):
            x = block(x, modulation=mod, mask=self.attn_mask)
        out_image = self.image_head(x[:, :n], modulation=mods[-2])
        out_action = self.action_head(x[:, n:], modulation=mods[-1])
        return torch.cat([out_image.flatten(1), out_action.flatten(1)], dim=1)

    # -- training ------------------------------------------------------------------------------------------------
    def action_weight_now(self) -> float:
        return self.action_loss_weight if int(self.train_steps) >= self.action_loss_start_step else 0.0

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [f"future.{k}" for k in self.image_keys if f"future.{k}" not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}: build the WindowDataset with future_frames="
                           f"{self.future_frames}, future_stride={self.future_stride} (the trainer does for pad)")
        obs = self.normalize_obs(self.split_batch(batch, "obs"))
        cond = self.encode(obs, self.resolve_goal(self.goal_from_batch(batch), batch["action"].shape[0]))
        future = torch.cat([self.patchify(self.to_model_frames(batch[f"future.{k}"])) for k in self.image_keys], 1)
        actions = self.normalizer.normalize("action", batch["action"].float())
        valid = ~batch["action_is_pad"]  # all False for action-free episodes
        form, b = self.formulation, actions.shape[0]
        level = form.sample_level(b, actions.device)  # ONE level for both streams
        noise_f, noise_a = randn(future.shape, device=future.device), randn(actions.shape, device=actions.device)
        x_f, cond_level = form.model_input(form.add_noise(future, noise_f, level), level)
        x_a, _ = form.model_input(form.add_noise(actions, noise_a, level), level)
        raw = self.denoise(torch.cat([x_f.flatten(1), x_a.flatten(1)], 1), cond_level, cond)
        raw_f, raw_a = self._split(raw.float())
        weight = form.loss_weight(level)
        image_loss = (masked_mean((raw_f - form.target(future, noise_f, level)).square(), None) * weight).mean()
        per_sample = masked_mean((raw_a - form.target(actions, noise_a, level)).square(), valid) * weight
        has_actions = valid.any(1).float()  # action-free samples weigh 0; the mean is over those with actions
        action_loss = (per_sample * has_actions).sum() / has_actions.sum().clamp_min(1.0)
        action_weight = self.action_weight_now()
        if self.training:
            self.train_steps += 1
        loss = self.image_loss_weight * image_loss + action_weight * action_loss
        return {"loss": loss, "image_loss": image_loss.detach(), "action_loss": action_loss.detach(),
                "action_fraction": has_actions.mean()}

    # -- inference -----------------------------------------------------------------------------------------------
    def chunk_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The flat unit Gaussian [B, flat_dim] the joint denoising starts from (future frames, then actions)."""
        return randn((batch, self.flat_dim), generator, self.device)

    def _denoise_flat(self, obs_t: dict[str, torch.Tensor], goal_t: dict[str, torch.Tensor], noise: torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One joint denoising run from `noise`: (future-frame tokens, normalised actions)."""
        cond = self.encode(self.normalize_obs(obs_t), goal_t)
        x = self.formulation.sample(lambda x_in, c, i: self.denoise(x_in, c, cond, i), sampler=self.sampler,
                                    steps=self.num_inference_steps, generator=generator, init_noise=noise)
        return self._split(x.float())

    def chunk_from_noise(self, obs_t, goal_t, noise, generator=None):
        """The actions of one joint run (the frames are denoised with them, as they must be, and dropped): what
        predict_action and `robodit export` run."""
        return self.chunk_to_actions(self._denoise_flat(obs_t, goal_t, noise, generator)[1])

    @torch.no_grad()
    def predict(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One joint denoising run: (actions [B, Tp, A] in robot units, {image key: frames [B, k, C, S, S] in [0, 1]})."""
        obs_t, goal_t = self.inference_inputs(obs, goal)
        noise = self.chunk_noise(next(iter(obs_t.values())).shape[0], generator)
        tokens, actions = self._denoise_flat(obs_t, goal_t, noise, generator)
        frames = {}
        for i, key in enumerate(self.image_keys):
            cam = tokens[:, i * self.patches:(i + 1) * self.patches]
            frames[key] = self.unpatchify(cam).clamp(-1, 1).add(1).div(2)
        return self.chunk_to_actions(actions), frames

    def goal_for_task(self, task: str, instruction: str | None = None, goal_image: str | None = None) -> dict:
        """Evaluation: with a language encoder the task's instruction (embedded), else the evaluator's task id."""
        if self.lang_proj is None or not instruction:
            return {}
        return {"lang_emb": self.embed_instructions([instruction])[0]}

    def predict_frames(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Predicted future frames t+s, ..., t+k*s per camera: {key: [B, k, C, image_size, image_size]} in [0, 1]."""
        return self.predict(obs, goal, generator)[1]
