"""LeRobot hardware behind the ControlInterface, without importing lerobot unless a config asks it to build one.

`LeRobotRobot(robot)` wraps any object with LeRobot's robot API: `connect()`, `get_observation() -> {name: value}`,
`send_action({name: value}) -> {name: value actually sent}`, `disconnect()`, and the `observation_features` /
`action_features` dicts (name → `float` for a scalar such as "shoulder_pan.pos", or an (H, W, C) tuple for a
camera). Scalars are packed, in feature order, into `state`; cameras become uint8 `image_<name>` (the name made
a store key by the same `safe_key` as `robodit convert lerobot`, so `wrist.cam` is `image_wrist_cam` in both);
the action vector follows `action_features` order. So an SO-100 arm, a bimanual rig or a test double all look
alike.

LeRobot reports no action limits, so bounds come from the robot config; the safety layer refuses to run with
infinite bounds. `stop()` (what an e-stop calls) commands the present measured positions: a position-controlled
arm stays where it is instead of finishing its last target. LeRobot robots turn torque off when they disconnect
(`disable_torque_on_disconnect`, default true), which would drop an arm the e-stop just held in place; so after
an e-stop `close()` keeps torque on unless the config sets `torque_off_after_estop: true`.

Connecting runs LeRobot's own `connect()`: its motor handshake, and its calibration check, which asks on stdin
whether to write the calibration file to motors that differ. A wrong port, a missing motor, no terminal for that
question, or motors left uncalibrated (`calibrate: false`) are one-line errors before the arm moves
(tests/test_lerobot_so101.py drives LeRobot's SO-101 class over a fake serial port).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import pkgutil
from typing import Any

import numpy as np

from robodit.envs.base import ArraySpec, ControlInterface, EnvSpec
from robodit.errors import CLIError
from robodit.keys import safe_key

log = logging.getLogger("robodit.lerobot")


def _is_scalar(feature) -> bool:
    return feature in (float, int, bool) or isinstance(feature, type)


class LeRobotRobot(ControlInterface):
    def __init__(self, robot, *, control_hz: float = 30.0, action_low=None, action_high=None,
                 max_episode_steps: int = 10**9, name: str | None = None, calibrate: bool = True,
                 torque_off_after_estop: bool = False):
        self.robot, self.calibrate = robot, calibrate
        self.torque_off_after_estop = bool(torque_off_after_estop)
        self.estopped = False  # set by stop(): close() then keeps the arm powered where the stop held it
        obs_ft, act_ft = dict(robot.observation_features), dict(robot.action_features)
        self.state_names = [k for k, v in obs_ft.items() if _is_scalar(v)]
        self.cameras = {k: tuple(int(x) for x in v) for k, v in obs_ft.items() if not _is_scalar(v)}
        self.camera_keys = {k: "image_" + safe_key(k) for k in self.cameras}
        if len(set(self.camera_keys.values())) < len(self.camera_keys):
            raise ValueError(f"cameras {sorted(self.cameras)} give clashing observation keys "
                             f"{sorted(self.camera_keys.values())}; rename a camera")
        bad = [k for k, v in act_ft.items() if not _is_scalar(v)]
        if bad:
            raise ValueError(f"action features {bad} are not scalars; LeRobotRobot sends flat float actions")
        self.action_names = list(act_ft)
        n = len(self.action_names)
        low = np.full(n, -np.inf, np.float32) if action_low is None else np.asarray(action_low, np.float32)
        high = np.full(n, np.inf, np.float32) if action_high is None else np.asarray(action_high, np.float32)
        if low.shape != (n,) or high.shape != (n,):
            raise ValueError(f"action_low/high need {n} values, one per action feature {self.action_names}")
        observation = {"state": ArraySpec((len(self.state_names),), "float32")}
        observation.update({self.camera_keys[k]: ArraySpec(v, "uint8") for k, v in self.cameras.items()})
        self.spec = EnvSpec(observation=observation, action_dim=n, action_low=low, action_high=high,
                            control_hz=float(control_hz), robot=name or type(robot).__name__,
                            max_episode_steps=int(max_episode_steps),
                            extra={"state_names": self.state_names, "action_names": self.action_names,
                                   "action_mode": "absolute"})  # joint targets: a hold re-sends the last one
        self._t = 0
        self.robot_clipped = 0  # steps where the robot's own limits changed the command

    @classmethod
    def from_config(cls, cfg: dict[str, Any], control_hz: float = 30.0) -> "LeRobotRobot":
        """`factory: "module:callable"` (+ `kwargs`) for any robot object, or `lerobot: {type: ..., ...}`."""
        cfg = dict(cfg)
        if "factory" in cfg:
            module, _, attr = str(cfg["factory"]).partition(":")
            robot = getattr(importlib.import_module(module), attr)(**(cfg.get("kwargs") or {}))
        elif "lerobot" in cfg:
            lr = dict(cfg["lerobot"] or {})
            if "type" not in lr:
                raise ValueError("robot.lerobot needs type: LeRobot's robot type, e.g. so101_follower")
            robot = make_lerobot_robot(**lr)
            cfg.setdefault("name", lr["type"])  # the name LeRobot's registry (and robodit's action space) use
        else:
            raise ValueError("robot.type lerobot needs robot.factory ('module:callable') or robot.lerobot "
                             "({type: so101_follower, port: ..., ...})")
        keys = ("action_low", "action_high", "max_episode_steps", "name", "calibrate", "torque_off_after_estop")
        return cls(robot, control_hz=control_hz, **{k: cfg[k] for k in keys if k in cfg})

    # -- conversions -----------------------------------------------------------------------------------------
    def _obs(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        missing = [k for k in (*self.state_names, *self.cameras) if k not in raw]
        if missing:
            raise RuntimeError(f"robot observation lacks features {missing} it declared")
        obs = {"state": np.asarray([float(raw[k]) for k in self.state_names], np.float32)}
        for k, shape in self.cameras.items():
            img = np.asarray(raw[k])
            if img.shape != shape:
                raise RuntimeError(f"camera {k!r} sent a frame of shape {img.shape}; it declared {shape}")
            obs[self.camera_keys[k]] = img.astype(np.uint8, copy=False)
        return obs

    def _action_dict(self, action: np.ndarray) -> dict[str, float]:
        a = np.asarray(action, np.float64).reshape(-1)
        if a.size != len(self.action_names):
            raise ValueError(f"action has {a.size} values; the robot expects {len(self.action_names)} "
                             f"({self.action_names})")
        return {k: float(v) for k, v in zip(self.action_names, a)}

    # -- ControlInterface ----------------------------------------------------------------------------------------
    def _connect(self) -> None:
        if getattr(self.robot, "is_connected", False):
            return
        params = inspect.signature(self.robot.connect).parameters
        try:
            self.robot.connect(calibrate=self.calibrate) if "calibrate" in params else self.robot.connect()
        except EOFError:  # LeRobot's calibrate() asks on stdin, and there is none (a service, a pipe)
            raise CLIError(f"{self.spec.robot}: the motors' calibration differs from LeRobot's calibration file "
                           "and LeRobot asks what to do on stdin, which is closed: run once from a terminal "
                           "(ENTER writes the file to the motors), or calibrate with lerobot-calibrate") from None
        except (ConnectionError, OSError, RuntimeError) as exc:  # wrong port, unplugged, a motor missing
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""  # e.g. [Errno 13] Permission denied: not in dialout
            raise CLIError(f"{self.spec.robot} did not connect: {' '.join(str(exc).split())}{cause}") from exc
        if not getattr(self.robot, "is_calibrated", True):  # `calibrate: false` skipped LeRobot's check
            raise CLIError(f"{self.spec.robot}: the motors' calibration differs from LeRobot's calibration file "
                           "(robot.calibrate is false, so nothing was written): its joint readings and the servos' "
                           "position limits would not be the ones the policy and safety bounds assume. Set "
                           "robot.calibrate: true (LeRobot asks whether to write the file), or run lerobot-calibrate")

    def reset(self, task: str | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        """Connect if needed and read the present observation (a person resets a real scene)."""
        self._connect()
        self._t = 0
        self.estopped = False
        return self._obs(self.robot.get_observation())

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool, dict[str, Any]]:
        command = self._action_dict(action)
        sent = self.robot.send_action(command)
        info: dict[str, Any] = {}
        if isinstance(sent, dict) and sent:
            sent_vec = np.asarray([float(sent.get(k, command[k])) for k in self.action_names], np.float32)
            info["sent_action"] = sent_vec
            if not np.allclose(sent_vec, list(command.values()), atol=1e-6):
                self.robot_clipped += 1
                info["robot_clipped"] = True
        obs = self._obs(self.robot.get_observation())
        self._t += 1
        info["steps"] = self._t
        return obs, False, self._t >= self.spec.max_episode_steps, info

    def stop(self) -> None:
        """Command the measured positions of every actuator whose action name is also an observation."""
        self.estopped = True
        _release_buses(self.robot)
        raw = self.robot.get_observation()
        hold = {k: float(raw[k]) for k in self.action_names if k in raw}
        if len(hold) == len(self.action_names):
            self.robot.send_action(hold)
        else:
            log.error("stop: cannot hold position, actions %s are not observed",
                      sorted(set(self.action_names) - set(hold)))

    def close(self) -> None:
        if self.estopped and not self.torque_off_after_estop:
            _keep_torque_on(self.robot)
        if getattr(self.robot, "is_connected", True):
            self.robot.disconnect()


def _release_buses(robot) -> None:
    """Free the robot's motor buses for the e-stop's hold. A signal (Ctrl-C, SIGTERM) raised inside a bus
    transaction leaves the Feetech/Dynamixel SDK's port marked busy (`is_using`), so every later read fails with
    "Port is in use!" and the hold never reaches the arm; its unread reply may still sit in the input buffer.
    Mark each port free and drop that input, as LeRobot's own `disconnect()` frees the port before torque-off."""
    parts = [robot, *getattr(robot, "__dict__", {}).values()]  # a bimanual robot holds one robot per arm
    for part in parts:
        for bus in (part, getattr(part, "bus", None)):
            port = getattr(bus, "port_handler", None)
            if port is None or not getattr(port, "is_open", False):
                continue
            port.is_using = False
            try:
                port.ser.reset_input_buffer()
            except Exception as exc:  # noqa: BLE001 - the hold is still tried
                log.debug("stop: could not clear %s's input: %s", getattr(bus, "port", "the bus"), exc)


