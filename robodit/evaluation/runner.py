"""Roll a policy out on any ControlInterface with receding-horizon chunk execution.

The runner keeps the observation history the policy was trained with (To frames, the first frame repeated at
the start of an episode), asks for a chunk of Tp actions, executes the first `n_action_steps`, and replans.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from robodit.control.history import ObservationHistory
from robodit.envs.base import ControlInterface


@dataclass
class EpisodeResult:
    seed: int
    task: str | None
    success: bool
    steps: int
    policy_calls: int
    policy_seconds: float
    frames: list[np.ndarray] = field(default_factory=list, repr=False)


def rollout(policy, env: ControlInterface, *, seed: int, task: str | None = None, goal: dict[str, Any] | None = None,
            max_steps: int | None = None, n_action_steps: int | None = None, record: bool = False,
            generator_seed: int | None = None,
            on_step: Callable[[dict[str, np.ndarray]], None] | None = None) -> EpisodeResult:
    """One episode; the episode ends at the simulator's success, its `done`, or `max_steps`. `on_step` sees every
    observation after a step (for diagnostics that need more than success)."""
    max_steps = max_steps or env.spec.max_episode_steps
    n_exec = n_action_steps or policy.n_action_steps
    keys = list(policy.obs_shapes)
    gen = torch.Generator(device=policy.device).manual_seed(seed if generator_seed is None else generator_seed)
    policy.reset()
    obs = env.reset(task=task, seed=seed)
    history = ObservationHistory(policy.obs_horizon)
    history.reset(obs)
    frames = [env.render()] if record else []
    steps = calls = 0
    spent = 0.0
    success = done = False
    low, high = env.spec.action_low, env.spec.action_high
    while steps < max_steps and not done:
        t0 = time.perf_counter()
        chunk = policy.predict_action(history.stacked(keys), goal=goal, generator=gen)[0].cpu().numpy()
        spent += time.perf_counter() - t0
        calls += 1
        for action in chunk[:n_exec]:
            obs, success, done, _ = env.step(np.clip(action, low, high))
            history.push(obs)
            steps += 1
            if on_step is not None:
                on_step(obs)
            if record:
                frames.append(env.render())
            if success or done or steps >= max_steps:
                done = done or success
                break
    return EpisodeResult(seed, task, bool(success), steps, calls, spent, frames)
