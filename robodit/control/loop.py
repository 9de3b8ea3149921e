"""The real-time control loop behind `robodit run`: one loop for simulators, dry runs and hardware.

Each tick at 1/hz: take the observation window, ask the chunk executor for a command, send it through the
safety layer, record timing. Ticks are scheduled on an absolute grid (t0 + k/hz), so sleep error does not
accumulate; a tick that overruns a whole period is not replayed in a burst (the grid restarts from now and
the overrun is counted). Per-step timing goes to a JSONL log and a summary (p50/p99 lateness, command
interval jitter, inference time, safety events) is printed at the end.

Whatever ends a run early (Ctrl-C, SIGTERM, a policy or server failure, a robot error) e-stops the robot first
and is then reported in `LoopResult.stopped`: the robot is never left running a stale command while a traceback
unwinds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from robodit.control.executors import ChunkExecutor
from robodit.envs.safety import SafetyStop
from robodit.control.history import ObservationHistory
from robodit.errors import CLIError

log = logging.getLogger("robodit.control")


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM) raised as an interrupt, so the robot is stopped exactly as for Ctrl-C."""


def describe_stop(exc: BaseException) -> str:
    """One line naming what ended the run."""
    if isinstance(exc, Interrupted):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "operator interrupt (Ctrl-C)"
    return f"failed: {type(exc).__name__}: {exc}"


@dataclass
class LoopResult:
    steps: int
    success: bool
    stopped: str | None  # e-stop / interrupt reason, None when the episode ended normally
    overruns: int
    timings: list[dict[str, Any]] = field(repr=False, default_factory=list)
    executor: dict[str, float] = field(default_factory=dict)
    safety: dict[str, int] = field(default_factory=dict)
    error: BaseException | None = field(default=None, repr=False)  # the exception that stopped the run, if any

    def summary(self, skip: int = 0) -> dict[str, Any]:
        """Lateness of each command against its scheduled tick, and the jitter of the command interval
        (`skip`: leave out the first ticks, e.g. the wait for the first chunk, to see the steady state)."""
        sent = [t for t in self.timings[skip:] if t["sent"]]
        late = np.array([t["send_late_ms"] for t in sent]) if sent else np.zeros(1)
        times = np.array([t["t_send"] for t in sent])
        gaps = np.diff(times) * 1000 if len(times) > 1 else np.zeros(1)
        infer = [t["infer_ms"] for t in self.timings[skip:] if t["infer_ms"] is not None]
        pct = lambda x, q: round(float(np.percentile(x, q)), 2)  # noqa: E731
        return {"steps": self.steps, "sent": len(sent), "success": self.success, "stopped": self.stopped,
                "overruns": self.overruns, "late_p50_ms": pct(late, 50), "late_p99_ms": pct(late, 99),
                "late_max_ms": round(float(late.max()), 2), "interval_mean_ms": round(float(gaps.mean()), 2),
                "interval_std_ms": round(float(gaps.std()), 2), "interval_max_ms": round(float(gaps.max()), 2),
                "infer_p50_ms": pct(infer, 50) if infer else None, "executor": self.executor, "safety": self.safety}