def _keep_torque_on(robot) -> None:
    """Clear LeRobot's `disable_torque_on_disconnect` on the robot's config and on its arms' (a bimanual robot
    builds one robot per arm from its own config), so disconnecting leaves the motors holding."""
    parts = getattr(robot, "__dict__", {}).values()
    configs = [getattr(robot, "config", None)] + [getattr(part, "config", None) for part in parts]
    for cfg in configs:
        if cfg is not None and getattr(cfg, "disable_torque_on_disconnect", False):
            try:
                cfg.disable_torque_on_disconnect = False
                log.warning("after the e-stop the arm keeps torque on at disconnect (it would drop otherwise); "
                            "set robot.torque_off_after_estop: true to let it go limp")
            except Exception as exc:  # noqa: BLE001 - e.g. a frozen config: say so, the disconnect still runs
                log.error("cannot keep torque on at disconnect (%s): the arm may drop", exc)


def make_lerobot_robot(type: str, **kwargs):  # noqa: A002 - LeRobot's own key name
    """Build a LeRobot robot from its registered config type (needs lerobot and its robot dependencies).

    A missing module is an ImportError naming the pip package to install; an unknown type or config key is a
    ValueError naming what LeRobot accepts (draccus's own errors name neither the file nor the fix)."""
    try:
        import draccus
        import lerobot.robots as robots
        from lerobot.robots import RobotConfig, make_robot_from_config
    except ImportError as exc:
        raise _missing(exc) from None
    failed: dict[str, Exception] = {}
    for mod in pkgutil.iter_modules(robots.__path__):  # config classes register themselves on import
        if type in RobotConfig.get_known_choices():
            break
        try:
            importlib.import_module(f"{robots.__name__}.{mod.name}")
        except Exception as exc:  # noqa: BLE001 - another robot's missing SDK must not stop this one
            failed[mod.name] = exc
            log.debug("lerobot robot module %s unavailable: %s", mod.name, exc)
    known = sorted(RobotConfig.get_known_choices())
    if type not in known:
        close = difflib.get_close_matches(type, known, n=1)
        broken = "; ".join(f"{name}: {_missing_text(e) if isinstance(e, ImportError) else e}"
                           for name, e in failed.items())
        raise ValueError(f"robot.lerobot.type {type!r} is not a LeRobot robot type"
                         + (f" (did you mean {close[0]!r}?)" if close else "") + f"; known: {known}"
                         + (f"; robot modules that did not import: {broken}" if broken else ""))
    config_cls = RobotConfig.get_choice_class(type)
    fields = sorted(f.name for f in dataclasses.fields(config_cls))
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, fields, n=1))
                             else "") for k in unknown]
        raise ValueError(f"robot.lerobot: {', '.join(hints)} not a setting of LeRobot's {type}; it takes {fields}")
    try:
        config = draccus.decode(RobotConfig, {"type": type, **kwargs})
    except draccus.utils.DecodingError as exc:  # a value of the wrong type, a missing required field
        raise ValueError(f"robot.lerobot ({type}): {exc}") from None
    try:
        return make_robot_from_config(config)
    except ImportError as exc:  # the robot's hardware SDK (e.g. scservo_sdk for Feetech motors)
        raise _missing(exc, type) from None


