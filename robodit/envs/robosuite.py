"""robosuite 1.5 (Lift, TwoArmLift, TwoArmHandover with Pandas, OSC_POSE) behind the `ControlInterface`.

Why our own wrapper: robosuite's observation dict is keyed per robot and changes with the task; policies want
one flat `state` whose layout the unified-action-space adapters know (robodit.action_space:
`ROBOSUITE_ARM_STATE` values per arm, robot0 = right arm, robot1 = left, then the task's `object-state`).
Its object placement draws from NumPy's *global* generator, so `reset(seed=s)` seeds that generator for the
reset only (and restores it), which makes one seed one layout. Cameras are rendered with our fast renderer on
robosuite's MuJoCo model (robosuite's own offscreen path is 3-4x slower) and come out upright.

Scripted experts (`expert_action`, robosuite ships none), measured on seeds 100-129: Lift 30/30 (~44 steps),
TwoArmLift 30/30 (~55 steps), TwoArmHandover 27/30, 28/30 and 27/30 (~200 steps) with the env built with
seed 0, 1 and 2 (robosuite draws the hammer's size when the env is built: `seed` fixes it, so a run is
reproducible across processes).
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any, NamedTuple

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

from robodit.action_space import ROBOSUITE_ARM_STATE, adapter_for
from robodit.envs.base import ArraySpec, ControlInterface, EnvSpec, global_seed, release
from robodit.envs.rendering import FastRenderer

# task -> (number of Panda arms, robot name for the unified space, short instruction)
TASKS = {
    "Lift": (1, "robosuite_panda", "lift the cube"),
    "TwoArmLift": (2, "robosuite_two_panda", "lift the pot with both arms"),
    "TwoArmHandover": (2, "robosuite_two_panda", "hand the hammer over to the other arm"),
}
_ARM_KEYS = (("joint_pos", 7), ("joint_vel", 7), ("gripper_qpos", 2), ("gripper_qvel", 2), ("eef_pos", 3),
             ("eef_quat", 4))
assert sum(n for _, n in _ARM_KEYS) == ROBOSUITE_ARM_STATE


class _Phase(NamedTuple):
    dz: float  # height above the grasp point (or above the phase's start pose when hold)
    grip: float  # -1 open, 1 close
    tol: float = 0.01
    min_steps: int = 0
    max_steps: int = 80
    hold: bool = False  # move relative to where the phase began (after the grasp: the object moves with us)


_PICK = (_Phase(0.10, -1.0, 0.015), _Phase(0.0, -1.0, 0.008, max_steps=60), _Phase(0.0, 1.0, 1.0, 12, 12, True),
         _Phase(0.25, 1.0, 0.01, max_steps=10_000, hold=True))
_PLANS = {"Lift": _PICK, "TwoArmLift": _PICK}
_TURN = 4  # the handover phase that carries and turns the hammer
_TURN_RATE = 0.5  # of full OSC rotation speed: a faster turn swings the hammer about the fingers
_AIM = 0.5  # rad: the free end may point this far from +y (arm 1 grasps it where it is); less turning
_WRIST_MARGIN = 0.3  # rad a planned wrist turn keeps from the joint's limits


def _wrist_margin(sim, robot, turn: float) -> float:
    """How far (rad) the arm's last joint would stay from its limits after turning by `turn`."""
    q = float(sim.data.qpos[robot._ref_joint_pos_indexes][-1]) + turn
    lo, hi = sim.model.jnt_range[robot._ref_joint_indexes[-1]]
    return min(q - lo, hi - q)


