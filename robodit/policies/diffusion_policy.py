"""What every diffusion policy shares: normalise → encode condition once → denoise an action chunk.

A family subclasses `DiffusionPolicy` and supplies `encode(obs, goal, batch)` (condition, computed once per
chunk) and `denoise(x_in, noise_cond, cond, step_index)` (one network evaluation); the diffusion core
(`robodit.diffusion`) owns noise levels, targets, weighting and samplers.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from robodit.datasets.normalizer import Normalizer
from robodit.diffusion import make_formulation
from robodit.diffusion.base import randn
from robodit.policies.base import Policy

TASK_CONDITIONING = ("token", "token+global")

# The families' default process, x0-prediction DDPM (100 training levels, squaredcos, x0 clipped to the normalised
# range), measured on reach-v3: DiT at 900 steps 100% vs 85% (EDM) vs 5% (epsilon); MoDE at 2500 steps 98% vs 56%
# (EDM); PAD from 64 px at an 8-min CPU budget 100% vs 40% (its paper's epsilon, linear, 1000 levels, DDIM-50).
X0_DDPM = {"name": "ddpm", "prediction": "sample", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 100,
           "clip_sample": 1.0}


class DiffusionPolicy(Policy):
    task_goals = True  # a family with a task embedding reads the task; MDT (goal-conditioned) does not
    # the family's process when none is given; configs/policy/<family>.yaml spells out the same
    default_formulation: dict = X0_DDPM

    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, obs_horizon: int = 2,
                 action_horizon: int = 16, n_action_steps: int = 8, formulation: dict | str | None = None,
                 sampler: str = "ddim", num_inference_steps: int = 10):
        super().__init__(shape_meta, normalizer, obs_horizon, action_horizon, n_action_steps)
        self.formulation = make_formulation(self.formulation_config(formulation))
        if sampler not in self.formulation.samplers:
            raise ValueError(f"sampler {sampler!r} is not available for formulation "
                             f"{self.formulation.name!r}; choose one of {self.formulation.samplers}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.sampler, self.num_inference_steps = sampler, num_inference_steps

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)`, `.half()`, `.cuda()`: the inference caches hold tensors derived from the weights on the
        old device / dtype, so they go too (they rebuild on the next chunk)."""
        self.on_weights_changed()
        return super()._apply(fn, recurse)

    @classmethod
    def formulation_config(cls, formulation: dict | str | None) -> dict | str:
        """What `formulation` means for this family: None is its default; a bare name (`policy.formulation=edm`)
        is that process with its own defaults, except the family's own process's name, which keeps the family's
        settings (`policy.formulation=ddpm` on an x0-DDPM family stays x0, not DDPM's ε default)."""
        if formulation is None:
            return dict(cls.default_formulation)
        if isinstance(formulation, str):
            from robodit.diffusion.factory import canonical_name

            if canonical_name(formulation) == canonical_name(cls.default_formulation["name"]):
                return dict(cls.default_formulation)
        return formulation

    def noise_cond_scale(self, scale: float | None = None) -> float:
        """Scale for the sinusoidal noise embedding: EDM feeds log(σ)/4 (≈ -2..1), spread like DDPM's 0..999
        timesteps so one embedding fits every process; `scale` (a policy's explicit setting) wins."""
        if scale is not None:
            return float(scale)
        return 250.0 if self.formulation.name == "edm" else 1.0

    @abc.abstractmethod
    def encode(self, obs: dict[str, torch.Tensor], goal: dict[str, torch.Tensor]) -> Any:
        """Condition for the denoiser from normalised observations and the resolved goal (`resolve_goal`), once
        per chunk."""

    @abc.abstractmethod
    def denoise(self, x_in: torch.Tensor, noise_cond: torch.Tensor, cond: Any,
                step_index: int | None = None) -> torch.Tensor:
        """One denoiser evaluation on the noisy normalised action chunk [B, Tp, A]."""

    def set_task_conditioning(self, value: str) -> None:
        """'token': the task embedding is one token among the observations, which attention may underweight;
        'token+global': it is also added to the noise embedding wherever that conditions every layer (DiT's
        AdaLN, as the DiT paper adds its class; MoDE's attention conditioning, never its routers), so every layer
        can tell apart tasks that share one scene. On MT10 (1500 steps, 2-3 seeds) it gained nothing over 'token'."""
        if value not in TASK_CONDITIONING:
            raise ValueError(f"task_conditioning={value!r}: choose one of {TASK_CONDITIONING}")
        self.task_conditioning = value

    def with_task_token(self, tokens: torch.Tensor, goal: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prepend the task embedding (a family's `task_embedding`, present when the store held several tasks);
        `goal` is resolved (`resolve_goal`), so it holds task_id [B]."""
        embedding = getattr(self, "task_embedding", None)
        if embedding is None:
            return tokens
        return torch.cat([embedding(goal["task_id"])[:, None], tokens], dim=1)

    def global_task_vector(self, goal: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B, W] task embedding to add to the noise conditioning, or None (single task, or 'token' only)."""
        embedding = getattr(self, "task_embedding", None)
        if embedding is None or getattr(self, "task_conditioning", "token") != "token+global":
            return None
        return embedding(goal["task_id"])

    def diffusion_target(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean chunk the denoiser learns (normalised actions) and its loss mask; RDT maps both to 128-d."""
        actions = self.normalizer.normalize("action", batch["action"].float())
        return actions, (~batch["action_is_pad"]).unsqueeze(-1).expand_as(actions).float()

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        obs = self.normalize_obs(self.split_batch(batch, "obs"))
        cond = self.encode(obs, self.resolve_goal(self.goal_from_batch(batch), batch["action"].shape[0]))
        x0, mask = self.diffusion_target(batch)
        per_sample = self.formulation.loss(lambda x, c: self.denoise(x, c, cond), x0, mask=mask)
        loss = per_sample.mean()
        return {"loss": loss, "diffusion_loss": loss.detach()}

    # -- inference: checked inputs → one pure-tensor chunk computation -----------------------------------------
    noise_dim: int | None = None  # the denoised space's width when it is not the action's (RDT: 128)

    def inference_inputs(self, obs: dict[str, Any], goal: dict[str, Any] | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Checked observation tensors [B, To, ...] and the resolved goal (`resolve_goal`) on the policy's device."""
        obs_t = self.prepare_obs(obs)
        return obs_t, self.resolve_goal(goal, next(iter(obs_t.values())).shape[0])

    def chunk_from_noise(self, obs_t: dict[str, torch.Tensor], goal_t: dict[str, torch.Tensor],
                         noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The whole chunk after input checking: normalise, encode once, denoise `noise` (unit Gaussian
        [B, Tp, D]) along the fixed schedule, un-normalise. Tensor code with no host sync and no randomness of its
        own (only a stochastic sampler draws, from `generator`), so it traces into one graph: what `robodit export`
        and compiled inference capture, and what `predict_action` runs."""
        cond = self.encode(self.normalize_obs(obs_t), goal_t)
        x = self.formulation.sample(lambda x_in, c, i: self.denoise(x_in, c, cond, i), sampler=self.sampler,
                                    steps=self.num_inference_steps, generator=generator, init_noise=noise)
        return self.chunk_to_actions(x.float())

    def chunk_to_actions(self, x: torch.Tensor) -> torch.Tensor:
        """Denoised normalised chunk → actions in the robot's units."""
        return self.normalizer.unnormalize("action", x)

    def chunk_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The unit Gaussian a chunk starts from, drawn as `formulation.sample` would draw it."""
        return randn((batch, self.action_horizon, self.noise_dim or self.action_dim), generator, self.device)

    @torch.no_grad()
    def sample_chunk(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                     generator: torch.Generator | None = None, dim: int | None = None) -> torch.Tensor:
        """Sample the normalised chunk [B, Tp, dim] (dim: the action dim unless a family denoises another space)."""
        obs_t, goal_t = self.inference_inputs(obs, goal)
        cond = self.encode(self.normalize_obs(obs_t), goal_t)
        batch_size = next(iter(obs_t.values())).shape[0]
        return self.formulation.sample(lambda x_in, c, i: self.denoise(x_in, c, cond, i),
                                       (batch_size, self.action_horizon, dim or self.action_dim),
                                       sampler=self.sampler, steps=self.num_inference_steps, generator=generator,
                                       device=self.device)

    @torch.no_grad()
    def predict_action(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        obs_t, goal_t = self.inference_inputs(obs, goal)
        noise = self.chunk_noise(next(iter(obs_t.values())).shape[0], generator)
        return self.chunk_from_noise(obs_t, goal_t, noise, generator)
