"""Milliseconds per action chunk on this machine: each policy / size / sampler, CPU, fixed thread count.

    python benchmarks/latency.py [--threads 2] [--repeats 30] [--only SUBSTRING[,SUBSTRING...]] [--images] [--merge]
        [--device cuda] [--bf16] [--compile default|reduce-overhead]

Prints a table and writes benchmarks/results/latency_<device>.json (--merge: replace only the rows measured).
Median of `repeats` timed calls after warm-up, the rows timed round-robin (one call of each per round) so that
load changes hit all rows alike; batch 1, as at control time. FLOPs per chunk are counted once per
row with torch.utils.flop_counter (matmuls and attention; elementwise ops are not counted), and the host-device
synchronisations per chunk (each one stalls a GPU's launch queue; they cost little on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from robodit.datasets.normalizer import Normalizer
from robodit.policies.dit import DiTPolicy
from robodit.policies.mode import MoDEPolicy
from robodit.policies.pad import PADPolicy
from robodit.profiling import count_host_syncs

# (label, class, kwargs) — new families add rows here.
PAPER_HORIZONS = dict(obs_horizon=1, action_horizon=10, n_action_steps=10)
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
    # The paper's horizons (one observation step, chunk 10 executed fully), which the MT1/MT10 runs use, for
    # MoDE, its dense twin (same decoder-only network, one SwiGLU as wide as the two active experts) and the
    # equal-active DiT; the DiT also at its own defaults (2 observation steps, chunk 16 of which 8 run, DDIM-10).
    ("mode/base ddim-5 To1 c10 cached", MoDEPolicy, dict(size="base", num_inference_steps=5, **PAPER_HORIZONS)),
    ("mode/base ddim-5 To1 c10 uncached", MoDEPolicy, dict(size="base", num_inference_steps=5, expert_cache=False,
                                                           **PAPER_HORIZONS)),
    ("mode/base ddim-5 To1 c10 in-place cache", MoDEPolicy, dict(size="base", num_inference_steps=5,
                                                                 expert_cache="in_place", **PAPER_HORIZONS)),
    ("mode-dense/base ddim-5 To1 c10 (dense twin)", MoDEPolicy, dict(size="base", num_inference_steps=5,
                                                                      num_experts=1, top_k=1, expert_hidden=1408,
                                                                      **PAPER_HORIZONS)),
    ("dit/base-d5 edm ddim-5 To1 c10 (=mode active)", DiTPolicy, dict(size="base", depth=5, formulation={"name": "edm"},
                                                                      sampler="ddim", num_inference_steps=5,
                                                                      **PAPER_HORIZONS)),
    # PAD denoises 2 future 64 px frames (64 tokens of 8 px patches, stacked on channels) with the chunk:
    # its default DDIM-50, with and without the (step, task) modulation cache, and DDIM-10.
    ("pad/base ddim-50 cached", PADPolicy, dict(size="base", num_inference_steps=50)),
    ("pad/base ddim-50 uncached", PADPolicy, dict(size="base", num_inference_steps=50, inference_cache=False)),
    ("pad/base ddim-10 cached", PADPolicy, dict(size="base", num_inference_steps=10)),
    ("pad/tiny ddim-50 cached", PADPolicy, dict(size="tiny", num_inference_steps=50)),
]
NEEDS_IMAGES = (PADPolicy,)  # these rows always get a 64 px camera (their model resolution), --images or not


def shape_meta(images: bool, state_dim: int = 39, action_dim: int = 4, image_size: int = 84) -> dict:
    obs = {"state": {"shape": [state_dim], "dtype": "float32"}}
    if images:
        obs["image_corner2"] = {"shape": [image_size, image_size, 3], "dtype": "uint8"}
    return {"obs": obs, "action": {"shape": [action_dim]}, "num_tasks": 1}


def identity_normalizer(meta: dict) -> Normalizer:
    stats = {}
    for key, dim in [("state", meta["obs"]["state"]["shape"][0]), ("action", meta["action"]["shape"][0])]:
        stats[key] = {"min": -np.ones(dim), "max": np.ones(dim), "mean": np.zeros(dim), "std": np.ones(dim)}
    return Normalizer(stats)


def random_obs(policy, device) -> dict:
    """Batch-1 observation with the policy's own keys and history length."""
    obs = {}
    for key, (shape, dtype) in policy.obs_shapes.items():
        size = (1, policy.obs_horizon, *shape)
        obs[key] = (torch.randint(0, 255, size, dtype=torch.uint8, device=device) if dtype == "uint8"
                    else torch.randn(size, device=device))
    return obs


def time_interleaved(entries: list[tuple], repeats: int, warmup: int = 5, bf16: bool = False) -> list[dict]:
    """ms per predict_action call for each (policy, obs), timed round-robin: one call of each row per round, so
    a change in the machine's load hits every row alike and ratios between rows hold on a noisy machine."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    gens = [torch.Generator(device=policy.device).manual_seed(0) for policy, _ in entries]

    def call(i: int) -> None:
        policy, obs = entries[i]
        with torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16):
            policy.predict_action(obs, generator=gens[i])

    for i in range(len(entries)):
        for _ in range(warmup):
            call(i)
    times: list[list[float]] = [[] for _ in entries]
    for _ in range(repeats):
        for i in range(len(entries)):
            sync()
            t0 = time.perf_counter()
            call(i)
            sync()
            times[i].append(1000 * (time.perf_counter() - t0))
    return [{"median_ms": statistics.median(t), "p90_ms": float(np.percentile(t, 90)), "min_ms": min(t)}
            for t in times]


def count_flops(policy, obs) -> int:
    """FLOPs of one predict_action call (after warm-up, so inference caches are already built)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator(device=policy.device).manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        policy.predict_action(obs, generator=gen)
    return counter.get_total_flops()


