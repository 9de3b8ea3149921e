"""Does a trained MDT's CLA align language with image goals, or does it read something else? (issue 18)

    python benchmarks/mdt_cla_check.py CHECKPOINT STORE [--trials 5] [--json PATH]

Takes one language-labelled window per task from STORE (an MT10-style store), and computes the CLA loss in both
directions with the checkpoint's EMA weights: with each window's own instruction, and with the instructions
rotated across tasks. An aligned model scores well below chance (log K) with the true instructions and at or
above chance with rotated ones; a model that solved CLA from the observation alone would not notice the rotation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import robodit
from robodit.datasets.sampler import WindowConfig, WindowDataset


def labelled_batch(ds: WindowDataset, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """One labelled window per task, in random order."""
    picks, seen = [], set()
    for i in rng.permutation(len(ds)):
        s = ds[int(i)]
        if bool(s["goal.has_lang"]) and int(s["task_id"]) not in seen:
            seen.add(int(s["task_id"]))
            picks.append(s)
    return {k: torch.stack([p[k] for p in picks]) for k in picks[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("store")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    policy = robodit.load_policy(args.checkpoint)
    if policy.alignment is None:
        raise SystemExit(f"{args.checkpoint} was trained without CLA (cla_weight=0)")
    ds = WindowDataset(args.store, WindowConfig(obs_horizon=policy.obs_horizon, action_horizon=policy.action_horizon,
                                                obs_keys=tuple(sorted(policy.obs_shapes)),
                                                goal_offsets=policy.goal_offsets,
                                                language_encoder=policy.language_encoder, cache=False), train=False)
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"true": [], "rotated": []}
    k = 0
    for _ in range(args.trials):
        batch = labelled_batch(ds, rng)
        k = len(batch["task_id"])
        with torch.no_grad():
            obs = policy.obs_encoder(policy.normalize_obs(policy.split_batch(batch, "obs")))
            goal = policy.split_batch(batch, "goal")
            image = policy._goal_grid(policy.image_goal_token(goal), obs)
            for name, emb in (("true", goal["lang_emb"]), ("rotated", goal["lang_emb"].roll(1, 0))):
                lang = policy._goal_grid(policy.language_goal_token(emb), obs)
                same = policy._same_goal(emb, batch["task_id"])
                rows[name].append([float(x) for x in policy.alignment.directional_losses(lang, image, same)])
    out = {"checkpoint": str(args.checkpoint), "tasks_per_batch": k, "trials": args.trials, "chance": float(np.log(k)),
           **{name: {"language_to_image": float(np.mean([r[0] for r in v])),
                     "image_to_language": float(np.mean([r[1] for r in v]))} for name, v in rows.items()}}
    print(f"| instructions | language→image | image→language |  (chance log {k} = {np.log(k):.2f})\n|---|---:|---:|")
    for name in rows:
        print(f"| {name} | {out[name]['language_to_image']:.3f} | {out[name]['image_to_language']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
