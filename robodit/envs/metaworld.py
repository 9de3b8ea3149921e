"""Meta-World (v3, MuJoCo) behind the `ControlInterface`, with its scripted experts for demo collection.

Why not `gym.make("Meta-World/MT1", ...)`: MT1 draws the goal/object layout from a fixed list of 50 pre-sampled
"tasks" with its own generator *before* applying `reset(seed=...)`, so the same seed does not give the same
episode and only 50 layouts exist. We build the task's env class directly and draw its layout vector
(`_random_reset_space`, object + goal positions) from the env's generator re-seeded at every reset: one seed
is one layout, reproducibly, from an unbounded set.
"""

from __future__ import annotations

import difflib
import os
import warnings
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported (it picks its GL backend at import)

import numpy as np  # noqa: E402

from robodit.envs.base import ArraySpec, ControlInterface, EnvSpec, release  # noqa: E402
from robodit.envs.rendering import FastRenderer  # noqa: E402

ROBOT = "metaworld_sawyer"
STATE_DIM = 39
ACTION_DIM = 4


def task_names() -> list[str]:
    """The 50 Meta-World v3 task names, e.g. "reach-v3"."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return list(ALL_V3_ENVIRONMENTS)


def check_task(task: str) -> str:
    """Return `task` if Meta-World has it, else raise ValueError naming it and the closest task names."""
    names = task_names()
    if task in names:
        return task
    close = difflib.get_close_matches(task, names, n=5, cutoff=0.5)
    if not close and not task.endswith("-v3"):  # "reach" -> "reach-v3"
        close = difflib.get_close_matches(task + "-v3", names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known tasks: {', '.join(names[:8])}, ..."
    raise ValueError(f"unknown Meta-World task {task!r}; {hint}")


class HandlePullExpert:
    """handle-pull-v3's scripted expert, replacing Meta-World's (v3.0): when the hand is above the handle's
    height, Meta-World's `_desired_pos` returns the handle's z *as a scalar* target, so all three axes steer to
    that number: the hand lurches sideways, and each lift, at full speed, lets the handle slip after ~2 cm. It
    ratchets the handle up in 3-5 such cycles (90-126 steps from a reset, 116-135 after handle-press), where
    the same state gets opposite actions a few steps apart; learned policies copied that badly (0/10 from
    resets). This one goes to the front of the handle at its height, slides under the lip and lifts slowly
    (3 cm ahead, 1 cm forward) so the handle stays on the fingers: one motion, ~51 steps from a reset and
    ~70 after handle-press, 32/32 successes measured (seeds 0-15, both starts)."""

    def get_action(self, obs: np.ndarray) -> np.ndarray:
        from metaworld.policies.policy import move

        hand, grip = obs[:3], obs[4:7] + np.array([0.0, -0.04, 0.0])  # Meta-World's grip point on the handle
        dx, dy, dz = abs(hand[0] - grip[0]), hand[1] - grip[1], hand[2] - grip[2]
        if dx < 0.02 and abs(dy) < 0.02 and -0.02 < dz < 0.04:  # under the lip: lift slowly, pressing in
            target = grip + np.array([0.0, 0.01, 0.03])
        elif dx < 0.02 and abs(dz) < 0.02:  # level with the handle, in front of it: slide in
            target = grip
        else:  # 4 cm in front of the grip point at its height (never from above: the hand lands on the lip)
            target = grip + np.array([0.0, -0.04, 0.0])
        return np.append(move(hand, to_xyz=target, p=25.0), 1.0)


# Meta-World experts replaced (task -> policy class with `get_action(state)`), each documented at its class.
EXPERT_FIXES = {"handle-pull-v3": HandlePullExpert}


# One short instruction per task, for language-conditioned policies (the names alone are not English).
INSTRUCTIONS = {
    "reach": "reach the goal",
    "reach-wall": "reach the goal behind the wall",
    "push": "push the puck to the goal",
    "push-wall": "push the puck around the wall to the goal",
    "push-back": "push the puck back to the goal",
    "pick-place": "pick up the puck and place it at the goal",
    "pick-place-wall": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole": "pick the peg out of the hole",
    "drawer-open": "open the drawer",
    "drawer-close": "close the drawer",
    "door-open": "open the door",
    "door-close": "close the door",
    "door-lock": "lock the door",
    "door-unlock": "unlock the door",
    "window-open": "slide the window open",
    "window-close": "slide the window closed",
    "button-press": "press the button",
    "button-press-wall": "press the button behind the wall",
    "button-press-topdown": "press the button from the top",
    "button-press-topdown-wall": "press the button from the top behind the wall",
    "faucet-open": "turn the faucet on",
    "faucet-close": "turn the faucet off",
    "handle-press": "press the handle down",
    "handle-press-side": "press the handle down from the side",
    "handle-pull": "pull the handle up",
    "handle-pull-side": "pull the handle up from the side",
    "plate-slide": "slide the plate into the goal",
    "plate-slide-side": "slide the plate sideways into the goal",
    "plate-slide-back": "slide the plate back out of the goal",
    "plate-slide-back-side": "slide the plate sideways back out of the goal",
    "coffee-button": "press the button on the coffee machine",
    "coffee-push": "push the mug under the coffee machine",
    "coffee-pull": "pull the mug away from the coffee machine",
    "peg-insert-side": "insert the peg into the hole from the side",
    "peg-unplug-side": "unplug the peg from the side",
    "assembly": "put the ring onto the peg",
    "disassemble": "take the ring off the peg",
    "basketball": "put the ball into the hoop",
    "bin-picking": "move the cube into the other bin",
    "box-close": "put the lid on the box",
    "dial-turn": "turn the dial",
    "hammer": "hammer the nail in",
    "hand-insert": "put the hand into the hole",
    "lever-pull": "pull the lever up",
    "shelf-place": "place the puck on the shelf",
    "soccer": "kick the ball into the goal",
    "stick-push": "push the bottle with the stick",
    "stick-pull": "pull the bottle with the stick",
    "sweep": "sweep the puck off the table",
    "sweep-into": "sweep the puck into the hole",
}
# Meta-World's multi-task benchmarks by name, for `robodit collect metaworld/MT10` (MT10's ten tasks).
BENCHMARKS = {
    "MT10": ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
             "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"),
}
_VERBS = {"open", "close", "press", "pull", "push", "turn", "slide", "lock", "unlock", "insert", "unplug", "pick",
          "place", "reach", "sweep", "kick", "lift", "stack", "move", "put", "hang", "fold", "pour", "wipe"}


def task_instruction(task: str) -> str:
    """A short English instruction: from the table, else "<verb words> the <object words>" from the name."""
    base = task.rsplit("-v", 1)[0] if task.rsplit("-v", 1)[-1].isdigit() else task
    if base in INSTRUCTIONS:
        return INSTRUCTIONS[base]
    words = base.split("-")
    verbs = [w for w in words if w in _VERBS]
    objects = [w for w in words if w not in _VERBS]
    if verbs and objects:
        return f"{' '.join(verbs)} the {' '.join(objects)}"
    return " ".join(words)


class MetaWorldEnv(ControlInterface):
    """One Meta-World task (switchable at `reset(task=...)`), seeded per episode, rendered the fast way.

    Observation: {"state": float32 [39], "image_<cam>": uint8 [S, S, 3] upright, per camera when image_size > 0}.
    The 39-d state is hand xyz, gripper opening, two object poses (pos+quat, zero-padded), the same 18 values
    from the previous step, and the goal xyz. Meta-World's goal-hidden variants (and its ML benchmarks) zero
    the goal; then a state-only policy cannot know where e.g. reach-v3's target is. `goal_observable=True`
    (default, as in Meta-World's MT benchmarks) keeps it; with False the last 3 values are zeroed for the policy
    while the expert still sees the true goal.

    `reset(seed=s)` is deterministic in s; `reset()` with no seed draws the next seed from a generator seeded by
    the constructor's `seed`. `step` clips actions to [-1, 1]; `success` is Meta-World's `info["success"]`;
    `done` is success or the step limit (`max_episode_steps`, default the task's `max_path_length`, 500).
    """

    def __init__(
        self,
        task: str,
        image_size: int = 0,
        cameras: tuple[str, ...] | list[str] = ("corner2",),
        seed: int = 0,
        max_episode_steps: int | None = None,
        video_size: int = 128,
        goal_observable: bool = True,
        video_camera: str = "corner2",
        fast_render: bool = True,
    ):
        if isinstance(cameras, str):
            cameras = tuple(c.strip() for c in cameras.split(",") if c.strip())
        self.image_size = int(image_size)
        self.cameras = tuple(cameras) if self.image_size > 0 else ()
        self.video_size = int(video_size)
        self.video_camera = video_camera
        self.goal_observable = bool(goal_observable)
        self.fast_render = fast_render
        self._max_steps_override = max_episode_steps
        self._seed_rng = np.random.default_rng(seed)
        self.seed = seed
        self._env = None
        self._renderer: FastRenderer | None = None
        self._experts: dict[str, Any] = {}
        self._raw_obs: np.ndarray | None = None
        self._t = 0
        self.episode_seed: int | None = None
        self._build(check_task(task))

    # -- construction ------------------------------------------------------------------------------------
    def _build(self, task: str) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.close()
        env = ALL_V3_ENVIRONMENTS[task]()
        env._partially_observable = False  # the raw obs always carries the goal; we hide it ourselves if asked
        env.__dict__.pop("sawyer_observation_space", None)  # cached_property: recompute for full observability
        env._freeze_rand_vec = False  # draw a fresh layout at each reset ...
        env.seeded_rand_vec = True  # ... from env.np_random, which reset() re-seeds
        env._set_task_called = True
        default_steps = int(env.max_path_length)
        max_steps = int(self._max_steps_override or default_steps)
        if max_steps > env.max_path_length:
            env.max_path_length = max_steps  # Meta-World refuses to step past its own limit
        self._env, self.task, self.max_episode_steps = env, task, max_steps
        self._renderer = FastRenderer(
            env.model, env.data, fast=self.fast_render, max_size=max(self.image_size, self.video_size)
        )
        for cam in (*self.cameras, self.video_camera):
            self._renderer.camera_id(cam)  # unknown camera -> ValueError now, not mid-episode
        self.control_hz = 1.0 / (env.model.opt.timestep * env.frame_skip)  # 0.0025 s * 5 -> 80 Hz
        obs_spec = {"state": ArraySpec((STATE_DIM,), "float32")}
        for cam in self.cameras:
            obs_spec[f"image_{cam}"] = ArraySpec((self.image_size, self.image_size, 3), "uint8")
        self.spec = EnvSpec(
            observation=obs_spec,
            action_dim=ACTION_DIM,
            action_low=-np.ones(ACTION_DIM, np.float32),
            action_high=np.ones(ACTION_DIM, np.float32),
            control_hz=self.control_hz,
            robot=ROBOT,
            max_episode_steps=max_steps,
            extra={"simulator": "metaworld", "task": task, "goal_observable": self.goal_observable},
        )

    def config(self) -> dict[str, Any]:
        """What rebuilds this env for evaluation (stored as a demo store's `env` attr)."""
        return {
            "name": f"metaworld/{self.task}",
            "simulator": "metaworld",
            "tasks": [self.task],
            "image_size": self.image_size,
            "cameras": list(self.cameras),
            "max_episode_steps": self.max_episode_steps,
            "goal_observable": self.goal_observable,
        }

    # -- ControlInterface ------------------------------------------------------------------------------
    def reset(self, task: str | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        if task is not None and task != self.task:
            self._build(check_task(task))
        if seed is None:
            seed = int(self._seed_rng.integers(2**31 - 1))
        self.episode_seed = int(seed)
        self._env.seed(self.episode_seed)
        raw, _ = self._env.reset()
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self._t = 0
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool, dict[str, Any]]:
        if self._raw_obs is None:
            raise RuntimeError("call reset() before step()")
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(ACTION_DIM), -1.0, 1.0)
        raw, reward, terminated, truncated, info = self._env.step(a)
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self._t += 1
        success = bool(info.get("success", 0.0) > 0)
        done = success or bool(terminated) or bool(truncated) or self._t >= self.max_episode_steps
        info = dict(info, reward=float(reward), steps=self._t, action=a)
        return self._obs(), success, done, info

    def render(self) -> np.ndarray:
        return self._renderer.render(self.video_camera, self.video_size)

    def close(self) -> None:
        release(self, "_renderer", "_env")

    # -- expert and helpers ---------------------------------------------------------------------------
    def instruction(self, task: str | None = None) -> str:
        return task_instruction(task or self.task)

    @property
    def raw_state(self) -> np.ndarray:
        """Meta-World's current 39-d observation, goal included whatever `goal_observable` says."""
        return self._raw_obs.copy()

    @property
    def unwrapped(self):
        return self._env

    def expert_action(self, obs: dict[str, np.ndarray] | np.ndarray | None = None) -> np.ndarray:
        """Meta-World's scripted expert for the current task, clipped to the action bounds.

        With no argument it reads the env's current raw state. A given state with a hidden (zeroed) goal gets the
        env's true goal filled in: every expert reads the goal from the last 3 values.
        """
        from metaworld.policies import ENV_POLICY_MAP

        if obs is None:
            state = self._raw_obs
        else:
            state = np.asarray(obs["state"] if isinstance(obs, dict) else obs, dtype=np.float64).copy()
            if not self.goal_observable:
                state[-3:] = self._env._get_pos_goal()
        policy = self._experts.get(self.task)
        if policy is None:
            policy = self._experts[self.task] = EXPERT_FIXES.get(self.task, ENV_POLICY_MAP[self.task])()
        with warnings.catch_warnings():  # experts warn whenever a gain saturates; the env clips anyway
            warnings.simplefilter("ignore")
            action = policy.get_action(state)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

    def _obs(self) -> dict[str, np.ndarray]:
        state = self._raw_obs.astype(np.float32)
        if not self.goal_observable:
            state[-3:] = 0.0
        obs = {"state": state}
        for cam in self.cameras:
            obs[f"image_{cam}"] = self._renderer.render(cam, self.image_size)
        return obs
