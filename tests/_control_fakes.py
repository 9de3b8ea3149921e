"""Test doubles for the control tests: a fake clock, a recording robot, policies with a fixed answer (or a
failure on cue), and a TCP relay that can freeze like a hung server."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import torch

from robodit.envs.base import ArraySpec, ControlInterface, EnvSpec


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += max(0.0, s)


class RecordingRobot(ControlInterface):
    """State = [x, y, z, gripper]; delta actions move xyz by 0.01 * a; records every command."""

    def __init__(self, action_dim: int = 4, hz: float = 10.0, low=-1.0, high=1.0):
        self.spec = EnvSpec({"state": ArraySpec((4,), "float32")}, action_dim, np.full(action_dim, low, np.float32),
                            np.full(action_dim, high, np.float32), hz, "recording", 10**6)
        self.commands: list[np.ndarray] = []
        self.pose = np.zeros(4, np.float32)
        self.closed = False
        self.stopped = 0

    def reset(self, task=None, seed=None):
        self.pose[:] = 0
        self.commands.clear()
        return {"state": self.pose.copy()}

    def step(self, action):
        a = np.asarray(action, np.float32)
        self.commands.append(a.copy())
        self.pose[:3] += 0.01 * a[:3]
        return {"state": self.pose.copy()}, False, False, {}

    def stop(self):
        self.stopped += 1

    def close(self):
        self.closed = True


class ConstantPolicy:
    """Duck-typed policy: every chunk is `value`; optionally slow (sleeps `delay` s per call)."""

    name = "constant"

    def __init__(self, value, horizon: int = 8, n_action_steps: int = 4, delay: float = 0.0):
        self.value = np.asarray(value, np.float32)
        self.action_dim, self.action_horizon, self.n_action_steps = self.value.size, horizon, n_action_steps
        self.obs_shapes = {"state": ((4,), "float32")}
        self.obs_horizon = 2
        self.delay = delay
        self.calls = 0
        self.device = torch.device("cpu")

    def reset(self):
        pass

    def predict_action(self, obs, goal=None, generator=None):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        b = np.asarray(obs["state"]).shape[0]
        return torch.from_numpy(np.broadcast_to(self.value, (b, self.action_horizon, self.action_dim)).copy())


def tiny_dit(state_dim: int = 5, action_dim: int = 3, steps: int = 2, num_tasks: int = 1):
    """A tiny random DiT (no training): enough to exercise the server end to end."""
    from robodit.datasets.normalizer import Normalizer
    from robodit.policies.dit import DiTPolicy

    meta = {"obs": {"state": {"shape": [state_dim], "dtype": "float32"}}, "action": {"shape": [action_dim]},
            "num_tasks": num_tasks}
    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}  # noqa: E731
    torch.manual_seed(0)
    return DiTPolicy(meta, Normalizer({"state": st(state_dim), "action": st(action_dim)}), size="tiny",
                     action_horizon=8, n_action_steps=4, num_inference_steps=steps).eval()


class CuePolicy(ConstantPolicy):
    """A ConstantPolicy that calls `cue()` on call number `at` (1-based): raise, send a signal, hang..."""

    def __init__(self, value, at: int, cue, **kw):
        super().__init__(value, **kw)
        self.at, self.cue = at, cue

    def predict_action(self, obs, goal=None, generator=None):
        if self.calls + 1 == self.at:
            self.calls += 1
            self.cue()
        return super().predict_action(obs, goal, generator)


class FreezableProxy:
    """A TCP relay in front of a server. While `frozen` is set, bytes are held in both directions: the connection
    stays open but nothing answers, like a SIGSTOPped server (whose kernel still holds the socket)."""

    def __init__(self, port: int):
        self.target, self.frozen, self._stop = port, threading.Event(), threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen.is_set() and not self._stop.is_set():
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
