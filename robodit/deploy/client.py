"""`RemotePolicy`: a policy served by `robodit serve` (server.py), behind the local `predict_action`.

The client's `timeout` bounds each request: past it the connection is dropped at once (no close handshake with a
server that has stopped answering), so a timeout costs the configured time, not several times it.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from typing import Any

import numpy as np

from robodit.deploy.wire import PROTOCOL, TOKEN_ENV, is_text, pack, unpack


class RemotePolicyError(RuntimeError):
    """The server refused or failed a request (its message is in the text)."""


def _goal_value(v):
    """What a goal entry travels as: text as text (an instruction, a task name), anything else as an array."""
    v = list(v) if isinstance(v, tuple) else v
    if is_text(v):
        return v
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


class RemotePolicy:
    """`predict_action(obs, goal=None, generator=None) -> Tensor [B, Tp, A]`, computed by a PolicyServer.

    Mirrors a local policy's attributes (obs_shapes, obs_horizon, action_horizon, n_action_steps, action_dim,
    device, and for evaluation the checkpoint's store record, task count and sampler) from the server's meta, so
    the runner and evaluation use either. `generator` (one, or a list with one per row as evaluation passes it)
    travels as its whole state and comes back advanced: a served policy draws the very noise a local one would,
    so evaluating through a server gives the same episodes. Not for concurrent callers: one request is in
    flight at a time (a lock enforces it).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        import torch

        self.url, self.timeout = url.rstrip("/"), float(timeout)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.device = torch.device("cpu")
        self._ws = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        meta = self._request({"type": "meta"})
        if meta.get("protocol") != PROTOCOL:
            raise RemotePolicyError(f"server speaks protocol {meta.get('protocol')}, this client {PROTOCOL}")
        self.meta = meta
        self.name = f"remote:{meta['policy']}"
        self.obs_shapes = {k: (tuple(s), d) for k, (s, d) in meta["obs_shapes"].items()}
        self.obs_horizon, self.action_horizon = meta["obs_horizon"], meta["action_horizon"]
        self.n_action_steps, self.action_dim = meta["n_action_steps"], meta["action_dim"]
        # what evaluation reads of a loaded checkpoint (robodit/evaluation/evaluate.py)
        self.checkpoint_dir = self.url
        self.checkpoint_config = {"store": meta.get("store") or {}}
        self.num_tasks, self.task_names = int(meta.get("num_tasks", 1)), list(meta.get("task_names") or [])
        # the goal keys the served policy reads (Policy.goal_keys); an older server's: task ids when multi-task
        keys = meta.get("goal_keys")
        self._goal_keys = list(keys) if keys is not None else (["task", "task_id"] if self.num_tasks > 1 else [])
        self.takes_task = "task_id" in self._goal_keys
        self.sampler, self.num_inference_steps = meta.get("sampler"), meta.get("num_inference_steps")
        if meta.get("goal_modality") is not None:
            self.goal_modality = meta["goal_modality"]

    def _connect(self):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        try:
            return connect(self.url, additional_headers={"Authorization": f"Bearer {self.token}"},  # noqa: SIM115
                           open_timeout=self.timeout, close_timeout=min(1.0, self.timeout), max_size=64 * 2**20,
                           compression=None).__enter__()
        except InvalidStatus as exc:
            code = exc.response.status_code
            why = {401: "missing or wrong token", 503: "server full"}.get(code, exc.response.body.decode()[:200])
            raise RemotePolicyError(f"{self.url} refused the connection (HTTP {code}: {why})") from None
        except OSError as exc:
            raise RemotePolicyError(f"cannot reach {self.url}: {exc}") from None

    def _request(self, msg: dict) -> dict:
        from websockets.exceptions import ConnectionClosed

        with self._lock:
            if self._ws is None:
                self._ws = self._connect()
            ws = self._ws  # close() from another thread may clear self._ws meanwhile
            msg = dict(msg, id=next(self._ids))
            payload = pack(msg)
            limit = getattr(self, "meta", {}).get("max_request_bytes")
            if limit and len(payload) > limit:
                raise RemotePolicyError(f"request of {len(payload)} bytes exceeds the server's {limit}-byte limit")
            try:
                ws.send(payload)
                reply = unpack(ws.recv(timeout=self.timeout))
            except TimeoutError:
                self._drop(ws)
                raise RemotePolicyError(f"no reply from {self.url} within {self.timeout:g} s") from None
            except ConnectionClosed as exc:
                self._drop(ws)
                raise RemotePolicyError(f"connection to {self.url} lost: {exc}") from None
        if reply.get("type") == "error":
            raise RemotePolicyError(f"server error ({reply.get('code')}): {reply.get('error')}")
        if reply.get("id") != msg["id"]:
            raise RemotePolicyError(f"reply id {reply.get('id')} does not match request {msg['id']}")
        return reply

    def predict_action(self, obs: dict[str, Any], goal: dict[str, Any] | None = None, generator=None):
        import torch

        obs = {k[4:] if k.startswith("obs.") else k: v for k, v in obs.items()}
        arrays = {}
        for key, (shape, _) in self.obs_shapes.items():
            if key not in obs:
                raise KeyError(f"observation is missing key {key!r}; the policy expects {sorted(self.obs_shapes)}")
            x = obs[key]
            x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            arrays[key] = x[None] if x.ndim == len(shape) + 1 else x
        if goal is not None:
            goal = {k: _goal_value(v) for k, v in goal.items()}
        msg = {"type": "infer", "obs": arrays, "goal": goal}
        per_row = isinstance(generator, (list, tuple))
        gens = list(generator) if per_row else [] if generator is None else [generator]
        if gens and self.meta.get("generator_state"):
            states = [{"device": g.device.type, "state": g.get_state().numpy()} for g in gens]
            msg["generator"] = states if per_row else states[0]
        elif per_row:
            raise RemotePolicyError(f"{self.url} takes one seed per batch, not a generator per row (an older "
                                    "robodit serve): update the server to evaluate through it")
        elif gens:  # an older server: one seed for the batch, reproducible run to run but not equal to local
            msg["seed"] = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
        reply = self._request(msg)
        if "generator" in msg:  # continue from where the server's sampling left each generator
            back = reply.get("generator")
            back = back if per_row else [back]
            if not isinstance(back, list) or len(back) != len(gens):
                raise RemotePolicyError(f"{self.url} did not return the {len(gens)} generator state(s) it was sent")
            for g, state in zip(gens, back):
                g.set_state(torch.from_numpy(state["state"]))
        self.last_infer_ms = float(reply.get("infer_ms", float("nan")))  # server-side model time
        return torch.from_numpy(reply["action"])

    def goal_keys(self) -> list[str]:
        return list(self._goal_keys)

    def goal_for_task(self, task: str, instruction: str | None = None, goal_image: str | None = None) -> dict:
        """Evaluation's goal for `task`, computed by the served policy (e.g. its instruction embedding); {} when it
        needs none beyond a task id. Goal images are files on this machine: not supported through a server."""
        if goal_image is not None:
            raise RemotePolicyError("goal images cannot be sent to a served policy; evaluate image goals with the "
                                    "checkpoint itself")
        return self._request({"type": "goal", "task": task, "instruction": instruction})["goal"]

    def ping(self) -> float:
        """Round-trip seconds of a ping (no model work)."""
        t0 = time.perf_counter()
        self._request({"type": "ping"})
        return time.perf_counter() - t0

    def reset(self) -> None:
        """Nothing to forget: served policies are stateless between requests."""

    def _drop(self, ws) -> None:
        """Forget a failed connection (the next call reconnects) and close its socket without a close handshake:
        a server that stopped answering would hold `close()` for its close_timeout."""
        if self._ws is ws:
            self._ws = None
        ws.close_socket()

    def close(self) -> None:
        """Close the connection. A request still in flight in another thread (an async inference abandoned at an
        e-stop) fails at once instead of keeping the process alive for the rest of its timeout."""
        if self._lock.acquire(blocking=False):
            try:
                ws, self._ws = self._ws, None
                if ws is not None:
                    ws.close()  # a short close handshake (close_timeout <= 1 s)
            finally:
                self._lock.release()
        else:
            ws = self._ws
            if ws is not None:
                self._drop(ws)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def healthz(url: str, timeout: float = 5.0) -> dict:
    """GET /healthz of a server given its ws:// URL."""
    import urllib.request

    http = "http" + url[2:] if url.startswith("ws") else url
    with urllib.request.urlopen(http.rstrip("/") + "/healthz", timeout=timeout) as resp:  # noqa: S310 - ws/http only
        return json.loads(resp.read())

