"""Evaluate a checkpoint: per-task success over seeded episodes, results.json, report.md, videos.

With no env given, the checkpoint's training store record says which simulator, tasks, cameras and episode
limit to use, so `python eval.py checkpoint=...` needs nothing else. Evaluation seeds start far above the
collection seeds (held-out initial conditions).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import robodit
from robodit.envs import make_env
from robodit.evaluation.report import write_report, write_video
from robodit.evaluation.runner import rollout


def env_kwargs_from_record(record: dict, policy) -> dict[str, Any]:
    """Env constructor kwargs that reproduce the observations the policy was trained on."""
    kwargs: dict[str, Any] = {}
    image_keys = [k for k in policy.obs_shapes if k.startswith("image_")]
    if image_keys:
        kwargs["image_size"] = int(policy.obs_shapes[image_keys[0]][0][0])
        kwargs["cameras"] = tuple(k[len("image_"):] for k in image_keys)
    for key in ("max_episode_steps", "goal_observable"):
        if record.get(key) is not None:
            kwargs[key] = record[key]
    return kwargs


def evaluate(checkpoint: str | Path, episodes: int = 50, out_dir: str | Path = "outputs/eval", env: str | None = None,
             tasks: list[str] | None = None, seed: int = 100_000, max_steps: int | None = None,
             n_action_steps: int | None = None, videos: int = 1, device: str = "cpu", sampler: str | None = None,
             num_inference_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = robodit.load_policy(checkpoint, device=device)
    if sampler:
        policy.sampler = sampler
    if num_inference_steps:
        policy.num_inference_steps = int(num_inference_steps)
    store = policy.checkpoint_config.get("store", {})
    record = dict(store.get("env") or {})
    env_name = env or record.get("name")
    if not env_name:
        raise ValueError(f"checkpoint {policy.checkpoint_dir} records no environment; pass env=SIMULATOR/TASK")
    train_tasks = list(store.get("tasks") or [])
    tasks = list(tasks or record.get("tasks") or [env_name.split("/", 1)[1]])
    kwargs = env_kwargs_from_record(record, policy)
    first_task_env = env_name if "/" in env_name else f"{env_name}/{tasks[0]}"
    sim = make_env(first_task_env.rsplit("/", 1)[0] + "/" + tasks[0], seed=seed, **kwargs)
    per_task: dict[str, Any] = {}
    videos_written = []
    t_start = time.time()
    bar = tqdm(total=episodes * len(tasks), desc="eval", disable=not progress, dynamic_ncols=True)
    try:
        for task in tasks:
            goal = None
            if policy.num_tasks > 1:
                if task not in train_tasks:
                    raise ValueError(f"task {task!r} was not in the training store's tasks {train_tasks}")
                goal = {"task_id": torch.tensor([train_tasks.index(task)])}
            results = []
            for i in range(episodes):
                ep = rollout(policy, sim, seed=seed + i, task=task, goal=goal, max_steps=max_steps,
                             n_action_steps=n_action_steps, record=i < videos)
                if ep.frames:
                    path = out / f"{task}_ep{i:03d}.mp4"
                    write_video(path, ep.frames, fps=30)
                    videos_written.append(str(path))
                results.append(ep)
                bar.update(1)
                bar.set_postfix(task=task, success=f"{np.mean([r.success for r in results]):.2f}")
            per_task[task] = {
                "episodes": len(results), "successes": int(sum(r.success for r in results)),
                "success_rate": float(np.mean([r.success for r in results])),
                "mean_steps": float(np.mean([r.steps for r in results])),
                "ms_per_chunk": 1000 * sum(r.policy_seconds for r in results) / max(1, sum(r.policy_calls for r in results)),
                "seeds": [r.seed for r in results], "success_per_episode": [bool(r.success) for r in results],
            }
    finally:
        bar.close()
        sim.close()
    summary = {
        "checkpoint": str(policy.checkpoint_dir), "policy": policy.name, "env": env_name, "tasks": per_task,
        "success_rate": float(np.mean([t["success_rate"] for t in per_task.values()])),
        "episodes_per_task": episodes, "seed": seed, "sampler": policy.sampler,
        "num_inference_steps": policy.num_inference_steps, "n_action_steps": n_action_steps or policy.n_action_steps,
        "device": device, "wall_time_s": round(time.time() - t_start, 2), "videos": videos_written,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary)
    return summary
