"""PAD vs the DiT baseline from 64 px images on Meta-World, and PAD co-trained on action-free video of other tasks.

    python benchmarks/pad_metaworld.py [--tasks reach-v3,button-press-topdown-v3,drawer-open-v3] [--demos 30]
        [--minutes 6] [--steps 1200] [--episodes 20] [--policies pad,dit] [--cotrain-task reach-v3]
        [--video-tasks drawer-close-v3,window-open-v3,door-open-v3] [--video-episodes 30] [--rows all|main|cotrain|none]
        [--diffusion x0|paper] [--tag NAME]

Same images (corner2 camera at 64 px, plus state), same wall-clock budget per run (1 torch thread), same width /
depth for both networks, same diffusion (DDPM x0-prediction, 100 steps, DDIM-10 at inference: at a budget of
~1000 steps the DiT measured 5% with epsilon-prediction vs 100% with x0 on reach, see configs/policy/dit.yaml).
`--diffusion paper` gives PAD its paper's process instead (epsilon, linear betas, 1000 steps, DDIM-50).
Evaluation on held-out seeds 100000.. of the demo task only. Co-training row: the demo store plus
`video-episodes` action-free episodes of each video task (`collect(..., has_actions=False)`), same budget.
`--tag` names a variant (another budget, --diffusion paper): its rows are kept next to the others.

Every run writes <out>/runs/<row>/row.json and is skipped when that exists, so an interrupted benchmark resumes;
the table is printed and written to benchmarks/results/pad_mt1.{json,md} from all finished rows.
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
from robodit.datasets.store import DemoStore  # noqa: E402
from robodit.evaluation.evaluate import evaluate  # noqa: E402
from robodit.training.trainer import train  # noqa: E402

TASKS = "reach-v3,button-press-topdown-v3,drawer-open-v3"
VIDEO_TASKS = "drawer-close-v3,window-open-v3,door-open-v3"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RESULTS = Path(__file__).resolve().parent / "results"
# the DiT's measured-good diffusion at small budgets, for both policies (PAD's paper default is epsilon / 1000)
DIFFUSION = ["formulation.prediction=sample", "formulation.beta_schedule=squaredcos_cap_v2",
             "formulation.num_train_timesteps=100", "sampler=ddim", "num_inference_steps=10"]
# PAD's paper process (epsilon, linear betas, 1000 steps, DDIM-50)
PAPER = ["formulation.prediction=epsilon", "formulation.beta_schedule=linear", "formulation.num_train_timesteps=1000",
         "sampler=ddim", "num_inference_steps=50"]


def store_for(task: str, args, video: bool = False) -> Path:
    """The task's image demos (collected once); with video=True a copy plus action-free episodes of other tasks."""
    stores = Path(args.out) / "stores"
    demos = stores / f"{task}.zarr"
    if not demos.exists():
        collect(f"metaworld/{task}", episodes=args.demos, out=demos, image_size=args.image_size,
                cameras=(args.camera,), seed=0, progress=False)
    if not video:
        return demos
    mixed = stores / f"{task}+video{args.video_episodes}.zarr"
    if not mixed.exists():
        partial = stores / f"{task}+video{args.video_episodes}.partial.zarr"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(demos, partial)
        for other in args.video_tasks.split(","):
            collect(f"metaworld/{other}", episodes=args.video_episodes, out=partial, image_size=args.image_size,
                    cameras=(args.camera,), seed=0, progress=False, has_actions=False)
        partial.rename(mixed)
    return mixed


def overrides_for(policy: str, args) -> list[str]:
    net = [f"++policy.width={args.width}", f"++policy.depth={args.depth}", f"++policy.heads={args.heads}"]
    if policy == "pad":
        diffusion = DIFFUSION if args.diffusion == "x0" else PAPER
        return ["policy=pad", "policy.size=base", f"policy.image_size={args.image_size}", *net,
                *(f"policy.{o}" for o in diffusion)]
    return [f"policy={policy}", "policy.size=tiny", *net, *(f"policy.{o}" for o in DIFFUSION)]


