"""Meta-World MT10 from state observations, one task-conditioned policy for all ten tasks.

    python benchmarks/metaworld_mt10.py [--policies mode,dit] [--demos 30] [--minutes 15] [--steps 2000]
        [--episodes 10] [--max-steps 300] [--seeds 0,1,2] [--label NAME] [--out benchmarks/results/mt10]

Collects `demos` expert episodes per MT10 task into one store (task ids from the store's task table), trains each
policy for the same budget, evaluates `suite=mt10` (held-out seeds 100000+). With several training seeds each
(policy, seed) is a row and the table adds a mean ± sample-std row per policy: one seed of MT10 moves the DiT's mean
by 8 points (80.3-88.7% over seeds 0-2) and single tasks by 20-30 (benchmarks/results/mt10_seeds.json). Prints a markdown table
(per task and mean) and writes <out>/mt10.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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


def run_policy(policy: str, store: Path, args, seed: int, root: Path) -> dict:
    overrides = [f"policy={policy}", f"policy.size={args.size}", f"dataset.path={store}", "logger=none",
                 f"out_dir={root / 'run'}", f"train.steps={args.steps}", f"train.max_minutes={args.minutes}",
                 "train.checkpoint_every=100000", f"train.seed={seed}", "train.progress=false", *args.override]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    shutil.rmtree(root / "run", ignore_errors=True)  # a half-finished run restarts from scratch (same budget)
    t0 = time.time()
    ckpt = train(cfg)
    minutes = round((time.time() - t0) / 60, 2)
    t0 = time.time()
    s = evaluate(ckpt, suite="mt10", episodes=args.episodes, max_steps=args.max_steps, out_dir=root / "eval",
                 videos=1, progress=False, workers=args.workers)
    return {"policy": policy, "size": args.size, "seed": seed, "overrides": list(args.override),
            "success_rate": s["success_rate"],
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
    ap.add_argument("--seed", type=int, default=0, help="training seed (one run per policy)")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds: one run per (policy, seed)")
    ap.add_argument("--label", default=None, help="row name instead of the policy's (e.g. to tell overrides apart)")
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
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    for policy in args.policies.split(","):
        name = args.label or policy
        for seed in seeds:
            key = name if len(seeds) == 1 else f"{name} seed {seed}"
            root = out / (name.replace(" ", "_") if len(seeds) == 1 else f"{name.replace(' ', '_')}_seed{seed}")
            result["rows"][key] = run_policy(policy, store, args, seed, root) | {"label": name}
            path.write_text(json.dumps(result, indent=2))
    print(format_table(result["rows"]))


def format_table(rows: dict) -> str:
    """One line per run, then mean ± sample std over seeds for every label with more than one run."""
    tasks = list(BENCHMARKS["MT10"])
    lines = ["| run | steps | min | mean | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(tasks)]
    groups: dict[str, list[dict]] = {}
    for key, r in rows.items():
        groups.setdefault(r.get("label", key), []).append(r)
        lines.append(f"| {key} ({r['policy']}/{r['size']}) | {r['train_steps']} | {r['train_minutes']} | "
                     f"{100 * r['success_rate']:.1f}% | "
                     + " | ".join(f"{100 * r['per_task'][t]:.0f}" for t in tasks) + " |")
    for label, runs in groups.items():
        if len(runs) < 2:
            continue
        def pm(values, digits):
            return f"{100 * statistics.mean(values):.{digits}f} ± {100 * statistics.stdev(values):.{digits}f}"
        lines.append(f"| **{label}: {len(runs)} seeds** | | | {pm([r['success_rate'] for r in runs], 1)} | "
                     + " | ".join(pm([r["per_task"][t] for r in runs], 0) for t in tasks) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
