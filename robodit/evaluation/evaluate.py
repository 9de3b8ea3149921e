"""Evaluate a checkpoint (or the scripted experts) on a suite: results.json, report.md, plot, videos.

With no suite, the checkpoint's training-store record says which simulator, tasks, cameras and episode limit
to use, so `python eval.py checkpoint=...` needs nothing else (an ad-hoc suite of those tasks). A policy served
by `robodit serve` is evaluated as `checkpoint=ws://HOST:PORT` (token from $ROBODIT_TOKEN): the record comes
from the server's meta, and the sampling noise travels with each request, so it gives the local episodes. Evaluation
seeds start far above the collection seeds (held-out initial conditions). The results.json schema is in
robodit/evaluation/report.py.

Goals: a multi-task policy gets `task_id` (its index in the training store's task table); a policy that defines
`goal_for_task(task, instruction=..., goal_image=...) -> dict` gets what it returns merged in, which is how the
suite's per-task instruction / goal image reach language- or image-conditioned policies.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from robodit.evaluation.engine import JobResult, RolloutEngine
from robodit.evaluation.frames import suite_frame_grid, supports_frame_grid
from robodit.evaluation.report import write_outputs
from robodit.evaluation.stats import chain_metrics, mean_rate, rate_summary
from robodit.evaluation.suites import (Suite, SuiteError, check_libero_states, check_seed_blocks, load_suite,
                                      suite_from_tasks)
from robodit.keys import is_image_key

EXPERT = "expert"
log = logging.getLogger(__name__)


def env_kwargs_from_record(record: dict, policy) -> dict[str, Any]:
    """Env constructor kwargs that reproduce the observations the policy was trained on."""
    kwargs: dict[str, Any] = {}
    if policy is not None:
        image_keys = [k for k, (shape, dtype) in policy.obs_shapes.items() if is_image_key(shape, dtype)]
        foreign = [k for k in image_keys if not k.startswith("image_")]
        if foreign:  # a camera of converted real-robot data, say `wrist`: no simulator renders it
            raise ValueError(f"the policy's cameras {foreign} are not simulator cameras (a simulator's observation "
                             "names each camera image_<camera>, e.g. image_corner2): evaluate it on its robot "
                             "(robodit run), or train on a store collected in the simulator")
        if image_keys:
            kwargs["image_size"] = int(policy.obs_shapes[image_keys[0]][0][0])
            kwargs["cameras"] = tuple(k[len("image_"):] for k in image_keys)
    for key in ("max_episode_steps", "goal_observable"):
        if record.get(key) is not None:
            kwargs[key] = record[key]
    return kwargs


SERVED = ("ws://", "wss://")


def is_served(checkpoint) -> bool:
    return str(checkpoint).startswith(SERVED)


def load_eval_policy(checkpoint, device: str = "cpu", sampler: str | None = None,
                     num_inference_steps: int | None = None):
    """The policy to evaluate, or None for `checkpoint=expert` (each task's scripted expert); a ws:// URL is a
    policy served by `robodit serve`, reached with the token in $ROBODIT_TOKEN."""
    if str(checkpoint) == EXPERT:
        return None
    if is_served(checkpoint):
        from robodit.deploy.client import RemotePolicy
        from robodit.deploy.wire import TOKEN_ENV

        if sampler or num_inference_steps is not None:
            raise ValueError(f"checkpoint={checkpoint}: the server samples as it was started; set "
                             "num_inference_steps with `robodit serve --num-inference-steps N` instead of here")
        if not os.environ.get(TOKEN_ENV):
            raise ValueError(f"checkpoint={checkpoint} is a policy server: put its token in ${TOKEN_ENV}")
        policy = RemotePolicy(str(checkpoint), os.environ[TOKEN_ENV])
        if not policy.meta.get("generator_state"):
            policy.close()
            raise ValueError(f"{checkpoint} runs an older robodit serve, which cannot draw each episode's own "
                             "noise: update the server to evaluate through it")
        return policy
    from robodit.training import checkpoint as ckpt_io

    policy = ckpt_io.load_policy(checkpoint, device=device)
    if sampler:
        policy.sampler = sampler
    if num_inference_steps is not None:
        policy.num_inference_steps = int(num_inference_steps)
    return policy


def restrict_suite(s: Suite, tasks: list[str] | None = None, episodes: int | None = None,
                   max_steps: int | None = None) -> Suite:
    """A loaded suite narrowed to `tasks` (chains: the scenes whose tasks are all among them), with `episodes`
    per task and seed block (chains: the number of chains) and `max_steps` overriding the suite's."""
    if tasks:
        unknown = sorted(set(tasks) - set(s.instructions))
        if unknown:
            raise SuiteError(f"{s.source}: tasks {unknown} are not in suite {s.name!r}")
        s.tasks = [t for t in s.tasks if t.name in tasks]
        if s.kind == "chains":
            s.scenes = {k: v for k, v in s.scenes.items() if set(v) <= set(tasks)}
            if not s.scenes:
                raise SuiteError(f"{s.source}: no scene has all its tasks in tasks={tasks}")
    if episodes is not None:
        if s.kind == "tasks":
            for t in s.tasks:
                t.episodes = int(episodes)
        else:
            s.chains = int(episodes)
    if max_steps is not None:
        s.max_steps = int(max_steps)
        for t in s.tasks:
            t.max_steps = None
    if s.kind == "tasks":
        check_seed_blocks(s)  # at the episode counts that will run
        check_libero_states(s)
    return s


def resolve_suite(policy, suite=None, suite_source: str | None = None, env: str | None = None,
                  tasks: list[str] | None = None, episodes: int | None = None, seed: int = 100_000,
                  max_steps: int | None = None) -> Suite:
    """The suite to run: a named/given suite (with `episodes`, `tasks`, `max_steps` as overrides), or an ad-hoc
    suite: `tasks=[...]`, else the task `env=SIM/TASK` names, else the tasks the checkpoint was trained on."""
    if suite is not None:
        return restrict_suite(load_suite(suite, suite_source, check_blocks=False), tasks, episodes, max_steps)
    store = _store_record(policy, env)
    record = dict(store.get("env") or {})
    env_name = env or record.get("name")
    if not env_name:
        where = policy.checkpoint_dir if policy is not None else "checkpoint=expert"
        raise ValueError(f"{where} records no environment; pass env=SIMULATOR/TASK or suite=NAME")
    simulator, _, env_task = env_name.partition("/")
    if tasks:
        task_list = list(tasks)
    elif env and env_task:  # env= names the task to run, whatever else the store holds
        task_list = [env_task]
    else:  # the store's tasks, less those it holds only as action-free video
        video_only = set(store.get("tasks_without_actions") or ())
        task_list = [t for t in record.get("tasks") or ([env_task] if env_task else []) if t not in video_only]
    if not task_list:
        raise ValueError(f"env={env_name!r} names no task; expected SIMULATOR/TASK")
    return suite_from_tasks(simulator, task_list, 50 if episodes is None else int(episodes), seed, max_steps)


def training_overlap(suite: Suite, record: dict, policy) -> dict[str, Any]:
    """What of this evaluation the checkpoint has or has not seen in training: episode seeds its demos were
    collected from (those initial states are not held out) and tasks it never learned to act on (not in its
    store, or there only as action-free video). Recorded in results.json, and printed."""
    if policy is None:
        return {}
    used = set(int(x) for x in record.get("seeds_used") or [])
    if record.get("init_states") is False:  # LIBERO demos from sampled layouts, never a fixed initial state
        used = set()
    seeds = sorted({j.seed for j in suite.jobs(0)} & used)
    store = policy.checkpoint_config.get("store") or {}
    trained = list(store.get("tasks") or record.get("tasks") or [])
    video_only = set(store.get("tasks_without_actions") or ())
    unseen = [t.name for t in suite.tasks
              if (trained and t.name not in trained and t.instruction not in trained) or t.name in video_only]
    return {"training_seeds": seeds, "untrained_tasks": unseen}


def select_store_for_env(policy, env: str | None, record: dict) -> None:
    """A multi-robot (RDT) policy answers in the robot units of the store being evaluated; a policy of one
    store (also an RDT fine-tuned on one robot) has nothing to select."""
    if env and len(getattr(policy, "store_names", ())) > 1 and record.get("name") == env:
        policy.select_store(env)


def _store_record(policy, env: str | None) -> dict:
    """The checkpoint's training-store record for `env`: a multi-store checkpoint (RDT over several robots)
    records every store; the one whose env is `env` says how to build it (else store 0's)."""
    if policy is None:
        return {}
    from robodit.datasets.multi import record_for_env

    return record_for_env(policy.checkpoint_config.get("store") or {}, env)


def make_goal_fn(policy, suite: Suite):
    """task -> the goal a policy gets with its observations; checks every task up front."""
    if policy is None:
        return None
    train_tasks = list((policy.checkpoint_config.get("store") or {}).get("tasks") or [])
    needs_id = policy.takes_task  # the family reads task ids (MDT reads language or goal images instead)
    specs = {t.name: t for t in suite.tasks}

    def trained_as(task: str) -> str:
        """The training store's name for `task`: its own, else its instruction (a converted LeRobot dataset
        names each task by its instruction, e.g. LIBERO's "pick up the alphabet soup and place it in the basket")."""
        if task in train_tasks or task not in specs:
            return task
        return specs[task].instruction if specs[task].instruction in train_tasks else task

    if needs_id:
        missing = [t.name for t in suite.tasks if trained_as(t.name) not in train_tasks]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise ValueError(f"tasks {shown} are not in the training store's tasks {train_tasks}: a multi-task "
                             "policy has no task id for them (restrict with tasks=[...])")
    custom = getattr(policy, "goal_for_task", None)  # language / goal-image policies may define it
    cache: dict[str, dict | None] = {}

    def goal(task: str) -> dict | None:
        if task not in cache:
            g = {"task_id": np.int64(train_tasks.index(trained_as(task)))} if needs_id else {}
            if custom is not None:
                g.update(custom(task, instruction=specs[task].instruction, goal_image=specs[task].goal_image) or {})
            cache[task] = g or None
        return cache[task]

    return goal


def run_suite(suite: Suite, policy=None, env_kwargs: dict | None = None, *, num_envs: int = 10, workers: int = 2,
              pipeline_groups: int = 2, seed: int = 0, n_action_steps: int | None = None, videos: int = 1,
              timeout_s: float = 300.0, inject_crash: dict | None = None, progress: bool = True,
              desc: str = "eval") -> tuple[list[JobResult], RolloutEngine]:
    """All jobs of `suite` through one engine; returns per-job results in suite order."""
    jobs = suite.jobs(videos)
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, dynamic_ncols=True, unit="ep")
    done: list[bool] = []

    def on_result(res: JobResult) -> None:
        done.append(res.success)
        bar.update(1)
        bar.set_postfix(success=f"{np.mean(done):.2f}", task=res.job.key)

    engine = RolloutEngine(suite.simulator, {**(env_kwargs or {}), **suite.env}, policy,
                           make_goal_fn(policy, suite), num_envs=num_envs, workers=workers,
                           pipeline_groups=pipeline_groups, seed=seed, n_action_steps=n_action_steps,
                           timeout_s=timeout_s, inject_crash=inject_crash, on_result=on_result)
    try:
        results = engine.run(jobs)
    finally:
        bar.close()
    return results, engine


