"""EDM (Karras et al. 2022) formulation: x_sigma = x0 + sigma * noise with preconditioning (MDT, MoDE).

Network: raw F = net(c_in * x, c_noise), denoiser D = c_skip * x + c_out * F, with
    c_skip = sd^2 / (s^2 + sd^2),  c_out = s * sd / sqrt(s^2 + sd^2),  c_in = 1 / sqrt(s^2 + sd^2),
    c_noise = log(s) / 4                                           (s = sigma, sd = sigma_data).

Loss weight, derived: Karras weight D-space errors by lambda(s) = (s^2 + sd^2) / (s * sd)^2. Since
    D - x0 = c_out * (F - F_target),  F_target = (x0 - c_skip * x) / c_out,
    lambda * |D - x0|^2 = lambda * c_out^2 * |F - F_target|^2 = |F - F_target|^2   (lambda * c_out^2 = 1).
So regressing the raw output onto `target()` (= F_target) with unit weight *is* the lambda-weighted loss:
`loss_weight()` (the weight on the raw-output MSE) is 1, and `denoised_loss_weight()` returns lambda for
losses taken on `denoised()` (e.g. auxiliary x0 losses).

Training sigma: a location-scale law on log(sigma), truncated (by inverse CDF, not clamped) to
[sigma_min, sigma_max]: "loglogistic" (default, loc log 0.5, scale 0.5, as MDT/MoDE) or "lognormal"
(Karras: loc -1.2, scale 1.2). Sampling: exponential (log-linear) or Karras rho grid from sample_sigma_max
down to sample_sigma_min, then a final step to sigma = 0; samplers are ours (see solvers.py).
"""

from __future__ import annotations

import math

import torch

from .base import Formulation, check_choice, check_positive, expand_as, f32, rand
from .solvers import dpmpp_2m, eval_plan, euler_heun

_LOG_LAWS = {  # name: (cdf, inverse cdf, default loc, default scale) of log(sigma)
    "loglogistic": (torch.sigmoid, torch.logit, math.log(0.5), 0.5),
    "lognormal": (torch.special.ndtr, torch.special.ndtri, -1.2, 1.2),
}


