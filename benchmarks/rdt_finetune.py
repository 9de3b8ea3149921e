"""Does multi-embodiment pretraining help? RDT pretrained on several robots, fine-tuned on TwoArmLift, versus
RDT trained on TwoArmLift from scratch with the same fine-tuning budget.

    python benchmarks/rdt_finetune.py [--pretrain metaworld/reach-v3,robosuite/Lift,robosuite/TwoArmHandover]
        [--target robosuite/TwoArmLift] [--demos 30] [--target-demos 50] [--pretrain-minutes 10]
        [--minutes 8] [--steps 500] [--episodes 20] [--reuse] [--size base] [--out benchmarks/results/rdt_finetune]

1. collect scripted demos (state observations) for every pretraining store and the target (seeds 0..);
2. pretrain one RDT on all pretraining stores at once (`dataset.paths=[...]`: a Sawyer, one Panda, two Pandas,
   each sample in the unified 128-d space with its own control rate and normalisation);
3. fine-tune it on the target store (`train.init_from=`), and train the same model from scratch on the target,
   both with `--steps` steps capped at `--minutes` of wall time;
4. evaluate both on `--episodes` held-out seeds (100000..). The target is left out of pretraining, so any gain
   is transfer from other robots and tasks. Prints a table, writes <out>.json and <out>.md.
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
from robodit.training.checkpoint import list_checkpoints, read_config  # noqa: E402
from robodit.training.trainer import train  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRETRAIN = "metaworld/reach-v3,robosuite/Lift,robosuite/TwoArmHandover"
MAX_STEPS = {"robosuite/Lift": 150, "robosuite/TwoArmLift": 150, "robosuite/TwoArmHandover": 300}


def store_for(source: str, episodes: int, root: Path) -> Path:
    store = root / "stores" / f"{source.replace('/', '_')}.zarr"
    if not store.exists():
        t0 = time.time()
        collect(source, episodes=episodes, out=store, seed=0, max_steps=MAX_STEPS.get(source), progress=False)
        print(f"collected {episodes} demos of {source} in {time.time() - t0:.0f} s", flush=True)
    return store


def run_train(name: str, dataset: list[str], steps: int, minutes: float, args, extra=()) -> tuple[Path, dict]:
    out = Path(args.out) / name
    found = list_checkpoints(out) if args.reuse else []
    if found:  # an earlier run's checkpoint: its steps and minutes come from its train_state
        state = torch.load(found[-1] / "train_state.pt", map_location="cpu", weights_only=False)
        planned = read_config(found[-1])["train"]["train"]["steps"]  # the LR schedule's length
        return found[-1], {"train_steps": int(state["step"]), "train_minutes": round(state["elapsed_s"] / 60, 2),
                           "schedule_steps": planned, "reused": True}
    data = [f"dataset.path={dataset[0]}"] if len(dataset) == 1 else [f"dataset.paths=[{','.join(dataset)}]"]
    overrides = ["policy=rdt", f"policy.size={args.size}", *data, "logger=none", f"out_dir={out}",
                 f"train.steps={steps}", f"train.max_minutes={minutes}", "train.checkpoint_every=100000",
                 f"train.seed={args.seed}", "train.progress=false", *extra, *args.override]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    shutil.rmtree(out, ignore_errors=True)  # a half-finished run restarts from scratch (same budget)
    t0 = time.time()
    ckpt = train(cfg)
    return ckpt, {"train_steps": int(ckpt.name.split("_")[1]), "train_minutes": round((time.time() - t0) / 60, 2),
                  "schedule_steps": steps}


def run_eval(ckpt: Path, args) -> dict:
    t0 = time.time()
    summary = evaluate(ckpt, episodes=args.episodes, out_dir=ckpt.parents[1] / "eval", videos=1, progress=False,
                       workers=0)
    r = next(iter(summary["tasks"].values()))
    return {"success_rate": r["success_rate"], "successes": r["successes"], "episodes": r["episodes"],
            "ci95": r.get("ci95"), "mean_steps": round(r["mean_steps"], 1),
            "ms_per_chunk": round(r["ms_per_chunk"], 2), "eval_s": round(time.time() - t0, 1),
            "checkpoint": str(ckpt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain", default=PRETRAIN)
    ap.add_argument("--target", default="robosuite/TwoArmLift")
    ap.add_argument("--demos", type=int, default=30, help="per pretraining store")
    ap.add_argument("--target-demos", type=int, default=50)
    ap.add_argument("--pretrain-minutes", type=float, default=10.0)
    ap.add_argument("--pretrain-steps", type=int, default=700)
    ap.add_argument("--minutes", type=float, default=8.0, help="fine-tune and scratch: the same wall-time cap")
    ap.add_argument("--steps", type=int, default=500, help="fine-tune and scratch: the same step budget")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--size", default="base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is robust on a shared 2-core machine")
    ap.add_argument("--out", default="benchmarks/results/rdt_finetune")
    ap.add_argument("--reuse", action="store_true", help="keep the checkpoints an earlier run left under <out> "
                    "(pretrain / finetune / scratch) and only evaluate again")
    ap.add_argument("override", nargs="*", help="extra Hydra overrides for every training run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    sources = args.pretrain.split(",")
    if args.target in sources:
        raise SystemExit(f"--target {args.target} is also a pretraining store: leave it out to measure transfer")
    pre_stores = [str(store_for(s, args.demos, root)) for s in sources]
    target = str(store_for(args.target, args.target_demos, root))

    pre_ckpt, pre = run_train("pretrain", pre_stores, args.pretrain_steps, args.pretrain_minutes, args)
    print(f"pretrained on {len(sources)} stores: {pre['train_steps']} steps / {pre['train_minutes']} min", flush=True)
    rows = []
    for name, extra in (("fine-tune", [f"train.init_from={pre_ckpt}"]), ("scratch", [])):
        ckpt, info = run_train(name.replace("-", ""), [target], args.steps, args.minutes, args, extra)
        row = {"run": name, **info, **run_eval(ckpt, args)}
        rows.append(row)
        print(f"{name}: {100 * row['success_rate']:.0f}% ({row['successes']}/{row['episodes']}) after "
              f"{row['train_steps']} steps / {row['train_minutes']} min", flush=True)

    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, "torch": torch.__version__, "note": "CPU shared with other jobs"},
              "settings": {k: v for k, v in vars(args).items() if k != "override"} | {"override": args.override},
              "pretrain": {"stores": sources, **pre, "checkpoint": str(pre_ckpt)}, "rows": rows}
    root.parent.mkdir(parents=True, exist_ok=True)
    json_path = root.parent / f"{root.name}.json"
    json_path.write_text(json.dumps(result, indent=2))
    table = [f"| {args.target} (state) | success | train steps | train min |", "|---|---:|---:|---:|",
             f"| pretrain on {', '.join(sources)} | — | {pre['train_steps']} | {pre['train_minutes']} |"]
    table += [f"| {r['run']} | {100 * r['success_rate']:.0f}% ({r['successes']}/{r['episodes']}) | "
              f"{r['train_steps']} | {r['train_minutes']} |" for r in rows]
    (root.parent / f"{root.name}.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
