"""The foundation benchmark: scripted demos → DiT baseline on the CPU for a time budget → seeded evaluation.

    python benchmarks/metaworld_mt1.py [--tasks reach-v3,button-press-topdown-v3,drawer-open-v3]
        [--demos 50] [--minutes 15] [--episodes 50] [--policy dit] [--size base] [--out benchmarks/results/mt1]

Per task: collect `demos` successful expert episodes (state observations, seeds 0..), train for `minutes` of
wall time (or --steps), evaluate `episodes` held-out seeds (100000..). Prints a markdown table and writes
<out>/mt1.json. Each task's store, run and eval report stay under <out>/<task>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from robodit.datasets.collect import collect  # noqa: E402
from robodit.evaluation.evaluate import evaluate  # noqa: E402
from robodit.training.trainer import train  # noqa: E402

TASKS = "reach-v3,button-press-topdown-v3,drawer-open-v3"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_task(task: str, args) -> dict:
    root = Path(args.out) / task
    store = root / "demos.zarr"
    t0 = time.time()
    if not store.exists():
        collect(f"metaworld/{task}", episodes=args.demos, out=store, seed=0, progress=False)
    t_collect = time.time() - t0
    overrides = [f"policy={args.policy}", f"policy.size={args.size}", f"dataset.path={store}", "logger=none",
                 f"out_dir={root / 'run'}", f"train.steps={args.steps}", f"train.max_minutes={args.minutes}",
                 "train.checkpoint_every=100000", f"train.seed={args.seed}", "train.progress=false"]
    overrides += args.override
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    shutil.rmtree(root / "run", ignore_errors=True)  # a half-finished run restarts from scratch (same budget)
    t0 = time.time()
    ckpt = train(cfg)
    t_train = time.time() - t0
    steps = int(ckpt.name.split("_")[1])
    t0 = time.time()
    summary = evaluate(ckpt, episodes=args.episodes, out_dir=root / "eval", videos=1, progress=False)
    r = summary["tasks"][task]
    return {"task": task, "success_rate": r["success_rate"], "successes": r["successes"], "episodes": r["episodes"],
            "train_steps": steps, "train_minutes": round(t_train / 60, 2), "collect_s": round(t_collect, 1),
            "eval_s": round(time.time() - t0, 1), "ms_per_chunk": round(r["ms_per_chunk"], 2),
            "checkpoint": str(ckpt), "report": str(root / "eval" / "report.md")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--demos", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--steps", type=int, default=2500, help="the LR schedule anneals over these; --minutes caps wall time")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--policy", default="dit")
    ap.add_argument("--size", default="base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is robust on a shared 2-core machine")
    ap.add_argument("--out", default="benchmarks/results/mt1")
    ap.add_argument("override", nargs="*", help="extra Hydra overrides for train.py, e.g. train.batch_size=128")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for task in args.tasks.split(","):
        row = run_task(task, args)
        rows.append(row)
        print(f"{task}: {100 * row['success_rate']:.0f}% ({row['successes']}/{row['episodes']}) after "
              f"{row['train_steps']} steps / {row['train_minutes']} min", flush=True)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__},
              "settings": {k: v for k, v in vars(args).items() if k != "override"} | {"override": args.override},
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mt1.json").write_text(json.dumps(result, indent=2))
    table = ["| task | success | train steps | train min | ms/chunk |", "|---|---:|---:|---:|---:|"]
    table += [f"| {r['task']} | {100 * r['success_rate']:.0f}% ({r['successes']}/{r['episodes']}) | {r['train_steps']} | "
              f"{r['train_minutes']} | {r['ms_per_chunk']} |" for r in rows]
    (out / "mt1.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\nwrote {out / 'mt1.json'}")


if __name__ == "__main__":
    main()
