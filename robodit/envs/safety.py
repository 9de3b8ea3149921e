"""A safety layer that wraps any ControlInterface: what stands between a policy and a real arm.

Every command passes, in order: a finiteness check (NaN/inf → e-stop or hold, per config), per-dimension bounds,
a maximum change per step, and an end-effector workspace box (where the robot reports its pose). Whatever is
changed is clipped AND reported: counted in `stats`, listed in `info["safety"]`, and logged (rate-limited per
kind, with the count of suppressed repeats, so a 30 Hz loop cannot flood the log yet nothing goes unsaid).

A watchdog thread acts when no fresh action arrives within `timeout_ms` (a slow or crashed policy): `hold`
sends a hold command at the loop's rate, `stop` e-stops. A hold is `hold_action` (a `null` entry keeps that
dimension's last command, e.g. a gripper's grasp), else zero on a delta robot (velocity-like commands: stand
still) and the last safe command on an absolute one (a position target stays put). A hold passes the same
bounds / max_delta / workspace filter as any command and becomes the rate limiter's reference.

`estop(reason)` may be called from any thread (keyboard, pedal, the loop's Ctrl-C or error); it latches until
`rearm()`, so a later `reset()` cannot silently restart a robot that was stopped for a reason.
"""

from __future__ import annotations

import collections
import difflib
import logging
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

import numpy as np

from robodit.envs.base import ControlInterface, EnvSpec

log = logging.getLogger("robodit.safety")


class SafetyStop(RuntimeError):
    """The robot was e-stopped (operator, watchdog, bad action); `rearm()` before the next `reset()`."""


@dataclass
class SafetyConfig:
    """The `safety:` section of a robot config (configs/robot/*.yaml). Unknown keys are an error."""

    action_low: list[float] | None = None  # per-dimension bounds; default: the robot's own spec
    action_high: list[float] | None = None
    max_delta: float | list[float] | None = None  # largest change of each dimension between two commands
    max_delta_reference: dict | None = None  # {key, index}: first command is limited relative to measured values
    workspace: dict | None = None  # {low, high, pose_key, pose_index, action_index, mode: delta|absolute, scale}
    watchdog: dict = field(default_factory=lambda: {"timeout_ms": 500, "on_timeout": "hold"})  # + hold_action
    action_mode: str | None = None  # delta | absolute: what a hold sends; default: the robot's, else the workspace's
    nonfinite: str = "estop"  # estop | hold: what a NaN / inf command does
    stop_action: list[float] | None = None  # sent once on e-stop (e.g. zero velocities); default: none
    allow_unbounded: bool = False  # infinite bounds are refused unless explicitly allowed
    log_interval_s: float = 1.0  # per violation kind, at most one log line per interval (+ suppressed count)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SafetyConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"unknown safety option {msg}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.watchdog = _check_watchdog(dict(cls().watchdog, **(cfg.watchdog or {})))
        if cfg.nonfinite not in ("estop", "hold"):
            raise ValueError(f"safety.nonfinite must be 'estop' or 'hold', got {cfg.nonfinite!r}")
        if cfg.action_mode not in (None, "delta", "absolute"):
            raise ValueError(f"safety.action_mode must be 'delta' or 'absolute', got {cfg.action_mode!r}")
        if cfg.max_delta is not None and not (np.asarray(cfg.max_delta, np.float64) >= 0).all():
            raise ValueError(f"safety.max_delta must be >= 0 in every dimension, got {cfg.max_delta}: a negative "
                             "limit would move the robot by itself")
        if cfg.max_delta_reference is not None:
            _check_keys(cfg.max_delta_reference, {"key", "index"}, "safety.max_delta_reference")
        if cfg.workspace is not None:
            ws = dict({"pose_key": "state", "pose_index": [0, 1, 2], "action_index": [0, 1, 2], "mode": "delta",
                       "scale": 1.0}, **cfg.workspace)
            if ws["mode"] not in ("delta", "absolute"):
                raise ValueError(f"safety.workspace.mode must be 'delta' or 'absolute', got {ws['mode']!r}")
            for k in ("low", "high"):
                if k not in ws:
                    raise ValueError(f"safety.workspace needs {k!r} (a box in the pose's units)")
            _check_keys(ws, {"low", "high", "pose_key", "pose_index", "action_index", "mode", "scale"},
                        "safety.workspace")
            n = len(ws["pose_index"])
            if not len(ws["low"]) == len(ws["high"]) == len(ws["action_index"]) == n:
                raise ValueError("safety.workspace: low, high, pose_index and action_index must have equal length")
            inverted = np.flatnonzero(np.asarray(ws["low"], np.float64) > np.asarray(ws["high"], np.float64))
            if inverted.size:
                raise ValueError(f"safety.workspace: low > high in dims {inverted.tolist()} (low {ws['low']}, "
                                 f"high {ws['high']})")
            if not float(ws["scale"]) > 0:
                raise ValueError(f"safety.workspace.scale must be > 0, got {ws['scale']!r}")
            cfg.workspace = ws
        return cfg


