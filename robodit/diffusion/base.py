"""The contract every diffusion formulation keeps, and the plumbing they share (loss assembly, sampling wrapper).

A formulation owns the noise process; the network only maps (x_in, noise_cond) -> raw output. Subclasses
implement the low-level pieces (`sample_level`, `add_noise`, `model_input`, `target`, `loss_weight`,
`denoised`) plus `_sample` / `_schedule`; this class turns them into `loss()` and `sample()` so that the
validation, masking, RNG and device rules are the same for every formulation.
"""

from __future__ import annotations

import abc

from typing import Any, Callable

import numpy as np
import torch

# A sampling-time network call: net(x_in, noise_cond_value, step_index) -> raw output (float32, x_in's shape).
NetFn = Callable[[torch.Tensor, float, int], torch.Tensor]


def check_choice(key: str, value: Any, allowed) -> Any:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not supported; allowed: {', '.join(map(str, allowed))}")
    return value


def check_positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def f32(value: float) -> float:
    """Round to the float32 a noise_cond tensor will actually hold (so schedule() equals what is fed)."""
    return float(np.float32(value))


def expand_as(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] tensor shaped to broadcast against x [B, ...]."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def _gen_device(generator, device):
    return generator.device if generator is not None else device


def randn(shape, generator=None, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise reproducible from `generator` even when it lives on another device than the result.

    A list of generators, one per row of `shape[0]`, draws each row from its own: a sample's noise then does
    not depend on which other samples share its batch (evaluation seeds noise per episode this way)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([randn(shape[1:], g, device, dtype) for g in generator])
    x = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=dtype)
    return x.to(device)


def rand(shape, generator=None, device="cpu") -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator, device=_gen_device(generator, device)).to(device)


