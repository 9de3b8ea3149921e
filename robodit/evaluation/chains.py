"""Evaluation's view of CALVIN-style chains: the unit of work (`Job`); the chain mechanics themselves (carrying
the scene between subtasks, the per-lane `ChainEpisode`) live with the simulator in robodit/envs/metaworld_chains.py,
which chain collection shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from robodit.envs.metaworld_chains import ChainEpisode, LayoutMismatch, carry_state, chain_tasks, success_now

__all__ = ["ChainEpisode", "Job", "LayoutMismatch", "carry_state", "chain_tasks", "success_now"]


@dataclass
class Job:
    """One unit of evaluation work: a suite episode (one subtask) or a chain (several), with its env seed."""

    index: int
    key: str  # the task (suite) or scene (chains) it is reported under
    tasks: list[str]
    seed: int
    record: bool = False
    max_steps: int | None = None  # per subtask; None = the env's limit


