"""Windowed sampling of demonstrations: observation history To, action horizon Tp, split by episode.

Sample `i` is the pair (episode, current frame t). It yields observations at t-To+1..t (repeating the first
frame before the episode starts) and actions at t..t+Tp-1 (repeating the last action past the end, flagged in
`action_is_pad` so losses can ignore them). Images stay uint8 (CHW) until the model: 4× less memory
traffic in workers and pinned transfers. With `future_frames=k` it also yields `future.<image key>` [k, C, H, W]:
frames t+s..t+k*s (s = `future_stride`, clipped to the episode's last frame), the targets of video-predicting
policies (PAD); they get the same random shift as the observation so the two stay pixel-aligned.

Goal-conditioned policies (MDT) ask for `goal_offsets=(lo, hi)`: `goal.<image key>` [C, H, W] is the frame
t+u of the same episode, u uniform in [lo, hi] (clipped to the last frame), i.e. a state the demonstration
reaches soon. `language_encoder=NAME` adds `goal.lang_emb` [D] (the episode's cached instruction embedding,
zeros without one) and `goal.has_lang`; the embeddings come from the store's `meta/lang_emb`, never computed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from robodit.datasets.store import DemoStore


def split_episodes(num_episodes: int, val_fraction: float, seed: int,
                   groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random split by whole episodes (frames of one episode never straddle train and validation).

    `groups` (one id per episode, e.g. `store_split_groups`) splits by whole groups instead: every episode of a
    group lands on the same side, so the segments of one chain are never half in validation. Without groups the
    split is the plain per-episode one (the same split a store without chains always had)."""
    if groups is None:
        order = np.random.default_rng(seed).permutation(num_episodes)
        n_val = int(round(num_episodes * val_fraction))
        if val_fraction > 0 and num_episodes > 1:
            n_val = max(1, min(n_val, num_episodes - 1))
        return np.sort(order[n_val:]), np.sort(order[:n_val])
    groups = np.asarray(groups)
    if len(groups) != num_episodes:
        raise ValueError(f"split_episodes: {len(groups)} group ids for {num_episodes} episodes")
    ids, member = np.unique(groups, return_inverse=True)
    train_g, val_g = split_episodes(len(ids), val_fraction, seed)
    is_val = np.isin(member, val_g)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def store_split_groups(store: DemoStore) -> np.ndarray | None:
    """Split groups of a store: a chain's segments share their chain id, any other episode is its own group;
    None for a store without chains (its split stays the per-episode one)."""
    chain = np.asarray(store.episode_chain)
    if not (chain >= 0).any():
        return None
    own = chain.max() + 1 + np.arange(len(chain))
    return np.where(chain >= 0, chain, own)


