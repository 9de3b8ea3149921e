"""What every diffusion policy shares: normalise → encode condition once → denoise an action chunk.

A family subclasses `DiffusionPolicy` and supplies `encode(obs, goal, batch)` (condition, computed once per
chunk) and `denoise(x_in, noise_cond, cond, step_index)` (one network evaluation); the diffusion core
(`robodit.diffusion`) owns noise levels, targets, weighting and samplers.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch

from robodit.datasets.normalizer import Normalizer
from robodit.diffusion import make_formulation
from robodit.diffusion.base import randn
from robodit.policies.base import Policy

TASK_CONDITIONING = ("token", "token+global")


class DiffusionPolicy(Policy):
    # the family's process when none is given; configs/policy/<family>.yaml spells out the same
    default_formulation: dict = {"name": "ddpm", "prediction": "epsilon"}

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
    def encode(self, obs: dict[str, torch.Tensor], goal: dict[str, torch.Tensor] | None) -> Any:
        """Condition for the denoiser from normalised observations (run once per chunk)."""

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

    def task_ids(self, goal: dict[str, torch.Tensor] | None, batch: int, device) -> torch.Tensor:
        task = (goal or {}).get("task_id")
        if task is None:
            raise ValueError(f"this policy was trained on {self.num_tasks} tasks: pass goal={{'task': NAME}} or "
                             f"{{'task_id': ...}}{self.task_table()}")
        return torch.as_tensor(task, device=device).long().reshape(-1).expand(batch)

    def task_table(self) -> str:
        """' (ids: 0 reach-v3, 1 push-v3, ...)' for error messages, when the checkpoint recorded the names."""
        names = list(getattr(self, "task_names", None) or [])
        return f" (ids: {', '.join(f'{i} {n}' for i, n in enumerate(names))})" if names else ""

    def goal_by_task_name(self, goal: dict[str, Any] | None) -> dict[str, Any]:
        """goal with "task" (a name, or one per row) replaced by its "task_id" in the training store's table, and
        text this family cannot read refused by name (it would fail deep inside torch)."""
        goal = dict(goal or {})
        if "task" in goal:
            names = list(getattr(self, "task_names", None) or [])
            wanted = goal.pop("task")
            wanted = [wanted] if isinstance(wanted, str) else [str(t) for t in wanted]
            unknown = [t for t in wanted if t not in names]
            if unknown:
                raise ValueError(f"goal task {unknown} is not one this policy was trained on: {names}")
            goal["task_id"] = np.asarray([names.index(t) for t in wanted], dtype=np.int64)
        text = [k for k, v in goal.items() if isinstance(v, str) or (isinstance(v, (list, tuple)) and v
                                                                      and isinstance(v[0], str))]
        if text:
            raise ValueError(f"goal {text} holds text, which {type(self).__name__} takes only as 'instruction' "
                             "from a policy trained with a language encoder (policy.language_encoder)")
        return goal

    def with_task_token(self, tokens: torch.Tensor, goal: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Prepend the task embedding (a family's `task_embedding`, present when the store held several tasks)."""
        embedding = getattr(self, "task_embedding", None)
        if embedding is None:
            return tokens
        task = self.task_ids(goal, tokens.shape[0], tokens.device)
        return torch.cat([embedding(task)[:, None], tokens], dim=1)

    def global_task_vector(self, goal: dict[str, torch.Tensor] | None, batch: int) -> torch.Tensor | None:
        """[B, W] task embedding to add to the noise conditioning, or None (single task, or 'token' only)."""
        embedding = getattr(self, "task_embedding", None)
        if embedding is None or getattr(self, "task_conditioning", "token") != "token+global":
            return None
        return embedding(self.task_ids(goal, batch, embedding.weight.device))

    def goal_from_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        goal = self.split_batch(batch, "goal")
        if "task_id" in batch:
            goal["task_id"] = batch["task_id"]
        return goal

    def diffusion_target(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean chunk the denoiser learns (normalised actions) and its loss mask; RDT maps both to 128-d."""
        actions = self.normalizer.normalize("action", batch["action"].float())
        return actions, (~batch["action_is_pad"]).unsqueeze(-1).expand_as(actions).float()

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        obs = self.normalize_obs(self.split_batch(batch, "obs"))
        cond = self.encode(obs, self.goal_from_batch(batch))
        x0, mask = self.diffusion_target(batch)
        per_sample = self.formulation.loss(lambda x, c: self.denoise(x, c, cond), x0, mask=mask)
        loss = per_sample.mean()
        return {"loss": loss, "diffusion_loss": loss.detach()}

    # -- inference: checked inputs → one pure-tensor chunk computation -----------------------------------------
    noise_dim: int | None = None  # the denoised space's width when it is not the action's (RDT: 128)

    def inference_inputs(self, obs: dict[str, Any], goal: dict[str, Any] | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Checked observation tensors [B, To, ...] and goal tensors (task names resolved) on the policy's device."""
        obs_t = self.prepare_obs(obs)
        goal_t = {k: torch.as_tensor(v, device=self.device) for k, v in self.goal_by_task_name(goal).items()}
        return obs_t, goal_t

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