# import name -> what pip installs it: LeRobot 0.4.4's SO-100/101 stack (`lerobot[feetech]` less its torch pin)
PIP_NAMES = {"lerobot": "--no-deps lerobot==0.4.4 (its own deps pin torch<2.11) and draccus==0.10.0 deepdiff "
                        "pyserial feetech-servo-sdk",
             "draccus": "draccus==0.10.0", "deepdiff": "deepdiff", "serial": "pyserial",
             "scservo_sdk": "feetech-servo-sdk", "dynamixel_sdk": "dynamixel-sdk",
             "torchvision": "torchvision (the build matching your torch)"}


def _missing_text(exc: ImportError) -> str:
    module = (exc.name or "").split(".")[0]
    if not (isinstance(exc, ModuleNotFoundError) and module):  # e.g. "cannot import name ...": a version skew
        return str(exc)
    return f"needs the Python module {module!r}, which is not installed: pip install {PIP_NAMES.get(module, module)}"


def _missing(exc: ImportError, robot_type: str | None = None) -> ImportError:
    """An ImportError naming the missing module and the pip package that provides it."""
    what = f"robot type {robot_type!r}" if robot_type else "robot.lerobot"
    return ImportError(f"{what} {_missing_text(exc)} (the whole stack: the Makefile's lerobot lines, as "
                       "`make install` runs them); or drive the arm through robot.factory")
