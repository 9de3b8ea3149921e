"""Policy server (`robodit serve`): run the model on a GPU box, the control loop by the arm (client.py).

Protocol (websocket, binary msgpack frames, arrays as in robodit.deploy.wire):
  → {"type": "infer", "id", "obs": {key: [B, To, ...]}, "goal": {key: array; "instruction" / "task": text} | None,
     "generator": {"device", "state": uint8 [N]} | [one per row] | None,  "seed": int | None (older clients)}
  ← {"type": "action", "id", "action": float32 [B, Tp, A], "infer_ms", "generator": the states after sampling}
     or  {"type": "error", "id", "code", "error"}
  → {"type": "meta"} ← the policy's observation shapes, horizons, limits, and what evaluation needs to know of the
     checkpoint (its training-store record, task count, the goal keys it reads, sampler);
  → {"type": "ping"} ← {"type": "pong"}
  → {"type": "goal", "task", "instruction"} ← {"type": "goal", "goal": {key: array}}: the policy's goal_for_task
Plain `GET /healthz` answers JSON without a token.

Noise: the client sends each generator's whole state and gets it back advanced, so a served policy draws exactly
the noise a local one would from the same generators, one per row as evaluation passes them (`generator_state`
in the meta says a server does this; an older one only took one `seed` for the batch).

Why it is shaped this way: the token is checked during the HTTP handshake (`Authorization: Bearer T`, compared
as SHA-256 digests with `hmac.compare_digest`: constant time, no length leak), so an unauthenticated peer never
reaches the message handler, let alone the model. Inference runs in one worker thread (`run_in_executor`),
so the event loop keeps answering /healthz, websocket pings and other clients while the model computes.
`max_size` makes the websocket library refuse an oversized message (close code 1009) before buffering it.
Every bad observation gets an error reply naming the key and the problem; the connection stays usable. So does
a non-finite action: the server checks what the policy returns and replies with an error instead of NaN/inf.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np

from robodit.deploy.wire import (MAX_GENERATOR_STATE, MAX_TEXT, MIN_TOKEN_LEN, PROTOCOL, TOKEN_ENV, WireError,
                                 check_generators, check_goal, check_observation, pack, unpack)
from robodit.errors import CLIError
from robodit.keys import is_image_key

log = logging.getLogger("robodit.server")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class PolicyServer:
    """Serve one policy to several clients. `start()` runs it in a background thread (tests, benchmarks);
    `await run(max_seconds)` runs it in the current event loop (the CLI)."""

    def __init__(self, policy, token: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 8,
                 max_clients: int = 8, max_request_bytes: int | None = None):
        if not token or len(token) < MIN_TOKEN_LEN:
            raise ValueError(f"the server token must have at least {MIN_TOKEN_LEN} characters; make one with "
                             "python -c 'import secrets; print(secrets.token_urlsafe(24))'")
        self.policy, self.host, self.port = policy, host, int(port)
        self._token = _digest(token)
        self.max_batch, self.max_clients = int(max_batch), int(max_clients)
        self.obs_shapes = {k: (tuple(s), str(d)) for k, (s, d) in policy.obs_shapes.items()}
        self.obs_horizon = int(policy.obs_horizon)
        per_sample = sum(int(np.prod(s)) * (1 if is_image_key(s, d) else 8) for s, d in self.obs_shapes.values())
        self.max_request_bytes = int(max_request_bytes or self.max_batch * (self.obs_horizon * per_sample
                                                                            + MAX_GENERATOR_STATE) + 256 * 1024)
        self.meta = {"protocol": PROTOCOL, "policy": getattr(policy, "name", type(policy).__name__),
                     "obs_shapes": {k: [list(s), d] for k, (s, d) in self.obs_shapes.items()},
                     "obs_horizon": self.obs_horizon, "action_horizon": int(policy.action_horizon),
                     "n_action_steps": int(policy.n_action_steps), "action_dim": int(policy.action_dim),
                     "max_batch": self.max_batch, "max_request_bytes": self.max_request_bytes,
                     "generator_state": True, **checkpoint_meta(policy)}
        self.stats = {"clients": 0, "served": 0, "errors": 0, "refused_auth": 0, "refused_busy": 0, "inflight": 0}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="robodit-serve")
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    # -- handshake: health and authentication, before any message is read -----------------------------------------
    def _process_request(self, connection, request):
        if request.path.split("?", 1)[0] == "/healthz":
            body = {"status": "ok", **{k: self.stats[k] for k in ("clients", "served", "errors", "inflight")}}
            return connection.respond(HTTPStatus.OK, json.dumps(body) + "\n")
        header = request.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(_digest(given), self._token):
            self.stats["refused_auth"] += 1
            log.warning("refused a connection from %s: missing or wrong token", connection.remote_address)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        if self.stats["clients"] >= self.max_clients:
            self.stats["refused_busy"] += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"server full ({self.max_clients} clients)\n")
        return None

    async def _handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        self.stats["clients"] += 1
        log.info("client %s connected", ws.remote_address)
        try:
            async for message in ws:
                await ws.send(pack(await self._reply(message)))
        except ConnectionClosed as exc:
            if exc.rcvd is None and exc.sent is not None and exc.sent.code == 1009:
                log.warning("client %s sent a message over %d bytes: closed", ws.remote_address,
                            self.max_request_bytes)
        finally:
            self.stats["clients"] -= 1

    def _error(self, rid, code: str, message: str) -> dict:
        self.stats["errors"] += 1
        log.info("error reply (%s): %s", code, message)
        return {"type": "error", "id": rid, "code": code, "error": message}

    async def _reply(self, message) -> dict:
        try:
            req = unpack(message)
        except WireError as exc:
            return self._error(None, exc.code, str(exc))
        if not isinstance(req, dict):
            return self._error(None, "malformed", f"a request must be a map, got {type(req).__name__}")
        rid, kind = req.get("id"), req.get("type")
        if kind == "ping":
            return {"type": "pong", "id": rid, "time": time.time()}
        if kind == "meta":
            return {"type": "meta", "id": rid, **self.meta}
        if kind == "goal":
            return await self._goal_reply(rid, req)
        if kind != "infer":
            return self._error(rid, "bad_request",
                               f"unknown request type {kind!r}; expected infer | meta | goal | ping")
        try:
            obs = check_observation(req.get("obs"), self.obs_shapes, self.obs_horizon, self.max_batch)
            goal = check_goal(req.get("goal"))
            seed = req.get("seed")
            if seed is not None and not isinstance(seed, int):
                raise WireError(f"'seed' must be an int or null, got {type(seed).__name__}", "bad_request")
            gens = self._generators(check_generators(req.get("generator"), len(next(iter(obs.values())))), seed)
        except WireError as exc:
            return self._error(rid, exc.code, str(exc))
        self.stats["inflight"] += 1
        try:
            action, spent = await asyncio.get_running_loop().run_in_executor(self.pool, self._infer, obs, goal, gens)
        except (ValueError, KeyError, TypeError) as exc:
            return self._error(rid, "policy_error", f"the policy refused the request: {exc}")
        except Exception as exc:  # the server keeps serving whatever the model does
            log.exception("inference failed")
            return self._error(rid, "internal", f"inference failed: {type(exc).__name__}: {exc}")
        finally:
            self.stats["inflight"] -= 1
        bad = int(np.size(action) - np.isfinite(action).sum())
        if bad:
            return self._error(rid, "nonfinite_action", f"the policy returned {bad} non-finite (NaN/inf) values in "
                               f"its {np.size(action)}-value action chunk; nothing was sent")
        self.stats["served"] += 1
        reply = {"type": "action", "id": rid, "action": action, "infer_ms": 1000 * spent}
        if req.get("generator") is not None:  # the states after sampling: the client continues from them
            states = [{"device": g.device.type, "state": g.get_state().numpy()}
                      for g in (gens if isinstance(gens, list) else [gens])]
            reply["generator"] = states if isinstance(gens, list) else states[0]
        return reply

    async def _goal_reply(self, rid, req: dict) -> dict:
        """{"type": "goal", "task", "instruction"} -> the policy's `goal_for_task` (what evaluation would compute
        locally: an instruction's embedding, ...), as arrays; {} for a policy without one."""
        task, instruction = req.get("task"), req.get("instruction")
        if not isinstance(task, str) or not (instruction is None or isinstance(instruction, str)) or \
                len(task) > MAX_TEXT or len(instruction or "") > MAX_TEXT:
            return self._error(rid, "bad_request", f"a goal request needs 'task' (text) and 'instruction' (text or "
                               f"null), each at most {MAX_TEXT} characters")
        fn = getattr(self.policy, "goal_for_task", None)
        if fn is None:
            return {"type": "goal", "id": rid, "goal": {}}

        def compute():
            import torch

            with torch.inference_mode():
                goal = fn(task, instruction=instruction) or {}
            return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in goal.items()}

        try:
            goal = await asyncio.get_running_loop().run_in_executor(self.pool, compute)
        except (ValueError, KeyError, TypeError) as exc:
            return self._error(rid, "policy_error", f"the policy has no goal for task {task!r}: {exc}")
        return {"type": "goal", "id": rid, "goal": goal}

    def _generators(self, gen, seed):
        """torch generators for a request: rebuilt from the states the client sent (else from an older client's
        one seed, else None). A state from a device this server lacks is refused."""
        import torch

        if gen is None:
            return None if seed is None else torch.Generator(device=self.policy.device).manual_seed(int(seed))
        out = []
        for g in gen if isinstance(gen, list) else [gen]:
            if g["device"] not in ("cpu", torch.device(self.policy.device).type):
                raise WireError(f"a generator on {g['device']!r} cannot be rebuilt on this server (policy on "
                                f"{self.policy.device}); send CPU generators", "bad_request")
            try:
                out.append(torch.Generator(device=g["device"]).set_state(torch.from_numpy(g["state"])))
            except (RuntimeError, ValueError) as exc:
                raise WireError(f"not a valid {g['device']} generator state: {exc}", "bad_request") from None
        return out if isinstance(gen, list) else out[0]

    def _infer(self, obs, goal, gen) -> tuple[np.ndarray, float]:
        import torch

        t0 = time.perf_counter()
        device = self.policy.device
        with torch.inference_mode():
            t_obs = {k: torch.from_numpy(v).to(device) for k, v in obs.items()}
            t_goal = None if goal is None else {k: torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v
                                                for k, v in goal.items()}  # text (instruction, task) as it came
            action = self.policy.predict_action(t_obs, goal=t_goal, generator=gen)
        return action.float().cpu().numpy(), time.perf_counter() - t0

    # -- running ------------------------------------------------------------------------------------------------
    async def run(self, max_seconds: float | None = None) -> None:
        """Serve until `stop()` (or SIGINT/SIGTERM from the CLI) or `max_seconds`."""
        from websockets.asyncio.server import serve

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._handler, self.host, self.port, process_request=self._process_request,
                         max_size=self.max_request_bytes, max_queue=4, ping_interval=20, ping_timeout=20) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=max_seconds)
            except TimeoutError:
                log.info("stopping after %s s (--max-seconds)", max_seconds)

    def start(self) -> "PolicyServer":
        def target():
            try:
                asyncio.run(self.run())
            except BaseException as exc:  # reported to start()'s caller
                self._failed = exc
                self._ready.set()

        self._thread = threading.Thread(target=target, name="robodit-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failed is not None:
            raise self._failed
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def check_backend(path, backend: str) -> None:
    """--backend onnx / aoti / native serve a directory written by `robodit export` in that format; torch a
    checkpoint."""
    from robodit.deploy.exported import MANIFEST, is_exported

    if backend == "torch":
        if is_exported(path):
            raise ValueError(f"{path} is an exported policy: serve it with --backend "
                             f"{json.loads((Path(path) / MANIFEST).read_text())['format']}")
        return
    if not is_exported(path):
        raise ValueError(f"--backend {backend} serves a directory written by `robodit export --format {backend}`; "
                         f"{path} has no {MANIFEST} (export the checkpoint first)")
    fmt = json.loads((Path(path) / MANIFEST).read_text())["format"]
    if fmt != backend:
        raise ValueError(f"{path} holds a {fmt} export; serve it with --backend {fmt}")


def checkpoint_meta(policy) -> dict[str, Any]:
    """What a client evaluating the served policy needs of its checkpoint: where it came from, its training-store
    record (simulator, tasks, seeds used: evaluation's defaults), its task count and sampler settings."""
    cfg = getattr(policy, "checkpoint_config", None) or {}
    store = json.loads(json.dumps(cfg.get("store") or {}, default=str))  # plain types only (YAML dates, int keys)
    goal_keys = getattr(policy, "goal_keys", None)
    meta = {"checkpoint": str(getattr(policy, "checkpoint_dir", "") or ""), "store": store,
            "num_tasks": int(getattr(policy, "num_tasks", 1)),
            "task_names": list(getattr(policy, "task_names", None) or []),
            "goal_keys": list(goal_keys()) if callable(goal_keys) else None}
    for key in ("sampler", "num_inference_steps", "goal_modality"):
        value = getattr(policy, key, None)
        meta[key] = value if value is None or isinstance(value, (str, int)) else str(value)
    return meta


def serve_command(args) -> None:
    """`robodit serve CHECKPOINT --host --port --token` (token also from $ROBODIT_TOKEN)."""
    import signal

    import torch

    from robodit.training import checkpoint as ckpt_io

    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ValueError(f"a token is required: --token T or ${TOKEN_ENV} (clients send it as a Bearer header)")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        log.warning("binding %s: traffic is unencrypted ws://; prefer 127.0.0.1 behind an SSH tunnel", args.host)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_backend(args.checkpoint, getattr(args, "backend", "torch"))
    policy = ckpt_io.load_policy(args.checkpoint, device=args.device)
    if args.num_inference_steps and getattr(args, "backend", "torch") != "torch":
        raise ValueError(f"--num-inference-steps: an exported policy's step count is fixed at export "
                         f"({policy.num_inference_steps}); export again with --num-inference-steps")
    if args.num_inference_steps:
        policy.num_inference_steps = int(args.num_inference_steps)
    server = PolicyServer(policy, token, host=args.host, port=args.port, max_batch=args.max_batch,
                          max_clients=args.max_clients)

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: server._stop and server._stop.set())
        task = asyncio.create_task(server.run(max_seconds=args.max_seconds))
        while not server._ready.is_set() and not task.done():
            await asyncio.sleep(0.05)
        if not task.done():
            print(f"serving {policy.checkpoint_dir} ({server.meta['policy']}) on {server.url} "
                  f"(health: http://{args.host}:{server.port}/healthz)", flush=True)
        await task

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(main())
    except OSError as exc:  # port in use, address not available
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    print(f"server stopped: {server.stats}", flush=True)
