"""Milliseconds per action chunk on this machine: each policy / size / sampler, CPU, fixed thread count.

    python benchmarks/latency.py [--threads 2[,1]] [--repeats 30] [--only SUBSTRING[,SUBSTRING...]] [--images]
        [--merge] [--device cuda] [--bf16] [--compile default|reduce-overhead] [--vs-lerobot]

Prints a table and writes benchmarks/results/latency_<device>.json (--merge: replace only the rows measured).
Median of `repeats` timed calls after warm-up, the rows timed round-robin (one call of each per round) so that
load changes hit all rows alike; batch 1, as at control time. FLOPs per chunk are counted once per
row with torch.utils.flop_counter (matmuls, convolutions and attention; elementwise ops are not counted), and the
host-device synchronisations per chunk (each one stalls a GPU's launch queue; they cost little on a CPU).

The FLOP floor of a row is its FLOPs divided by the matmul rate measured in the same run (a square fp32 matmul
timed round-robin with the rows, so it sees the same load): how fast the chunk could run if every FLOP ran at
the speed of one large GEMM. `--vs-lerobot` adds lerobot's DiffusionPolicy (state-only, DDIM-10, its default
U-Net) to the round-robin and prints `ratio <row> vs lerobot: <N>x` for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robodit.datasets.normalizer import Normalizer
from robodit.policies.dit import DiTPolicy
from robodit.policies.mode import MoDEPolicy
from robodit.policies.pad import PADPolicy
from robodit.profiling import count_host_syncs, cpu_model

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


def selected(label: str, only: str) -> bool:
    """--only: a part equal to a row's label picks that row alone ('dit/base ddim-10', not '... ddim-100');
    any other part picks every label containing it."""
    labels = {name for name, _, _ in CONFIGS}
    return any(part == label or (part not in labels and part in label) for part in only.split(","))


def build_row_policy(cls, kwargs: dict, images: bool = False):
    """A row's policy as every latency script times it: seeded weights, identity normaliser, 64 px camera for
    NEEDS_IMAGES (PAD's model resolution), otherwise state only unless `images` (an 84 px camera)."""
    meta = shape_meta(True, image_size=64) if issubclass(cls, NEEDS_IMAGES) else shape_meta(images)
    torch.manual_seed(0)
    return cls(meta, identity_normalizer(meta), **kwargs).eval()


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


def time_interleaved(calls: list, repeats: int, warmup: int = 5, sync=lambda: None) -> list[dict]:
    """ms per call of each zero-argument function, timed round-robin: one call of each row per round, so a change
    in the machine's load hits every row alike and ratios between rows hold on a noisy machine."""
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times[i].append(1000 * (time.perf_counter() - t0))
    return [{"median_ms": statistics.median(t), "p90_ms": float(np.percentile(t, 90)), "min_ms": min(t)}
            for t in times]


def policy_call(policy, obs, threads: int, bf16: bool = False):
    """One predict_action per call, the noise seeded once per row (every row draws the same sequence)."""
    gen = torch.Generator(device=policy.device).manual_seed(0)

    def call():
        torch.set_num_threads(threads)
        with torch.autocast(policy.device.type, dtype=torch.bfloat16, enabled=bf16):
            policy.predict_action(obs, generator=gen)
    return call


PATHS = ("eager", "onnx", "compile", "aoti", "native")


def fast_path_call(policy, obs, path: str, threads: int, workdir: Path):
    """The same chunk through `path` (robodit.deploy.export traces DiffusionPolicy.chunk_from_noise once):
    onnx / aoti / native load the exported directory behind predict_action (native: DiT only, the loop in C);
    compile runs torch.compile (inductor, weights frozen into the graph) on the traced program. Returns (call, its
    actions for seed 0)."""
    from robodit.deploy.export import export_policy, trace
    from robodit.deploy.exported import ExportedPolicy

    gen = torch.Generator(device=policy.device).manual_seed(0)
    if path in ("onnx", "aoti", "native"):
        if policy.device.type != "cpu":
            raise ValueError(f"the {path} artifact runs on the CPU")
        out = export_policy(policy, workdir / path, path)
        exported = ExportedPolicy(out, threads=threads)

        def call():
            torch.set_num_threads(threads)
            return exported.predict_action(obs, generator=gen)
    elif path == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights become constants: inductor prepacks them for its GEMMs
        _, _, program = trace(policy, policy.device)
        compiled = torch.compile(program.module())

        def call():
            torch.set_num_threads(threads)
            with torch.no_grad():
                obs_t, goal_t = policy.inference_inputs(obs)
                return compiled(*obs_t.values(), *goal_t.values(), policy.chunk_noise(1, gen))
    else:
        raise ValueError(f"unknown path {path!r}; choose from {PATHS}")
    first = call()
    gen.manual_seed(0)
    return call, first


def matmul_call(n: int, threads: int, device):
    """A square fp32 matmul: its rate is the FLOP floor's yardstick (what one large GEMM reaches on these cores)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def call():
        torch.set_num_threads(threads)
        torch.mm(a, b)
    return call


def count_flops(policy, obs) -> int:
    """FLOPs of one predict_action call (after warm-up, so inference caches are already built)."""
    return count_call_flops(lambda: policy.predict_action(obs, generator=torch.Generator(device=policy.device)))


def count_call_flops(call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def merge_rows(old: dict, rows: list[dict]) -> dict:
    """Old rows keep their thread count (from the file's header when they predate per-row counts); new rows
    replace old ones of the same label, in CONFIGS order, so a one-family re-run does not erase the others."""
    by_label = {r["policy"]: {"threads": old.get("machine", {}).get("threads"), **r} for r in old.get("rows", [])}
    by_label.update({r["policy"]: r for r in rows})
    order = {label: i for i, (label, _, _) in enumerate(CONFIGS)}
    base_label = lambda r: r["policy"].split(" @")[0].split(" +")[0].split(" [")[0]  # noqa: E731
    merged = sorted(by_label.values(), key=lambda r: order.get(base_label(r), len(order)))
    return {**old, "rows": merged}


def lerobot_row(args, threads: int, device) -> tuple[dict, object | None]:
    """lerobot's DiffusionPolicy, state-only DDIM-10, as a row; when it cannot be built the row says why."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from lerobot_baseline import build_lerobot_dp

    label = "lerobot DiffusionPolicy state ddim-10" + (f" @{threads}t" if len(args.thread_counts) > 1 else "")
    if device.type != "cpu":
        return {"policy": label, "missing": "--vs-lerobot runs on the CPU only"}, None
    try:
        torch.manual_seed(0)
        call, info = build_lerobot_dp(state_dim=39, action_dim=4, steps=10)
    except Exception as exc:  # not installed, or a version whose API moved: the row says so, the run goes on
        return {"policy": label, "missing": f"{type(exc).__name__}: {exc}"}, None
    gflops = count_call_flops(call) / 1e9

    def timed():
        torch.set_num_threads(threads)
        call()
    return {"policy": label, "threads": threads, "params_M": info["params_M"], "active_params_M": info["params_M"],
            "gflops": round(gflops, 3), "lerobot": info["lerobot"], "config": info["config"]}, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="2", help="torch threads; a comma-separated list times every row at each")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--images", action="store_true", help="add one 84 px camera to the observation")
    ap.add_argument("--only", default="", help="rows whose label contains one of these comma-separated substrings")
    ap.add_argument("--bf16", action="store_true", help="time under bf16 autocast (rows are labelled '+bf16')")
    ap.add_argument("--compile", default=None, metavar="MODE", choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile each policy's denoiser (reduce-overhead: CUDA graphs); rows labelled "
                         "'+compile'")
    ap.add_argument("--vs-lerobot", action="store_true",
                    help="time lerobot's DiffusionPolicy (state-only, DDIM-10) in the same round-robin")
    ap.add_argument("--paths", default="eager",
                    help=f"comma-separated, from {PATHS}: the exported / compiled chunk next to eager (CPU)")
    ap.add_argument("--matmul-size", type=int, default=512, help="side of the square matmul that sets the FLOP floor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/latency_<device>.json")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the measured rows in an existing --out (each row records its thread count)")
    args = ap.parse_args()
    args.thread_counts = [int(t) for t in str(args.threads).split(",")]
    device = torch.device(args.device)
    args.out = args.out or f"benchmarks/results/latency_{device.type}.json"
    suffix = (lambda t: f" @{t}t") if len(args.thread_counts) > 1 else (lambda t: "")
    rows, calls, missing = [], [], []
    for label, cls, kw in CONFIGS:
        if args.only and not selected(label, args.only):
            continue
        policy = build_row_policy(cls, kw, args.images).to(device)
        if args.compile:
            policy.denoise = torch.compile(policy.denoise, mode=args.compile)
            label = f"{label} +compile({args.compile})"
        obs = random_obs(policy, device)
        params = sum(p.numel() for p in policy.parameters())
        active = policy.parameter_counts()["active"] if hasattr(policy, "parameter_counts") else params
        policy.predict_action(obs, generator=torch.Generator(device=device))  # builds inference caches
        if args.images and not issubclass(cls, NEEDS_IMAGES):  # another observation: another row, not a replacement
            label = f"{label} +84px camera"
        base = {"params_M": round(params / 1e6, 2), "active_params_M": round(active / 1e6, 2),
                "gflops": round(count_flops(policy, obs) / 1e9, 3),
                # each stalls a GPU's launch queue: the MoE dispatch's `nonzero` per expert, layer and step
                "host_syncs": count_host_syncs(policy.predict_action, obs, generator=torch.Generator(device=device))}
        if hasattr(policy, "expert_cache_bytes"):  # what the inference cache holds beyond the weights
            base["cache_MiB"] = round(policy.expert_cache_bytes() / 2**20, 1)
        # A chunk of 16 of which 8 run is not a chunk of 10 that all run: compare cost per executed action too.
        base["actions_per_chunk"] = policy.n_action_steps
        base["gflops_per_action"] = round(base["gflops"] / policy.n_action_steps, 4)
        for threads in args.thread_counts:
            name = (f"{label} +bf16" if args.bf16 else label) + suffix(threads)
            rows.append({"policy": name, "threads": threads, "path": "eager", **base})
            calls.append(policy_call(policy, obs, threads, args.bf16))
            eager = policy.predict_action(obs, generator=torch.Generator(device=device).manual_seed(0))
            for path in [p for p in args.paths.split(",") if p != "eager"]:
                row = {"policy": f"{label} [{path}]" + suffix(threads), "threads": threads, "path": path,
                       **{k: base[k] for k in ("params_M", "active_params_M", "gflops", "actions_per_chunk")}}
                try:
                    t0 = time.perf_counter()
                    call, first = fast_path_call(policy, obs, path, threads, Path(tempfile.mkdtemp()))
                except Exception as exc:  # a family that cannot export: the row says why
                    missing.append({**row, "missing": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                    print(f"{row['policy']}: not timed ({missing[-1]['missing']})", flush=True)
                    continue
                row["build_s"] = round(time.perf_counter() - t0, 1)
                # an untrained policy's zero-initialised heads predict a constant chunk: no evidence either way
                # (tests/test_export.py checks equality on random weights)
                if float(eager.std()) > 0:
                    row["max_abs_diff_vs_eager"] = float((first - eager).abs().max())
                rows.append(row)
                calls.append(call)
    if args.vs_lerobot:
        for threads in args.thread_counts:
            row, call = lerobot_row(args, threads, device)
            if call is None:
                missing.append(row)
                print(f"{row['policy']}: not timed ({row['missing']})", flush=True)
            else:
                rows.append(row)
                calls.append(call)
    n = args.matmul_size
    yardsticks = {}
    for threads in args.thread_counts:
        yardsticks[threads] = len(calls)
        rows.append({"policy": f"matmul {n}x{n}x{n} fp32" + suffix(threads), "threads": threads,
                     "gflops": round(2 * n**3 / 1e9, 3)})
        calls.append(matmul_call(n, threads, device))
    loads = [os.getloadavg()[0]]  # 1-min load average: > cores means the CPU is shared
    print(f"timing {len(calls)} rows round-robin, {args.repeats} rounds (load average {loads[0]:.2f})", flush=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings = time_interleaved(calls, args.repeats, sync=sync)
    loads.append(os.getloadavg()[0])
    for row, timing in zip(rows, timings):
        row.update(load_avg=round(max(loads), 2), **timing)
    for threads, i in yardsticks.items():  # the matmul rate each thread count reached, under the same load
        rate = rows[i]["gflops"] / rows[i]["median_ms"]  # GFLOP per ms
        rows[i]["gflop_per_s"] = round(1000 * rate, 1)
        for row in rows:
            if row.get("threads") == threads and row is not rows[i]:
                row["floor_ms"] = round(row["gflops"] / rate, 3)
                row["x_floor"] = round(row["median_ms"] / row["floor_ms"], 2)
    for row in rows:
        print(f"{row['policy']:44s} {row['gflops']:7.3f} GFLOP  {row.get('host_syncs', ''):>4} syncs  "
              f"median {row['median_ms']:8.2f} ms  p90 {row['p90_ms']:8.2f} ms"
              + (f"  |diff| {row['max_abs_diff_vs_eager']:.1e}" if "max_abs_diff_vs_eager" in row else "")
              + (f"  {row['x_floor']:6.1f}x its FLOP floor" if "x_floor" in row else
                 f"  {row.get('gflop_per_s', 0):.1f} GFLOP/s"), flush=True)
    if args.vs_lerobot:
        print()
        for threads in args.thread_counts:
            ref = [r for r in rows if r["policy"].startswith("lerobot") and r["threads"] == threads]
            for row in rows:
                if row.get("threads") != threads or row["policy"].startswith(("lerobot", "matmul")):
                    continue
                if ref:
                    row["x_faster_than_lerobot"] = round(ref[0]["median_ms"] / row["median_ms"], 1)
                    print(f"ratio {row['policy']} vs lerobot: {row['x_faster_than_lerobot']}x")
                else:
                    why = [m["missing"] for m in missing if m["policy"].startswith("lerobot")]
                    print(f"ratio {row['policy']} vs lerobot: lerobot missing ({why[0] if why else 'not timed'})")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.thread_counts, "gpu": gpu,
                          "torch": torch.__version__, "load_avg": [round(x, 2) for x in loads]},
              "date": time.strftime("%Y-%m-%d"), "images": args.images, "rows": rows + missing}
    if args.merge and Path(args.out).exists():
        result = {**merge_rows(json.loads(Path(args.out).read_text()), rows + missing),
                  "machine": result["machine"], "date": result["date"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{result['machine']['cpu']}, torch {torch.__version__}, load average {loads[0]:.2f} -> {loads[1]:.2f}\n"
          "| policy | params | active | GFLOP/chunk | host syncs | threads | median ms/chunk | p90 | x FLOP floor "
          "| x faster than lerobot |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        if "missing" in r:
            print(f"| {r['policy']} | not timed: {r['missing']} |")
            continue
        params = (f"{r['params_M']}M | {r['active_params_M']}M" if "params_M" in r
                  else f"{r.get('gflop_per_s')} GFLOP/s |")
        print(f"| {r['policy']} | {params} | {r['gflops']:.3f} | "
              f"{r.get('host_syncs', '')} | {r['threads']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
              f"{r.get('x_floor', '')} | {r.get('x_faster_than_lerobot', '')} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