def run_row(name: str, task: str, policy: str, args, video: bool = False) -> dict:
    root = Path(args.out) / "runs" / name
    done = root / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.time()
    store = store_for(task, args, video)
    t_collect = time.time() - t0
    with DemoStore.open(store) as s:
        n_video = int((~s.episode_has_actions).sum())
    shutil.rmtree(root / "run", ignore_errors=True)  # a half-finished run restarts from scratch (same budget)
    overrides = overrides_for(policy, args) + [
        f"dataset.path={store}", "logger=none", f"out_dir={root / 'run'}", f"train.steps={args.steps}",
        f"train.max_minutes={args.minutes}", "train.checkpoint_every=100000", "train.val_every=0",
        f"train.seed={args.seed}", "train.progress=false", *args.override]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    t0 = time.time()
    ckpt = train(cfg)
    t_train = time.time() - t0
    t0 = time.time()
    summary = evaluate(ckpt, episodes=args.episodes, tasks=[task], out_dir=root / "eval", videos=1, progress=False)
    r = summary["tasks"][task]
    row = {"row": name, "task": task, "policy": policy, "video_episodes": n_video, "tag": args.tag,
           "budget_minutes": args.minutes, "schedule_steps": args.steps,
           "diffusion": args.diffusion if policy == "pad" else "x0",
           "sampler": f"{summary['sampler']}-{summary['num_inference_steps']}",
           "success_rate": r["success_rate"], "successes": r["successes"], "episodes": r["episodes"],
           "train_steps": int(ckpt.name.split("_")[1]), "train_minutes": round(t_train / 60, 2),
           "collect_s": round(t_collect, 1), "eval_s": round(time.time() - t0, 1),
           "ms_per_chunk": round(r["ms_per_chunk"], 2), "checkpoint": str(ckpt),
           "report": str(root / "eval" / "report.md"), "frames": summary.get("frame_grid")}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row, indent=2))
    return row


def planned_rows(args) -> list[tuple[str, str, str, bool]]:
    rows, tag = [], f"@{args.tag}" if args.tag else ""
    if args.rows in ("all", "main"):
        rows += [(f"{t}/{p}{tag}", t, p, False) for t in args.tasks.split(",") for p in args.policies.split(",")]
    if args.rows in ("all", "cotrain"):
        t = args.cotrain_task
        rows += [(f"{t}/pad{tag}", t, "pad", False), (f"{t}/pad+video{args.video_episodes}{tag}", t, "pad", True)]
    return list(dict.fromkeys(rows))  # the co-training baseline is the main table's PAD row: run once


def table(rows: list[dict]) -> list[str]:
    lines = ["| task | policy | diffusion | video eps | variant | success | train steps (schedule) | train min (cap) | "
             "ms/chunk |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['policy']} | {r['diffusion']} {r['sampler']} | {r['video_episodes']} | "
              f"{r['tag'] or '-'} | "
              f"{100 * r['success_rate']:.0f}% ({r['successes']}/{r['episodes']}) | {r['train_steps']} "
              f"({r['schedule_steps']}) | {r['train_minutes']} ({r['budget_minutes']:g}) | {r['ms_per_chunk']} |"
              for r in rows]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--policies", default="pad,dit")
    ap.add_argument("--rows", default="all", choices=["all", "main", "cotrain", "none"],
                    help="none: only rebuild the table from finished rows")
    ap.add_argument("--cotrain-task", default="reach-v3")
    ap.add_argument("--video-tasks", default=VIDEO_TASKS)
    ap.add_argument("--video-episodes", type=int, default=30, help="action-free episodes per video task")
    ap.add_argument("--demos", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--camera", default="corner2")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--steps", type=int, default=1200, help="the LR schedule anneals over these; --minutes caps")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diffusion", default="x0", choices=["x0", "paper"], help="PAD's process (see above)")
    ap.add_argument("--tag", default="", help="suffix of this variant's row names, e.g. 3min")
    ap.add_argument("--threads", type=int, default=1, help="1 is robust on a shared 2-core machine")
    ap.add_argument("--out", default=str(RESULTS / "pad_mt1"))
    ap.add_argument("override", nargs="*", help="extra Hydra overrides for both policies, e.g. train.batch_size=32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, task, policy, video in planned_rows(args):
        row = run_row(name, task, policy, args, video)
        rows.append(row)
        print(f"{name}: {100 * row['success_rate']:.0f}% ({row['successes']}/{row['episodes']}) after "
              f"{row['train_steps']} steps / {row['train_minutes']} min", flush=True)
    finished = sorted((json.loads(p.read_text()) for p in (Path(args.out) / "runs").rglob("row.json")),
                      key=lambda r: (r["tag"], r["task"], r["policy"], r["diffusion"], r["video_episodes"]))
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                          "torch": torch.__version__, "note": "2-core CPU shared with other jobs, nice 19"},
              "last_invocation": {k: v for k, v in vars(args).items() if k != "override"} | {"override": args.override},
              "rows": finished}
    (RESULTS / "pad_mt1.json").write_text(json.dumps(result, indent=2))
    lines = table(finished)
    caption = (f"Meta-World, {args.camera} camera at {args.image_size} px + state, {args.demos} demos, "
               f"{args.episodes} held-out episodes (seeds 100000..), width {args.width} depth {args.depth}, "
               f"1 torch thread, nice 19, 2-core CPU shared with other jobs (steps vary with the load). "
               "video eps: action-free episodes of the video tasks in the store (all tasks together).")
    (RESULTS / "pad_mt1.md").write_text(caption + "\n\n" + "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\nwrote {RESULTS / 'pad_mt1.json'}")


if __name__ == "__main__":
    main()
