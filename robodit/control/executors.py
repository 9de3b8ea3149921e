"""How a chunk of H predicted actions becomes one command per control tick.

Three strategies behind one call, `next_action(obs, now) -> action | None`:

- `RecedingHorizon`: predict, execute the first k actions, predict again (what evaluation does). Inference
  blocks the loop, so the robot pauses while the policy thinks.
- `TemporalEnsemble` (ACT): predict every `query_every` ticks and execute, at each tick, the average of every
  chunk's prediction for that tick with weights exp(-m * i), i = 0 for the oldest: smooth, but an inference
  per tick.
- `AsyncInference`: the next chunk is computed in a worker thread while the current one executes. Each action
  carries a timestamp (the time of the observation it was computed from + i / hz); when a chunk arrives, the
  actions whose time has passed are dropped instead of being played late.

`infer(obs) -> np.ndarray [H, A]` is any callable; `policy_infer` adapts a Policy or a RemotePolicy.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import logging
import time
from typing import Any, Callable

import numpy as np

log = logging.getLogger("robodit.control")

Infer = Callable[[dict[str, np.ndarray]], np.ndarray]
STRATEGIES = ("receding", "ensemble", "async")


def policy_infer(policy, goal: dict | None = None, seed: int = 0) -> Infer:
    """`obs window -> chunk [H, A]` (numpy, robot units) for a local Policy or a RemotePolicy."""
    import torch

    gen = torch.Generator(device=policy.device).manual_seed(seed)

    def infer(obs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = policy.predict_action(obs, goal=goal, generator=gen)
        return np.asarray(out[0].detach().cpu().numpy() if hasattr(out, "detach") else out[0], dtype=np.float32)

    return infer


class ChunkExecutor(abc.ABC):
    """Turns chunks into per-tick actions; `stats` counts inferences, their time, drops and starved ticks."""

    name = "executor"

    def __init__(self, infer: Infer, dt: float, clock: Callable[[], float] = time.monotonic):
        if dt <= 0:
            raise ValueError(f"control period must be positive, got {dt}")
        self.infer, self.dt, self.clock = infer, float(dt), clock
        self.stats: dict[str, float] = {}
        self.last_infer_s: float | None = None  # set when the latest call ran (or received) an inference
        self.reset()

    def reset(self) -> None:
        self.stats = {"inferences": 0, "infer_s": 0.0, "dropped_stale": 0, "starved": 0}

    def _timed(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        chunk = np.asarray(self.infer(obs), dtype=np.float32)
        spent = time.perf_counter() - t0
        if chunk.ndim != 2 or len(chunk) == 0:
            raise ValueError(f"policy returned a chunk of shape {chunk.shape}; expected [H, action_dim]")
        return chunk, spent

    def _count(self, spent: float) -> None:
        self.stats["inferences"] += 1
        self.stats["infer_s"] += spent
        self.last_infer_s = spent

    def _run(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        chunk, spent = self._timed(obs)
        self._count(spent)
        return chunk

    @abc.abstractmethod
    def next_action(self, obs: dict[str, np.ndarray], now: float | None = None) -> np.ndarray | None:
        """The command for the tick at time `now`, given the latest observation window (None: nothing to send)."""

    def close(self) -> None:  # noqa: B027
        """Stop background work."""


class RecedingHorizon(ChunkExecutor):
    name = "receding"

    def __init__(self, infer: Infer, dt: float, n_action_steps: int, clock=time.monotonic):
        if n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1, got {n_action_steps}")
        self.n = int(n_action_steps)
        super().__init__(infer, dt, clock)

    def reset(self) -> None:
        super().reset()
        self.queue: collections.deque = collections.deque()

    def next_action(self, obs, now=None):
        self.last_infer_s = None
        if not self.queue:
            self.queue.extend(self._run(obs)[: self.n])
        return self.queue.popleft()


class TemporalEnsemble(ChunkExecutor):
    """ACT's temporal ensembling; `m` is the decay (ACT uses 0.01; larger trusts the oldest chunk more)."""

    name = "ensemble"

    def __init__(self, infer: Infer, dt: float, m: float = 0.01, query_every: int = 1, clock=time.monotonic):
        if query_every < 1:
            raise ValueError(f"query_every must be >= 1, got {query_every}")
        self.m, self.query_every = float(m), int(query_every)
        super().__init__(infer, dt, clock)

    def reset(self) -> None:
        super().reset()
        self.t = 0
        self.chunks: list[tuple[int, np.ndarray]] = []  # (tick of its first action, chunk), oldest first

    def next_action(self, obs, now=None):
        self.last_infer_s = None
        if self.t % self.query_every == 0:
            chunk = self._run(obs)
            if len(chunk) < self.query_every:
                raise ValueError(f"chunk of {len(chunk)} actions cannot cover query_every={self.query_every} ticks")
            self.chunks.append((self.t, chunk))
        self.chunks = [(s, c) for s, c in self.chunks if s + len(c) > self.t]
        preds = np.stack([c[self.t - s] for s, c in self.chunks])
        w = np.exp(-self.m * np.arange(len(preds)))
        self.t += 1
        return (w[:, None] * preds).sum(0) / w.sum()


