"""Shared diffusion core: one object per formulation gives a denoiser's training target and samples.

    form = make_formulation({"name": "edm"})          # or "ddpm" (prediction=...), "flow"
    loss = form.loss(denoise_fn, x0, mask)             # per-sample [B]; denoise_fn(x_in, noise_cond)
    x0 = form.sample(denoise_fn, shape, sampler="ddim", steps=10, generator=g)  # denoise_fn(x_in, cond, step)

Files: base.py (contract + shared loss/sample plumbing), ddpm.py (diffusers' schedulers), edm.py and
flow.py (our preconditioning and levels), solvers.py (our Euler / Heun / DPM-Solver++ loops), factory.py.
"""

from .base import Formulation, masked_mean
from .ddpm import DDPMFormulation
from .edm import EDMFormulation
from .factory import FORMULATIONS, make_formulation
from .flow import FlowFormulation

__all__ = [
    "Formulation",
    "DDPMFormulation",
    "EDMFormulation",
    "FlowFormulation",
    "FORMULATIONS",
    "make_formulation",
    "masked_mean",
]
