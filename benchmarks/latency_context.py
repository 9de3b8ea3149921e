"""Why a tiny exported policy misses its FLOP floor: what one chunk costs depends on what ran before it, and on
how many graph nodes it dispatches, not on its arithmetic.

    python benchmarks/latency_context.py [--policy "dit/tiny ddim-10"] [--paths onnx,native] [--steps 2,5,10,20]
        [--repeats 150] [--json benchmarks/results/latency_context.json]

Two tables, one thread, batch 1, the policy built as `benchmarks/latency.py` builds it:

1. **Context.** The chunk of each exported path (ONNX Runtime; `native`: the DiT's loop and, for state
   observations, its condition in C) timed right after: the same chunk (back to back, as a loop computing chunk after
   chunk), a 512³ matmul, the same policy's eager `predict_action` (what `latency.py`'s round-robin puts before
   it), a 3 ms and a 50 ms sleep (a policy server idle between requests). Each (path, context) is timed
   round-robin with the others. The 512³ matmul's rate is measured in the same rounds: the floor is FLOPs ÷ that
   rate.
2. **Graph size.** The ONNX export with 2, 5, 10, 20 DDIM steps: node count against time, back to back and after
   the eager policy. The slope is what one more node costs; the intercept is the per-call cost.

Prints both tables and writes JSON with the CPU model and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
import latency as L  # noqa: E402  (the rows' policies, observations and FLOP counting)

from robodit.deploy.export import example_inputs, export_policy  # noqa: E402
from robodit.deploy.exported import ExportedPolicy  # noqa: E402
from robodit.profiling import cpu_model  # noqa: E402


def build(label: str):
    matches = [c for c in L.CONFIGS if c[0] == label]
    if not matches:
        raise SystemExit(f"--policy {label!r}: not a row of benchmarks/latency.py "
                         f"({', '.join(c[0] for c in L.CONFIGS)})")
    _, cls, kwargs = matches[0]
    return L.build_row_policy(cls, kwargs)


def median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="dit/tiny ddim-10")
    ap.add_argument("--paths", default="onnx,native", help="exported paths for the context table")
    ap.add_argument("--steps", default="2,5,10,20", help="DDIM step counts for the graph-size table")
    ap.add_argument("--repeats", type=int, default=150)
    ap.add_argument("--json", default="benchmarks/results/latency_context.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]

    policy = build(args.policy)
    obs = L.random_obs(policy, policy.device)
    gen = torch.Generator().manual_seed(0)
    flops = L.count_flops(policy, obs)
    work = Path(tempfile.mkdtemp())
    exported = {}
    for steps in sorted({int(s) for s in args.steps.split(",")} | {policy.num_inference_steps}):
        saved, policy.num_inference_steps = policy.num_inference_steps, steps
        out = export_policy(policy, work / f"ddim{steps}", "onnx")
        policy.num_inference_steps = saved
        exported[steps] = (ExportedPolicy(out, threads=1), len(onnx.load(str(out / "policy.onnx")).graph.node))
    nodes = exported[policy.num_inference_steps][1]
    chunks = {"onnx": exported[policy.num_inference_steps][0]}
    if "native" in args.paths.split(","):
        chunks["native"] = ExportedPolicy(export_policy(policy, work / "native", "native"), threads=1)
    eager = lambda: policy.predict_action(obs, generator=gen)  # noqa: E731
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    matmul = lambda: torch.mm(a, b)  # noqa: E731
    call = lambda e: e.predict_action(obs, generator=gen)  # noqa: E731
    contexts = {"back to back": None, "after a 512^3 matmul": matmul, "after the eager policy": eager,
                "after 3 ms idle": lambda: time.sleep(0.003), "after 50 ms idle": lambda: time.sleep(0.05)}
    for _ in range(20):  # warm-up
        for chunk in chunks.values():
            call(chunk)
        eager(), matmul()

    times = {(path, name): [] for path in chunks for name in contexts}
    mm_times = []
    rounds = max(20, args.repeats // 3)
    for _ in range(rounds):
        for (path, name), t in times.items():
            chunk, before = chunks[path], contexts[name]
            before() if before else call(chunk)  # back to back: the same chunk just ran
            t0 = time.perf_counter()
            call(chunk)
            t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        matmul()
        mm_times.append(time.perf_counter() - t0)
    rate = 2 * 512 ** 3 / statistics.median(mm_times)
    floor_ms = 1000 * flops / rate
    context_rows = [{"path": path, "context": name, "median_ms": median_ms(t),
                     "x_floor": round(median_ms(t) / floor_ms, 2)} for (path, name), t in times.items()]

    size_times = {s: {"back to back": [], "after the eager policy": []} for s in exported}
    for _ in range(args.repeats):
        for s, (e, _) in exported.items():
            t0 = time.perf_counter()
            call(e)
            size_times[s]["back to back"].append(time.perf_counter() - t0)
            eager()
            t0 = time.perf_counter()
            call(e)
            size_times[s]["after the eager policy"].append(time.perf_counter() - t0)
    size_rows = [{"ddim_steps": s, "nodes": n, **{k: median_ms(v) for k, v in size_times[s].items()}}
                 for s, (_, n) in exported.items()]
    fits = {}
    for key in ("back to back", "after the eager policy"):
        slope, intercept = np.polyfit([r["nodes"] for r in size_rows], [r[key] for r in size_rows], 1)
        fits[key] = {"us_per_node": round(1000 * slope, 3), "intercept_ms": round(intercept, 3)}

    print(f"{args.policy} [onnx: {nodes} nodes], {flops / 1e9:.3f} GFLOP; 512^3 matmul {rate / 1e9:.1f} GFLOP/s "
          f"-> floor {floor_ms:.3f} ms; {cpu_model()}, 1 thread, load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print("\n| path | chunk timed | median ms | x FLOP floor |\n|---|---|---:|---:|")
    for r in context_rows:
        print(f"| {r['path']} | {r['context']} | {r['median_ms']:.3f} | {r['x_floor']:.2f} |")
    print("\n| DDIM steps | nodes | back to back ms | after the eager policy ms |\n|---:|---:|---:|---:|")
    for r in size_rows:
        print(f"| {r['ddim_steps']} | {r['nodes']} | {r['back to back']:.3f} | {r['after the eager policy']:.3f} |")
    for key, fit in fits.items():
        print(f"{key}: {fit['us_per_node']:.2f} us per node + {fit['intercept_ms']:.3f} ms per call")
    result = {"policy": args.policy, "paths": list(chunks), "nodes": nodes, "gflops": round(flops / 1e9, 4),
              "matmul_gflops_per_s": round(rate / 1e9, 1), "floor_ms": round(floor_ms, 3),
              "machine": {"cpu": cpu_model(), "threads": 1, "torch": torch.__version__,
                          "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]},
              "date": time.strftime("%Y-%m-%d"), "contexts": context_rows, "graph_size": size_rows, "fits": fits}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
