"""Envs whose simulator needs another Python interpreter (LIBERO: robosuite 1.4 beside our robosuite 1.5).

`spawn(python, module)` starts `python -m module FD` with one end of a socket pair as a
`multiprocessing.connection.Connection` (pickled messages, as between our own worker processes) and the
checkout's robodit first on its path, so both sides run the same code. `ChildProcess` gives the Popen the
`multiprocessing.Process` face the evaluation workers use (is_alive, exitcode, kill, join).

`ForeignEnv` is a `ControlInterface` in this process whose env lives in such a child (`make_env` returns one
for `libero/...` outside `.venv-libero`): `collect`, goal-image rendering and in-process evaluation
(workers=0) use it like any env. Evaluation workers (robodit/evaluation/workers.py) instead run whole in the
other interpreter, so their steps cross no extra pipe.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from robodit.envs.base import ControlInterface

_ROBODIT_ROOT = str(Path(__file__).resolve().parents[2])


class ForeignEnvError(RuntimeError):
    """The env in the other interpreter raised; the message carries its traceback."""


class ChildProcess:
    """A Popen with the methods of `multiprocessing.Process` that the workers call."""

    def __init__(self, popen: subprocess.Popen):
        self.popen, self.pid = popen, popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def spawn(python: str, module: str) -> tuple[ChildProcess, Connection]:
    """Start `python -m module FD`; returns the process and this side's connection."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_ROBODIT_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("MUJOCO_GL", "egl")
    try:
        popen = subprocess.Popen([python, "-m", module, str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env,
                                 stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    return ChildProcess(popen), Connection(ours.detach())


def child_connection() -> Connection:
    """In a spawned child: the connection to its parent (argv[1] is the descriptor)."""
    return Connection(int(sys.argv[1]))


class ForeignEnv(ControlInterface):
    """`make_env(name, **kwargs)` run in the interpreter `python`, driven over a pipe.

    Calls are forwarded one request each; the env's `spec` and `config()` are fetched once. `set_render` rides
    along with the next step instead of costing a message of its own."""

    def __init__(self, python: str, name: str, **kwargs):
        self.name = name
        self._proc, self._conn = spawn(python, "robodit.envs.interpreter")
        self._render: bool | None = None
        self.spec, self._config = self._call("make", name, kwargs)

    def _call(self, op: str, *args) -> Any:
        try:
            self._conn.send((op, *args))
            status, value = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self._proc.join(timeout=5)
            raise ForeignEnvError(f"{self.name}: its interpreter (pid {self._proc.pid}) died "
                                  f"(exit code {self._proc.exitcode}); its output above says why") from None
        if status == "error":
            raise ForeignEnvError(f"{self.name} (in {self._proc.popen.args[0]}):\n{value}")
        return value

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def reset(self, task: str | None = None, seed: int | None = None) -> dict[str, np.ndarray]:
        return self._call("reset", task, seed)

    def step(self, action: np.ndarray):
        render, self._render = self._render, None
        return self._call("step", np.asarray(action, np.float32), render)

    def set_render(self, on: bool) -> None:
        self._render = bool(on)

    def render(self) -> np.ndarray | None:
        return self._call("call", "render", ())

    def observe(self) -> dict[str, np.ndarray]:
        return self._call("call", "observe", ())

    def instruction(self, task: str | None = None) -> str:
        return self._call("call", "instruction", (task,))

    def expert_action(self, obs=None) -> np.ndarray:
        return self._call("call", "expert_action", ())

    def close(self) -> None:
        if getattr(self, "_proc", None) is None:
            return
        try:
            self._conn.send(("close",))
            self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            pass
        self._proc.join(timeout=10)
        self._proc.kill()
        self._conn.close()
        self._proc = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _serve(conn: Connection) -> None:
    """The child's loop: one reply per request, exceptions returned as text."""
    from robodit.envs import make_env

    env = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        op = msg[0]
        try:
            if op == "make":
                env = make_env(msg[1], **msg[2])
                value = (env.spec, env.config() if hasattr(env, "config") else {})
            elif op == "reset":
                value = env.reset(task=msg[1], seed=msg[2])
            elif op == "step":
                if msg[2] is not None:
                    env.set_render(msg[2])
                value = env.step(msg[1])
            elif op == "call":
                value = getattr(env, msg[1])(*msg[2])
            elif op == "close":
                conn.send(("ok", None))
                break
            else:
                raise ValueError(f"unknown request {op!r}")
            conn.send(("ok", value))
        except Exception:  # noqa: BLE001 - returned to the caller, who raises it
            conn.send(("error", traceback.format_exc(limit=8)))
    if env is not None:
        env.close()


if __name__ == "__main__":
    _serve(child_connection())
