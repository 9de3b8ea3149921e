"""Several demonstration stores — of different robots — as one training set in the unified 128-d space.

Why: a unified-action-space policy (RDT) pretrains on every embodiment at once. Each store keeps its own
`WindowDataset` (windows, splits, caching are unchanged); this wrapper maps every sample into one layout
(`robodit.action_space.UnifiedLayout`) so samples of different robots batch together:

    obs.state    [To, 128]  proprioception in its unified slots (raw units), state_mask [128]
    obs.context  [To, C]    the other low-dim observation values (object poses, goals), zero-padded to C
    obs.<camera> [To, 3, H, W] uint8, every camera any store has; a store without that camera gets blank frames
                            (RDT's rule; stores with disjoint cameras then train mostly on state: collect them
                            state-only, or name the shared view alike)
    action       [Tp, 128]  raw units, action_mask [128];  action_is_pad [Tp];  task_id (one task table over
                            all stores, by name);  store_id (which store: its stats and control rate)

Normalisation stays with the policy: each store's native stats go into the normaliser as `<key>@<i>`, and the
policy normalises each sample with its own store's stats. A slot two robots share (end-effector deltas) has
different ranges per robot; pooled stats would squeeze the narrower robot into a sliver of [-1, 1] and clip the
wider one at the sampler's ±1, so per-store stats are the correct choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from robodit.datasets.normalizer import Normalizer, compute_stats
from robodit.datasets.sampler import WindowConfig, WindowDataset, split_episodes
from robodit.datasets.store import DemoStore
from robodit.action_space import UnifiedLayout
from robodit.keys import is_image_key


def store_paths(dataset_cfg) -> list[str]:
    """`dataset.paths` (several stores) or `dataset.path` (one), as a list; a clear error when neither is set."""
    paths = dataset_cfg.get("paths")
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p]
    if paths and dataset_cfg.get("path"):
        raise ValueError(f"both dataset.path={dataset_cfg.get('path')} and dataset.paths={list(paths)} are set: "
                         "give one store with path, or several with paths (list the first one there too)")
    if paths:
        return [str(p) for p in paths]
    if dataset_cfg.get("path"):
        return [str(dataset_cfg.get("path"))]
    raise ValueError("no demonstration store: set dataset.path=STORE, or dataset.paths=[STORE_A,STORE_B] to train "
                     "one unified-action-space policy on several")


def store_record(path: Path, store: DemoStore) -> dict[str, Any]:
    """What a checkpoint remembers of a training store (evaluation rebuilds its env from `env`)."""
    with_actions = {int(t) for t in store.episode_task[store.episode_has_actions]}
    seeds = store.seeds_used  # committed with the episodes (evaluation reports which of its seeds were trained on)
    env = {**store.env, "seeds_used": seeds} if seeds else store.env
    return {"path": str(path.resolve()), "env": env, "robot": store.robot, "fps": store.fps,
            "tasks": store.task_names, "episodes": len(store),
            # action-free video (PAD co-training): learned to predict, never to act
            "tasks_without_actions": [n for t, n in enumerate(store.task_names) if t not in with_actions]}


def record_for_env(record: dict, env: str | None) -> dict:
    """The training-store record to evaluate `env` ("SIM/TASK") with: the matching entry of a multi-store
    checkpoint's "stores" (its own env kwargs and tasks), else the record itself. Pair it with the policy's
    `select_store(env)` (RDT) so the policy answers in that robot's units."""
    for rec in record.get("stores") or []:
        if env and (rec.get("env") or {}).get("name") == env:
            return rec
    return record