def _check_keys(d: dict, known: set[str], where: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ValueError(f"unknown {where} option(s) {unknown}; known: {sorted(known)}")


def _check_watchdog(wd: dict) -> dict:
    """A watchdog cannot be switched off: a non-positive timeout is refused, not read as 'never'."""
    _check_keys(wd, {"timeout_ms", "on_timeout", "hold_action"}, "safety.watchdog")
    if wd["on_timeout"] not in ("hold", "stop"):
        raise ValueError(f"safety.watchdog.on_timeout must be 'hold' or 'stop', got {wd['on_timeout']!r}")
    timeout = wd["timeout_ms"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ValueError(f"safety.watchdog.timeout_ms must be a positive number of milliseconds, got {timeout!r} "
                         "(the watchdog cannot be turned off)")
    return wd


def _vec(x, n: int, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)  # a None entry becomes NaN (hold_action: keep that dimension)
    if v.ndim == 0:
        v = np.full(n, float(v))
    if v.shape != (n,):
        raise ValueError(f"safety.{name} has {v.size} values; the robot's action has {n} dimensions")
    return v


class SafeRobot(ControlInterface):
    """`SafeRobot(robot, SafetyConfig | dict, on_estop=[callback(reason)])`; same ControlInterface as `robot`."""

    def __init__(self, robot: ControlInterface, config: SafetyConfig | dict | None = None,
                 on_estop: list[Callable[[str], None]] | Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, watchdog_thread: bool = True,
                 control_hz: float | None = None):
        """`control_hz`: the loop's rate, which the watchdog holds at (default: the robot's own control_hz,
        which for a simulator is its physics rate, not what the loop asked for)."""
        self.robot = robot
        self.config = cfg = config if isinstance(config, SafetyConfig) else SafetyConfig.from_dict(config)
        n = robot.spec.action_dim
        self.low = _vec(cfg.action_low if cfg.action_low is not None else robot.spec.action_low, n, "action_low")
        self.high = _vec(cfg.action_high if cfg.action_high is not None else robot.spec.action_high, n, "action_high")
        if np.any(self.low > self.high):
            raise ValueError(f"safety bounds are inverted: low {self.low} > high {self.high}")
        if not cfg.allow_unbounded and not (np.isfinite(self.low).all() and np.isfinite(self.high).all()):
            raise ValueError("action bounds are infinite: set safety.action_low/action_high for this robot "
                             "(or allow_unbounded: true, which is not safe on hardware)")
        self.max_delta = None if cfg.max_delta is None else _vec(cfg.max_delta, n, "max_delta")
        self.hold_action = None if cfg.watchdog.get("hold_action") is None else \
            _vec(cfg.watchdog["hold_action"], n, "watchdog.hold_action")
        self.stop_action = None if cfg.stop_action is None else _vec(cfg.stop_action, n, "stop_action")
        if self.stop_action is not None and not np.isfinite(self.stop_action).all():
            raise ValueError(f"safety.stop_action {cfg.stop_action} must be finite in every dimension")
        ws_mode = cfg.workspace["mode"] if cfg.workspace else None
        self.action_mode = cfg.action_mode or robot.spec.extra.get("action_mode") or ws_mode or "absolute"
        for name, v in (("watchdog.hold_action", self.hold_action), ("stop_action", self.stop_action)):
            if v is not None and (np.any(v < self.low) or np.any(v > self.high)):
                raise ValueError(f"safety.{name} {v.tolist()} lies outside the action bounds")
        if self.action_mode == "delta" and self.hold_action is None and (np.any(self.low > 0) or np.any(self.high < 0)):
            raise ValueError("a delta robot holds with a zero action, which lies outside the action bounds "
                             f"{self.low.tolist()}..{self.high.tolist()}: set safety.watchdog.hold_action")
        self.timeout_s = float(cfg.watchdog["timeout_ms"]) / 1000.0
        self.control_hz = float(control_hz or robot.spec.control_hz or 10.0)
        self.spec: EnvSpec = replace(robot.spec, action_low=self.low.astype(np.float32),
                                     action_high=self.high.astype(np.float32))
        self.clock = clock
        self.callbacks = list(on_estop) if isinstance(on_estop, (list, tuple)) else ([on_estop] if on_estop else [])
        self.stats: collections.Counter = collections.Counter()
        self._log_state: dict[str, list[float]] = {}  # kind -> [last log time, suppressed count]
        self._lock = threading.RLock()
        self._latch = threading.Lock()
        self._last_safe: np.ndarray | None = None
        self._last_obs: dict[str, np.ndarray] | None = None
        self._last_fresh: float | None = None  # time of the last policy action; None = watchdog not armed
        self._holding = False
        self.stopped: str | None = None  # the e-stop reason while latched
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._use_thread = watchdog_thread and self.timeout_s > 0
        self._check_reads({k: v.shape for k, v in robot.spec.observation.items()})

    # -- reporting --------------------------------------------------------------------------------------------
    def _report(self, kind: str, msg: str, level: int = logging.WARNING) -> None:
        self.stats[kind] += 1
        now = time.monotonic()
        last, suppressed = self._log_state.get(kind, (-1e9, 0))
        if now - last >= self.config.log_interval_s:
            more = f" ({int(suppressed)} more since last report)" if suppressed else ""
            log.log(level, "safety %s: %s%s", kind, msg, more)
            self._log_state[kind] = [now, 0]
        else:
            self._log_state[kind] = [last, suppressed + 1]

    def summary(self) -> dict[str, int]:
        return dict(self.stats)

    # -- the filter -------------------------------------------------------------------------------------------
    def filter_action(self, action: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Return the command that may be sent and the violation kinds found (each one reported)."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != self.low.shape:
            raise ValueError(f"action has {a.size} values; the robot expects {self.low.size}")
        kinds: list[str] = []
        if not np.isfinite(a).all():
            bad = np.flatnonzero(~np.isfinite(a)).tolist()
            if self.config.nonfinite == "estop":
                self.estop(f"non-finite action in dims {bad}")
                raise SafetyStop(self.stopped)
            fallback = self._hold_command()
            if fallback is None:
                self.estop(f"non-finite action in dims {bad} and no command to hold")
                raise SafetyStop(self.stopped)
            self._report("nonfinite", f"NaN/inf in dims {bad}; holding")
            a, kinds = fallback, ["nonfinite"]  # the hold passes the rest of the filter like any command
        clipped = np.clip(a, self.low, self.high)
        if not np.array_equal(clipped, a):
            dims = np.flatnonzero(clipped != a).tolist()
            self._report("bounds", f"dims {dims} {a[dims].round(4).tolist()} clipped to "
                                   f"{clipped[dims].round(4).tolist()}")
            kinds.append("bounds")
        a = clipped
        ref = self._last_safe if self._last_safe is not None else self._measured_reference()
        if self.max_delta is not None and ref is not None:
            limited = np.clip(a, ref - self.max_delta, ref + self.max_delta)
            if not np.array_equal(limited, a):
                dims = np.flatnonzero(limited != a).tolist()
                self._report("max_delta", f"dims {dims} changed by {(a - ref)[dims].round(4).tolist()} "
                                          f"(limit {self.max_delta[dims].round(4).tolist()}); clipped")
                kinds.append("max_delta")
            a = limited
        ws = self.config.workspace
        if ws is not None:
            a = self._workspace(a, ws, kinds)
        return np.clip(a, self.low, self.high), kinds

    def _measured_reference(self) -> np.ndarray | None:
        ref = self.config.max_delta_reference
        if not ref or self._last_obs is None:
            return None
        ref_vals = np.asarray(self._last_obs[ref.get("key", "state")], np.float64).reshape(-1)
        return ref_vals[list(ref.get("index", range(self.low.size)))]

    def _check_reads(self, shapes: dict[str, tuple]) -> None:
        """Every observation entry the config reads exists: checked from the spec at construction and from the
        first observation at reset, so a typo is an error before the first command, not a KeyError mid-run."""
        reads = []
        ref = self.config.max_delta_reference
        if ref:
            index = list(ref.get("index", range(self.low.size)))
            if len(index) != self.low.size:
                raise ValueError(f"safety.max_delta_reference.index has {len(index)} values; the robot's action "
                                 f"has {self.low.size} dimensions")
            reads.append(("safety.max_delta_reference.key", ref.get("key", "state"), index))
        ws = self.config.workspace
        if ws is not None and ws["mode"] == "delta":
            reads.append(("safety.workspace.pose_key", ws["pose_key"], list(ws["pose_index"])))
        for name, key, index in reads:
            if key not in shapes:
                raise ValueError(f"{name} reads observation {key!r}, which the robot does not report "
                                 f"(keys: {sorted(shapes)})")
            size = int(np.prod(shapes[key]))
            out = [i for i in index if not -size <= int(i) < size]
            if out:
                raise ValueError(f"{name}: index {out} out of range for observation {key!r} of size {size}")

    def _workspace(self, a: np.ndarray, ws: dict, kinds: list[str]) -> np.ndarray:
        idx = list(ws["action_index"])
        lo, hi = np.asarray(ws["low"], np.float64), np.asarray(ws["high"], np.float64)
        if ws["mode"] == "absolute":  # the command is a target pose: keep it in the box
            amin, amax = lo, hi
        else:  # the command moves the pose by scale * a: allow only moves that stay in (or head back into) the box
            pose = np.asarray(self._last_obs[ws["pose_key"]], np.float64).reshape(-1)[list(ws["pose_index"])]
            scale = float(ws["scale"])
            amin = np.minimum((lo - pose) / scale, 0.0)  # already outside: never forced to move, only held back
            amax = np.maximum((hi - pose) / scale, 0.0)
        part = np.clip(a[idx], amin, amax)
        if not np.array_equal(part, a[idx]):
            self._report("workspace", f"action dims {idx} {a[idx].round(4).tolist()} would leave the box; "
                                      f"clipped to {part.round(4).tolist()}")
            kinds.append("workspace")
            a = a.copy()
            a[idx] = part
        return a

    def _hold_command(self) -> np.ndarray | None:
        """hold_action (NaN entries keep the last command), else zero on a delta robot (a re-sent velocity would
        drift), else the last safe command; None when there is nothing to hold yet."""
        last = self._last_safe
        if self.hold_action is not None:
            keep = np.isnan(self.hold_action)
            if keep.any() and last is None:
                return None
            return np.where(keep, last if last is not None else 0.0, self.hold_action)
        if self.action_mode == "delta":
            return np.zeros_like(self.low)
        return last

    # -- ControlInterface -------------------------------------------------------------------------------------
    def reset(self, task: str | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        if self.stopped:
            raise SafetyStop(f"robot is e-stopped ({self.stopped}); call rearm() after checking it")
        with self._lock:
            self._last_fresh = None  # armed again by the first action
            self._last_safe = None
            self._holding = False
            obs = self.robot.reset(task=task, seed=seed)
            self._last_obs = obs
        self._check_reads({k: np.shape(v) for k, v in obs.items()})
        if self._use_thread and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="robodit-watchdog", daemon=True)
            self._thread.start()
        return obs

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool, bool, dict[str, Any]]:
        with self._lock:
            if self.stopped:
                raise SafetyStop(f"robot is e-stopped ({self.stopped})")
            if self._last_obs is None:
                raise RuntimeError("call reset() before step()")
            safe, kinds = self.filter_action(action)
            if self._holding:
                self._report("watchdog_resume", "fresh action received; resuming", logging.INFO)
                self._holding = False
            if self.stopped:  # e-stopped from another thread while this command was being checked
                raise SafetyStop(f"robot is e-stopped ({self.stopped})")
            obs, success, done, info = self.robot.step(safe.astype(np.float32))
            self._last_safe, self._last_obs, self._last_fresh = safe, obs, self.clock()
        info = dict(info, safety=kinds, requested_action=np.asarray(action, np.float32), safe_action=safe)
        return obs, success, done, info

    def render(self):
        return self.robot.render()

    # -- watchdog and e-stop ----------------------------------------------------------------------------------
    def check_watchdog(self, now: float | None = None) -> str | None:
        """One watchdog tick (the thread calls this; tests may call it with a fake time): 'hold', 'stop' or None."""
        with self._lock:
            if self.stopped or self._last_fresh is None or self.timeout_s <= 0:
                return None
            now = self.clock() if now is None else now
            late = now - self._last_fresh
            if late <= self.timeout_s:
                return None
            if self.config.watchdog["on_timeout"] == "stop":
                self.estop(f"watchdog: no fresh action for {1000 * late:.0f} ms "
                           f"(timeout {1000 * self.timeout_s:.0f} ms)")
                return "stop"
            command = self._hold_command()
            self._holding = True
            self._report("watchdog", f"no fresh action for {1000 * late:.0f} ms (timeout "
                                     f"{1000 * self.timeout_s:.0f} ms); holding")
            if command is not None:
                safe, _ = self.filter_action(command)  # bounds, max_delta, workspace: a hold is a command too
                obs, *_ = self.robot.step(safe.astype(np.float32))
                self._last_safe, self._last_obs = safe, obs  # the next command is rate-limited from the hold
            return "hold"

    def _watch(self) -> None:
        period = 1.0 / max(self.control_hz, 1.0)
        while not self._closing.wait(min(period, self.timeout_s / 2)):
            try:
                self.check_watchdog()
            except Exception as exc:  # a failing hold must not kill the watchdog silently
                log.error("safety watchdog: hold command failed: %s; e-stopping", exc)
                self.estop(f"watchdog hold failed: {exc}")

    def estop(self, reason: str) -> None:
        """Latch a stop from any thread: stop the robot (its estop/stop hook or `stop_action`), tell callbacks."""
        with self._latch:  # latch at once (no lock wait): from now on no command passes `step`
            if self.stopped:
                return
            self.stopped = reason
        self.stats["estop"] += 1
        log.error("safety E-STOP: %s", reason)
        with self._lock:  # the stop hook waits for an in-flight command: a bus takes one at a time
            try:
                hook = getattr(self.robot, "estop", None) or getattr(self.robot, "stop", None)
                if hook is not None:
                    hook()
                elif self.stop_action is not None and self._last_obs is not None:
                    self.robot.step(self.stop_action.astype(np.float32))
            except Exception as exc:
                log.error("safety E-STOP: the robot's stop failed: %s", exc)
        for cb in self.callbacks:
            try:
                cb(reason)
            except Exception as exc:
                log.error("safety E-STOP callback %r failed: %s", cb, exc)

    def add_estop_callback(self, cb: Callable[[str], None]) -> None:
        self.callbacks.append(cb)

    def rearm(self) -> None:
        """Clear a latched e-stop (after a person has checked the robot)."""
        with self._lock:
            if self.stopped:
                log.warning("safety: re-armed after e-stop (%s)", self.stopped)
            self.stopped = None
            self._last_fresh = None

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self.stats:
            log.info("safety summary: %s", dict(self.stats))
        self.robot.close()
