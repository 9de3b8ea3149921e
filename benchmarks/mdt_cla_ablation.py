"""MDT's Contrastive Latent Alignment on vs off, MT10 from 64 px images with sparse language labels (issue 18).

    python benchmarks/mdt_cla_ablation.py [--store PATH] [--episodes-per-task 20] [--language-fraction 0.1]
        [--size small] [--steps 1000] [--seeds 0,1] [--variants cla_on,cla_off] [--episodes 5] [--max-steps 300]
        [--old-code /path/to/old/checkout --old-minutes 4] [--report-only] [--out benchmarks/results/mdt_cla]

Collects the MT10 store if missing, then for every variant and seed trains one MDT for the same step budget
(`train.steps`, no wall-clock cap, so on and off see the same number of updates) and evaluates its EMA weights
on the mt10 suite twice: with language goals and with goal images. One job at a time, each a subprocess whose
log lands next to its run (`<out>/<variant>_s<seed>/train.log`, `eval_<goal>/eval.log`); a finished training run
or evaluation is reused, so the script can be stopped and re-run. `--report-only` runs nothing and reports what
has finished.

The CLA loss curve comes from each run's metrics.jsonl. `--old-code DIR` also trains the CLA-on variant with the
code of another checkout (e.g. the commit before the fix), same config and schedule, stopped after
`--old-minutes`, for the old-vs-new curve. Prints markdown tables and writes benchmarks/results/mdt_cla_ablation.json
(success pooled over tasks and seeds with a Wilson 95% interval, per seed, per task; curves; budget; CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robodit.evaluation.stats import wilson_interval  # noqa: E402

VARIANTS = {"cla_on": [], "cla_off": ["policy.cla_weight=0"]}
GOALS = ("language", "image")


def run_logged(cmd: list[str], log: Path, cwd: Path, pythonpath: Path) -> float:
    """Run one job to completion with its output in `log`; its wall time in seconds. A failure stops the script
    with the log's tail (a half-finished ablation is worse than a clear error)."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    if rc:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"{' '.join(cmd[:3])} ... failed (exit {rc}); {log}:\n" + "\n".join(tail))
    return time.time() - t0


def final_step(run: Path) -> int | None:
    steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*") if p.name.split("_")[1].isdigit()]
    return max(steps) if steps else None


def train_overrides(store: Path, run: Path, seed: int, args) -> list[str]:
    return ["policy=mdt", f"policy.size={args.size}", f"dataset.path={store.resolve()}", "logger=none",
            f"out_dir={run.resolve()}", f"train.steps={args.steps}", f"train.seed={args.seed_base + seed}",
            "train.checkpoint_every=100000", "train.val_every=100000", "train.progress=false",
            f"train.log_every={args.log_every}", *args.override]


def train(variant: str, seed: int, store: Path, args) -> dict:
    job = Path(args.out) / f"{variant}_s{seed}"
    run, timing = job / "run", job / "timing.json"
    if timing.exists() and final_step(run) is not None:
        return json.loads(timing.read_text())
    if args.report_only:
        return {}
    old = variant == "cla_old"
    code = Path(args.old_code).resolve() if old else ROOT
    extra = [f"train.max_minutes={args.old_minutes}"] if old else VARIANTS[variant]
    cmd = [sys.executable, str(code / "train.py"), *train_overrides(store, run, seed, args), *extra]
    seconds = run_logged(cmd, job / "train.log", code, code)
    row = {"train_steps": final_step(run), "train_minutes": round(seconds / 60, 2), "code": str(code),
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()}
    timing.write_text(json.dumps(row, indent=2))
    return row


def evaluate(variant: str, seed: int, goal: str, args) -> dict | None:
    job = Path(args.out) / f"{variant}_s{seed}"
    out = job / f"eval_{goal}"
    if not (out / "results.json").exists():
        if args.report_only or final_step(job / "run") is None:
            return None
        cmd = [sys.executable, str(ROOT / "eval.py"), f"checkpoint={(job / 'run').resolve()}", "suite=mt10",
               f"suite.episodes={args.episodes}", f"max_steps={args.max_steps}", f"goal={goal}",
               f"out_dir={out.resolve()}", "progress=false", "videos=0", f"workers={args.workers}"]
        run_logged(cmd, job / f"eval_{goal}.log", ROOT, ROOT)
    s = json.loads((out / "results.json").read_text())
    tasks = {t: (int(r["successes"]), int(r["episodes"])) for t, r in s["tasks"].items()}
    return {"successes": sum(k for k, _ in tasks.values()), "episodes": sum(n for _, n in tasks.values()),
            "per_task": {t: f"{k}/{n}" for t, (k, n) in tasks.items()}}


def cla_curve(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["train/cla_loss"])) for r in rows if "train/cla_loss" in r]


def pooled(cells: list[dict | None]) -> dict | None:
    done = [c for c in cells if c]
    if not done:
        return None
    k, n = sum(c["successes"] for c in done), sum(c["episodes"] for c in done)
    lo, hi = wilson_interval(k, n)
    return {"seeds": len(done), "successes": k, "episodes": n, "success_rate": k / n, "ci95": [lo, hi],
            "per_seed": [round(c["successes"] / c["episodes"], 3) for c in done]}