class EDMFormulation(Formulation):
    """Karras-preconditioned denoiser in sigma; `ddim` is an alias of `euler` (the same update in sigma)."""

    name = "edm"
    samplers = ("ddim", "euler", "heun", "dpmsolver++")
    sampler_aliases = {"ddim": "euler"}

    def __init__(
        self,
        sigma_data: float = 0.5,
        sigma_min: float = 0.001,
        sigma_max: float = 80.0,
        sigma_dist: str = "loglogistic",
        sigma_loc: float | None = None,
        sigma_scale: float | None = None,
        sigma_schedule: str = "exponential",
        rho: float = 7.0,
        sample_sigma_min: float | None = None,
        sample_sigma_max: float | None = None,
        clip_sample: float | None = None,
        sampler: str = "ddim",
        steps: int = 10,
    ):
        self.sigma_data = check_positive("sigma_data", sigma_data)
        self.sigma_min = check_positive("sigma_min", sigma_min)
        self.sigma_max = check_positive("sigma_max", sigma_max)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({sigma_min}) must be < sigma_max ({sigma_max})")
        self._cdf, self._icdf, loc, scale = _LOG_LAWS[check_choice("sigma_dist", sigma_dist, tuple(_LOG_LAWS))]
        self.sigma_loc = float(loc if sigma_loc is None else sigma_loc)
        self.sigma_scale = check_positive("sigma_scale", scale if sigma_scale is None else sigma_scale)
        self.sigma_schedule = check_choice("sigma_schedule", sigma_schedule, ("exponential", "karras"))
        self.rho = check_positive("rho", rho)
        self.sample_sigma_min = check_positive(
            "sample_sigma_min", self.sigma_min if sample_sigma_min is None else sample_sigma_min)
        self.sample_sigma_max = check_positive(
            "sample_sigma_max", self.sigma_max if sample_sigma_max is None else sample_sigma_max)
        if self.sample_sigma_min >= self.sample_sigma_max:
            raise ValueError("sample_sigma_min must be < sample_sigma_max")
        super().__init__(
            sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, sigma_dist=sigma_dist,
            sigma_loc=sigma_loc, sigma_scale=sigma_scale, sigma_schedule=sigma_schedule, rho=rho,
            sample_sigma_min=sample_sigma_min, sample_sigma_max=sample_sigma_max,
            clip_sample=clip_sample, sampler=sampler, steps=steps,
        )

    # ---- preconditioning (tensor or float sigma) ------------------------------------------------------
    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5

    def c_in(self, sigma):
        return 1.0 / (sigma**2 + self.sigma_data**2) ** 0.5

    @staticmethod
    def c_noise(sigma):
        return torch.log(sigma) / 4 if torch.is_tensor(sigma) else math.log(sigma) / 4

    def denoised_loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Karras lambda(sigma) = (s^2 + sd^2) / (s * sd)^2: the weight for an MSE on denoised() vs x0."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    # ---- training pieces ------------------------------------------------------------------------------
    def sample_level(self, batch_size, device=None, generator=None):
        """sigma [B] float32 from the truncated log-law: uniform in CDF between the two truncation points."""
        lo, hi = (self._cdf(torch.tensor((math.log(s) - self.sigma_loc) / self.sigma_scale, dtype=torch.float64))
                  for s in (self.sigma_min, self.sigma_max))
        u = lo + (hi - lo) * rand((batch_size,), generator, device or "cpu").double()
        sigma = torch.exp(self.sigma_loc + self.sigma_scale * self._icdf(u))
        return sigma.clamp(self.sigma_min, self.sigma_max).float()

    def add_noise(self, x0, noise, sigma):
        return x0 + expand_as(sigma, x0) * noise

    def model_input(self, x_t, sigma):
        return x_t * expand_as(self.c_in(sigma), x_t), self.c_noise(sigma).float()

    def target(self, x0, noise, sigma):
        """F_target = (x0 - c_skip * x_sigma) / c_out: what the raw output must be for D to equal x0."""
        x_t = self.add_noise(x0, noise, sigma)
        return (x0 - expand_as(self.c_skip(sigma), x0) * x_t) / expand_as(self.c_out(sigma), x0)

    def denoised(self, x_t, raw, sigma):
        return expand_as(self.c_skip(sigma), x_t) * x_t + expand_as(self.c_out(sigma), x_t) * raw

    # ---- sampling -------------------------------------------------------------------------------------
    def sigmas(self, steps: int) -> list[float]:
        """steps sigmas from sample_sigma_max to sample_sigma_min (exponential or Karras rho), then 0."""
        lo, hi, n = self.sample_sigma_min, self.sample_sigma_max, steps
        ramp = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        if self.sigma_schedule == "exponential":
            out = [math.exp(math.log(hi) + r * (math.log(lo) - math.log(hi))) for r in ramp]
        else:
            a, b = hi ** (1 / self.rho), lo ** (1 / self.rho)
            out = [(a + r * (b - a)) ** self.rho for r in ramp]
        return out + [0.0]

    def _schedule(self, sampler, steps):
        sig = self.sigmas(steps)
        return [f32(self.c_noise(sig[i])) for i in eval_plan(sig, sampler)]

    def _sample(self, net, noise, sampler, steps, generator):
        sig = self.sigmas(steps)
        sd2, clip = self.sigma_data**2, self.clip_sample
        coef = [(self.c_in(s), self.c_skip(s), self.c_out(s), f32(self.c_noise(s))) for s in sig[:-1]]

        def denoise(x, i, k):
            c_in, c_skip, c_out, cond = coef[i]
            d = torch.add(x * c_skip, net(x * c_in, cond, k), alpha=c_out)
            return d.clamp(-clip, clip) if clip is not None else d

        def velocity(x, i, k):
            """dx/dsigma = (x - D) / sigma = x * s / (s^2 + sd^2) - F * c_out / s (fused when not clipping)."""
            s = sig[i]
            if clip is not None:
                return (x - denoise(x, i, k)) / s
            c_in, _, c_out, cond = coef[i]
            return torch.add(x * (s / (s * s + sd2)), net(x * c_in, cond, k), alpha=-c_out / s)

        x = noise * sig[0]
        if sampler == "dpmsolver++":
            return dpmpp_2m(denoise, x, sig)
        return euler_heun(velocity, x, sig, heun=sampler == "heun")