def merge_rows(old: dict, rows: list[dict]) -> dict:
    """Old rows keep their thread count (from the file's header when they predate per-row counts); new rows
    replace old ones of the same label, in CONFIGS order, so a one-family re-run does not erase the others."""
    by_label = {r["policy"]: {"threads": old.get("machine", {}).get("threads"), **r} for r in old.get("rows", [])}
    by_label.update({r["policy"]: r for r in rows})
    order = {label: i for i, (label, _, _) in enumerate(CONFIGS)}
    merged = sorted(by_label.values(), key=lambda r: order.get(r["policy"], len(order)))
    return {**old, "rows": merged}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--images", action="store_true", help="add one 84 px camera to the observation")
    ap.add_argument("--only", default="", help="rows whose label contains one of these comma-separated substrings")
    ap.add_argument("--bf16", action="store_true", help="time under bf16 autocast (rows are labelled '+bf16')")
    ap.add_argument("--compile", default=None, metavar="MODE", choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile each policy's denoiser (reduce-overhead: CUDA graphs); rows labelled '+compile'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/latency_<device>.json")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the measured rows in an existing --out (each row records its thread count)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out = args.out or f"benchmarks/results/latency_{device.type}.json"
    rows, entries = [], []
    for label, cls, kw in CONFIGS:
        if args.only and not any(part in label for part in args.only.split(",")):
            continue
        torch.manual_seed(0)
        meta = shape_meta(True, image_size=64) if issubclass(cls, NEEDS_IMAGES) else shape_meta(args.images)
        policy = cls(meta, identity_normalizer(meta), **kw).to(device).eval()
        if args.compile:
            policy.denoise = torch.compile(policy.denoise, mode=args.compile)
            label = f"{label} +compile({args.compile})"
        obs = random_obs(policy, device)
        params = sum(p.numel() for p in policy.parameters())
        active = policy.parameter_counts()["active"] if hasattr(policy, "parameter_counts") else params
        policy.predict_action(obs, generator=torch.Generator(device=device))  # builds inference caches
        if args.images and not issubclass(cls, NEEDS_IMAGES):  # another observation: another row, not a replacement
            label = f"{label} +84px camera"
        row = {"policy": f"{label} +bf16" if args.bf16 else label, "threads": args.threads,
               "params_M": round(params / 1e6, 2), "active_params_M": round(active / 1e6, 2),
               "gflops": round(count_flops(policy, obs) / 1e9, 3),
               # each stalls a GPU's launch queue: the MoE dispatch's `nonzero` per expert, layer and step
               "host_syncs": count_host_syncs(policy.predict_action, obs, generator=torch.Generator(device=device))}
        if hasattr(policy, "expert_cache_bytes"):  # what the inference cache holds beyond the weights
            row["cache_MiB"] = round(policy.expert_cache_bytes() / 2**20, 1)
        # A chunk of 16 of which 8 run is not a chunk of 10 that all run: compare cost per executed action too.
        row["actions_per_chunk"] = policy.n_action_steps
        row["gflops_per_action"] = round(row["gflops"] / policy.n_action_steps, 4)
        rows.append(row)
        entries.append((policy, obs))
    load = round(os.getloadavg()[0], 2)  # 1-min load average before timing: > cores means shared CPU
    print(f"timing {len(entries)} rows round-robin, {args.repeats} rounds (load average {load})", flush=True)
    for row, timing in zip(rows, time_interleaved(entries, args.repeats, bf16=args.bf16)):
        row.update(load_avg=load, **timing)
        print(f"{row['policy']:40s} {row['params_M']:7.2f}M ({row['active_params_M']:.2f}M active)  "
              f"{row['gflops']:7.3f} GFLOP ({row['gflops_per_action']:.3f}/action)  {row['host_syncs']:4d} syncs  "
              f"median {row['median_ms']:7.2f} ms  p90 {row['p90_ms']:7.2f} ms", flush=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "gpu": gpu,
                          "torch": torch.__version__}, "images": args.images, "rows": rows}
    if args.merge and Path(args.out).exists():
        result = merge_rows(json.loads(Path(args.out).read_text()), rows)
        rows = result["rows"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| policy | params | active | GFLOP/chunk | GFLOP/action | host syncs | threads | median ms/chunk | p90 |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        per_action = r.get("gflops_per_action")
        print(f"| {r['policy']} | {r['params_M']}M | {r['active_params_M']}M | {r['gflops']:.3f} | "
              f"{'' if per_action is None else f'{per_action:.3f}'} | {r.get('host_syncs', '')} | {r['threads']} | "
              f"{r['median_ms']:.1f} | {r['p90_ms']:.1f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