def tables(results: dict) -> str:
    lines = ["| variant | seeds | steps | train min / run | language goals (95% CI) | per seed | "
             "image goals (95% CI) | per seed |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in results["variants"].items():
        cells = []
        for goal in GOALS:
            p = v["success"].get(goal)
            cells += ([f"{100 * p['success_rate']:.0f}% ({100 * p['ci95'][0]:.0f}–{100 * p['ci95'][1]:.0f}), "
                       f"n={p['episodes']}", " / ".join(f"{100 * r:.0f}" for r in p["per_seed"])] if p else ["-", "-"])
        mins = [r["train_minutes"] for r in v["runs"].values() if r]
        steps = sorted({r["train_steps"] for r in v["runs"].values() if r})
        lines.append(f"| {name} | {len(mins)} | {','.join(map(str, steps)) or '-'} | "
                     f"{min(mins, default=0):.1f}–{max(mins, default=0):.1f} | " + " | ".join(cells) + " |")
    curves = {k: c for k, c in results["cla_curves"].items() if c}
    if curves:  # median of the logged (single-batch, noisy) values per 100-step window, and the lowest one
        last = max(s for c in curves.values() for s, _ in c)
        windows = [(lo, min(lo + 99, last)) for lo in range(1, last + 1, 100)]
        lines += ["", "| CLA loss, median per window (min) | " + " | ".join(f"{a}–{b}" for a, b in windows) +
                  " | min |", "|---|" + "---:|" * (len(windows) + 1)]
        for name, c in curves.items():
            cells = []
            for a, b in windows:
                vals = sorted(v for s, v in c if a <= s <= b)
                cells.append(f"{vals[len(vals) // 2]:.2g}" if vals else "")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {min(v for _, v in c):.1g} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=None, help="MT10 store (default: <out>/mt10.zarr, collected if missing)")
    p.add_argument("--episodes-per-task", type=int, default=20)
    p.add_argument("--language-fraction", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run (the step budget)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--seed-base", type=int, default=0, help="train.seed = seed-base + seed")
    p.add_argument("--variants", default="cla_on,cla_off")
    p.add_argument("--episodes", type=int, default=5, help="evaluation episodes per task")
    p.add_argument("--max-steps", type=int, default=300, help="evaluation episode limit")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--old-code", default=None, help="a checkout with the old CLA: adds the cla_old curve run")
    p.add_argument("--old-minutes", type=float, default=4.0)
    p.add_argument("--override", action="append", default=[],
                   help="extra Hydra override for every run, e.g. policy.mgf_weight=0 (repeatable)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default="benchmarks/results/mdt_cla")
    p.add_argument("--json", default="benchmarks/results/mdt_cla_ablation.json")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(args.store) if args.store else out / "mt10.zarr"
    if not store.exists() and not args.report_only:
        run_logged([sys.executable, "-m", "robodit.cli", "collect", "metaworld/MT10", "--episodes-per-task",
                    str(args.episodes_per_task), "--language-fraction", str(args.language_fraction), "--image-size",
                    str(args.image_size), "--out", str(store)], out / "collect.log", ROOT, ROOT)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {"description": "MDT CLA on vs off (issue 18's fix: goal-token contrast with negatives that share the "
                              "observation), MT10 64 px, sparse language labels, same step budget per run",
               "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} core(s) shared with "
                           "other jobs, 1 torch thread, CPU only",
               "budget": {"steps": args.steps, "size": args.size, "seeds": seeds, "episodes_per_task_train":
                          args.episodes_per_task, "language_fraction": args.language_fraction,
                          "eval_episodes_per_task": args.episodes, "eval_max_steps": args.max_steps,
                          "eval_suite": "mt10 (seeds 100000+)", "log_every": args.log_every,
                          "overrides": args.override, "old_code_minutes": args.old_minutes if args.old_code else None},
               "store": str(store), "variants": {}, "cla_curves": {}}
    # seed-major order: both variants of seed 0 finish before seed 1 starts, so a cut-off run still compares;
    # the (short) old-code curve run comes right after the first run, so the curves exist early
    results_old = None
    for seed in seeds:
        for name in args.variants.split(","):
            if results_old is None and (seed, name) != (seeds[0], args.variants.split(",")[0]) and \
                    (args.old_code or (out / "cla_old_s0" / "timing.json").exists()):
                results_old = train("cla_old", 0, store, args)
            v = results["variants"].setdefault(name, {"runs": {}, "evals": {}, "success": {}})
            v["runs"][seed] = train(name, seed, store, args)
            v["evals"][seed] = {g: evaluate(name, seed, g, args) for g in GOALS}
            if name != "cla_off":
                results["cla_curves"][f"{name}_s{seed}"] = cla_curve(out / f"{name}_s{seed}" / "run")
    if args.old_code or (out / "cla_old_s0" / "timing.json").exists():
        results["old_run"] = results_old or train("cla_old", 0, store, args)
        results["cla_curves"]["cla_old_s0"] = cla_curve(out / "cla_old_s0" / "run")
    for v in results["variants"].values():
        v["success"] = {g: pooled([e.get(g) for e in v["evals"].values() if e]) for g in GOALS}
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(tables(results))


if __name__ == "__main__":
    main()