def masked_mean(err: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of err [B, ...] over the elements where mask is 1.

    mask broadcasts against err, or matches err's leading dims (e.g. a [B, T] validity mask for [B, T, A]);
    a sample with nothing counted gets 0.
    """
    if mask is None:
        return err.flatten(1).mean(1)
    mask = mask.to(device=err.device, dtype=err.dtype)
    if mask.dim() < err.dim() and tuple(mask.shape) == tuple(err.shape[: mask.dim()]):
        mask = mask.reshape(*mask.shape, *([1] * (err.dim() - mask.dim())))
    mask = torch.broadcast_to(mask, err.shape)
    return (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-12)


class Formulation(abc.ABC):
    """One diffusion formulation: training inputs/targets for a denoiser and sampling with a chosen sampler.

    Levels (`sample_level`) are formulation-specific: DDPM int timesteps, EDM sigma, flow t. `noise_cond` is
    always float32 [B]. `loss_weight` is the weight on the MSE between the *raw* network output and `target()`.
    """

    name: str = ""
    samplers: tuple[str, ...] = ()
    sampler_aliases: dict[str, str] = {}  # accepted name -> the algorithm that runs it
    max_steps: int | None = None  # DDPM: cannot take more steps than it has training timesteps

    def __init__(self, *, clip_sample: float | None = None, sampler: str = "ddim", steps: int = 10, **cfg):
        if clip_sample is not None:
            clip_sample = check_positive("clip_sample", clip_sample)
        self.clip_sample = clip_sample
        self._cfg = dict(cfg, clip_sample=clip_sample, sampler=sampler, steps=steps)
        self._resolve(sampler, steps)  # fail at construction on a bad default
        self.default_sampler, self.default_steps = sampler, int(steps)

    # ---- config -------------------------------------------------------------------------------------
    @property
    def options(self) -> dict:
        """Every option this process was built with (defaults included), sampler defaults aside."""
        return {k: v for k, v in self._cfg.items() if k not in ("sampler", "steps")}

    @property
    def config(self) -> dict:
        """Plain dict that `make_formulation` turns back into an equal formulation."""
        return {"name": self.name, **self._cfg}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._cfg.items())})"

    def _resolve(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """Validate (sampler, steps) and map the sampler to the algorithm that runs it."""
        sampler = getattr(self, "default_sampler", None) if sampler is None else sampler
        steps = getattr(self, "default_steps", None) if steps is None else steps
        if sampler not in self.samplers:
            raise ValueError(
                f"unknown sampler {sampler!r} for formulation {self.name!r}; allowed: {', '.join(self.samplers)}"
            )
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an int >= 1 (e.g. 5, 10, 50), got {steps!r}")
        if self.max_steps is not None and steps > self.max_steps:
            raise ValueError(f"steps={steps} exceeds num_train_timesteps={self.max_steps} of {self.name!r}")
        return self.sampler_aliases.get(sampler, sampler), int(steps)

    # ---- low-level pieces (subclasses) ----------------------------------------------------------------
    @abc.abstractmethod
    def sample_level(self, batch_size: int, device=None, generator=None) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def model_input(self, x_t: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    @abc.abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        ...

    def loss_weight(self, level: torch.Tensor) -> torch.Tensor:
        return torch.ones(level.shape[0], device=level.device, dtype=torch.float32)

    @abc.abstractmethod
    def denoised(self, x_t: torch.Tensor, raw: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def _sample(self, net: NetFn, noise: torch.Tensor, sampler: str, steps: int, generator) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def _schedule(self, sampler: str, steps: int) -> list[float]:
        """The noise_cond value of each network evaluation `_sample` makes (inference caches key on it)."""

    # ---- training -----------------------------------------------------------------------------------
    def loss(self, denoise_fn, x0: torch.Tensor, mask: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Per-sample loss [B]: weighted mean over counted elements of (raw output - target)^2."""
        level = self.sample_level(x0.shape[0], x0.device, generator)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x_in, noise_cond = self.model_input(self.add_noise(x0, noise, level), level)
        raw = denoise_fn(x_in, noise_cond)
        err = (raw.float() - self.target(x0, noise, level).float()).square()
        return masked_mean(err, mask) * self.loss_weight(level)

    # ---- sampling -----------------------------------------------------------------------------------
    def schedule(self, sampler: str | None = None, steps: int | None = None) -> list[float]:
        """The noise_cond value fed at each network evaluation of sample(), in order (float32-exact)."""
        return list(self._schedule(*self._resolve(sampler, steps)))

    def schedule_key(self, sampler: str | None = None, steps: int | None = None) -> tuple:
        """Hashable id of the exact noise_cond sequence (formulation config, algorithm, steps)."""
        algo, steps = self._resolve(sampler, steps)
        cfg = tuple(sorted((k, v) for k, v in self._cfg.items() if k not in ("sampler", "steps")))
        return (self.name, algo, steps, cfg)

    @torch.no_grad()
    def sample(
        self,
        denoise_fn,
        shape=None,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        init_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw x0 of `shape` by calling denoise_fn(x_in, noise_cond, step_index) along a fixed schedule.

        init_noise is unit Gaussian (scaled by the formulation). The solver state is kept in float32;
        `dtype` is what the network receives and what is returned. None sampler/steps -> the config's.
        """
        algo, steps = self._resolve(sampler, steps)
        if init_noise is not None:
            if shape is not None and tuple(shape) != tuple(init_noise.shape):
                raise ValueError(f"init_noise shape {tuple(init_noise.shape)} != shape {tuple(shape)}")
            device = init_noise.device if device is None else torch.device(device)
            noise = init_noise.to(device=device, dtype=torch.float32)
        else:
            if shape is None:
                raise ValueError("sample() needs shape or init_noise")
            device = torch.device("cpu") if device is None else torch.device(device)
            noise = randn(shape, generator, device)
        batch = noise.shape[0]

        def net(x: torch.Tensor, cond: float, index: int) -> torch.Tensor:
            noise_cond = torch.full((batch,), cond, dtype=torch.float32, device=device)
            return denoise_fn(x.to(dtype), noise_cond, index).float()

        return self._sample(net, noise, algo, steps, generator).to(dtype)