def check_task(task: str) -> str:
    if task in TASKS:
        return task
    close = difflib.get_close_matches(task, list(TASKS), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known tasks: {', '.join(TASKS)}"
    raise ValueError(f"unknown robosuite task {task!r}; {hint}")


class RobosuiteEnv(ControlInterface):
    """Observation {"state": float32 [arms*25 + object-state], "image_<cam>": uint8 [S, S, 3] per camera}.

    Actions are native OSC_POSE deltas per arm (xyz, axis-angle, gripper; 7 or 14 values) in [-1, 1], clipped.
    `success` is robosuite's `_check_success()`; `done` is success or `max_episode_steps` (default 300).
    """

    def __init__(self, task: str, image_size: int = 0, cameras: tuple[str, ...] | list[str] = ("agentview",),
                 seed: int = 0, max_episode_steps: int | None = None, video_size: int = 128,
                 video_camera: str = "agentview", control_freq: float = 20.0, env_configuration: str = "default",
                 fast_render: bool = True):
        import robosuite as suite
        from robosuite.controllers import load_composite_controller_config

        self.task = check_task(task)
        arms, robot, _ = TASKS[self.task]
        if isinstance(cameras, str):
            cameras = tuple(c.strip() for c in cameras.split(",") if c.strip())
        self.image_size, self.video_size, self.video_camera = int(image_size), int(video_size), video_camera
        self.cameras = tuple(cameras) if self.image_size > 0 else ()
        self.max_episode_steps = int(max_episode_steps or 300)
        self._seed_rng = np.random.default_rng(seed)
        self.seed, self.arms, self.fast_render = seed, arms, fast_render
        logging.getLogger("robosuite").setLevel(logging.ERROR)  # it warns about every absent body part
        controller = load_composite_controller_config(controller="BASIC", robot="Panda")
        kwargs = {"env_configuration": env_configuration} if arms == 2 else {}
        with global_seed(seed):  # model building draws from it too (TwoArmHandover's hammer size)
            self._env = suite.make(self.task, robots=["Panda"] * arms if arms > 1 else "Panda",
                                   controller_configs=controller, has_renderer=False, has_offscreen_renderer=False,
                                   use_camera_obs=False, horizon=self.max_episode_steps + 1, ignore_done=True,
                                   control_freq=control_freq, hard_reset=False, reward_shaping=False, **kwargs)
        self._renderer: FastRenderer | None = None
        self._raw: dict[str, np.ndarray] | None = None
        self._t = 0
        self.episode_seed: int | None = None
        self.adapter = adapter_for(robot)
        self.action_dim = 7 * arms
        low, high = (np.asarray(b, np.float32) for b in self._env.action_spec)
        self._low, self._high = low, high
        with global_seed(seed):
            object_dim = len(self._env.reset()["object-state"])
        self._new_renderer()
        obs_spec = {"state": ArraySpec((arms * ROBOSUITE_ARM_STATE + object_dim,), "float32")}
        for cam in self.cameras:
            obs_spec[f"image_{cam}"] = ArraySpec((self.image_size, self.image_size, 3), "uint8")
        self.spec = EnvSpec(observation=obs_spec, action_dim=self.action_dim, action_low=low, action_high=high,
                            control_hz=float(control_freq), robot=robot, max_episode_steps=self.max_episode_steps,
                            unified_slots=self.adapter.action_slots,
                            extra={"simulator": "robosuite", "task": self.task, "object_dim": object_dim})

    def _new_renderer(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        sim = self._env.sim
        self._renderer = FastRenderer(sim.model._model, sim.data._data, fast=self.fast_render,
                                      max_size=max(self.image_size, self.video_size))
        self._model = sim.model._model
        for cam in (*self.cameras, self.video_camera):
            self._renderer.camera_id(cam)  # unknown camera -> ValueError now, not mid-episode

    def config(self) -> dict[str, Any]:
        return {"name": f"robosuite/{self.task}", "simulator": "robosuite", "tasks": [self.task],
                "image_size": self.image_size, "cameras": list(self.cameras),
                "max_episode_steps": self.max_episode_steps}

    def instruction(self, task: str | None = None) -> str:
        return TASKS[task or self.task][2]

    # -- ControlInterface ---------------------------------------------------------------------------------------
    def reset(self, task: str | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        if task is not None and check_task(task) != self.task:
            raise ValueError(f"this env runs {self.task}; build another RobosuiteEnv for {task}")
        if seed is None:
            seed = int(self._seed_rng.integers(2**31 - 1))
        self.episode_seed = int(seed)
        with global_seed(self.episode_seed):  # robosuite's placement samplers and init noise use the global RNG
            self._raw = self._env.reset()
        if self._env.sim.model._model is not self._model:  # robosuite rebuilt the model: renderer must follow
            self._new_renderer()
        self._t = 0
        self._phase, self._phase_t, self._anchor = 0, 0, None
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool, dict[str, Any]]:
        if self._raw is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.size != self.action_dim:
            raise ValueError(f"{self.task} takes {self.action_dim} action values, got {a.size}")
        a = np.clip(a, self._low, self._high)
        self._raw, reward, _, info = self._env.step(a)
        self._t += 1
        success = bool(self._env._check_success())
        done = success or self._t >= self.max_episode_steps
        return self._obs(), success, done, dict(info, reward=float(reward), steps=self._t, action=a)

    def render(self) -> np.ndarray:
        return self._renderer.render(self.video_camera, self.video_size)

    def close(self) -> None:
        release(self, "_renderer", "_env")

    @property
    def unwrapped(self):
        return self._env

    def state_vector(self, raw: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The flat state: per arm (robot0, robot1) the `_ARM_KEYS` fields, then `object-state`."""
        raw = self._raw if raw is None else raw
        parts = [np.asarray(raw[f"robot{r}_{k}"], np.float32).reshape(n) for r in range(self.arms) for k, n in _ARM_KEYS]
        parts.append(np.asarray(raw["object-state"], np.float32))
        return np.concatenate(parts)

    # -- scripted experts (robosuite ships none) -------------------------------------------------------------------
    def expert_action(self, obs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """A phase machine over per-arm waypoints (approach above, descend, close, lift), all arms advancing
        together so a two-arm lift stays level; handover has its own (`_handover_action`). Each phase ends when
        every arm is within tolerance, or on a step budget so a stuck phase cannot stall the episode.
        Reads the simulator, so `obs` is ignored (kept for the collect API)."""
        if self._raw is None:
            raise RuntimeError("call reset() before expert_action()")
        if self.task == "TwoArmHandover":
            return self._handover_action()
        plan = _PLANS[self.task]
        phase = plan[min(self._phase, len(plan) - 1)]
        objs = self._objects(self._env._get_observations(force_update=False))
        eef = [self._env.sim.data.site_xpos[r.eef_site_id["right"]].copy() for r in self._env.robots]
        if self._anchor is None or self._phase_t == 0:
            self._anchor = eef
        action, reached = np.zeros(self.action_dim, np.float32), True
        for r, (grasp, radial) in enumerate(objs):
            target = (self._anchor[r] if phase.hold else grasp) + np.array([0.0, 0.0, phase.dz])
            reached &= bool(np.linalg.norm(target - eef[r]) < phase.tol)
            action[7 * r: 7 * r + 7] = self._arm_command(r, target, None if phase.hold else radial, phase.grip)
        self._phase_t += 1
        if (reached and self._phase_t >= phase.min_steps) or self._phase_t >= phase.max_steps:
            self._phase, self._phase_t = min(self._phase + 1, len(plan) - 1), 0
        return action

    def _arm_command(self, r: int, target: np.ndarray, closing: np.ndarray | None, grip: float,
                     wrist_limits: bool = False) -> np.ndarray:
        """OSC delta for arm r toward a world target (deltas are in the base frame), turning the fingers' closing
        axis (eef site x) onto `closing` when given, the short way round (fingers are symmetric) — or, with
        `wrist_limits`, the long way when the short one would drive the last joint into its limit."""
        sim, robot = self._env.sim, self._env.robots[r]
        eef = sim.data.site_xpos[robot.eef_site_id["right"]]
        cmd = np.zeros(7, np.float32)
        cmd[:3] = np.clip(sim.data.get_body_xmat(robot.robot_model.root_body).T @ ((target - eef) * 12.0), -1, 1)
        if closing is not None:
            axis = sim.data.site_xmat[robot.eef_site_id["right"]].reshape(3, 3)[:, 0]
            yaw = np.arctan2(axis[0] * closing[1] - axis[1] * closing[0], axis @ closing)
            yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2
            if wrist_limits and _wrist_margin(sim, robot, -yaw) < _WRIST_MARGIN:  # the last joint turns by -yaw
                yaw -= np.pi * np.sign(yaw)
            cmd[5] = np.clip(yaw * 2.0, -1, 1)
        cmd[6] = grip
        return cmd

    def _handover_action(self) -> np.ndarray:
        """Arm 0 picks the hammer by the handle's head end and lifts it straight up, then carries it to the
        middle while turning its free end toward arm 1; arm 1 takes that end from above; arm 0 lets go and backs
        off. Why it is shaped so (it was 16/30): the turn goes the way that keeps each wrist's last joint off its
        limits (±2.9 rad; turning into the limit left the hammer sideways and arm 1 unable to align), it starts
        only after a straight lift and at half speed (a fast turn swung the hammer about the fingers until it hung
        vertical), and the grasp points scale with the hammer's handle (drawn per env, 0.10-0.21 m)."""
        sim, env = self._env.sim, self._env
        center = sim.data.geom_xpos[env.hammer_handle_geom_id].copy()
        axis = sim.data.geom_xmat[env.hammer_handle_geom_id].reshape(3, 3)[:, 2] * np.array([1.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis) + 1e-9  # the handle's horizontal direction, pointing at the head
        head = sim.data.geom_xpos[sim.model.geom_name2id(env.hammer.head_geoms[0])]
        if (head - center) @ axis < 0:
            axis = -axis
        across = np.array([-axis[1], axis[0], 0.0])  # fingers close across the handle
        eef = [sim.data.site_xpos[r.eef_site_id["right"]].copy() for r in env.robots]
        angle = float(np.arctan2(-axis[0], -axis[1]))  # of the free end from +y (toward arm 1)
        if self._phase_t == 0:
            self._anchor = eef
        if self._phase == _TURN and self._phase_t == 0:
            self._turn = self._plan_turn(angle)
        if self._phase >= _TURN:  # unwrap: the turn may pass ±pi
            self._turn["angle"] += (angle - self._turn["last"] + np.pi) % (2 * np.pi) - np.pi
            self._turn["last"] = angle
        # far apart, so the grippers do not touch (hammer sizes are drawn when the env is built)
        half = env.hammer.handle_length / 2
        g0, g1 = center + min(0.06, half - 0.015) * axis, center - (half - 0.025) * axis
        meet = np.array([0.0, -0.12, 1.15])
        up = np.array([0.0, 0.0, 1.0])
        # phase: (arm0 target, arm0 grip, arm1 target, arm1 grip, tolerance, min steps, max steps)
        plans = [
            (g0 + 0.1 * up, -1, self._anchor[1], -1, 0.015, 0, 80),  # 0 above the handle's head end
            (g0, -1, self._anchor[1], -1, 0.008, 0, 60),  # 1 down to it
            (self._anchor[0], 1, self._anchor[1], -1, 1.0, 12, 12),  # 2 close
            (self._anchor[0] + 0.15 * up, 1, self._anchor[1], -1, 0.02, 0, 40),  # 3 lift, no turn
            (meet, 1, g1 + 0.12 * up, -1, 0.02, 10, 160),  # 4 carry to the middle, turn; arm 1 above the free end
            (meet, 1, g1 + 0.06 * up, -1, 0.012, 0, 80),  # 5 arm 1 down
            (meet, 1, g1, -1, 0.008, 0, 60),  # 6
            (self._anchor[0], 1, self._anchor[1], 1, 1.0, 12, 12),  # 7 arm 1 closes
            (self._anchor[0], -1, self._anchor[1], 1, 1.0, 10, 10),  # 8 arm 0 opens
            (self._anchor[0] + 0.12 * up, -1, self._anchor[1] + 0.03 * up, 1, 0.01, 0, 10_000),  # 9 apart
        ]
        t0, grip0, t1, grip1, tol, lo, hi = plans[min(self._phase, len(plans) - 1)]
        turn0 = across if self._phase < 2 else None
        turn1 = across if _TURN <= self._phase < 7 else None
        cmd0 = self._arm_command(0, t0, turn0, grip0, wrist_limits=True)
        turn_left = 0.0
        if _TURN <= self._phase < 7:  # turn the carried hammer so its free end points at arm 1, head away
            turn_left = self._turn["angle"] - self._turn["goal"]
            cmd0[5] = np.clip(turn_left * 2.0, -_TURN_RATE, _TURN_RATE)
        action = np.concatenate([cmd0, self._arm_command(1, t1, turn1, grip1, wrist_limits=True)])
        reached = np.linalg.norm(t0 - eef[0]) < tol and np.linalg.norm(t1 - eef[1]) < tol
        reached &= self._phase != _TURN or abs(turn_left) < 0.15
        self._phase_t += 1
        if (reached and self._phase_t >= lo) or self._phase_t >= hi:
            self._phase, self._phase_t = min(self._phase + 1, len(plans) - 1), 0
        return action

    def _plan_turn(self, angle: float) -> dict[str, float]:
        """Where the free end should end up (unwrapped angle from +y): within ±_AIM of +y, by the shortest turn
        that keeps arm 0's last joint (it turns with the hammer, same sign) off its limits."""
        sim, robot = self._env.sim, self._env.robots[0]
        options = []
        for k in (-1, 0, 1):
            goal = float(np.clip(angle, -_AIM, _AIM)) + 2 * np.pi * k
            options.append((_wrist_margin(sim, robot, goal - angle) < _WRIST_MARGIN, abs(goal - angle), goal))
        return {"angle": angle, "last": angle, "goal": min(options)[2]}

    def _objects(self, raw) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per arm: the grasp point and (for handles) the horizontal pot-centre → handle direction, along which
        the fingers must close to straddle the handle's outer bar."""
        if self.task == "Lift":
            return [(raw["cube_pos"], None)]
        if self.task == "TwoArmLift":
            out = []
            for r in range(2):
                h = raw[f"handle{r}_xpos"]
                d = (h - raw["pot_pos"]) * np.array([1.0, 1.0, 0.0])
                out.append((h, d / (np.linalg.norm(d) + 1e-9)))
            return out
        raise ValueError(f"no grasp targets defined for robosuite task {self.task!r}")

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {"state": self.state_vector()}
        for cam in self.cameras:
            obs[f"image_{cam}"] = self._renderer.render(cam, self.image_size)
        return obs