def _per_key(results: list[JobResult], suite: Suite) -> dict[str, Any]:
    per: dict[str, Any] = {}
    if suite.kind == "tasks":
        for spec in suite.tasks:
            mine = [r for r in results if r.job.key == spec.name and r.error is None]
            calls = sum(r.policy_calls for r in mine)
            per[spec.name] = {
                "instruction": spec.instruction, **rate_summary([r.success for r in mine]),
                "mean_steps": float(np.mean([sum(r.steps) for r in mine])) if mine else None,
                "ms_per_chunk": 1000 * sum(r.policy_seconds for r in mine) / calls if calls else None,
                "policy_calls": calls, "seeds": [r.job.seed for r in mine],
                "success_per_episode": [r.success for r in mine],
                "fingerprint": hashlib.sha1("".join(r.digest for r in mine).encode()).hexdigest()[:16] if mine else None,
                "errors": sum(r.error is not None for r in results if r.job.key == spec.name)}
        return per
    for spec in suite.tasks:  # chains: every attempt of a task anywhere in a chain
        outcomes = [s for r in results if r.error is None for t, s in zip(r.job.tasks, r.successes) if t == spec.name]
        per[spec.name] = {"instruction": spec.instruction, **rate_summary(outcomes)}
    return per


def summarize_chains(results: list[JobResult], suite: Suite) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    out = chain_metrics([r.successes for r in ok], suite.chain_length)
    out["per_scene"] = {s: chain_metrics([r.successes for r in ok if r.job.key == s], suite.chain_length)
                        for s in suite.scenes}
    for v in out["per_scene"].values():
        v.pop("completed_per_chain")
    out["satisfied_at_start"] = int(sum(sum(r.satisfied_at_start) for r in ok))
    out["per_task"] = _per_key(results, suite)
    return out


