"""Deployment timing: policy-server round trip on loopback, and control-loop jitter per strategy and rate.

    python benchmarks/control.py [--size base] [--rtt-calls 50] [--seconds 6] [--rates 10,30] [--images]

1. Round trip: `robodit serve`'s PolicyServer in a child process (its own interpreter, as in deployment) and a
   RemotePolicy here. Reports ping (transport only) and predict_action p50/p99, the server-side model time,
   and the local predict_action time of the same network for comparison.
2. Jitter: a DryRunRobot behind the SafeRobot, driven by ControlLoop with the same network locally, at each
   rate with each strategy. "late" is when a command left versus its scheduled tick; "interval" the spread
   of the time between consecutive commands.

Prints tables and writes benchmarks/results/control.json. Random weights (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

TOKEN = "benchmark-token-0123456789"


def build_policy(size: str, images: bool, steps: int):
    from robodit.datasets.normalizer import Normalizer
    from robodit.policies.dit import DiTPolicy

    obs = {"state": {"shape": [39], "dtype": "float32"}}
    if images:
        obs["image_corner2"] = {"shape": [84, 84, 3], "dtype": "uint8"}
    meta = {"obs": obs, "action": {"shape": [4]}, "num_tasks": 1}
    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}  # noqa: E731
    torch.manual_seed(0)
    return DiTPolicy(meta, Normalizer({"state": st(39), "action": st(4)}), size=size,
                     num_inference_steps=steps).eval()


def fake_obs(policy, rng) -> dict[str, np.ndarray]:
    out = {}
    for k, (shape, dtype) in policy.obs_shapes.items():
        full = (1, policy.obs_horizon, *shape)
        image = dtype == "uint8"
        out[k] = rng.integers(0, 255, full, dtype=np.uint8) if image else rng.normal(size=full).astype(np.float32)
    return out


def _serve_child(size, images, steps, threads, conn, seconds):
    torch.set_num_threads(threads)
    from robodit.deploy.server import PolicyServer

    server = PolicyServer(build_policy(size, images, steps), TOKEN, host="127.0.0.1", port=0).start()
    conn.send(server.url)
    conn.recv() if conn.poll(seconds) else None  # bounded: stop when told, or after `seconds`
    server.stop()


def pct(xs, q):
    return round(float(np.percentile(xs, q)), 2)


def round_trip(args) -> dict:
    from robodit.deploy.client import RemotePolicy

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_child, args=(args.size, args.images, args.steps, args.threads, child, 600))
    proc.start()
    try:
        url = parent.recv()
        remote = RemotePolicy(url, TOKEN)
        rng = np.random.default_rng(0)
        policy = build_policy(args.size, args.images, args.steps)
        obs = fake_obs(policy, rng)
        for _ in range(5):
            remote.predict_action(obs)
            remote.ping()
        pings = [1000 * remote.ping() for _ in range(args.rtt_calls)]
        rtts, server_ms = [], []
        for _ in range(args.rtt_calls):
            t0 = time.perf_counter()
            remote.predict_action(obs)
            rtts.append(1000 * (time.perf_counter() - t0))
            server_ms.append(remote.last_infer_ms)
        remote.close()
        local = []
        for _ in range(args.rtt_calls):
            t0 = time.perf_counter()
            with torch.inference_mode():
                policy.predict_action(obs)
            local.append(1000 * (time.perf_counter() - t0))
    finally:
        parent.send("stop")
        proc.join(30)
    overhead = [r - s for r, s in zip(rtts, server_ms)]
    return {"ping_p50_ms": pct(pings, 50), "ping_p99_ms": pct(pings, 99), "rtt_p50_ms": pct(rtts, 50),
            "rtt_p99_ms": pct(rtts, 99), "server_infer_p50_ms": pct(server_ms, 50),
            "overhead_p50_ms": pct(overhead, 50), "overhead_p99_ms": pct(overhead, 99),
            "local_p50_ms": pct(local, 50), "local_p99_ms": pct(local, 99), "calls": args.rtt_calls}


def jitter(args) -> list[dict]:
    from robodit.control import ControlLoop, make_executor, policy_infer
    from robodit.envs.dry_run import DryRunRobot
    from robodit.envs.safety import SafeRobot

    policy = build_policy(args.size, args.images, args.steps)
    logging.getLogger("robodit.safety").setLevel(logging.ERROR)  # random weights saturate the bounds: expected
    rows = []
    for hz in args.rates:
        for strategy in ("receding", "ensemble", "async"):
            robot = SafeRobot(DryRunRobot.from_policy(policy, control_hz=hz),
                              {"watchdog": {"timeout_ms": 1000, "on_timeout": "hold"}})
            ex = make_executor(strategy, policy_infer(policy), hz=hz, n_action_steps=policy.n_action_steps)
            res = ControlLoop(robot, policy, ex, hz).run(int(args.seconds * hz))
            ex.close()
            robot.close()
            s = res.summary(skip=int(hz))  # steady state: leave out the first second (first chunk, warm-up)
            e = s["executor"]
            rows.append({"hz": hz, "strategy": strategy, **{k: s[k] for k in (
                "steps", "sent", "late_p50_ms", "late_p99_ms", "late_max_ms", "interval_mean_ms", "interval_std_ms",
                "interval_max_ms", "overruns")}, "inferences": e["inferences"], "infer_mean_ms":
                round(1000 * e["infer_s"] / max(e["inferences"], 1), 1), "dropped_stale": e["dropped_stale"],
                "starved": e["starved"]})
            print(f"  {hz:>3g} Hz {strategy:<9} late p50 {s['late_p50_ms']:7.2f} p99 {s['late_p99_ms']:7.2f} "
                  f"max {s['late_max_ms']:7.2f} ms | interval {s['interval_mean_ms']:6.1f} "
                  f"± {s['interval_std_ms']:5.1f} ms "
                  f"| overruns {s['overruns']:3d} | infer {rows[-1]['infer_mean_ms']:6.1f} ms x{e['inferences']} "
                  f"| dropped {e['dropped_stale']} starved {e['starved']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="base")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (DDIM)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rtt-calls", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=6.0, help="loop duration per (rate, strategy); 1st s skipped")
    ap.add_argument("--rates", default="10,30")
    ap.add_argument("--images", action="store_true", help="add one 84 px camera to the observation")
    ap.add_argument("--out", default="benchmarks/results/control.json")
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    torch.set_num_threads(args.threads)
    label = f"dit/{args.size} ddim-{args.steps}{' +84px image' if args.images else ''}, {args.threads} thread(s)"
    print(f"round trip on loopback ({label}):", flush=True)
    rtt = round_trip(args)
    print("  " + "  ".join(f"{k} {v}" for k, v in rtt.items()), flush=True)
    print(f"control-loop jitter ({label}, dry-run robot, {args.seconds:g} s each):", flush=True)
    rows = jitter(args)
    out = {"policy": label, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "round_trip": rtt, "jitter": rows, "date": time.strftime("%Y-%m-%d %H:%M"),
           "note": "noisy shared machine: another benchmark was running; treat as indicative"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    err = statistics.median(abs(r["interval_mean_ms"] - 1000 / r["hz"]) for r in rows)
    print(f"wrote {args.out}; median error of the mean command interval {err:.2f} ms")


if __name__ == "__main__":
    main()