class AsyncInference(ChunkExecutor):
    """Next chunk computed while the current one plays; stale (past-due) actions are dropped.

    A new inference starts once at most `H - n_action_steps` actions of the current chunk remain, so with no
    latency the chunk boundary matches receding horizon; the unplayed tail covers the inference's latency.
    Only the very first chunk is waited for, and it plays from its start once it arrives: the robot stood still
    meanwhile, so its timeline begins then, not at its observation (which would drop the first latency / dt
    actions as stale, or the whole chunk). If every action is used up before the next chunk arrives, the
    tick is `starved` (None: send nothing, the safety layer's watchdog holds the robot).
    """

    name = "async"

    def __init__(self, infer: Infer, dt: float, n_action_steps: int, clock=time.monotonic,
                 first_timeout_s: float | None = 300.0):
        if n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1, got {n_action_steps}")
        self.n, self.first_timeout = int(n_action_steps), first_timeout_s
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="robodit-infer")
        self.pending: concurrent.futures.Future | None = None
        super().__init__(infer, dt, clock)

    def reset(self) -> None:
        super().reset()
        if getattr(self, "pending", None) is not None:
            self.pending.cancel()
            try:
                self.pending.result()  # let a running inference finish: never two at once
            except Exception:  # noqa: BLE001 - a discarded inference's error does not matter
                pass
        self.pending = None
        self.pending_t = 0.0
        self.queue: collections.deque = collections.deque()  # (timestamp, action)
        self.chunk_len = 0
        self.started = False

    def _accept(self) -> None:
        fut, t_obs = self.pending, self.pending_t
        self.pending = None
        chunk, spent = fut.result()  # re-raises the policy's error here, in the loop thread
        self._count(spent)
        self.queue = collections.deque((t_obs + i * self.dt, a) for i, a in enumerate(chunk))
        self.chunk_len = len(chunk)
        self.started = True

    def next_action(self, obs, now=None):
        now = self.clock() if now is None else now
        self.last_infer_s = None
        if self.pending is not None and self.pending.done():
            self._accept()
        refill = len(self.queue) <= max(self.chunk_len - self.n, 0)
        if self.pending is None and (not self.started or refill):
            self.pending_t = now
            self.pending = self.pool.submit(self._timed, obs)
        if not self.started:  # nothing to play yet: wait for the first chunk only
            concurrent.futures.wait([self.pending], timeout=self.first_timeout)
            if not self.pending.done():
                raise TimeoutError(f"first inference took over {self.first_timeout} s")
            now = self.pending_t = self.clock()  # nothing played yet: the chunk's first action is due now
            self._accept()
        while self.queue and self.queue[0][0] < now - self.dt / 2:
            self.queue.popleft()
            self.stats["dropped_stale"] += 1
        if not self.queue:
            self.stats["starved"] += 1
            return None
        return self.queue.popleft()[1]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def make_executor(strategy: str, infer: Infer, *, hz: float, n_action_steps: int, clock=time.monotonic,
                  ensemble_m: float = 0.01, query_every: int = 1, **_: Any) -> ChunkExecutor:
    """Build a strategy by name: receding | ensemble | async."""
    dt = 1.0 / float(hz)
    if strategy == "receding":
        return RecedingHorizon(infer, dt, n_action_steps, clock)
    if strategy == "ensemble":
        return TemporalEnsemble(infer, dt, ensemble_m, query_every, clock)
    if strategy == "async":
        return AsyncInference(infer, dt, n_action_steps, clock)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
