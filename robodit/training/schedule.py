"""The learning-rate schedule: linear warm-up over `warmup` steps, then cosine decay to `min_ratio` of the peak.

The decay runs over `train.steps`. With a wall-clock budget (`train.max_minutes`) it follows whichever ends
first, the steps or the budget: its progress is the larger of the step fraction and the time fraction, so a
15-minute run on a laptop that manages 1,200 of its 10,000 steps still anneals to the minimum instead of stopping
at a high rate. Each step's rate is the schedule at the moment it starts, as over steps: the last step before the
deadline runs one step short of the floor, not at a zero rate that would waste it. Progress never decreases.
Under DDP the trainer hands every rank the largest time fraction, so all ranks use one rate.

Resume: the progress reached is saved with the checkpoint (`state_dict`), and a resumed run continues the decay
from there, over its own budget (`max_minutes` counts this invocation's wall time) and its remaining steps. A
run without a budget computes exactly the closed-form `warm-up + cosine over train.steps`, so exact resume and
earlier checkpoints are unchanged.
"""

from __future__ import annotations

import math


class LRSchedule:
    """`factor(step)` is the multiple of the peak lr for optimizer step `step` (a `LambdaLR` lambda)."""

    def __init__(self, warmup: int, total_steps: int, min_ratio: float = 0.0, budget_s: float | None = None):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total_steps), float(min_ratio)
        self.budget_s = float(budget_s) if budget_s else None
        self.anchor = (self.warmup, 0.0)  # (step, progress) the step fraction counts from: warm-up's end or a resume
        self.progress = 0.0  # of the decay, at the last step computed
        self.time_progress = 0.0  # the budget's share, as last observed
        self.driven_by = "steps"
        self._deadline: float | None = None
        self._time_anchor: tuple[float, float] | None = None  # (clock, progress) where this run's budget decay began

    # -- the rate ----------------------------------------------------------------------------------------------
    def step_progress(self, step: int) -> float:
        s, p = self.anchor
        return min(1.0, p + (1 - p) * (step - s) / max(1, self.total - s))

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / max(1, self.warmup)
        by_steps = self.step_progress(step)
        progress = by_steps
        if self.budget_s is not None:
            progress = max(progress, self.time_progress, self.progress)
            self.driven_by = "max_minutes" if self.time_progress > by_steps else "steps"
        self.progress = progress
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # -- the budget --------------------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """This run's clock starts: the budget ends at now + budget_s."""
        if self.budget_s is not None:
            self._deadline, self._time_anchor = now + self.budget_s, None

    def time_fraction(self, at: float, next_step: int) -> float:
        """The budget's progress at clock time `at`, as `next_step` starts: 0 until warm-up is over in this run,
        then from the progress reached then up to 1 at the deadline."""
        if self._deadline is None or next_step < self.warmup:
            return 0.0
        if self._time_anchor is None:
            self._time_anchor = (at, self.progress)
        t0, p0 = self._time_anchor
        return min(1.0, p0 + (1 - p0) * (at - t0) / max(1e-9, self._deadline - t0))

    def observe(self, time_progress: float) -> None:
        """Take the budget's progress for the next `factor` (the trainer reduces it over ranks first)."""
        self.time_progress = max(self.time_progress, float(time_progress))

    # -- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"anchor_step": self.anchor[0], "anchor_progress": self.anchor[1], "progress": self.progress,
                "driven_by": self.driven_by}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Continue from a checkpoint at `step`. Where the budget had pushed the decay past the step fraction,
        the step fraction restarts from that progress (no jump back up); otherwise the saved anchor is kept, so
        a resumed run without a budget replays the uninterrupted one exactly."""
        self.anchor = (int(state["anchor_step"]), float(state["anchor_progress"]))
        self.progress = float(state["progress"])
        self.driven_by = str(state.get("driven_by", "steps"))
        if step >= self.warmup and self.progress > self.step_progress(step):
            self.anchor = (int(step), self.progress)

    def record(self, lr: float, peak_lr: float, progress: float) -> dict:
        """How the schedule stands at a checkpoint (config.yaml's `schedule`, shown by `robodit info`): the rate
        the last step used, its share of the peak, how far into the decay that step was and what drove it."""
        return {"lr": float(lr), "peak_lr": float(peak_lr), "lr_fraction": float(lr) / peak_lr if peak_lr else None,
                "min_lr_ratio": self.min_ratio, "progress": round(float(progress), 6), "driven_by": self.driven_by,
                "warmup_steps": self.warmup, "steps": self.total,
                "max_minutes": None if self.budget_s is None else self.budget_s / 60}
