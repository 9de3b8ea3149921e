"""Env workers: subprocesses that host the envs of several lanes and execute whole action chunks.

Why our own workers and not gymnasium's AsyncVectorEnv: (1) one message per *chunk* (up to n_action_steps
env steps, stopping early at success) instead of one per step; (2) a dead or hung worker is detected, replaced
and its lanes restored (AsyncVectorEnv has no recovery: one dead worker breaks the whole vector env);
(3) episodes are `ChainEpisode`s (seeded resets, subtask switches with carried scene state) rather than gym's
autoreset; (4) `workers=0` runs the same protocol in-process, which is how the tests prove that the worker
count does not change results.

Protocol (each request gets exactly one reply, in order):
  ("start", lane, job, replay_actions, fault)    -> obs after reset and replaying the given actions
  ("step", lane, actions[n, A] | n_expert)      -> up to n steps; stops early at a subtask switch or the end
Replies are ("ok", payload) or ("error", lane, traceback text) for exceptions raised by the env code.
`fault` (tests only, None otherwise) makes the worker fail once the episode reaches a step, while replaying or
running: an int step or ("die", step) exits like a segfaulting simulator, ("hang", step) stops answering.
Workers never import torch. A simulator that needs another interpreter (LIBERO, `robodit.envs.INTERPRETERS`)
gets workers started in that interpreter (`python -m robodit.evaluation.workers FD`), with the same protocol.

Observations a policy never reads are not rendered: within a chunk of n actions only the last `obs_tail`
steps' observations travel back, so the env's cameras are switched off (`set_render`) for the others. For
LIBERO, whose frames cost 3-4 physics steps each, that is most of an evaluation's time.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections import OrderedDict
from typing import Any

import numpy as np

from robodit.envs import foreign_python
from robodit.evaluation.chains import ChainEpisode, Job


class WorkerCrash(RuntimeError):
    def __init__(self, wid: int, pid: int | None, exitcode: int | None, reason: str):
        super().__init__(f"env worker {wid} (pid {pid}) {reason} (exit code {exitcode})")
        self.wid, self.pid, self.exitcode, self.reason = wid, pid, exitcode, reason


class WorkerState:
    """The envs and episodes of the lanes one worker hosts; `handle` executes one request."""

    def __init__(self, env_prefix: str, env_kwargs: dict, obs_tail: int, pool_size: int = 4):
        self.prefix, self.kwargs, self.obs_tail, self.pool_size = env_prefix, dict(env_kwargs), obs_tail, pool_size
        self.pools: dict[int, OrderedDict] = {}
        self.episodes: dict[int, ChainEpisode] = {}
        self.faults: dict[int, tuple[str, int] | None] = {}

    def _maker(self, lane: int, job: Job):
        pool = self.pools.setdefault(lane, OrderedDict())
        kwargs = dict(self.kwargs, seed=job.seed)
        if job.max_steps:
            kwargs["max_episode_steps"] = job.max_steps

        def make(task: str):
            key = (task, kwargs.get("max_episode_steps"))
            env = pool.pop(key, None)
            if env is None:
                from robodit.envs import make_env

                env = make_env(f"{self.prefix}/{task}", **kwargs)
            pool[key] = env  # most recently used last
            while len(pool) > self.pool_size:
                old_key = next(k for k in pool if k != key)
                pool.pop(old_key).close()
            return env

        return make

    def handle(self, msg: tuple) -> tuple:
        op, lane = msg[0], msg[1]
        try:
            if op == "start":
                return "ok", self._start(lane, *msg[2:])
            if op == "step":
                return "ok", self._step(lane, msg[2])
            raise ValueError(f"unknown request {op!r}")
        except Exception:  # noqa: BLE001 - any env failure is reported as that episode's error
            self.episodes.pop(lane, None)
            return "error", lane, traceback.format_exc(limit=8)

    def _start(self, lane: int, job: Job, replay: list[np.ndarray], fault) -> dict:
        ep = ChainEpisode(job.tasks, job.seed, job.max_steps, self._maker(lane, job), record=False)
        self.faults[lane] = _parse_fault(fault)
        obs = ep.start()
        for i, action in enumerate(replay):  # crash recovery: the same actions give the same states (MuJoCo is
            ep.env.set_render(i >= len(replay) - self.obs_tail)  # deterministic; rendering changes no state)
            obs, _ = ep.apply(action)
            self._maybe_fail(lane, ep)
        ep.env.set_render(True)
        ep.record = job.record
        if job.record and not replay:
            ep.frames.append(ep.env.render())
        self.episodes[lane] = ep
        spec = ep.env.spec
        return {"obs": [obs], "sub": ep.sub, "event": None, "executed": np.zeros((0, spec.action_dim), np.float32),
                "action_low": spec.action_low, "action_high": spec.action_high, "frames": self._frames(ep),
                "video_fps": spec.control_hz / ep.video_stride}

    def _step(self, lane: int, actions) -> dict:
        ep = self.episodes[lane]
        expert = isinstance(actions, (int, np.integer))
        n = int(actions) if expert else len(actions)
        tail, executed, event = [], [], None
        for i in range(n):
            action = ep.expert_action() if expert else actions[i]
            ep.env.set_render(i >= n - self.obs_tail)
            obs, event = ep.apply(action)
            executed.append(np.asarray(action, np.float32))
            tail.append(obs)
            self._maybe_fail(lane, ep)
            if event is not None:
                break
        ep.env.set_render(True)  # a subtask switch's fresh env and the next start render as usual
        if event == "done":
            self.episodes.pop(lane)
        return {"obs": tail[-self.obs_tail:], "sub": ep.sub, "event": event, "executed": np.stack(executed),
                "successes": list(ep.successes), "steps": list(ep.steps),
                "satisfied_at_start": list(ep.satisfied_at_start), "frames": self._frames(ep)}

    def _maybe_fail(self, lane: int, ep: ChainEpisode) -> None:
        """Fault injection for tests: die like a segfaulting simulator, or hang like a stuck one."""
        fault = self.faults.get(lane)
        if fault is not None and sum(ep.steps) + ep.t >= fault[1]:
            if fault[0] == "hang":
                time.sleep(3600)  # the engine's timeout kills this process long before
            os._exit(17)

    @staticmethod
    def _frames(ep: ChainEpisode) -> list:
        frames, ep.frames = ep.frames, []
        return frames

    def close(self) -> None:
        for pool in self.pools.values():
            for env in pool.values():
                env.close()
        self.pools.clear()


def _parse_fault(fault) -> tuple[str, int] | None:
    """None, a step (die there) or (kind, step) with kind "die" | "hang" -> (kind, step)."""
    if fault is None:
        return None
    kind, step = ("die", fault) if isinstance(fault, (int, np.integer)) else fault
    if kind not in ("die", "hang"):
        raise ValueError(f"unknown fault {fault!r}: expected a step, ('die', step) or ('hang', step)")
    return str(kind), int(step)


def _worker_main(conn, env_prefix: str, env_kwargs: dict, obs_tail: int) -> None:
    state = WorkerState(env_prefix, env_kwargs, obs_tail)
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            conn.send(state.handle(msg))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        state.close()


class LocalWorker:
    """The worker protocol executed in this process (workers=0): no IPC, same results."""

    pid = None
    answered = True

    def __init__(self, wid: int, env_prefix: str, env_kwargs: dict, obs_tail: int):
        self.wid = wid
        self.state = WorkerState(env_prefix, env_kwargs, obs_tail)
        self.replies: dict[int, tuple] = {}
        self.pending: OrderedDict[int, tuple] = OrderedDict()
        self._next = 0

    def send(self, msg: tuple) -> int:
        if msg[0] == "start" and msg[4] is not None:
            raise ValueError("crash injection needs subprocess workers (workers >= 1)")
        token, self._next = self._next, self._next + 1
        self.replies[token] = self.state.handle(msg)
        return token

    def result(self, token: int, timeout: float | None = None) -> tuple:
        return self.replies.pop(token)

    def close(self) -> None:
        self.state.close()


_CTX = None
_PRELOAD = ["robodit.evaluation.workers", "robodit.envs.metaworld", "metaworld.env_dict", "metaworld.policies"]


def _context():
    """A forkserver that has imported the simulators (never torch, never the caller's __main__): a new or
    replacement worker is a fork of it, ready in milliseconds. Plain fork is unsafe once torch threads or GL
    contexts exist in this process; spawn re-imports __main__ in every worker (seconds each)."""
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _CTX = ctx
    return _CTX


class ProcessWorker:
    """One subprocess (a forkserver child, or `python`'s when given); requests are pipelined, replies matched to
    tokens in send order."""

    def __init__(self, wid: int, env_prefix: str, env_kwargs: dict, obs_tail: int, python: str | None = None):
        self.wid = wid
        if python is None:
            ctx = _context()
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_worker_main, args=(child, env_prefix, dict(env_kwargs), obs_tail),
                                    daemon=True, name=f"robodit-env-{wid}")
            self.proc.start()
            child.close()
        else:
            from robodit.envs.interpreter import spawn

            self.proc, self.conn = spawn(python, "robodit.evaluation.workers")
            self.conn.send((env_prefix, dict(env_kwargs), obs_tail))
        self.pid = self.proc.pid
        self.pending: OrderedDict[int, tuple] = OrderedDict()  # token -> request, oldest first
        self.replies: dict[int, tuple] = {}
        self.answered = False
        self._next = 0

    def send(self, msg: tuple) -> int:
        token, self._next = self._next, self._next + 1
        self.pending[token] = msg
        try:
            self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # noticed on the next receive, with the exit code
        return token

    def result(self, token: int, timeout: float | None = None) -> tuple:
        while token not in self.replies:
            if not self.conn.poll(timeout):
                self.kill()
                raise WorkerCrash(self.wid, self.pid, self.proc.exitcode, f"sent no reply for {timeout:.0f} s")
            try:
                reply = self.conn.recv()
            except (EOFError, ConnectionResetError, OSError):
                self.proc.join(timeout=5)
                raise WorkerCrash(self.wid, self.pid, self.proc.exitcode, "died") from None
            oldest = next(iter(self.pending))
            self.pending.pop(oldest)
            self.replies[oldest] = reply
            self.answered = True
        return self.replies.pop(token)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)

    def close(self) -> None:
        try:
            self.conn.send(("close", None))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.kill()
        self.conn.close()


def make_worker(wid: int, subprocess: bool, env_prefix: str, env_kwargs: dict, obs_tail: int) -> Any:
    if not subprocess:  # in this process; a simulator of another interpreter is reached through ForeignEnv
        return LocalWorker(wid, env_prefix, env_kwargs, obs_tail)
    return ProcessWorker(wid, env_prefix, env_kwargs, obs_tail, python=foreign_python(env_prefix))


if __name__ == "__main__":  # a worker in another interpreter (ProcessWorker with python=...)
    from robodit.envs.interpreter import child_connection

    _conn = child_connection()
    _worker_main(_conn, *_conn.recv())
