"""Rectified flow: x_t = (1 - t) x0 + t * noise, the network predicts the velocity noise - x0.

noise_cond = t * noise_cond_scale (default 1000), i.e. on the same 0..1000 scale as DDPM timesteps, so a
network whose sinusoidal embedding was built for DDPM takes flow unchanged. Training t is uniform or
logit-normal (SD3: sigmoid of N(t_loc, t_scale^2)). Sampling integrates dx/dt = v from t = 1 to 0 on a
uniform grid with Euler or Heun (ours, solvers.py: diffusers' flow-match schedulers are built around
shifted image-model grids and have no x0 clipping); `ddim` is an alias of `euler` (DDIM on this path is
exactly Euler).
"""

from __future__ import annotations

import torch

from .base import Formulation, check_choice, check_positive, expand_as, f32, rand, randn
from .solvers import eval_plan, euler_heun


class FlowFormulation(Formulation):
    name = "flow"
    samplers = ("euler", "heun", "ddim")
    sampler_aliases = {"ddim": "euler"}

    def __init__(
        self,
        t_dist: str = "uniform",
        t_loc: float = 0.0,
        t_scale: float = 1.0,
        noise_cond_scale: float = 1000.0,
        clip_sample: float | None = None,
        sampler: str = "euler",
        steps: int = 10,
    ):
        self.t_dist = check_choice("t_dist", t_dist, ("uniform", "logit_normal"))
        self.t_loc = float(t_loc)
        self.t_scale = check_positive("t_scale", t_scale)
        self.noise_cond_scale = check_positive("noise_cond_scale", noise_cond_scale)
        super().__init__(
            t_dist=t_dist, t_loc=t_loc, t_scale=t_scale, noise_cond_scale=noise_cond_scale,
            clip_sample=clip_sample, sampler=sampler, steps=steps,
        )

    def sample_level(self, batch_size, device=None, generator=None):
        """t [B] float32 in [0, 1]."""
        device = device or "cpu"
        if self.t_dist == "uniform":
            return rand((batch_size,), generator, device)
        return torch.sigmoid(self.t_loc + self.t_scale * randn((batch_size,), generator, device))

    def add_noise(self, x0, noise, t):
        t = expand_as(t, x0)
        return (1 - t) * x0 + t * noise

    def model_input(self, x_t, t):
        return x_t, (t * self.noise_cond_scale).float()

    def target(self, x0, noise, t):
        return noise - x0

    def denoised(self, x_t, raw, t):
        return x_t - expand_as(t, x_t) * raw

    def _levels(self, steps: int) -> list[float]:
        return [1.0 - i / steps for i in range(steps + 1)]

    def _schedule(self, sampler, steps):
        ts = self._levels(steps)
        return [f32(ts[i] * self.noise_cond_scale) for i in eval_plan(ts, sampler)]

    def _sample(self, net, noise, sampler, steps, generator):
        ts = self._levels(steps)
        conds = [f32(t * self.noise_cond_scale) for t in ts]
        clip = self.clip_sample

        def velocity(x, i, k):
            v = net(x, conds[i], k)
            if clip is not None:  # clip the implied x0, keep the velocity consistent with it (t > 0 here)
                v = (x - (x - ts[i] * v).clamp(-clip, clip)) / ts[i]
            return v

        return euler_heun(velocity, noise, ts, heun=sampler == "heun")