def random_shift(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """DrQ-style random shift: replicate-pad by `pad` px and crop back, same shift for the whole history."""
    if pad <= 0:
        return images
    h, w = images.shape[-3:-1]
    padded = np.pad(images, [(0, 0)] * (images.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)], mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    return padded[..., dy:dy + h, dx:dx + w, :]


@dataclass
class WindowConfig:
    obs_horizon: int = 2
    action_horizon: int = 16
    obs_keys: tuple[str, ...] | None = None  # None: every key of the store except "action"
    image_shift: int = 4  # random-shift augmentation (pixels), training only
    cache: bool = True  # load the committed frames into RAM once (fast); False streams images (larger than RAM)
    future_frames: int = 0  # k future frames per image key as `future.<key>` (0: none, the default)
    future_stride: int = 1  # frames between consecutive future frames
    goal_offsets: tuple[int, int] | None = None  # goal image u ~ U[lo, hi] frames ahead as `goal.<image key>`
    language_encoder: str | None = None  # yield `goal.lang_emb` / `goal.has_lang` from the store's meta/lang_emb
    lang_dim: int | None = None  # the policy's embedding width: the zeros a store with no instruction yields


_VAL_SEED = 0x5EED  # with the window index, the seed of a validation window's random choices


class WindowDataset(Dataset):
    """Map-style dataset over (episode, frame) windows of a DemoStore.

    Picklable for DataLoader workers: each worker re-opens the store read-only on first use.
    Indices may be plain ints or `(index, seed)` pairs (see `ResumableBatchSampler`), which makes the
    augmentation reproducible across resumes and worker counts. A plain index draws fresh randomness for a
    training set, but with `train=False` its random choices (MDT's goal frame) are seeded by the index: a
    validation loss compares checkpoints on the same windows with the same goals, pass after pass.
    """

    def __init__(self, path: str | Path, cfg: WindowConfig, episodes: np.ndarray | None = None,
                 train: bool = True):
        self.path, self.cfg, self.train = Path(path), cfg, train
        store = DemoStore.open(self.path)
        self.keys_meta = dict(store.keys)
        keys = cfg.obs_keys or tuple(k for k in sorted(store.keys) if k != "action")
        unknown = [k for k in keys if k not in store.keys]
        if unknown:
            raise ValueError(f"observation key(s) {unknown} not in store {self.path} (it has {sorted(store.keys)})")
        if "action" not in store.keys:
            raise ValueError(f"store {self.path} has no 'action' key")
        if "action" in keys:
            raise ValueError(f"obs_keys {list(keys)} include 'action': the policy would see the actions it must "
                             "predict (the observation keys are every key but 'action' by default)")
        self.obs_keys = tuple(keys)
        if cfg.future_frames < 0 or cfg.future_stride < 1:
            raise ValueError(f"future_frames must be >= 0 and future_stride >= 1, got {cfg.future_frames}, "
                             f"{cfg.future_stride}")
        self.episodes = np.arange(len(store)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        if len(self.episodes) == 0:
            raise ValueError(f"store {self.path}: no episodes selected for this split")
        starts, ends = store.episode_starts[self.episodes], store.episode_ends[self.episodes]
        lengths = ends - starts
        self._index_episode = np.repeat(np.arange(len(self.episodes)), lengths)
        self._index_frame = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
        self._ep_start, self._ep_end = starts.astype(np.int64), ends.astype(np.int64)
        self._has_actions = store.episode_has_actions[self.episodes].astype(bool)
        self._task = store.episode_task[self.episodes].astype(np.int64)
        self.num_tasks = len(store.tasks)
        if cfg.goal_offsets is not None:
            lo, hi = (int(v) for v in cfg.goal_offsets)
            if not 0 <= lo <= hi:
                raise ValueError(f"goal_offsets must be (lo, hi) with 0 <= lo <= hi, got {tuple(cfg.goal_offsets)}")
        self._lang_emb, self._ep_lang = None, None
        if cfg.language_encoder:
            from robodit.datasets.language import store_language_table

            table = store_language_table(store, cfg.language_encoder)
            texts = list(table)
            # a store whose segments are all unlabelled (goal images only) has no table to take the width from
            dim = len(next(iter(table.values()))) if table else int(cfg.lang_dim or 0)
            if table and cfg.lang_dim and dim != cfg.lang_dim:
                raise ValueError(f"store {self.path}: meta/lang_emb rows are {dim}-d, but the policy takes "
                                 f"{cfg.lang_dim}-d {cfg.language_encoder!r} embeddings (lang_dim)")
            self._lang_emb = np.stack([table[t] for t in texts]).astype(np.float32) if texts else np.zeros((0, dim))
            rows = {t: i for i, t in enumerate(texts)}
            infos = [store.episode_info(int(e)) for e in self.episodes]
            self._ep_lang = np.array([rows[i["instruction"]] if i["has_language"] else -1 for i in infos], np.int64)
            self.lang_dim = dim
        self._store: DemoStore | None = None
        # Low-dim keys are ~1% of a store with images: they stay in RAM even when streaming, which saves a
        # zarr read (~0.4 ms of async overhead each) per key per sample; cache=False streams only images.
        keys = (*self.obs_keys, "action")
        keys = keys if cfg.cache else tuple(k for k in keys if len(store.keys[k][0]) <= 1)
        self._cache: dict[str, np.ndarray] = {k: store.read(k, 0, store.num_frames) for k in keys}
        store.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self._index_frame)

    @property
    def window_has_language(self) -> np.ndarray | None:
        """[len(self)] bool: whether each window's episode carries an instruction (None without a language
        encoder): the pool `dataset.language_fraction` draws from."""
        return None if self._ep_lang is None else self._ep_lang[self._index_episode] >= 0

    @property
    def window_has_actions(self) -> np.ndarray:
        """[len(self)] bool: whether each window comes from an episode with actions (co-training batches)."""
        return self._has_actions[self._index_episode]

    def _read(self, key: str, frames: np.ndarray) -> np.ndarray:
        if key in self._cache:
            return self._cache[key][frames]
        if self._store is None:
            self._store = DemoStore.open(self.path)
        lo, hi = int(frames.min()), int(frames.max()) + 1
        return self._store.read(key, lo, hi)[frames - lo]

    def __getitem__(self, item) -> dict[str, torch.Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        e, t = self._index_episode[index], int(self._index_frame[index])
        start, end = self._ep_start[e], self._ep_end[e]
        to, tp = self.cfg.obs_horizon, self.cfg.action_horizon
        obs_frames = np.clip(np.arange(t - to + 1, t + 1), start, end - 1)
        act_frames = np.arange(t, t + tp)
        is_pad = act_frames >= end
        k, stride = self.cfg.future_frames, self.cfg.future_stride
        future_frames = np.minimum(t + stride * np.arange(1, k + 1), end - 1)
        if seed is None and not self.train:  # validation: the same goal frame for a window on every pass
            seed = [_VAL_SEED, int(index)]
        rng = np.random.default_rng(seed)
        goal_frame = None
        if self.cfg.goal_offsets is not None:
            lo, hi = self.cfg.goal_offsets
            goal_frame = np.array([min(t + int(rng.integers(lo, hi + 1)), end - 1)])
        sample: dict[str, torch.Tensor] = {}
        for key in self.obs_keys:
            x = self._read(key, obs_frames)
            if x.dtype == np.uint8 and x.ndim == 4:
                if k:  # one read and one shift for history + future: the same crop for both
                    x = np.concatenate([x, self._read(key, future_frames)])
                if goal_frame is not None:
                    x = np.concatenate([x, self._read(key, goal_frame)])
                if self.train:
                    x = random_shift(x, self.cfg.image_shift, rng)
                x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
                sample[f"obs.{key}"] = torch.from_numpy(x[:to])
                if k:
                    sample[f"future.{key}"] = torch.from_numpy(x[to:to + k])
                if goal_frame is not None:
                    sample[f"goal.{key}"] = torch.from_numpy(x[-1])
            else:
                sample[f"obs.{key}"] = torch.from_numpy(x.astype(np.float32, copy=False))
        actions = self._read("action", np.minimum(act_frames, end - 1)).astype(np.float32, copy=False)
        sample["action"] = torch.from_numpy(actions)
        sample["action_is_pad"] = torch.from_numpy(is_pad | (not self._has_actions[e]))
        sample["task_id"] = torch.tensor(self._task[e], dtype=torch.long)
        if self._ep_lang is not None:
            row = self._ep_lang[e]
            emb = self._lang_emb[row] if row >= 0 else np.zeros(self.lang_dim, np.float32)
            sample["goal.lang_emb"] = torch.from_numpy(np.asarray(emb, np.float32))
            sample["goal.has_lang"] = torch.tensor(row >= 0)
        return sample


def batch_shares(weights: Sequence[float], total: int) -> list[int]:
    """Split `total` batch slots by `weights` with largest-remainder rounding (the shares sum to `total`)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    shares = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - shares), kind="stable")[:total - shares.sum()]:
        shares[i] += 1
    return shares.tolist()


def share_pools(mask: np.ndarray | None, fraction: float, num_samples: int, global_batch: int, name: str,
                what: str) -> list[tuple[np.ndarray, int]]:
    """Two pools: the windows where `mask` holds, round(fraction * batch) per global batch, and the rest (all of
    the batch from the first pool if there is no rest). `name`/`what` word the errors ("action_fraction",
    "has actions")."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {fraction}")
    if mask is None or len(mask) != num_samples:
        raise ValueError(f"{name} needs a mask with one flag per window ({num_samples})")
    mask = np.asarray(mask, dtype=bool)
    inside, rest = np.flatnonzero(mask), np.flatnonzero(~mask)
    if len(inside) == 0:
        raise ValueError(f"{name} is set but no training window's episode {what}")
    count = int(round(fraction * global_batch)) if len(rest) else global_batch
    if count == 0:
        raise ValueError(f"{name}={fraction} is less than one window of the global batch ({global_batch})")
    return [(inside, count), (rest, global_batch - count)]


def weighted_pools(groups: np.ndarray | None, weights: Sequence[float],
                   global_batch: int) -> list[tuple[np.ndarray, int]]:
    """(window indices, windows per global batch) for each group with a positive weight; clear errors for a
    weight list that does not fit the groups, a negative / non-finite weight, or a share that rounds to nothing."""
    if groups is None:
        raise ValueError("group weights need `groups`: the group of every window")
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    weights = [float(w) for w in weights]
    if len(weights) != n_groups:
        raise ValueError(f"{len(weights)} sampling weights for {n_groups} stores: give one weight per store")
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"sampling weights must be finite, >= 0 and not all 0, got {weights}")
    shares = batch_shares(weights, global_batch)
    pools = []
    for g, (w, count) in enumerate(zip(weights, shares)):
        members = np.flatnonzero(groups == g)
        if w > 0 and count == 0:
            raise ValueError(f"store {g}'s weight {w:g} is less than one window of the global batch "
                             f"({global_batch}); raise its weight or the batch size")
        if count and len(members) == 0:
            raise ValueError(f"store {g} has weight {w:g} but no training windows")
        if count:
            pools.append((members, count))
    return pools


