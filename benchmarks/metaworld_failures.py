"""How a Meta-World policy fails, not only how often: per episode, the hand's distance to the goal and the gripper.

    python benchmarks/metaworld_failures.py CHECKPOINT [CHECKPOINT ...] [--task reach-v3] [--episodes 30]
        [--max-steps 300] [--top-k K] [--out benchmarks/results/failures.json]

Rolls each checkpoint out on one task (held-out seeds 100000+, the evaluation's) and records, from the 39-d state,
the closest and the final hand-to-goal distance and the smallest gripper opening (1 = open). A multi-task policy
that confuses reach with push / pick-place (one scene) closes its gripper; one that homes imprecisely keeps it
open and ends near, not at, the goal. `--top-k` re-routes a MoDE checkpoint's experts at evaluation. Prints a
table (failures vs successes) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import robodit  # noqa: E402
from robodit.envs.metaworld import MetaWorldEnv  # noqa: E402
from robodit.evaluation.runner import rollout  # noqa: E402

HAND, GRIPPER, GOAL = slice(0, 3), 3, slice(36, 39)


def episode(policy, env, seed: int, task: str, goal: dict | None, max_steps: int) -> dict:
    dist, grip = [], []

    def watch(obs):
        s = obs["state"]
        dist.append(float(np.linalg.norm(s[HAND] - s[GOAL])))
        grip.append(float(s[GRIPPER]))

    r = rollout(policy, env, seed=seed, task=task, goal=goal, max_steps=max_steps, on_step=watch)
    return {"seed": seed, "success": r.success, "steps": r.steps, "min_goal_dist": min(dist),
            "final_goal_dist": dist[-1], "min_gripper": min(grip)}


def run_checkpoint(path: str, task: str, episodes: int, max_steps: int, top_k: int | None) -> dict:
    policy = robodit.load_policy(path)
    if top_k is not None:
        if not hasattr(policy, "inference_routing"):
            raise SystemExit(f"--top-k: {path} is not a MoDE checkpoint")
        for block in policy.blocks:
            block.moe.top_k = top_k
        policy.on_weights_changed()  # the cached routes were built for the old top-k
    tasks = list((policy.checkpoint_config.get("store") or {}).get("tasks") or [])
    goal = {"task_id": np.int64(tasks.index(task))} if policy.num_tasks > 1 else None
    env = MetaWorldEnv(task, max_episode_steps=max_steps)
    rows = [episode(policy, env, 100000 + i, task, goal, max_steps) for i in range(episodes)]
    env.close()
    return {"checkpoint": str(policy.checkpoint_dir), "task": task, "top_k": top_k, "episodes": rows}


def summarize(rows: list[dict]) -> dict:
    out = {"successes": sum(r["success"] for r in rows), "episodes": len(rows)}
    for outcome, sel in (("failures", [r for r in rows if not r["success"]]),
                         ("successes_only", [r for r in rows if r["success"]])):
        if sel:
            out[outcome] = {k: round(statistics.mean(r[k] for r in sel), 3)
                            for k in ("min_goal_dist", "final_goal_dist", "min_gripper")}
            out[outcome]["gripper_closed"] = sum(r["min_gripper"] < 0.8 for r in sel)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--task", default="reach-v3")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/failures.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print("| checkpoint | success | failures: min / final hand-goal m, gripper closed | successes: min / final |")
    print("|---|---:|---|---|")
    for path in args.checkpoints:
        r = run_checkpoint(path, args.task, args.episodes, args.max_steps, args.top_k)
        r["summary"] = s = summarize(r["episodes"])
        results.append(r)
        f, ok = s.get("failures", {}), s.get("successes_only", {})
        print(f"| {path} | {s['successes']}/{s['episodes']} | "
              f"{f.get('min_goal_dist', '')} / {f.get('final_goal_dist', '')}, {f.get('gripper_closed', 0)} | "
              f"{ok.get('min_goal_dist', '')} / {ok.get('final_goal_dist', '')} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"task": args.task, "max_steps": args.max_steps, "runs": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
