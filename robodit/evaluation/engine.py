"""Batched, pipelined, crash-tolerant rollouts of many episodes: the engine behind suites and chains.

`num_envs` lanes each run one episode (`Job`) at a time; a lane that finishes takes the next job. Lanes are
split into `pipeline_groups` fixed groups: while the env workers step one group's chunks, this process runs
the policy for the next group, so on 2 cores the policy and the simulators overlap. All lanes of a group
replan together, so the policy sees one batch per group per chunk.

Reproducibility: each episode draws the policy's noise from a generator of its own, seeded from (seed, the
episode's env seed, its task or scene), and a batch row's output does not depend on the other rows (measured bit
for bit on this CPU for batches of 2 to 32; a batch of one can take another matmul path, 4.5e-8 off for a trained
MT10 DiT, so a lone row is padded to two); MuJoCo is deterministic. So an episode's rollout is a function of the checkpoint, `seed` and the episode alone: the same
run to run, for any `workers` count (0 = in-process), `num_envs` or `pipeline_groups`, and whichever other
tasks share the suite (re-running one task alone reproduces its episodes). A worker crash changes nothing:
the crashed worker is replaced and each of its episodes is re-run from its seed, replaying the actions
already taken (checked bit for bit against the observation it had reached), then continued. Recovery is
re-entrant: a replacement that dies or hangs while replaying is replaced in turn. An episode that kills a worker
`max_attempts` times (in its own steps or while being replayed) is reported as an error, never as a failure,
and the run goes on.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from robodit.evaluation.chains import Job
from robodit.control.history import ObservationHistory
from robodit.evaluation.workers import WorkerCrash, make_worker


@dataclass
class JobResult:
    job: Job
    successes: list[bool] = field(default_factory=list)  # per attempted subtask (a chain stops at a failure)
    steps: list[int] = field(default_factory=list)
    satisfied_at_start: list[bool] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list, repr=False)
    policy_calls: int = 0
    policy_seconds: float = 0.0  # this job's share of batched policy time
    restarts: int = 0  # times it was re-run after a crash of its worker
    error: str | None = None
    digest: str = ""  # sha1 of every action executed: equal digests = identical rollouts

    @property
    def success(self) -> bool:
        return bool(self.successes) and all(self.successes) and len(self.successes) == len(self.job.tasks)


@dataclass
class _Lane:
    idx: int
    group: int
    worker: int
    job: Job | None = None
    started: bool = False
    history: ObservationHistory | None = None
    last_obs: dict | None = None
    actions: list[np.ndarray] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    sub: int = 0
    req: tuple | None = None
    token: int | None = None
    calls: int = 0
    seconds: float = 0.0
    noise: torch.Generator | None = None  # this episode's own sampling noise
    replaying: int | None = None  # token of its replay request while crash recovery restores it


def episode_generator(seed: int, job: Job, device) -> torch.Generator:
    """The generator an episode's policy noise comes from: (seed, env seed, task/scene), nothing else."""
    key = int(np.random.SeedSequence([int(seed), int(job.seed), zlib.crc32(job.key.encode())]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(key)


class RolloutEngine:
    """Run `Job`s with `policy` (None = each task's scripted expert) on `num_envs` lanes over `workers` processes."""

    def __init__(self, env_prefix: str, env_kwargs: dict | None = None, policy=None,
                 goal_fn: Callable[[str], dict | None] | None = None, num_envs: int = 10, workers: int = 2,
                 pipeline_groups: int = 2, seed: int = 0, n_action_steps: int | None = None,
                 timeout_s: float = 300.0, max_attempts: int = 3, inject_crash: dict[int, Any] | None = None,
                 on_result: Callable[[JobResult], None] | None = None):
        if num_envs < 1 or workers < 0 or pipeline_groups < 1:
            raise ValueError(f"need num_envs >= 1, workers >= 0, pipeline_groups >= 1; got {num_envs}, {workers}, "
                             f"{pipeline_groups}")
        self.prefix, self.env_kwargs, self.policy, self.goal_fn = env_prefix, dict(env_kwargs or {}), policy, goal_fn
        self.num_envs, self.seed, self.timeout_s, self.max_attempts = num_envs, seed, timeout_s, max_attempts
        self.groups_n = min(pipeline_groups, num_envs)
        self.n_workers = min(workers, num_envs)
        self.n_exec = n_action_steps or (policy.n_action_steps if policy is not None else 8)
        self.obs_tail = policy.obs_horizon if policy is not None else 1
        self.keys = list(policy.obs_shapes) if policy is not None else []
        self.inject_crash = dict(inject_crash or {})
        self.on_result = on_result
        self.crashes: list[dict[str, Any]] = []
        self.env_steps = 0
        self.video_fps = 20.0

    # -- public -------------------------------------------------------------------------------------------------
    def run(self, jobs: list[Job]) -> list[JobResult]:
        self.results: dict[int, JobResult] = {}
        self.attempts = {j.index: 0 for j in jobs}  # crashes an episode caused itself
        self.reruns = {j.index: 0 for j in jobs}  # times it was re-run after any crash of its worker
        self.starts = {j.index: 0 for j in jobs}  # start requests sent for it (first run, replays, restarts)
        self.ever_answered = False  # some env worker has answered: workers can run the envs
        self.queue = deque(jobs)
        self.low = self.high = None
        w = max(1, self.n_workers)
        self.lanes = [_Lane(i, i * self.groups_n // self.num_envs, i % w) for i in range(self.num_envs)]
        self.workers = [make_worker(k, self.n_workers > 0, self.prefix, self.env_kwargs, self.obs_tail)
                        for k in range(w)]
        try:
            while len(self.results) < len(jobs):
                busy = False
                for g in range(self.groups_n):
                    lanes = [lane for lane in self.lanes if lane.group == g]
                    while any(lane.token is not None for lane in lanes):  # recovery may re-send requests
                        for lane in lanes:
                            self._collect(lane)
                    self._refill(lanes)
                    ready = [lane for lane in lanes if lane.job is not None]
                    if ready:
                        self._dispatch(ready, g)
                        busy = True
                if not busy and not self.queue and len(self.results) < len(jobs):
                    raise RuntimeError("rollout engine stalled with unfinished jobs (bug)")
        finally:
            for worker in self.workers:
                worker.close()
        return [self.results[j.index] for j in jobs]

    # -- scheduling ---------------------------------------------------------------------------------------------
    def _start_msg(self, lane: _Lane, replay: bool) -> tuple:
        job = lane.job
        n, self.starts[job.index] = self.starts[job.index], self.starts[job.index] + 1
        return ("start", lane.idx, job, list(lane.actions) if replay else [], self._fault(job.index, n))

    def _fault(self, index: int, n: int):
        """Tests: the fault injected into job `index`'s n-th start (0 = its first run, then each re-run).
        `inject_crash[index]` is a step (its first run dies there: see workers.py) or a list, one per start."""
        plan = self.inject_crash.get(index)
        if isinstance(plan, list):
            return plan[n] if n < len(plan) else None
        return plan if n == 0 else None

    def _send(self, lane: _Lane, msg: tuple) -> None:
        lane.req, lane.token = msg, self.workers[lane.worker].send(msg)

    def _refill(self, lanes: list[_Lane]) -> None:
        fresh = []
        for lane in lanes:
            if lane.job is None and self.queue:
                lane.job = self.queue.popleft()
                lane.noise = self._episode_noise(lane.job)
                self._send(lane, self._start_msg(lane, replay=False))
                fresh.append(lane)
        while any(lane.token is not None for lane in fresh):
            for lane in fresh:
                self._collect(lane)

    def _dispatch(self, ready: list[_Lane], group: int) -> None:
        if self.policy is None:
            for lane in ready:
                self._send(lane, ("step", lane.idx, self.n_exec))
            return
        obs = {k: np.concatenate([lane.history.stacked([k])[k] for lane in ready]) for k in self.keys}
        goal = None
        if self.goal_fn is not None:
            rows = [self.goal_fn(lane.job.tasks[lane.sub]) for lane in ready]
            if rows[0]:
                goal = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
        gens = [lane.noise for lane in ready]
        if len(ready) == 1:  # a lone row takes another matmul path (gemv) than any batch: pad it, keep row 0
            obs = {k: np.concatenate([v, v]) for k, v in obs.items()}
            goal = None if goal is None else {k: np.concatenate([v, v]) for k, v in goal.items()}
            gens = gens + [torch.Generator(device=self.policy.device).manual_seed(0)]
        t0 = time.perf_counter()
        chunk = self.policy.predict_action(obs, goal=goal, generator=gens)[: len(ready)]
        chunk = chunk.detach().cpu().numpy()
        share = (time.perf_counter() - t0) / len(ready)
        for lane, actions in zip(ready, chunk):
            lane.calls += 1
            lane.seconds += share
            actions = np.clip(actions[: self.n_exec], self.low, self.high).astype(np.float32)
            self._send(lane, ("step", lane.idx, actions))

    def _episode_noise(self, job: Job) -> torch.Generator | None:
        return episode_generator(self.seed, job, self.policy.device) if self.policy is not None else None

    # -- replies ------------------------------------------------------------------------------------------------
    def _collect(self, lane: _Lane) -> None:
        while lane.token is not None:
            try:
                reply = self.workers[lane.worker].result(lane.token, self.timeout_s)
            except WorkerCrash as crash:
                self._recover(crash)
                continue
            kind = lane.req[0]
            lane.req = lane.token = None
            self._apply(lane, kind, reply)

    def _apply(self, lane: _Lane, kind: str, reply: tuple) -> None:
        if reply[0] == "error":
            self._finish(lane, None, error=f"env error on lane {lane.idx}:\n{reply[2]}")
            return
        p = reply[1]
        if kind == "start":
            lane.started = True
            lane.history = ObservationHistory(self.obs_tail)
            lane.history.reset(p["obs"][0])
            if self.low is None:
                self.low, self.high = np.asarray(p["action_low"]), np.asarray(p["action_high"])
                self.video_fps = float(p["video_fps"])
        else:
            lane.actions.extend(p["executed"])
            self.env_steps += len(p["executed"])
            for o in p["obs"]:
                lane.history.push(o)
        lane.last_obs = p["obs"][-1]
        lane.frames.extend(p["frames"])
        lane.sub = p["sub"]
        if p["event"] == "done":
            self._finish(lane, p)

    def _finish(self, lane: _Lane, p: dict | None, error: str | None = None) -> None:
        job = lane.job
        res = JobResult(job, frames=lane.frames, policy_calls=lane.calls, policy_seconds=lane.seconds,
                        restarts=self.reruns[job.index], error=error)
        if p is not None:
            res.successes, res.steps, res.satisfied_at_start = p["successes"], p["steps"], p["satisfied_at_start"]
            res.digest = hashlib.sha1(b"".join(np.asarray(a, np.float32).tobytes() for a in lane.actions)).hexdigest()
        self.results[job.index] = res
        lane.job, lane.started, lane.history, lane.last_obs, lane.sub = None, False, None, None, 0
        lane.actions, lane.frames, lane.calls, lane.seconds, lane.noise = [], [], 0, 0.0, None
        lane.req = lane.token = None
        if self.on_result is not None:
            self.on_result(res)

    # -- crash recovery -----------------------------------------------------------------------------------------
    def _recover(self, crash: WorkerCrash) -> None:
        """Replace the dead worker and bring its lanes back to where they were.

        Re-entrant: the replacement can die or hang too while it replays those episodes. That crash is charged
        to the episode being replayed, and recovery starts over with a fresh worker. Every round charges one
        episode, and an episode charged `max_attempts` times is reported as an error, so recovery ends."""
        while crash is not None:
            crash = self._replace(crash)

    def _replace(self, crash: WorkerCrash) -> WorkerCrash | None:
        """One round of recovery; returns the replacement's own crash if it failed while replaying.

        The oldest unanswered request was the one executing when it died: its episode is the culprit, whose
        attempt count decides when to give up. Every episode on that worker is re-run from its seed, replaying
        the actions it had taken; then the requests that were in flight are sent again."""
        old = self.workers[crash.wid]
        self.ever_answered = self.ever_answered or old.answered or any(w.answered for w in self.workers)
        if not self.ever_answered:
            raise RuntimeError(f"{crash} before answering any request: envs cannot run in a worker process "
                               "(try workers=0 to see the error in this process)") from crash
        hosted = [lane for lane in self.lanes if lane.worker == crash.wid and lane.job is not None]
        oldest = next(iter(old.pending), None)
        culprit = next((lane for lane in hosted if oldest is not None and oldest in (lane.token, lane.replaying)),
                       None)
        during = "replay" if culprit is not None and culprit.replaying == oldest else "run"
        for lane in hosted:  # tokens of the dead worker: its replacement numbers its requests afresh
            lane.token = lane.replaying = None
        old.kill()
        self.workers[crash.wid] = new = make_worker(crash.wid, True, self.prefix, self.env_kwargs, self.obs_tail)
        event = {"worker": crash.wid, "pid": crash.pid, "exitcode": crash.exitcode, "reason": crash.reason,
                 "job": None, "during": None, "rerun_jobs": [], "action": "no episode was running"}
        self.crashes.append(event)
        if culprit is not None:
            job = culprit.job
            self.attempts[job.index] += 1
            event.update(job=job.index, key=job.key, seed=job.seed, lane=culprit.idx, subtask=culprit.sub,
                         at_step=len(culprit.actions), attempt=self.attempts[job.index], during=during)
            if self.attempts[job.index] >= self.max_attempts:
                event["action"] = "gave up: reported as an error, not a failure"
                self._finish(culprit, None, error=f"{crash} {self.attempts[job.index]} times")
                hosted.remove(culprit)
        for lane in hosted:
            job = lane.job
            self.reruns[job.index] += 1
            event["rerun_jobs"].append(job.index)
            how = "re-ran from seed"
            if lane.started:
                lane.replaying = new.send(self._start_msg(lane, replay=True))
                try:
                    reply = new.result(lane.replaying, self.timeout_s)
                except WorkerCrash as again:
                    if culprit is not None and culprit.job is not None:  # (not given up)
                        event["action"] = f"the replacement failed too, replaying episode {job.index}: replaced again"
                    return again
                lane.replaying = None
                if reply[0] == "ok" and _same_obs(reply[1]["obs"][-1], lane.last_obs):
                    how = f"re-ran from seed, replayed {len(lane.actions)} actions exactly"
                else:  # the simulator did not reproduce: run the episode again from its start instead
                    how = "replay diverged: episode restarted from its seed"
                    lane.started, lane.actions, lane.frames, lane.calls, lane.seconds = False, [], [], 0, 0.0
                    lane.noise = self._episode_noise(job)
                    lane.req = self._start_msg(lane, replay=False)
            elif lane.req is not None and lane.req[0] == "start":
                lane.req = self._start_msg(lane, replay=False)
            if lane is culprit:
                event["action"] = how
        for lane in hosted:  # the requests that were in flight, in lane order, after every replay succeeded
            if lane.req is not None:
                self._send(lane, lane.req)
        return None


def _same_obs(a: dict, b: dict | None) -> bool:
    return b is not None and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