class ControlLoop:
    """`ControlLoop(robot, policy, executor, hz).run(steps)`; `robot` is any ControlInterface (a SafeRobot
    for hardware), `policy` anything with obs_shapes / obs_horizon / reset (local or RemotePolicy)."""

    def __init__(self, robot, policy, executor: ChunkExecutor, hz: float, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 log_path: str | Path | None = None, print_every: int = 0):
        self.robot, self.policy, self.executor = robot, policy, executor
        self.dt, self.clock, self.sleep = 1.0 / float(hz), clock, sleep
        self.log_path = Path(log_path) if log_path else None
        self.print_every = int(print_every)
        self.stop_reason: str | None = None
        if hasattr(robot, "add_estop_callback"):
            robot.add_estop_callback(self.request_stop)

    def request_stop(self, reason: str) -> None:
        """Ends the loop at the next tick (the safety layer's e-stop callback; safe from any thread)."""
        self.stop_reason = self.stop_reason or reason

    def run(self, max_steps: int, task: str | None = None, seed: int | None = None) -> LoopResult:
        self.stop_reason = None  # a new run starts clean: a stop before rearm() belongs to the previous run
        keys = list(self.policy.obs_shapes)
        history = ObservationHistory(int(self.policy.obs_horizon))
        self.policy.reset()
        self.executor.reset()
        obs = self.robot.reset(task=task, seed=seed)
        history.reset(obs)
        timings: list[dict[str, Any]] = []
        logf = open(self.log_path, "w") if self.log_path else None  # noqa: SIM115 - closed in finally
        success, overruns, k, error = False, 0, 0, None
        t0 = t_next = self.clock()
        try:
            for k in range(max_steps):
                if self.stop_reason:
                    break
                now = self.clock()
                if t_next > now:
                    self.sleep(t_next - now)
                    now = self.clock()
                window = history.stacked(keys)
                action = self.executor.next_action(window, now)
                t_send = self.clock()
                info: dict[str, Any] = {}
                done = False
                if action is not None:
                    try:
                        obs, success, done, info = self.robot.step(action)
                    except SafetyStop as exc:
                        self.request_stop(str(exc))
                        break
                    history.push(obs)
                t_end = self.clock()
                infer = self.executor.last_infer_s
                rec = {"step": k, "t_send": t_send - t0, "late_ms": 1000 * (now - t_next),
                       "send_late_ms": 1000 * (t_send - t_next), "policy_ms": 1000 * (t_send - now),
                       "infer_ms": None if infer is None else 1000 * infer, "step_ms": 1000 * (t_end - t_send),
                       "sent": action is not None, "safety": list(info.get("safety", []))}
                timings.append(rec)
                if logf:
                    logf.write(json.dumps(rec) + "\n")
                if self.print_every and (k + 1) % self.print_every == 0:
                    recent = timings[-self.print_every:]
                    print(f"step {k + 1}: late p50 {np.median([r['send_late_ms'] for r in recent]):.1f} ms, "
                          f"max {max(r['send_late_ms'] for r in recent):.1f} ms, "
                          f"safety {sum(len(r['safety']) for r in recent)} events", flush=True)
                if success or done:
                    break
                t_next += self.dt
                if self.clock() > t_next + self.dt:  # a whole period missed: restart the grid, no burst
                    overruns += 1
                    t_next = self.clock()
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the robot is stopped before anything else
            error = exc
            self._emergency_stop(describe_stop(exc))
            if not isinstance(exc, (Exception, KeyboardInterrupt)):  # SystemExit and the like go on up
                raise
        finally:
            if logf:
                logf.close()
        stats = dict(self.executor.stats)
        safety = dict(getattr(self.robot, "stats", {}))
        return LoopResult(len(timings), bool(success), self.stop_reason, overruns, timings, stats, safety, error)

    def _emergency_stop(self, reason: str) -> None:
        """E-stop through the safety layer (latch, hold, callbacks), else the robot's own `stop()`."""
        self.request_stop(reason)
        log.debug("control loop stopped", exc_info=True)
        hook = getattr(self.robot, "estop", None)
        try:
            if hook is not None:
                hook(self.stop_reason)
            elif hasattr(self.robot, "stop"):
                log.error("E-STOP: %s", self.stop_reason)
                self.robot.stop()
        except Exception as exc:  # noqa: BLE001 - reported; the run is over either way
            log.error("E-STOP failed: %s", exc)


def _check_compatible(robot, policy) -> None:
    """Refuse before the first command when the robot cannot feed the policy or take its actions."""
    spec = robot.spec
    if spec.action_dim != policy.action_dim:
        raise ValueError(f"the policy outputs {policy.action_dim}-d actions; robot {spec.robot} takes "
                         f"{spec.action_dim}")
    for key, (shape, dtype) in policy.obs_shapes.items():
        have = spec.observation.get(key)
        if have is None:
            raise ValueError(f"the policy needs observation {key!r}; robot {spec.robot} reports "
                             f"{sorted(spec.observation)}")
        if tuple(have.shape) != tuple(shape):
            raise ValueError(f"observation {key!r}: the policy was trained on {tuple(shape)}, the robot reports "
                             f"{tuple(have.shape)}")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (systemd, `docker stop`, `timeout`) stops the robot as Ctrl-C does. A repeat while shutting down
    is ignored, so the robot is still closed."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            log.warning("%s again: already stopping", signal.Signals(signum).name)
            return
        fired.append(signum)
        raise Interrupted(f"{signal.Signals(signum).name} received")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_policy(args, hz: float):
    from robodit.training import checkpoint as ckpt_io
    if args.policy.startswith(("ws://", "wss://")):
        from robodit.deploy.client import RemotePolicy

        timeout = getattr(args, "policy_timeout", None)
        timeout = 30.0 if timeout is None else float(timeout)
        if not timeout > 0:
            raise CLIError(f"--policy-timeout must be > 0 seconds, got {timeout}")
        try:
            return RemotePolicy(args.policy, token=args.token, timeout=timeout)
        except RuntimeError as exc:
            raise CLIError(str(exc)) from None
    policy = ckpt_io.load_policy(args.policy, device=args.device)
    fps = (getattr(policy, "checkpoint_config", {}).get("store") or {}).get("fps")
    if fps and abs(float(fps) - hz) > 1e-6:
        log.warning("the policy was trained on %.1f Hz demonstrations; running at %.1f Hz changes what each "
                    "action means", float(fps), hz)
    return policy


