"""DDPM (discrete VP) formulation on diffusers' schedulers (RDT: x0-prediction + cosine; PAD: epsilon + linear).

Forward process: diffusers' DDPMScheduler betas (alphas_cumprod); x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise,
noise_cond = t as float (0..T-1). Samplers are diffusers' DDIMScheduler (eta 0), DPMSolverMultistepScheduler
(dpmsolver++, order 2) and DDPMScheduler (ancestral), all built from the same betas array and prediction
type. Schedulers are stateful, so each sample() works on a shallow copy of a configured template reset by
set_timesteps (its documented reset): concurrent calls share nothing mutable.

clip_sample clamps the x0 estimate at every step: DDIM/DDPM through their own clip_sample option;
DPM-Solver++ has none, so the raw output is replaced by the one that implies the clamped x0.
Default timestep_spacing is "trailing" (first step at t = T-1; "leading" starts short of pure noise,
which hurts at 5-10 steps - Lin et al. 2023).
"""

from __future__ import annotations

import copy
import warnings

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from .base import Formulation, check_choice, expand_as, f32

_PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "sample": "sample", "x0": "sample",
                "v_prediction": "v_prediction", "v": "v_prediction"}


class DDPMFormulation(Formulation):
    name = "ddpm"
    samplers = ("ddim", "dpmsolver++", "ddpm")

    def __init__(
        self,
        prediction: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        timestep_spacing: str = "trailing",
        clip_sample: float | None = None,
        sampler: str = "ddim",
        steps: int = 10,
    ):
        self.prediction = _PREDICTIONS[check_choice("prediction", prediction, tuple(_PREDICTIONS))]
        check_choice("beta_schedule", beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check_choice("timestep_spacing", timestep_spacing, ("trailing", "leading", "linspace"))
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        self.num_train_timesteps = self.max_steps = num_train_timesteps
        self.timestep_spacing = timestep_spacing
        train = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                              beta_schedule=beta_schedule, prediction_type=self.prediction, clip_sample=False)
        self.betas = train.betas.clone()
        ab = train.alphas_cumprod.double()
        self._coef_cpu = (ab.sqrt().float(), (1 - ab).sqrt().float())
        self._coef_float: tuple[list[float], list[float]] | None = None  # Python floats, filled on first use
        self._coef_dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._templates: dict[str, object] = {}
        self._prepared: dict[tuple[str, int], object] = {}
        self._timesteps: dict[tuple[str, int], tuple[int, ...]] = {}
        self._ddim_tables: dict[int, tuple] = {}
        super().__init__(
            prediction=prediction, num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
            beta_start=beta_start, beta_end=beta_end, timestep_spacing=timestep_spacing,
            clip_sample=clip_sample, sampler=sampler, steps=steps,
        )

    # ---- forward process ------------------------------------------------------------------------------
    def _coef(self, t: torch.Tensor):
        """(sqrt(ab_t), sqrt(1 - ab_t)) gathered for int timesteps t [B], tables cached per device."""
        tables = self._coef_dev.get(t.device)
        if tables is None:
            tables = self._coef_dev[t.device] = tuple(c.to(t.device) for c in self._coef_cpu)
        return tables[0][t], tables[1][t]

    def sample_level(self, batch_size, device=None, generator=None):
        """Timesteps [B] int64, uniform over 0..T-1."""
        device = torch.device(device or "cpu")
        gdev = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=gdev)
        return t.to(device)

    def add_noise(self, x0, noise, t):
        a, s = self._coef(t)
        return expand_as(a, x0) * x0 + expand_as(s, x0) * noise

    def model_input(self, x_t, t):
        return x_t, t.float()

    def target(self, x0, noise, t):
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        a, s = self._coef(t)
        return expand_as(a, x0) * noise - expand_as(s, x0) * x0

    def denoised(self, x_t, raw, t):
        a, s = (expand_as(c, x_t) for c in self._coef(t))
        if self.prediction == "epsilon":
            return (x_t - s * raw) / a
        if self.prediction == "sample":
            return raw
        return a * x_t - s * raw

    def _raw_from_x0(self, x_t, x0, t: int):
        """The raw output (of our prediction type) that implies x0 at timestep t."""
        if self._coef_float is None:  # read once (a traced graph cannot read tensor data; eager runs first)
            self._coef_float = tuple(c.tolist() for c in self._coef_cpu)
        a, s = self._coef_float[0][t], self._coef_float[1][t]
        if self.prediction == "epsilon":
            return (x_t - a * x0) / s
        if self.prediction == "sample":
            return x0
        return (a * x_t - x0) / s

    # ---- sampling -------------------------------------------------------------------------------------
    def _template(self, sampler: str):
        if sampler not in self._templates:
            common = dict(num_train_timesteps=self.num_train_timesteps, trained_betas=self.betas.numpy(),
                          prediction_type=self.prediction, timestep_spacing=self.timestep_spacing)
            clip = dict(clip_sample=self.clip_sample is not None, clip_sample_range=self.clip_sample or 1.0)
            if sampler == "ddim":
                sch = DDIMScheduler(**common, **clip, set_alpha_to_one=True)
            elif sampler == "ddpm":
                sch = DDPMScheduler(**common, **clip, variance_type="fixed_small")
            else:
                sch = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                  lower_order_final=True, final_sigmas_type="zero")
            self._templates[sampler] = sch
        return self._templates[sampler]

    def _fresh(self, sampler: str, steps: int):
        """A scheduler with fresh per-call state: a shallow copy of one prepared by set_timesteps (its documented
        reset; done once per (sampler, steps), so neither a chunk nor a traced graph pays its numpy work). The
        copy shares read-only tables; DPM-Solver's multistep memory, the one list `step` updates in place, is
        replaced, and the step counters are plain attributes `step` rebinds on the copy."""
        prepared = self._prepared.get((sampler, steps))
        if prepared is None:
            prepared = copy.copy(self._template(sampler))
            with warnings.catch_warnings():  # diffusers calls np.array(tensor) here; numpy 2 warns about it
                warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                prepared.set_timesteps(steps)
            if hasattr(prepared, "set_begin_index"):
                prepared.set_begin_index(0)
            self._prepared[(sampler, steps)] = prepared
        sch = copy.copy(prepared)
        if hasattr(sch, "model_outputs"):
            sch.model_outputs = [None] * len(prepared.model_outputs)
        return sch

    def timesteps(self, sampler: str, steps: int) -> tuple[int, ...]:
        """The integer timesteps diffusers' scheduler visits (cached per (sampler, steps))."""
        key = self._resolve(sampler, steps)
        if key not in self._timesteps:
            self._timesteps[key] = tuple(int(t) for t in self._fresh(*key).timesteps)
        return self._timesteps[key]

    def _schedule(self, sampler, steps):
        return [f32(t) for t in self.timesteps(sampler, steps)]

    def ddim_table(self, steps: int) -> tuple[tuple[int, float, float, float, float, float], ...]:
        """DDIM (eta 0) per step as (t, a, b, c, d, e): x0 = a·x_t + b·raw, clamped to ±clip_sample when set, and
        x_prev = c·x_t + d·raw + e·x0. Read from the prepared DDIMScheduler's own tables (its alphas, its final
        alpha, its previous-timestep rule, its clipping after the ε estimate), so it is diffusers' `step` with the
        arithmetic on scalars done once: 2-4 tensor ops per step instead of about 20, which at batch 1 is a tenth of
        a small policy's chunk. tests/test_diffusion.py holds it to diffusers."""
        if steps not in self._ddim_tables:
            sch = self._fresh("ddim", steps)
            ab = sch.alphas_cumprod.double()
            table = []
            for t in self.timesteps("ddim", steps):
                prev = t - self.num_train_timesteps // steps
                a_t, a_prev = float(ab[t]), float(ab[prev]) if prev >= 0 else float(sch.final_alpha_cumprod)
                sa, sb, sa_prev, sb_prev = a_t ** 0.5, (1 - a_t) ** 0.5, a_prev ** 0.5, (1 - a_prev) ** 0.5
                # (x0, eps) as linear maps of (x_t, raw) for each prediction type
                x0_x, x0_raw, eps_x, eps_raw = {"epsilon": (1 / sa, -sb / sa, 0.0, 1.0),
                                                "sample": (0.0, 1.0, 1 / sb, -sa / sb),
                                                "v_prediction": (sa, -sb, sb, sa)}[self.prediction]
                if self.clip_sample is None:  # x0 enters linearly: fold it into c and d
                    table.append((t, x0_x, x0_raw, sa_prev * x0_x + sb_prev * eps_x,
                                  sa_prev * x0_raw + sb_prev * eps_raw, 0.0))
                else:
                    table.append((t, x0_x, x0_raw, sb_prev * eps_x, sb_prev * eps_raw, sa_prev))
            self._ddim_tables[steps] = tuple(table)
        return self._ddim_tables[steps]

    def _ddim(self, net, x, steps):
        for k, (t, a, b, c, d, e) in enumerate(self.ddim_table(steps)):
            raw = net(x, float(t), k)
            x_next = torch.add(x * c, raw, alpha=d)
            if e:
                x0 = raw if (a, b) == (0.0, 1.0) else torch.add(x * a, raw, alpha=b)
                x_next.add_(x0.clamp(-self.clip_sample, self.clip_sample), alpha=e)
            x = x_next
        return x

    def _sample(self, net, noise, sampler, steps, generator):
        if noise.dim() == 1:  # diffusers' DDPM step reads shape[1]; give it [B, 1]
            flat_net = lambda x, c, k: net(x[:, 0], c, k)[:, None]  # noqa: E731
            return self._sample(flat_net, noise[:, None], sampler, steps, generator)[:, 0]
        if sampler == "ddim":
            return self._ddim(net, noise, steps)
        sch = self._fresh(sampler, steps)
        extra = {"generator": generator} if sampler == "ddpm" else {}
        reclip = sampler == "dpmsolver++" and self.clip_sample is not None
        x = noise
        for k, t in enumerate(self.timesteps(sampler, steps)):
            raw = net(x, float(t), k)
            if reclip:
                x0 = self.denoised(x, raw, torch.full((x.shape[0],), t, device=x.device))
                raw = self._raw_from_x0(x, x0.clamp(-self.clip_sample, self.clip_sample), t)
            x = sch.step(raw, t, x, return_dict=False, **extra)[0]
        return x
