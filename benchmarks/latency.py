"""Milliseconds per action chunk on this machine: each policy / size / sampler, CPU, fixed thread count.

    python benchmarks/latency.py [--threads 2] [--repeats 30] [--only SUBSTRING] [--images]

Prints a table and writes benchmarks/results/latency.json. Median of `repeats` timed calls after warm-up;
batch 1, as at control time. FLOPs per chunk are counted once per row with torch.utils.flop_counter
(matmuls and attention; elementwise ops are not counted).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from robodit.datasets.normalizer import Normalizer
from robodit.policies.dit import DiTPolicy
from robodit.policies.mode import MoDEPolicy

# (label, class, kwargs) — new families add rows here.
CONFIGS = [
    ("dit/tiny ddim-10", DiTPolicy, dict(size="tiny", sampler="ddim", num_inference_steps=10)),
    ("dit/base ddim-10", DiTPolicy, dict(size="base", sampler="ddim", num_inference_steps=10)),
    ("dit/base dpmsolver++-10", DiTPolicy, dict(size="base", sampler="dpmsolver++", num_inference_steps=10)),
    ("dit/base edm ddim-10", DiTPolicy, dict(size="base", formulation={"name": "edm"}, sampler="ddim",
                                             num_inference_steps=10)),
    ("dit/base edm heun-5", DiTPolicy, dict(size="base", formulation={"name": "edm"}, sampler="heun",
                                            num_inference_steps=5)),
    ("dit/base flow euler-10", DiTPolicy, dict(size="base", formulation={"name": "flow"}, sampler="euler",
                                               num_inference_steps=10)),
    ("dit/base ddim-100", DiTPolicy, dict(size="base", sampler="ddim", num_inference_steps=100)),
    # MoDE: fused expert cache on / off, and dense DiTs with as many parameters as mode/base activates
    # (dit width 256 depth 5: 8.8M; mode/base: 9.1M active with routers, 8.7M with the cache) or holds in all
    # (dit width 320 depth 6: 15.9M; mode/base: 15.6M).
    ("mode/tiny ddim-5 cached", MoDEPolicy, dict(size="tiny", num_inference_steps=5)),
    ("mode/tiny ddim-5 uncached", MoDEPolicy, dict(size="tiny", num_inference_steps=5, expert_cache=False)),
    ("mode/base ddim-5 cached", MoDEPolicy, dict(size="base", num_inference_steps=5)),
    ("mode/base ddim-5 uncached", MoDEPolicy, dict(size="base", num_inference_steps=5, expert_cache=False)),
    ("mode/base ddim-10 cached", MoDEPolicy, dict(size="base", num_inference_steps=10)),
    ("mode/base ddim-10 uncached", MoDEPolicy, dict(size="base", num_inference_steps=10, expert_cache=False)),
    ("dit/base-d5 edm ddim-5 (=mode active)", DiTPolicy, dict(size="base", depth=5, formulation={"name": "edm"},
                                                              sampler="ddim", num_inference_steps=5)),
    ("dit/base-d5 edm ddim-10 (=mode active)", DiTPolicy, dict(size="base", depth=5, formulation={"name": "edm"},
                                                               sampler="ddim", num_inference_steps=10)),
    ("dit/w320-d6 edm ddim-10 (=mode total)", DiTPolicy, dict(size="base", width=320, depth=6,
                                                              formulation={"name": "edm"}, sampler="ddim",
                                                              num_inference_steps=10)),
]


def shape_meta(images: bool, state_dim: int = 39, action_dim: int = 4) -> dict:
    obs = {"state": {"shape": [state_dim], "dtype": "float32"}}
    if images:
        obs["image_corner2"] = {"shape": [84, 84, 3], "dtype": "uint8"}
    return {"obs": obs, "action": {"shape": [action_dim]}, "num_tasks": 1}


def identity_normalizer(meta: dict) -> Normalizer:
    stats = {}
    for key, dim in [("state", meta["obs"]["state"]["shape"][0]), ("action", meta["action"]["shape"][0])]:
        stats[key] = {"min": -np.ones(dim), "max": np.ones(dim), "mean": np.zeros(dim), "std": np.ones(dim)}
    return Normalizer(stats)


def time_policy(policy, obs, repeats: int, warmup: int = 5) -> dict:
    device = policy.device
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        policy.predict_action(obs, generator=gen)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        policy.predict_action(obs, generator=gen)
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90)),
            "min_ms": min(times)}


def count_flops(policy, obs) -> int:
    """FLOPs of one predict_action call (after warm-up, so inference caches are already built)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator(device=policy.device).manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        policy.predict_action(obs, generator=gen)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--images", action="store_true", help="add one 84 px camera to the observation")
    ap.add_argument("--only", default="", help="substring filter on the row label")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/latency_<device>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = shape_meta(args.images)
    device = torch.device(args.device)
    args.out = args.out or f"benchmarks/results/latency_{device.type}.json"
    obs = {"state": torch.randn(1, 2, 39, device=device)}
    if args.images:
        obs["image_corner2"] = torch.randint(0, 255, (1, 2, 84, 84, 3), dtype=torch.uint8, device=device)
    rows = []
    for label, cls, kw in CONFIGS:
        if args.only and args.only not in label:
            continue
        torch.manual_seed(0)
        policy = cls(meta, identity_normalizer(meta), **kw).to(device).eval()
        params = sum(p.numel() for p in policy.parameters())
        active = policy.parameter_counts()["active"] if hasattr(policy, "parameter_counts") else params
        row = {"policy": label, "params_M": round(params / 1e6, 2), "active_params_M": round(active / 1e6, 2),
               **time_policy(policy, obs, args.repeats)}
        row["gflops"] = round(count_flops(policy, obs) / 1e9, 3)
        rows.append(row)
        print(f"{label:40s} {row['params_M']:7.2f}M ({row['active_params_M']:.2f}M active)  "
              f"{row['gflops']:7.3f} GFLOP  "
              f"median {row['median_ms']:7.2f} ms  p90 {row['p90_ms']:7.2f} ms", flush=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "gpu": gpu,
                          "torch": torch.__version__}, "images": args.images, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| policy | params | active | GFLOP/chunk | median ms/chunk | p90 |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['params_M']}M | {r['active_params_M']}M | {r['gflops']:.3f} | "
              f"{r['median_ms']:.1f} | {r['p90_ms']:.1f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
