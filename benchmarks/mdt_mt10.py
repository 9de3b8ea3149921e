"""MDT on Meta-World MT10 from images with sparse language labels, plus the auxiliary-loss ablations.

    python benchmarks/mdt_mt10.py [--store PATH] [--episodes-per-task 30] [--language-fraction 0.1]
        [--image-size 64] [--minutes 15] [--episodes 10] [--max-steps 300]
        [--variants full,no_mgf,no_cla,no_aux] [--out benchmarks/results/mdt_mt10]

Collects the MT10 store if missing (`robodit collect metaworld/MT10 ...`), trains one MDT per variant for the same
wall-clock budget, and evaluates each checkpoint with language goals; the full model is also evaluated with goal
images (an expert's success on a held-out seed per task) and with held-out paraphrases. Prints a markdown table
and writes <out>/mdt_mt10.json (per task and mean, with step counts and minutes).
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

from robodit.datasets.collect import collect_multitask  # noqa: E402
from robodit.envs.metaworld import BENCHMARKS  # noqa: E402
from robodit.evaluation.evaluate import evaluate  # noqa: E402
from robodit.training.trainer import train  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = {"full": [], "no_mgf": ["policy.mgf_weight=0", "policy.future_frames=0"], "no_cla": ["policy.cla_weight=0"],
            "no_aux": ["policy.mgf_weight=0", "policy.future_frames=0", "policy.cla_weight=0"]}
EVALS = {"language": {"goal": "language"}, "image": {"goal": "image"},
         "language_heldout": {"goal": "language", "instructions": "heldout"}}


def train_variant(name: str, store: Path, args) -> tuple[Path, dict]:
    overrides = ["policy=mdt", f"policy.size={args.size}", f"dataset.path={store}", "logger=none",
                 f"out_dir={Path(args.out) / name / 'run'}", f"train.steps={args.steps}",
                 f"train.max_minutes={args.minutes}", "train.checkpoint_every=100000", f"train.seed={args.seed}",
                 "train.progress=false", *VARIANTS[name], *args.override]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    shutil.rmtree(Path(args.out) / name / "run", ignore_errors=True)  # a half-finished run restarts from scratch
    t0 = time.time()
    ckpt = train(cfg)
    return ckpt, {"train_steps": int(ckpt.name.split("_")[1]), "train_minutes": round((time.time() - t0) / 60, 2)}


def evaluate_variant(name: str, ckpt: Path, kind: str, args) -> dict:
    t0 = time.time()
    s = evaluate(ckpt, episodes=args.episodes, out_dir=Path(args.out) / name / f"eval_{kind}", max_steps=args.max_steps,
                 videos=1, progress=False, workers=args.workers, **EVALS[kind])
    return {"success_rate": s["success_rate"], "per_task": {t: r["success_rate"] for t, r in s["tasks"].items()},
            "episodes_per_task": s["episodes_per_task"], "eval_s": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=None, help="MT10 store (default: <out>/mt10.zarr, collected if missing)")
    p.add_argument("--episodes-per-task", type=int, default=30)
    p.add_argument("--language-fraction", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--size", default="base")
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--steps", type=int, default=4000, help="schedule length (training stops at --minutes)")
    p.add_argument("--episodes", type=int, default=10, help="evaluation episodes per task")
    p.add_argument("--max-steps", type=int, default=300, help="evaluation episode limit")
    p.add_argument("--variants", default="full,no_mgf,no_cla,no_aux")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/mdt_mt10")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(args.store) if args.store else out / "mt10.zarr"
    if not store.exists():
        collect_multitask("metaworld/MT10", list(BENCHMARKS["MT10"]), args.episodes_per_task, store,
                          language_fraction=args.language_fraction, image_size=args.image_size, progress=False)
    results_path = out / "mdt_mt10.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"variants": {}}
    results.update({"store": str(store), "hardware": f"{platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores, {args.threads} torch thread(s), CPU only",
                    "budget_minutes": args.minutes, "eval_episodes_per_task": args.episodes,
                    "eval_max_steps": args.max_steps, "language_fraction": args.language_fraction})
    for name in args.variants.split(","):
        ckpt, row = train_variant(name, store, args)
        kinds = ["language", "image", "language_heldout"] if name == "full" else ["language"]
        row["eval"] = {k: evaluate_variant(name, ckpt, k, args) for k in kinds}
        row["checkpoint"] = str(ckpt)
        results["variants"][name] = row
        results_path.write_text(json.dumps(results, indent=2))  # keep what finished if a later variant dies
    print(table(results))


def table(results: dict) -> str:
    lines = ["| variant | steps | min | language | image goal | held-out paraphrases |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in results["variants"].items():
        cell = lambda k: f"{100 * row['eval'][k]['success_rate']:.0f}%" if k in row["eval"] else "-"
        lines.append(f"| {name} | {row['train_steps']} | {row['train_minutes']} | {cell('language')} | "
                     f"{cell('image')} | {cell('language_heldout')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