def _drive(args, cfg: dict, policy, hz: float) -> LoopResult:
    """Build the robot and run the loop. On the way out the robot is closed FIRST (stopped or held, its
    connection released), then the policy (a remote request still in flight fails at once), and only then is
    background inference waited for: a hung server never keeps a live arm waiting."""
    from robodit.control.executors import make_executor, policy_infer
    from robodit.control.robots import build_robot

    strat = dict(cfg.get("strategy") or {})
    name = args.strategy or strat.get("name", "receding")
    n_exec = int(args.n_action_steps or strat.get("n_action_steps") or policy.n_action_steps)
    try:
        robot = build_robot(cfg, policy, dry_run=args.dry_run, hz=hz)
    except ImportError as exc:
        raise CLIError(f"cannot build the robot: {exc}") from None
    executor = None
    try:
        _check_compatible(robot, policy)
        executor = make_executor(name, policy_infer(policy, goal=run_goal(args, policy), seed=args.seed), hz=hz,
                                 n_action_steps=n_exec,
                                 ensemble_m=float(strat.get("ensemble_m", 0.01)),
                                 query_every=int(strat.get("query_every", 1)))
        loop = ControlLoop(robot, policy, executor, hz, log_path=args.log, print_every=max(1, int(hz * 5)))
        dry = " (dry run)" if args.dry_run else ""
        print(f"running {getattr(policy, 'name', 'policy')} on {robot.spec.robot}{dry} "
              f"at {hz:g} Hz, strategy {name}, {args.steps} steps", flush=True)
        return loop.run(args.steps, task=args.task, seed=args.seed)
    finally:
        _close_in_order(robot.close, getattr(policy, "close", None), executor and executor.close)


def run_goal(args, policy) -> dict | None:
    """The goal every inference of a run gets: `--instruction TEXT` (language-conditioned policies) and/or
    `--goal-task NAME` (multi-task ones), which defaults to the simulator's `--task` when the policy reads task ids
    and knows that one."""
    goal = {}
    if getattr(args, "instruction", None):
        goal["instruction"] = args.instruction
    names = list(getattr(policy, "task_names", None) or [])
    reads_task = getattr(policy, "takes_task", False)  # a multi-task family with task ids (not MDT's goal token)
    task = getattr(args, "goal_task", None) or (args.task if reads_task and args.task in names else None)
    if task:
        goal["task"] = task
    return goal or None


def _close_in_order(*closers) -> None:
    """Call every closer even if an earlier one fails (logged); the first failure is raised at the end."""
    first: Exception | None = None
    for close in closers:
        if close is None:
            continue
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - the rest must still be closed
            log.error("closing %s failed: %s", getattr(close, "__self__", close), exc)
            first = first or exc
    if first is not None:
        raise first


def run_command(args) -> None:
    """`robodit run --policy CHECKPOINT_OR_URL --robot CONFIG [--strategy] [--hz] [--dry-run]`."""
    import torch

    from robodit.control.robots import load_robot_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_robot_config(args.robot)
    hz = float(args.hz or cfg.get("control_hz") or 10.0)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = None
    try:
        with _sigterm_as_interrupt():
            policy = _load_policy(args, hz)
            result = _drive(args, cfg, policy, hz)
    except KeyboardInterrupt as exc:  # outside the loop (the loop itself e-stops and returns a result)
        raise CLIError(f"stopped: {describe_stop(exc)}") from None
    finally:
        if hasattr(policy, "close"):
            policy.close()
    print(json.dumps(result.summary(), indent=1), flush=True)
    if result.stopped:
        raise CLIError(f"stopped: {result.stopped}")
