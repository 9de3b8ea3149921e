"""CALVIN-style chains in Meta-World: several subtasks in one scene, one after another, without a reset.

Meta-World has one env class per task, but several tasks load the same scene model (drawer open/close, window
open/close, ...). A chain moves from task A's env to task B's env by *carrying the scene*:

1. B is reset with A's layout: B's layout vector (`_last_rand_vec`, the object/goal placement Meta-World draws
   at reset) takes A's object part, so B places the scene where A has it and derives its goal from it. That
   every body of the two models then sits at the same place is checked (`LayoutMismatch` otherwise).
2. A's dynamic state (joint positions and velocities, mocap target, actuator controls, warm start, time) is
   copied into B's `MjData` and forwarded, so the drawer stays half-open, the hand stays where it was.
3. B's own observation bookkeeping (previous frame, step counter) restarts from that state.

B's success check (`evaluate_state`, Meta-World's own) then reads the carried joints: a drawer that A left
closed counts as closed for drawer-close at once, whatever drawer-close's own reset would have done. The
tests show exactly that.

`ChainEpisode` is the per-episode state machine both users drive: the rollout engine (a suite episode is a
chain of one) and chain collection (robodit/datasets/collect_chains.py, with the scripted experts). It lives
with the simulator, below both, so that demos and evaluation chain subtasks by exactly the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Copied from A to B. Positions/velocities define the physical state; mocap + ctrl are the hand and gripper
# targets; qacc_warmstart and time keep the solver continuous (bit-exact with an uncarried continuation).
_DATA_FIELDS = ("qpos", "qvel", "act", "mocap_pos", "mocap_quat", "ctrl", "qacc_warmstart", "qacc")


class LayoutMismatch(RuntimeError):
    """Task B could not be placed like task A: the two envs do not share a scene."""


def _layout_vector(src_vec: np.ndarray, dst_vec: np.ndarray) -> np.ndarray:
    """B's layout vector with A's object placement: all of A's when the lengths agree, else A's first 3 (the
    object position every shared-scene task draws first) and B's own rest (its goal, if it draws one)."""
    src_vec, dst_vec = np.asarray(src_vec, np.float64), np.asarray(dst_vec, np.float64)
    if src_vec.shape == dst_vec.shape:
        return src_vec.copy()
    out = dst_vec.copy()
    out[:3] = src_vec[:3]
    return out


def carry_state(src, dst, seed: int) -> dict[str, np.ndarray]:
    """Put `dst` (a MetaWorldEnv of another task) into `src`'s scene state; returns dst's first observation."""
    import mujoco

    s, d = src.unwrapped, dst.unwrapped
    if s.model.nbody != d.model.nbody or s.model.nq != d.model.nq:
        raise LayoutMismatch(f"{src.task} and {dst.task} do not share a scene model")
    dst.reset(seed=seed)  # draws B's own layout vector (for the parts A does not decide)
    d._last_rand_vec = _layout_vector(s._last_rand_vec, d._last_rand_vec)
    d._freeze_rand_vec = True
    try:
        dst.reset(seed=seed)  # B's reset_model with A's placement: goal and model body positions follow it
    finally:
        d._freeze_rand_vec = False
    bad = np.flatnonzero(np.abs(s.model.body_pos - d.model.body_pos).max(axis=1) > 1e-9)
    if len(bad):
        names = [mujoco.mj_id2name(d.model, mujoco.mjtObj.mjOBJ_BODY, int(i)) for i in bad[:5]]
        raise LayoutMismatch(f"{dst.task} cannot take {src.task}'s layout: bodies {names} differ")
    for name in _DATA_FIELDS:
        getattr(d.data, name)[...] = getattr(s.data, name)
    d.data.time = s.data.time
    mujoco.mj_forward(d.model, d.data)
    d.curr_path_length = 0
    # init_tcp stays where B's own reset put the hand: Meta-World uses it only to shape rewards, and a margin
    # measured from a carried hand that already sits on the object goes negative and raises inside the success
    # check (seen: handle-pull after a policy's handle-press, "`margin` must be non-negative").
    d._prev_obs = d._get_curr_obs_combined_no_goal()
    raw = d._get_obs()
    d._last_stable_obs = raw
    dst._raw_obs = np.asarray(raw, dtype=np.float64)
    dst._t = 0
    return dst._obs()


def success_now(env) -> bool:
    """The task's own success check on the env's current state, without stepping."""
    d = env.unwrapped
    _, info = d.evaluate_state(np.asarray(d._get_obs(), np.float64), np.zeros(4, np.float32))
    return bool(info.get("success", 0.0) > 0)


@dataclass
class ChainEpisode:
    """One lane's episode: subtasks in order, each ending at its own success or `max_steps` (then the chain
    stops, as in CALVIN). `apply` steps one action and reports "switch" (next subtask started, scene carried),
    "done" or None; everything is a deterministic function of (job, actions), which crash recovery relies on."""

    tasks: list[str]
    seed: int
    max_steps: int | None
    make: Any  # task -> env (cached by the worker)
    record: bool = False
    video_stride: int = 4  # a video frame every k steps (20 fps at Meta-World's 80 Hz): a frame costs ~10 steps
    sub: int = 0
    t: int = 0
    successes: list[bool] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    satisfied_at_start: list[bool] = field(default_factory=list)  # carried state already passed the check
    frames: list[np.ndarray] = field(default_factory=list)
    env: Any = None
    done: bool = False

    def start(self) -> dict[str, np.ndarray]:
        self.env = self.make(self.tasks[0])
        obs = self.env.reset(task=self.tasks[0], seed=self.seed)
        if self.max_steps is None:
            self.max_steps = self.env.spec.max_episode_steps
        if self.record:
            self.frames.append(self.env.render())
        return obs

    def apply(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], str | None]:
        obs, success, done, _ = self.env.step(action)
        self.t += 1
        if self.record and (sum(self.steps) + self.t) % self.video_stride == 0:
            self.frames.append(self.env.render())
        if not (success or done or self.t >= self.max_steps):
            return obs, None
        self.successes.append(bool(success))
        self.steps.append(self.t)
        if not success or self.sub + 1 >= len(self.tasks):
            self.done = True
            return obs, "done"
        self.sub += 1
        nxt = self.make(self.tasks[self.sub])
        obs = carry_state(self.env, nxt, self.seed)
        self.satisfied_at_start.append(success_now(nxt))
        self.env, self.t = nxt, 0
        return obs, "switch"

    def expert_action(self) -> np.ndarray:
        return self.env.expert_action()

    @classmethod
    def frame_subtasks(cls, steps: list[int], frames: int, video_stride: int | None = None) -> list[int]:
        """The subtask each recorded frame shows, from the per-subtask step counts: frame 0 is the reset, frame j
        the state after chain step j * stride (recorded before a switch, so it shows the subtask that just ran)."""
        stride = cls.video_stride if video_stride is None else int(video_stride)
        ends = np.cumsum(steps) if len(steps) else np.zeros(1, np.int64)
        out = [0]
        for j in range(1, frames):
            out.append(min(int(np.searchsorted(ends, j * stride)), max(len(steps) - 1, 0)))
        return out[:frames]


def chain_tasks(cycle: list[str], length: int, rng: np.random.Generator) -> list[str]:
    """`length` subtasks walking the scene's cycle from a random start (open, close, open, ...)."""
    start = int(rng.integers(len(cycle)))
    return [cycle[(start + k) % len(cycle)] for k in range(length)]