class ResumableBatchSampler(Sampler):
    """Infinite, deterministic stream of batches: batch `k` depends only on (seed, k, world layout).

    Epoch `k // batches_per_epoch` uses permutation(seed + epoch); so training resumed at step k reads exactly
    the batches an uninterrupted run would, whatever DataLoader prefetching did. Each index comes with its own
    augmentation seed. Under DDP each rank takes a strided slice of the same global batch.

    Co-training (`action_mask` + `action_fraction`): every global batch holds round(fraction * batch) windows with
    actions and the rest from action-free video, each pool walked through its own seeded permutations. Without it
    a store that is mostly video gives the action loss a few samples per batch, and more video means fewer action
    samples per unit of compute.

    Language share (`language_mask` + `language_fraction`, MDT's separate language loader): every global batch
    holds round(fraction * batch) windows from episodes with an instruction. With 10% of episodes labelled, the
    language-goal loss otherwise sees ~10% of each batch.

    Pooled batches are shuffled within each rank's slice (seeded by step), so a loss that reads only the first
    samples of a batch (MDT's `mgf_batch`) sees every pool.

    Mixing weights (`groups` + `group_weights`, e.g. one group per store of a multi-robot run): every global batch
    holds a fixed number of windows from each group, in proportion to its weight (largest remainder), each group
    walked through its own permutations, so a small store with a large weight is revisited more often. Without
    weights, groups are mixed in proportion to their windows.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, action_mask: np.ndarray | None = None,
                 action_fraction: float | None = None, groups: np.ndarray | None = None,
                 group_weights: Sequence[float] | None = None, language_mask: np.ndarray | None = None,
                 language_fraction: float | None = None):
        if batch_size * world_size > num_samples:
            raise ValueError(f"global batch {batch_size * world_size} is larger than the dataset "
                             f"({num_samples} windows); lower train.batch_size")
        self.n, self.bs, self.seed, self.start = num_samples, batch_size, seed, start_batch
        self.rank, self.world = rank, world_size
        self.global_bs = batch_size * world_size
        self.batches_per_epoch = num_samples // self.global_bs
        self.pools: list[tuple[np.ndarray, int]] = []  # (window indices, how many per global batch)
        if action_fraction is not None:
            self.pools = share_pools(action_mask, action_fraction, num_samples, self.global_bs, "action_fraction",
                                     "has actions")
        if language_fraction is not None:
            if self.pools:
                raise ValueError("action_fraction and language_fraction cannot be combined")
            self.pools = share_pools(language_mask, language_fraction, num_samples, self.global_bs,
                                     "language_fraction", "carries language")
        if group_weights is not None:
            if self.pools:
                raise ValueError("action_fraction / language_fraction and group weights cannot be combined")
            self.pools = weighted_pools(groups, group_weights, self.global_bs)

    def _pooled_rows(self, k: int, perms: dict) -> np.ndarray:
        rows = []
        for p, (pool, count) in enumerate(self.pools):
            if count == 0:
                continue
            j = np.arange(k * count, (k + 1) * count)
            epochs, pos = np.divmod(j, len(pool))
            for e in np.unique(epochs):
                if (p, e) not in perms:
                    perms[(p, e)] = np.random.default_rng([self.seed, p, int(e)]).permutation(len(pool))
                    if len(perms) > 2 * len(self.pools) + 4:  # a few epochs per pool, not all
                        perms.pop(next(iter(perms)))
                sel = epochs == e
                rows.append(pool[perms[(p, e)][pos[sel]]])
        return np.concatenate(rows)

    def __iter__(self):
        k = self.start
        perm, perm_epoch, perms = None, -1, {}
        while True:
            if self.pools:
                rows = self._pooled_rows(k, perms)[self.rank::self.world]
                rows = np.random.default_rng([self.seed, k, self.rank, 7]).permutation(rows)
            else:
                epoch, j = divmod(k, self.batches_per_epoch)
                if epoch != perm_epoch:
                    perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
                    perm_epoch = epoch
                rows = perm[j * self.global_bs:(j + 1) * self.global_bs][self.rank::self.world]
            base = (self.seed * 1_000_003 + k) * self.global_bs
            yield [(int(i), int(base + self.rank + r * self.world)) for r, i in enumerate(rows)]
            k += 1

    def __len__(self) -> int:  # DataLoader only uses this for progress hints
        return 2**62