def evaluate(checkpoint: str | Path, episodes: int | None = None, out_dir: str | Path = "outputs/eval",
             env: str | None = None, tasks: list[str] | None = None, seed: int = 100_000,
             max_steps: int | None = None, n_action_steps: int | None = None, videos: int = 1, device: str = "cpu",
             sampler: str | None = None, num_inference_steps: int | None = None, progress: bool = True,
             suite: str | dict | Suite | None = None, suite_source: str | None = None, num_envs: int = 10,
             workers: int = 2, pipeline_groups: int = 2, timeout_s: float = 300.0,
             inject_crash: dict | None = None, write: bool = True, wandb: str | None = None,
             frame_grid: int = 4, goal: str | None = None, instructions: str = "train") -> dict[str, Any]:
    """Run a suite (or the checkpoint's own tasks) and write results.json, report.md, success.png and videos;
    for a video-predicting policy (PAD) also frames.png: `frame_grid` replans of predicted vs real frames.

    Goal-conditioned policies (MDT): `goal` = "language" | "image" (default: the policy's `goal_modality`);
    image goals default to an expert's success on a held-out seed (out_dir/goal_images/); `instructions` =
    "heldout" swaps each task's instruction for a paraphrase template never used in training. With MGF the
    policy's foresight reconstructions on its training store go to out_dir/mgf.png."""
    if episodes is not None and int(episodes) < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if instructions not in ("train", "heldout"):
        raise ValueError(f"instructions must be 'train' or 'heldout', got {instructions!r}")
    if num_inference_steps is not None and int(num_inference_steps) < 1:
        raise ValueError(f"num_inference_steps must be >= 1 (or null for the policy's), got {num_inference_steps}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if n_action_steps is not None and int(n_action_steps) < 1:
        raise ValueError(f"n_action_steps must be >= 1 (or null for the policy's), got {n_action_steps}")
    policy = load_eval_policy(checkpoint, device, sampler, num_inference_steps)
    served = is_served(checkpoint)
    if served:
        try:
            _check_server_batch(policy, num_envs, pipeline_groups)
        except ValueError:
            policy.close()
            raise
    if policy is not None and n_action_steps is not None and int(n_action_steps) > policy.action_horizon:
        raise ValueError(f"n_action_steps={n_action_steps} exceeds the {policy.action_horizon} actions a chunk of "
                         f"{policy.name} holds")
    s = resolve_suite(policy, suite, suite_source, env, tasks, episodes, seed, max_steps)
    record = dict(_store_record(policy, env).get("env") or {})
    select_store_for_env(policy, env, record)
    env_kwargs = env_kwargs_from_record(record, policy)
    overlap = training_overlap(s, record, policy)
    _warn_overlap(overlap)
    modality = _set_goal_modality(policy, goal)
    if instructions == "heldout":
        from robodit.datasets.language import paraphrases

        for i, spec in enumerate(s.tasks):
            options = paraphrases(spec.instruction, "heldout")
            spec.instruction = options[i % len(options)]
    if modality == "image":
        from robodit.evaluation.goal_images import fill_goal_images

        fill_goal_images(s, env_kwargs, Path(out_dir) / "goal_images")
    make_goal_fn(policy, s)  # task-id errors before any worker starts
    if write:
        clear_previous_outputs(Path(out_dir))
    knobs = dict(num_envs=num_envs, workers=workers, pipeline_groups=pipeline_groups, seed=seed,
                 n_action_steps=n_action_steps, timeout_s=timeout_s)
    t0 = time.time()
    try:
        results, engine = run_suite(s, policy, env_kwargs, videos=videos, inject_crash=inject_crash,
                                    progress=progress, **knobs)
    finally:
        if served:
            policy.close()
    wall = time.time() - t0
    summary: dict[str, Any] = {
        "schema": "robodit.eval/2", "kind": s.kind, "suite": s.to_dict(),
        "checkpoint": str(policy.checkpoint_dir) if policy is not None else EXPERT,
        "policy": policy.name if policy is not None else EXPERT,
        "env": f"{s.simulator}/{s.tasks[0].name}" if len(s.tasks) == 1 else s.simulator,
        "episodes_per_task": _episodes_per_task(s),
        "seed": s.seeds[0] if s.kind == "tasks" else s.seed,  # the first env seed (initial states)
        "policy_seed": seed,  # seeds the policy's sampling noise (with num_envs, pipeline_groups)
        "sampler": getattr(policy, "sampler", None), "num_inference_steps": getattr(policy, "num_inference_steps", None),
        "n_action_steps": n_action_steps or getattr(policy, "n_action_steps", None), "device": device,
        **overlap,
    }
    if served:
        summary["server"] = {"url": str(checkpoint), "checkpoint": policy.meta.get("checkpoint"),
                             "policy": policy.meta.get("policy")}
    if modality is not None:
        summary["goal"] = {"modality": modality, "instructions": instructions,
                           "per_task": {t.name: t.instruction if modality == "language" else t.goal_image
                                        for t in s.tasks}}
    ok = [r for r in results if r.error is None]
    if s.kind == "tasks":
        summary["tasks"] = _per_key(results, s)
        summary["success_rate"] = mean_rate(summary["tasks"])
        pooled = rate_summary([r.success for r in ok])
        summary["pooled"] = pooled
    else:
        chains = {"policy" if policy is not None else EXPERT: summarize_chains(results, s)}
        if policy is not None and s.expert_baseline:
            expert_results, _ = run_suite(s, None, env_kwargs, videos=0, progress=progress, desc="expert", **knobs)
            chains[EXPERT] = summarize_chains(expert_results, s)
        main = chains["policy" if policy is not None else EXPERT]
        summary["chains"] = chains
        summary["tasks"] = main["per_task"]
        summary["success_rate"] = main["success_at_length"][str(s.chain_length)]["success_rate"]
        summary["avg_completed"] = main["avg_completed"]
    calls = sum(r.policy_calls for r in results)
    summary["run"] = {
        "num_envs": num_envs, "workers": workers, "pipeline_groups": pipeline_groups, "wall_time_s": round(wall, 2),
        "episodes": len(results), "env_steps": engine.env_steps, "env_steps_per_s": round(engine.env_steps / wall, 1),
        "video_fps": round(engine.video_fps, 2), "policy_calls": calls,
        "policy_seconds": round(sum(r.policy_seconds for r in results), 2),
        "crashes": engine.crashes, "restarted_episodes": sum(r.restarts > 0 for r in results),
        "errors": [{"job": r.job.index, "key": r.job.key, "seed": r.job.seed, "error": r.error}
                   for r in results if r.error is not None]}
    summary["wall_time_s"] = summary["run"]["wall_time_s"]
    summary["ci_method"] = "wilson95"
    if write and frame_grid and supports_frame_grid(policy):
        summary["frame_grid"] = str(suite_frame_grid(policy, s, env_kwargs, out_dir, make_goal_fn(policy, s),
                                                     replans=int(frame_grid)))
    if write and getattr(policy, "foresight", None) is not None:
        store_path = Path((policy.checkpoint_config.get("store") or {}).get("path") or "")
        if store_path.name and store_path.exists():
            summary["foresight_grid"] = str(policy.write_foresight_grid(store_path, Path(out_dir) / "mgf.png"))
    if write:
        write_outputs(Path(out_dir), summary, results, wandb_project=wandb)
    if results and not ok:
        raise EvaluationError(f"every one of the {len(results)} episodes errored, so there is no success rate: "
                              f"see run.errors in {Path(out_dir) / 'results.json'} (first: "
                              f"{results[0].error.strip().splitlines()[-1]})")
    return summary


class EvaluationError(RuntimeError):
    """The evaluation ran but measured nothing (every episode errored); results.json lists why."""


# files an evaluation writes into out_dir; a previous run's are removed first so that nothing stale is mixed in
_OUTPUT_GLOBS = ("results.json", "report.md", "success.png", "frames.png", "mgf.png", "*_ep[0-9][0-9][0-9].mp4",
                 "chain_*_[0-9][0-9][0-9].mp4")


def clear_previous_outputs(out: Path) -> None:
    """Remove what an earlier evaluation wrote into `out` (results, report, plots, videos); nothing else."""
    stale = [p for g in _OUTPUT_GLOBS for p in out.glob(g) if p.is_file()] if out.is_dir() else []
    if stale:
        log.warning("%s holds a previous evaluation: replacing its %d output file(s)", out, len(stale))
    for p in stale:
        p.unlink()


def _episodes_per_task(s: Suite) -> int | dict[str, int]:
    """Episodes per task: one number when every task runs the same count, else {task: count}."""
    if s.kind == "chains":
        return s.chains
    counts = {t.name: t.episodes * len(s.seeds) for t in s.tasks}
    return next(iter(counts.values())) if len(set(counts.values())) == 1 else counts


def _check_server_batch(policy, num_envs: int, pipeline_groups: int) -> None:
    """The engine asks for one group's lanes at once (a lone lane padded to two): the server must take that batch."""
    groups = max(1, min(int(pipeline_groups), int(num_envs)))
    rows, limit = max(2, math.ceil(int(num_envs) / groups)), int(policy.meta.get("max_batch") or 0)
    if limit and rows > limit:
        raise ValueError(f"num_envs={num_envs} over pipeline_groups={pipeline_groups} sends batches of {rows} "
                         f"observations; {policy.url} takes at most {limit} (robodit serve --max-batch): lower "
                         "num_envs or raise pipeline_groups (results do not depend on either)")


def _warn_overlap(overlap: dict) -> None:
    seeds, unseen = overlap.get("training_seeds"), overlap.get("untrained_tasks")
    if seeds:
        log.warning("%d evaluation seed(s) (%s%s) are seeds the training demos were collected from: those "
                    "initial states are not held out", len(seeds), ", ".join(map(str, seeds[:5])),
                    ", ..." if len(seeds) > 5 else "")
    if unseen:
        log.warning("task(s) %s are not among the tasks the checkpoint was trained on", ", ".join(unseen))


def _set_goal_modality(policy, goal: str | None) -> str | None:
    """Apply `goal=` to a goal-conditioned policy; None for policies without goal modalities."""
    current = getattr(policy, "goal_modality", None)
    if current is None:
        if goal is not None:
            raise ValueError(f"goal={goal!r} applies to goal-conditioned policies (mdt); "
                             f"{getattr(policy, 'name', 'the expert')} has no goal modality")
        return None
    if goal is not None:
        if goal not in ("language", "image"):
            raise ValueError(f"goal must be 'language' or 'image', got {goal!r}")
        policy.goal_modality = goal
    return policy.goal_modality
