"""ODE solvers for the continuous formulations (EDM in sigma, rectified flow in t). Ours, not diffusers'.

Why ours: no diffusers scheduler runs Euler, Heun and DPM-Solver++ on one shared level grid with our
preconditioning, per-evaluation x0 clipping and step-index bookkeeping (diffusers' EDM schedulers cover
Euler and DPM-Solver++ but not Heun, and each keeps its own grid and mutable state). These loops hold no
state objects; their coefficients are Python floats, so a step costs a handful of tensor ops. The
DPM-Solver++ update is checked against diffusers' EDMDPMSolverMultistepScheduler in the tests.

`levels` is a decreasing list ending in 0 (sigma for EDM, t for flow). Callbacks get (x, level_index,
eval_index): level_index points into `levels`, eval_index counts network evaluations 0, 1, 2, ...
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Fn = Callable[[torch.Tensor, int, int], torch.Tensor]


def eval_plan(levels: list[float], method: str) -> list[int]:
    """Level index of each network evaluation, in order, for `method` in {euler, heun, dpmsolver++}."""
    plan = []
    for i in range(len(levels) - 1):
        plan.append(i)
        if method == "heun" and levels[i + 1] > 0:  # Karras Alg. 1: no correction on the step to 0
            plan.append(i + 1)
    return plan


def euler_heun(velocity: Fn, x: torch.Tensor, levels: list[float], heun: bool) -> torch.Tensor:
    """Integrate dx/dlevel = velocity from levels[0] to 0 with Euler or Heun (2nd order, Karras 2022)."""
    k = 0
    for i in range(len(levels) - 1):
        h = levels[i + 1] - levels[i]
        d = velocity(x, i, k)
        k += 1
        x_next = torch.add(x, d, alpha=h)
        if heun and levels[i + 1] > 0:
            d2 = velocity(x_next, i + 1, k)
            k += 1
            x_next = torch.add(x, d + d2, alpha=0.5 * h)
        x = x_next
    return x


def dpmpp_2m(denoise: Fn, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """DPM-Solver++(2M) for x = x0 + sigma * noise, multistep in lambda = -log(sigma) (Lu et al. 2022).

    x' = (s'/s) x + (1 - s'/s) D', D' = D for the first step and the step to sigma=0 (there h is infinite),
    else D' = (1 + 1/2r) D - (1/2r) D_prev with r = h_prev / h (the "midpoint" form diffusers uses).
    """
    d_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        s0, s1 = sigmas[i], sigmas[i + 1]
        d = denoise(x, i, i)
        if s1 == 0:
            return d
        h = math.log(s0 / s1)
        if d_prev is None:
            d_mix = d
        else:
            c = 0.5 * h / h_prev
            d_mix = torch.add(d * (1.0 + c), d_prev, alpha=-c)
        ratio = s1 / s0
        x = torch.add(x * ratio, d_mix, alpha=1.0 - ratio)
        d_prev, h_prev = d, h
    return x