class MultiStoreDataset(Dataset):
    """Concatenation of per-store `WindowDataset`s, each sample in the unified layout (see module doc)."""

    def __init__(self, parts: list[WindowDataset], layouts: list[UnifiedLayout], task_ids: list[np.ndarray],
                 images: dict[str, tuple[int, ...]]):
        self.parts, self.layouts, self.task_ids, self.images = parts, layouts, task_ids, images
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.obs_keys = tuple(sorted({k for p in parts for k in p.obs_keys}))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item) -> dict[str, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        i = int(np.searchsorted(self.offsets, index, side="right") - 1)
        local = int(index - self.offsets[i])
        raw = self.parts[i][(local, seed) if seed is not None else local]
        layout = self.layouts[i]
        lowdim = {k: raw[f"obs.{k}"] for k, _ in layout.lowdim}
        if not lowdim:  # image-only store: nothing for the state / context, only their batch shape
            lowdim = {"_": torch.zeros(self.parts[i].cfg.obs_horizon, 1)}
        out = {"obs.state": layout.state(lowdim).float(), "obs.context": layout.context(lowdim).float()}
        for key, (h, w, c) in self.images.items():
            out[f"obs.{key}"] = raw.get(f"obs.{key}", torch.zeros(self.parts[i].cfg.obs_horizon, c, h, w,
                                                                  dtype=torch.uint8))
        out["state_mask"] = torch.as_tensor(layout.state_mask)
        out["action"] = layout.action(raw["action"]).float()
        out["action_mask"] = torch.as_tensor(layout.action_mask)
        out["action_is_pad"] = raw["action_is_pad"]
        out["task_id"] = torch.tensor(self.task_ids[i][int(raw["task_id"])], dtype=torch.long)
        out["store_id"] = torch.tensor(i, dtype=torch.long)
        for key, value in raw.items():  # goal.* (language, goal images) pass through unchanged
            if key.startswith("goal."):
                out[key] = value
        return out


@dataclass
class MultiStoreData:
    train_set: MultiStoreDataset
    val_set: MultiStoreDataset | None
    shape_meta: dict
    normalizer: Normalizer
    record: dict


def build_multi_store(paths: list[str], wcfg: WindowConfig, dataset_cfg, policy_cfg, seed: int) -> MultiStoreData:
    """Per-store windows, stats and layouts → one dataset, the policy's shape_meta (with every store under
    "stores"), a normaliser with per-store keys `<key>@<i>`, and the checkpoint's store record (store 0 is the
    default for evaluation; "stores" lists all)."""
    target = str(policy_cfg.get("_target_", ""))
    from hydra.utils import get_class

    if not getattr(get_class(target), "supports_multi_store", False):
        raise ValueError(f"dataset.paths lists {len(paths)} stores, but policy {target} trains on one store: "
                         "several robots need a unified-action-space policy (policy=rdt)")
    state_key = policy_cfg.get("state_key", "state")
    context_dim = int(policy_cfg.get("context_dim", 64))
    modes = dict(dataset_cfg.get("normalizer_modes") or {})
    stats, norm_modes, metas, records, layouts, trains, vals = {}, {}, [], [], [], [], []
    tasks: list[str] = []
    local_tasks: list[list[str]] = []
    images: dict[str, tuple[int, ...]] = {}
    for i, raw_path in enumerate(paths):
        path = Path(raw_path).expanduser()
        with DemoStore.open(path) as store:
            store.verify()
            name = (store.env or {}).get("name") or path.stem
            train_eps, val_eps = split_episodes(len(store), dataset_cfg.get("val_fraction", 0.0), seed)
            train = WindowDataset(path, wcfg, train_eps, train=True)
            val = WindowDataset(path, wcfg, val_eps, train=False) if len(val_eps) else None
            obs = {k: (tuple(store.keys[k][0]), str(np.dtype(store.keys[k][1]))) for k in train.obs_keys}
            try:
                layout = UnifiedLayout.build(store.robot, obs, state_key, context_dim)
            except ValueError as exc:  # name the store: "robot 'x' has no adapter" alone does not say where
                raise ValueError(f"store {path}: {exc}") from exc
            for key, (shape, dtype) in obs.items():
                if is_image_key(shape, dtype):
                    if key in images and images[key] != shape:
                        raise ValueError(f"store {path}: camera {key!r} is {shape}, another store has {images[key]}; "
                                         "one image size per camera key")
                    images[key] = shape
            lowdim = [k for k, (shape, _) in obs.items() if len(shape) == 1]
            for key, st in compute_stats(store, lowdim + ["action"]).items():
                stats[f"{key}@{i}"] = st
                if key in modes:
                    norm_modes[f"{key}@{i}"] = modes[key]
            metas.append({"name": name, "robot": store.robot, "control_hz": float(store.fps),
                          "obs": {k: {"shape": list(s), "dtype": d} for k, (s, d) in obs.items()},
                          "action": {"shape": list(store.keys["action"][0])}})
            records.append(store_record(path, store))
            local_tasks.append(list(store.task_names))
            tasks += [t for t in store.task_names if t not in tasks]
        layouts.append(layout)
        trains.append(train)
        vals.append(val)
    ids = [np.array([tasks.index(t) for t in names] or [0], dtype=np.int64) for names in local_tasks]
    images = dict(sorted(images.items()))
    train_set = MultiStoreDataset(trains, layouts, ids, images)
    val_set = None
    if all(v is not None for v in vals):
        val_set = MultiStoreDataset(vals, layouts, ids, images)
    shape_meta = {**{k: metas[0][k] for k in ("obs", "action", "robot", "control_hz")},
                  "num_tasks": max(1, len(tasks)), "stores": metas}
    record = {**records[0], "tasks": tasks, "episodes": sum(r["episodes"] for r in records), "stores": records}
    return MultiStoreData(train_set, val_set, shape_meta, Normalizer(stats, modes=norm_modes), record)
