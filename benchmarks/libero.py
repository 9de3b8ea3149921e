"""LIBERO on this machine: env speed with both cameras, the scripted expert's success per task, a policy's table.

    python benchmarks/libero.py [--suite libero_object] [--episodes 10] [--speed-steps 120]
        [--checkpoint runs/x --policy-episodes 10 [--n-action-steps 4] [--first-state 10]]
        [--out benchmarks/results/libero]

1. Speed (in .venv-libero, one LIBERO-Object env, 2 cameras at image_size 128, rendered at 256): steps per
   second for physics alone, both cameras every step (what `collect` pays), and both cameras on 2 of every 8
   steps (what an evaluation pays: the workers render only the last obs_horizon=2 steps of an 8-action
   chunk), each with the default MuJoCo quality and with ours (no shadows, MSAA, reflections). Wall time on a
   shared machine depends on its load, so CPU seconds of the process (all its threads, Mesa's included) are
   reported too: `cpu_steps_per_s` is what one free core would do.
2. Expert: `eval.py checkpoint=expert suite=<suite> episodes=N` (fixed initial states 0..N-1, the suite's step
   limit), success per task with Wilson intervals.
3. Policy (with --checkpoint): the same suite and episodes, success per task, the pooled rate with its Wilson
   interval, and the training budget the checkpoint records (steps, batch, seed, demos, wall minutes; a
   fine-tune adds its starting checkpoint's). `--n-action-steps` executes that many actions of each planned
   chunk before replanning (default: the policy's own); `--first-state K` starts episode i from fixed initial
   state K + i, to check a setting chosen on states 0..N-1 on states that played no part in the choice. Each
   (checkpoint, executed n_action_steps, first state) keeps its own row under "policies".
Prints markdown tables and updates --json (benchmarks/results/libero.json): a part that was skipped keeps its
previous result. Reports and videos go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")
# run as a script, this file's folder leads sys.path, and this file would shadow the `libero` package
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

SPEED_TASK = "libero_object/pick_up_the_alphabet_soup_and_place_it_in_the_basket"


def measure_speed(steps: int, image_size: int = 128) -> list[dict]:
    """Run inside .venv-libero: steps/s of one env under each rendering regime (expert actions, init state 0)."""
    from robodit.envs.libero import LiberoEnv

    rows = []
    for fast in (False, True):
        env = LiberoEnv(SPEED_TASK, image_size=image_size, fast_render=fast)
        for name, every in (("physics only", 0), ("2 cameras every step", 1), ("2 cameras, 2 of 8 steps", 4)):
            env.reset(seed=0)
            env.render_seconds = env.physics_seconds = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(steps):
                env.set_render(every == 1 or (every == 4 and i % 8 >= 6))
                _, success, done, _ = env.step(env.expert_action())
                if done:
                    env.reset(seed=0)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows.append({"quality": "ours (fast)" if fast else "MuJoCo default", "regime": name, "steps": steps,
                         "steps_per_s": round(steps / wall, 2), "cpu_steps_per_s": round(steps / cpu, 2),
                         "render_ms_per_step": round(1000 * env.render_seconds / steps, 1),
                         "physics_ms_per_step": round(1000 * env.physics_seconds / steps, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        env.close()
    return rows


def _table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _per_task(summary: dict) -> list[dict]:
    rows = []
    for task, r in summary["tasks"].items():
        lo, hi = r.get("ci95", [None, None])
        rows.append({"task": task.split("/")[-1], "success": f"{r['successes']}/{r['episodes']}",
                     "rate": round(r["success_rate"], 3),
                     "wilson95": f"[{lo:.2f}, {hi:.2f}]" if lo is not None else "",
                     "mean_steps": round(r["mean_steps"] or 0, 1)})
    return rows


def training_budget(checkpoint: str) -> dict:
    """What a checkpoint cost: steps, batch, seed, policy horizons, demos per task and wall minutes (from the
    training run's metrics.jsonl, first to last logged step, when the checkpoint sits in its out_dir). A fine-tune
    (train.init_from) also counts what its starting checkpoint cost: `total_steps` and `total_minutes` over the
    chain, with the start's own budget under `init_from_budget`."""
    from robodit.training.info import summarize_checkpoint

    info = summarize_checkpoint(checkpoint)
    ckpt = Path(info["path"])
    stores = info.get("stores") or []
    budget = {"step": info["step"], **info.get("training", {}), "policy": info["policy"],
              "parameters": info["parameters"]["total"], "observations": info["observations"],
              "episodes": sum(st.get("episodes", 0) for st in stores),
              "tasks": sum(len(st.get("tasks") or []) for st in stores)}
    metrics = next((d / "metrics.jsonl" for d in ckpt.parents if (d / "metrics.jsonl").exists()), None)
    if metrics is not None:
        times = [json.loads(line)["time"] for line in metrics.read_text().splitlines() if '"time"' in line]
        if len(times) > 1:
            budget["logged_minutes"] = round((times[-1] - times[0]) / 60, 1)
    budget["total_steps"], budget["total_minutes"] = budget["step"], budget.get("logged_minutes")
    if budget.get("init_from"):
        src = training_budget(budget["init_from"])
        budget["init_from_budget"] = {k: src.get(k) for k in ("step", "logged_minutes", "total_steps",
                                                              "total_minutes", "init_from") if src.get(k) is not None}
        budget["total_steps"] = budget["step"] + src["total_steps"]
        if budget["total_minutes"] is not None and src.get("total_minutes") is not None:
            budget["total_minutes"] = round(budget["total_minutes"] + src["total_minutes"], 1)
    return budget


def policy_rows(previous: dict) -> list[dict]:
    """The policy results a JSON holds, one per checkpoint (files written before several were kept hold one
    under "policy")."""
    rows = list(previous.get("policies") or [])
    return rows or ([previous["policy"]] if previous.get("policy") else [])


def _row_key(r: dict) -> tuple:
    """What a policy row measured: the checkpoint, the actions executed per chunk (rows written before the option
    existed ran the policy's own), the first initial state and the denoising steps (the policy's own: None)."""
    steps = r.get("n_action_steps") or r.get("training", {}).get("policy", {}).get("n_action_steps")
    return r.get("checkpoint"), steps, r.get("first_state", 0), r.get("num_inference_steps")


def keep_row(rows: list[dict], row: dict) -> list[dict]:
    """A checkpoint measured again with the same setting (actions per chunk, first state, denoising steps)
    replaces its row; any other row is added after the others."""
    return [r for r in rows if _row_key(r) != _row_key(row)] + [row]


def policy_suite(suite: str, first_state: int = 0) -> str | dict:
    """The suite a policy runs: the named one, or (first_state > 0) the same suite with its seed block moved so
    that episode i of every task starts from the task's fixed initial state first_state + i (the evaluation
    checks that the suite holds that many states)."""
    if first_state < 0:
        raise ValueError(f"--first-state must be >= 0, got {first_state}")
    if not first_state:
        return suite
    import yaml

    from robodit.evaluation.suites import resolve_suite_path

    d = yaml.safe_load(resolve_suite_path(suite).read_text())
    if d.get("kind", "tasks") != "tasks":
        raise ValueError(f"--first-state: suite {suite!r} is a {d.get('kind')} suite, not a task suite")
    return {**d, "seeds": [int(first_state)]}


def _summary_row(r: dict) -> dict:
    t, (lo, hi) = r.get("training", {}), r["pooled"]["ci95"]
    return {"checkpoint": r["checkpoint"], "steps": t.get("total_steps", t.get("step")),
            "minutes": t.get("total_minutes", t.get("logged_minutes")), "batch": t.get("batch_size"),
            "seed": t.get("seed"), "n_action_steps": _row_key(r)[1], "initial_states": r.get("initial_states"),
            "success": f"{r['pooled']['successes']}/{r['pooled']['episodes']}",
            "wilson95": f"[{lo:.2f}, {hi:.2f}]"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--episodes", type=int, default=10, help="expert episodes per task (initial states 0..N-1)")
    p.add_argument("--speed-steps", type=int, default=120)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--policy-episodes", type=int, default=10)
    p.add_argument("--n-action-steps", type=int, default=None, help="policy actions executed per planned chunk "
                   "before replanning (default: the policy's own)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps per chunk (default: "
                   "the policy's own); recorded in the row")
    p.add_argument("--first-state", type=int, default=0, help="policy episode i starts from fixed initial state "
                   "first_state + i (default 0: the standard states 0..N-1)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-envs", type=int, default=None, help="parallel episodes (default 2 per worker); each "
                   "builds one env per task (7-30 s each on a CPU)")
    p.add_argument("--videos", type=int, default=1, help="videos per task (each renders every step of an episode)")
    p.add_argument("--expert-tasks", default="", help="comma-separated task names: re-measure only these and "
                   "replace their rows of the expert table in --json (the mean and pooled rate are recomputed)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: speed,expert")
    p.add_argument("--out", default="benchmarks/results/libero", help="evaluation outputs (reports, videos)")
    p.add_argument("--json", default="benchmarks/results/libero.json")
    p.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)  # the .venv-libero half
    args = p.parse_args()
    if args.speed_only:
        print(json.dumps(measure_speed(args.speed_steps)))
        return

    from robodit.envs.libero_tasks import python
    from robodit.profiling import cpu_model  # torch: only here, never in the --speed-only child

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    if previous.get("suite", args.suite) != args.suite:
        previous = {}
    result: dict = {**{k: v for k, v in previous.items() if k != "policy"}, "policies": policy_rows(previous),
                    "cpu": cpu_model(), "cores": os.cpu_count(),
                    "load_at_start": os.getloadavg(), "suite": args.suite}
    if "speed" not in skip:
        r = subprocess.run([python(), __file__, "--speed-only", "--speed-steps", str(args.speed_steps)],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        result["speed"] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"\n## Env speed ({SPEED_TASK}, image_size 128 rendered at 256; {result['cpu']}, load "
              f"{result['load_at_start'][0]:.1f} on {result['cores']} cores)\n")
        print(_table(result["speed"], ["quality", "regime", "steps_per_s", "cpu_steps_per_s", "render_ms_per_step",
                                       "physics_ms_per_step"]))
    from robodit.evaluation.evaluate import evaluate

    if "expert" not in skip:
        t0 = time.time()
        only = [f"{args.suite}/{t}" for t in filter(None, args.expert_tasks.split(","))] or None
        s = evaluate("expert", suite=args.suite, episodes=args.episodes, out_dir=out / "expert", videos=args.videos,
                     workers=args.workers, num_envs=args.num_envs or 2 * max(1, args.workers), progress=True, tasks=only)
        result["expert"] = {"episodes_per_task": args.episodes, "initial_states": f"0..{args.episodes - 1}",
                            "success_rate": s["success_rate"], "pooled": s["pooled"], "tasks": _per_task(s),
                            "wall_s": round(time.time() - t0, 1), "env_steps_per_s": s["run"]["env_steps_per_s"]}
        if only:  # the other tasks' rows stay as last measured
            old = previous.get("expert", {})
            if old.get("episodes_per_task") != args.episodes:
                raise SystemExit(f"--expert-tasks: {args.json} holds no {args.episodes}-episode expert table to update")
            new_rows = {r["task"]: r for r in result["expert"]["tasks"]}
            rows = [dict(new_rows.get(r["task"], r)) for r in old["tasks"]]
            k = sum(int(r["success"].split("/")[0]) for r in rows)
            n = sum(int(r["success"].split("/")[1]) for r in rows)
            from robodit.evaluation.stats import wilson_interval

            result["expert"] = {**old, "tasks": rows, "success_rate": sum(r["rate"] for r in rows) / len(rows),
                                "pooled": {"episodes": n, "successes": k, "success_rate": k / n,
                                           "ci95": list(wilson_interval(k, n))},
                                "remeasured": {t.split("/")[-1]: time.strftime("%Y-%m-%d") for t in only}}
            s = {**s, "success_rate": result["expert"]["success_rate"]}
        print(f"\n## Scripted expert on {args.suite} ({args.episodes} initial states per task, "
              f"{s['suite']['max_steps']} steps max): mean {s['success_rate']:.3f}\n")
        print(_table(result["expert"]["tasks"], ["task", "success", "rate", "wilson95", "mean_steps"]))
    if args.checkpoint:
        # the budget first: a run keeps only its last checkpoints, and one rotated out during the evaluation
        # would otherwise lose the whole row after the evaluation ran
        budget = training_budget(args.checkpoint)
        t0 = time.time()
        suite = policy_suite(args.suite, args.first_state)
        s = evaluate(args.checkpoint, suite=suite, suite_source=None if isinstance(suite, str) else
                     f"{args.suite} from initial state {args.first_state}", episodes=args.policy_episodes,
                     out_dir=out / "policy", workers=args.workers, num_envs=args.num_envs or 2 * max(1, args.workers),
                     videos=args.videos, progress=True, n_action_steps=args.n_action_steps,
                     num_inference_steps=args.num_inference_steps)
        first = args.first_state
        row = {"checkpoint": args.checkpoint, "episodes_per_task": args.policy_episodes,
               "initial_states": f"{first}..{first + args.policy_episodes - 1}", "first_state": first,
               "n_action_steps": args.n_action_steps or budget["policy"].get("n_action_steps"),
               **({"num_inference_steps": args.num_inference_steps} if args.num_inference_steps else {}),
               "success_rate": s["success_rate"],
               "pooled": s["pooled"], "tasks": _per_task(s), "training": budget,
               "eval_wall_s": round(time.time() - t0, 1), "env_steps_per_s": s["run"]["env_steps_per_s"]}
        result["policies"] = keep_row(result["policies"], row)
        lo, hi = s["pooled"]["ci95"]
        p = budget["policy"]
        print(f"\n## Policy {args.checkpoint} on {args.suite} (initial states {row['initial_states']} per task, "
              f"{row['n_action_steps']} actions per chunk): "
              f"mean {s['success_rate']:.3f}, Wilson 95% [{lo:.2f}, {hi:.2f}]; {p['class'].rsplit('.', 1)[-1]} "
              f"{p.get('size', '')}, {budget['episodes']} demos over {budget['tasks']} tasks, images "
              f"{budget['observations']}, {budget['total_steps']} steps x batch {budget.get('batch_size')}, seed "
              f"{budget.get('seed')}, {budget.get('total_minutes') or '?'} min\n")
        print(_table(row["tasks"], ["task", "success", "rate", "wilson95", "mean_steps"]))
    if result["policies"]:
        print(f"\n## Policies measured on {args.suite} (steps and minutes include a fine-tune's starting checkpoint)\n")
        print(_table([_summary_row(r) for r in result["policies"]],
                     ["checkpoint", "steps", "minutes", "batch", "seed", "n_action_steps", "initial_states", "success",
                      "wilson95"]))
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
