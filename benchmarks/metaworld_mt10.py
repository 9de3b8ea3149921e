"""Meta-World MT10 from state observations, one task-conditioned policy for all ten tasks.

    python benchmarks/metaworld_mt10.py [--policies mode,dit] [--demos 30] [--minutes 15] [--steps 2000]
        [--episodes 10] [--max-steps 300] [--out benchmarks/results/mt10]

Collects `demos` expert episodes per MT10 task into one store (task ids from the store's task table), trains each
policy for the same wall-clock budget, evaluates `suite=mt10` (held-out seeds 100000+). Prints a markdown table
(per task and mean) and writes <out>/mt10.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from robodit.datasets.collect import collect_multitask  # noqa: E402
from robodit.envs.metaworld import BENCHMARKS  # noqa: E402
from robodit.evaluation.evaluate import evaluate  # noqa: E402
from robodit.training.trainer import train  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_policy(policy: str, store: Path, args) -> dict:
    root = Path(args.out) / policy
    overrides = [f"policy={policy}", f"policy.size={args.size}", f"dataset.path={store}", "logger=none",
                 f"out_dir={root / 'run'}", f"train.steps={args.steps}", f"train.max_minutes={args.minutes}",
                 "train.checkpoint_every=100000", f"train.seed={args.seed}", "train.progress=false", *args.override]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    t0 = time.time()
    ckpt = train(cfg)
    minutes = round((time.time() - t0) / 60, 2)
    t0 = time.time()
    s = evaluate(ckpt, suite="mt10", episodes=args.episodes, max_steps=args.max_steps, out_dir=root / "eval",
                 videos=1, progress=False, workers=args.workers)
    return {"policy": policy, "size": args.size, "success_rate": s["success_rate"],
            "per_task": {t: r["success_rate"] for t, r in s["tasks"].items()},
            "episodes_per_task": s["episodes_per_task"], "train_steps": int(ckpt.name.split("_")[1]),
            "train_minutes": minutes, "eval_s": round(time.time() - t0, 1), "checkpoint": str(ckpt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="mode,dit")
    ap.add_argument("--demos", type=int, default=30, help="per task")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--steps", type=int, default=2000, help="the LR schedule anneals over these; --minutes caps")
    ap.add_argument("--episodes", type=int, default=10, help="per task")
    ap.add_argument("--max-steps", type=int, default=300, help="evaluation episode limit")
    ap.add_argument("--size", default="base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/mt10")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "mt10_state.zarr"
    if not store.exists():
        collect_multitask("metaworld/MT10", list(BENCHMARKS["MT10"]), args.demos, store, language_fraction=0.0,
                          progress=False)
    path = out / "mt10.json"
    result = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    result.update({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "threads": args.threads, "torch": torch.__version__},
                   "settings": {k: v for k, v in vars(args).items()}})
    for policy in args.policies.split(","):
        result["rows"][policy] = run_policy(policy, store, args)
        path.write_text(json.dumps(result, indent=2))
    tasks = list(BENCHMARKS["MT10"])
    lines = ["| policy | steps | min | mean | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for r in result["rows"].values():
        lines.append(f"| {r['policy']}/{r['size']} | {r['train_steps']} | {r['train_minutes']} | "
                     f"{100 * r['success_rate']:.0f}% | " + " | ".join(f"{100 * r['per_task'][t]:.0f}" for t in tasks)
                     + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
