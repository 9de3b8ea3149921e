"""The one training loop every policy family uses (train.py is a thin Hydra wrapper around `train`).

AdamW, linear warmup + cosine decay (over train.steps, or the wall-clock budget when that ends first:
robodit.training.schedule), grad clipping, EMA (evaluation uses it), bf16 autocast on CUDA, DDP under torchrun,
atomic checkpoints, exact resume (data order, RNG, optimizer, EMA and step all restored), wall-clock budget,
fine-tuning from another checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from robodit.datasets.multi import build_multi_store, store_paths, store_record
from robodit.datasets.normalizer import Normalizer, compute_stats, normalized_bound
from robodit.datasets.sampler import (ResumableBatchSampler, WindowConfig, WindowDataset, split_episodes,
                                      store_split_groups)
from robodit.datasets.store import DemoStore
from robodit.training import checkpoint as ckpt_io
from robodit.training.distributed import DistInfo, setup_distributed
from robodit.training.logging import RunLogger
from robodit.training.schedule import LRSchedule


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shape_meta_from_store(store: DemoStore, obs_keys: tuple[str, ...]) -> dict:
    return {"obs": {k: {"shape": list(store.keys[k][0]), "dtype": str(np.dtype(store.keys[k][1]))} for k in obs_keys},
            "action": {"shape": list(store.keys["action"][0])},
            "num_tasks": max(1, len(store.tasks)), "robot": store.robot, "control_hz": float(store.fps)}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """`evaluator_factory(eval_cfg, out_dir, store_record)` builds the training-time evaluator (train.py passes
    robodit.evaluation.training_eval.PeriodicEvaluator): evaluation sits a floor above training, so it is handed
    in rather than imported."""

    def __init__(self, cfg: DictConfig | dict, evaluator_factory=None):
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.evaluator_factory = evaluator_factory
        self.dist: DistInfo = setup_distributed(self.cfg.train.get("device", "auto"))
        self.device = self.dist.device
        self.out_dir = Path(self.cfg.out_dir).expanduser().resolve()
        if self.dist.world_size > 1:  # ranks may resolve ${now:...} in out_dir to different seconds: use rank 0's
            shared = [str(self.out_dir)]
            torch.distributed.broadcast_object_list(shared, src=0)
            self.out_dir = Path(shared[0])
        self.tc = self.cfg.train

    # -- set-up ------------------------------------------------------------------------------------------------
    def _build_data(self):
        dc = self.cfg.dataset
        paths = store_paths(dc)  # dataset.paths=[A, B, ...]: several robots, one unified-space policy
        store_path = Path(paths[0]).expanduser()
        store = DemoStore.open(store_path)
        store.verify()
        self.store_record = store_record(store_path, store)
        policy_cfg = self.cfg.policy
        wcfg = WindowConfig(obs_horizon=policy_cfg.obs_horizon, action_horizon=policy_cfg.action_horizon,
                            obs_keys=tuple(dc.obs_keys) if dc.get("obs_keys") else None,
                            image_shift=dc.get("image_shift", 4), cache=dc.get("cache", True),
                            future_frames=policy_cfg.get("future_frames", 0),  # video-predicting policies (PAD)
                            future_stride=policy_cfg.get("future_stride", 1),
                            # goal-image / language-goal policies (MDT)
                            goal_offsets=tuple(policy_cfg.goal_offsets) if policy_cfg.get("goal_offsets") else None,
                            language_encoder=policy_cfg.get("language_encoder"), lang_dim=policy_cfg.get("lang_dim"))
        if len(paths) > 1:
            store.close()
            multi = build_multi_store(paths, wcfg, dc, policy_cfg, self.tc.seed)
            self.train_set, self.val_set, self.shape_meta = multi.train_set, multi.val_set, multi.shape_meta
            self.normalizer, self.store_record = multi.normalizer, multi.record  # the record lists every store
            self.action_bound = (None, None)  # the clip check (_check_clip) covers single-store runs only
            return
        train_eps, val_eps = split_episodes(len(store), dc.get("val_fraction", 0.0), self.tc.seed,
                                            store_split_groups(store))
        self.train_set = WindowDataset(store_path, wcfg, train_eps, train=True)
        self.val_set = WindowDataset(store_path, wcfg, val_eps, train=False) if len(val_eps) else None
        self.shape_meta = shape_meta_from_store(store, self.train_set.obs_keys)
        norm_keys = [k for k in self.train_set.obs_keys if len(store.keys[k][0]) == 1] + ["action"]
        stats = compute_stats(store, norm_keys)
        modes = dict(dc.get("normalizer_modes") or {})
        unknown = sorted(set(modes) - set(norm_keys))
        if unknown:
            raise ValueError(f"dataset.normalizer_modes names {unknown}, which {store_path} does not normalise: its "
                             f"normalised keys are {norm_keys} (images are scaled inside the model)")
        self.normalizer = Normalizer(stats, modes=modes)
        self.action_bound = (modes.get("action", "limits"), normalized_bound(stats["action"], self.normalizer, "action"))
        store.close()

    def _build_loader(self, start_step: int) -> DataLoader:
        fraction = self.cfg.dataset.get("action_fraction")  # co-training: a fixed share of windows with actions
        mask = self._share_mask("action_fraction", "window_has_actions")
        lang_fraction = self.cfg.dataset.get("language_fraction")  # MDT: a fixed share of labelled windows
        lang_mask = self._share_mask("language_fraction", "window_has_language")
        if lang_fraction is not None and lang_mask is None:
            raise ValueError("dataset.language_fraction needs language goals: set policy.language_encoder "
                             "(e.g. minilm) on a store with instructions")
        weights = self.cfg.dataset.get("weights")  # several stores: a fixed share of every batch from each
        groups = None
        if weights is not None:
            offsets = getattr(self.train_set, "offsets", None)
            if offsets is None:
                raise ValueError("dataset.weights needs several stores (dataset.paths=[A,B,...]): one weight per store")
            groups = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
            weights = list(weights)
        sampler = ResumableBatchSampler(len(self.train_set), self.tc.batch_size, seed=self.tc.seed,
                                        start_batch=start_step, rank=self.dist.rank, world_size=self.dist.world_size,
                                        action_mask=mask, action_fraction=fraction, groups=groups,
                                        group_weights=weights, language_mask=lang_mask,
                                        language_fraction=lang_fraction)
        workers = self.cfg.dataset.get("num_workers", 0)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                          prefetch_factor=4 if workers > 0 else None, generator=torch.Generator())

    def _share_mask(self, key: str, flags: str) -> np.ndarray | None:
        """The per-window flags (`self.train_set.<flags>`) that `dataset.<key>` fixes a batch share of; None when
        the key is unset. Single-store training only."""
        if self.cfg.dataset.get(key) is None:
            return None
        if getattr(self.train_set, "offsets", None) is not None:
            raise ValueError(f"dataset.{key} is supported for single-store training only")
        return getattr(self.train_set, flags)

    def _policy_config(self) -> dict:
        return OmegaConf.to_container(self.cfg.policy, resolve=True)

    def _build_policy(self):
        return ckpt_io.build_policy(self._policy_config(), self.shape_meta, self.normalizer)

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> Path | None:
        tc, dist = self.tc, self.dist
        if dist.is_main:  # left by a save killed mid-way (preemption): full copies nobody will read
            ckpt_io.remove_stale_temporaries(self.out_dir)
        earlier = ckpt_io.list_checkpoints(self.out_dir)
        if earlier and not tc.get("resume"):  # pruning would keep the old run's later steps, not this run's
            raise ValueError(f"out_dir {self.out_dir} already holds checkpoints of a run (latest {earlier[-1].name}): "
                             "continue it with train.resume=true, or train into another out_dir "
                             "(train.init_from=... fine-tunes from it)")
        _seed_everything(tc.seed)
        self._build_data()  # same seed on every rank: identical split and normaliser
        policy = self._build_policy().to(self.device)  # same init on every rank (DDP also broadcasts it)
        self._check_clip(policy)
        _seed_everything(tc.seed + 1000 * dist.rank)  # each rank draws its own diffusion noise
        if tc.get("init_from"):
            self._init_from(policy, tc.init_from)
        decay, no_decay = [], []
        for name, p in policy.named_parameters():
            (no_decay if p.ndim < 2 or "embedding" in name or "pos" in name.split(".")[-1] else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                                      betas=tuple(tc.get("betas", (0.9, 0.999))))
        warmup = int(tc.warmup_steps)
        if warmup >= tc.steps:  # the learning rate would never reach train.lr
            warmup = tc.steps // 10
            if dist.is_main:
                print(f"[robodit] train.warmup_steps={tc.warmup_steps} >= train.steps={tc.steps}: warming up over "
                      f"{warmup} steps instead", flush=True)
        budget_s = None if tc.get("max_minutes") in (None, 0) else 60 * float(tc.max_minutes)
        schedule = LRSchedule(warmup, tc.steps, tc.get("min_lr_ratio", 0.0), budget_s)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: schedule.factor(k))
        ema = EMAModel(policy.parameters(), decay=tc.ema_decay, use_ema_warmup=True, power=tc.get("ema_power", 0.75))
        step, elapsed_before = 0, 0.0
        resume_from = self._find_resume() if tc.get("resume") else None
        if resume_from is not None:
            step, elapsed_before = self._restore(resume_from, policy, optimizer, scheduler, ema, schedule)
        model = policy
        if dist.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                policy, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if tc.get("compile"):
            model = torch.compile(model)
        config_record = self._config_record()
        # training-time evaluation (robodit.evaluation.training_eval): off unless train.eval.every > 0
        eval_cfg = OmegaConf.to_container(tc.eval, resolve=True) if tc.get("eval") else {}
        evaluator = None
        if eval_cfg.get("every") and dist.is_main:
            if self.evaluator_factory is None:
                raise ValueError("train.eval.every > 0 needs an evaluator: run train.py, or pass evaluator_factory="
                                 "robodit.evaluation.training_eval.PeriodicEvaluator to train()/Trainer()")
            evaluator = self.evaluator_factory(eval_cfg, self.out_dir, self.store_record)
        logger = RunLogger(self.out_dir, kind=self.cfg.logger.get("kind", "none"),
                           project=self.cfg.logger.get("project", "robodit"), mode=self.cfg.logger.get("mode", "offline"),
                           config=config_record, enabled=dist.is_main,
                           resume_step=step if resume_from is not None else None)
        if dist.is_main:
            n_params = sum(p.numel() for p in policy.parameters())
            print(f"[robodit] {self.cfg.policy._target_.rsplit('.', 1)[-1]} {n_params / 1e6:.2f}M params | "
                  f"{len(self.train_set)} train windows | device {self.device} x{dist.world_size} | "
                  f"out_dir {self.out_dir}" + (f" | resumed at step {step}" if resume_from else ""), flush=True)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if self.device.type == "cuda" and tc.get("bf16", True) else nullcontext())
        start_step = step
        loader = iter(self._build_loader(step))
        t0 = time.monotonic()
        # this invocation's wall time: a resumed run gets max_minutes more (fits a cluster job's time limit)
        deadline = None if budget_s is None else t0 + budget_s
        schedule.start(t0)
        bar = tqdm(total=tc.steps, initial=step, disable=not dist.is_main or not tc.get("progress", True),
                   dynamic_ncols=True, desc="train")
        last_saved, stop_reason = None, "steps"
        logged_at, logged_step = time.monotonic(), step
        policy.train()
        while step < tc.steps:
            batch = _to_device(next(loader), self.device)
            with autocast:
                out = model(batch)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower train.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), tc.grad_clip)
            lr = scheduler.get_last_lr()[0]  # the rate this step used (after scheduler.step() it is the next one's)
            lr_progress = schedule.progress  # and how far into the decay it was
            optimizer.step()
            ema.step(policy.parameters())
            policy.on_weights_changed()
            step += 1
            bar.update(1)
            now = time.monotonic()
            out_of_time = deadline is not None and now >= deadline
            if deadline is not None:  # the budget's share of the decay as the next step starts
                budget = [float(out_of_time), schedule.time_fraction(now, step)]
                if dist.world_size > 1:  # every rank must stop at the same step, and use the same rate
                    both = torch.tensor(budget, device=self.device)
                    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
                    budget = both.tolist()
                out_of_time = bool(budget[0])
                schedule.observe(budget[1])
            scheduler.step()
            if step % tc.log_every == 0 or step == tc.steps or out_of_time:
                metrics = {f"train/{k}": v for k, v in self._global_mean(out).items()}
                now = time.monotonic()
                rate = (step - logged_step) / max(1e-9, now - logged_at)
                logged_at, logged_step = now, step
                metrics.update({"train/lr": lr, "train/grad_norm": grad_norm.item(),
                                "train/ema_decay": ema.cur_decay_value or 0.0, "train/steps_per_s": rate,
                                "train/samples_per_s": rate * tc.batch_size * dist.world_size})
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                logger.log(metrics, step)
            if self.val_set is not None and tc.get("val_every") and step % tc.val_every == 0:
                logger.log(self.validate(policy, ema), step)
            if eval_cfg.get("every") and step % int(eval_cfg["every"]) == 0:  # success on a small suite
                if evaluator is not None:
                    metrics = evaluator.run(step, policy, ema, config_record)
                    logger.log(metrics, step)
                    bar.set_postfix(loss=f"{loss.item():.4f}", success=f"{metrics.get('eval/success_rate', 0):.2f}")
                self.dist.barrier()
            if step % tc.checkpoint_every == 0 or step == tc.steps or out_of_time:
                last_saved = self._save(step, policy, optimizer, scheduler, ema,
                                        {**config_record, "schedule": schedule.record(lr, tc.lr, lr_progress)},
                                        elapsed_before + time.monotonic() - t0, schedule)
            if out_of_time:
                stop_reason = "max_minutes"
                break
        bar.close()
        if dist.is_main:
            rate = (step - start_step) / max(1e-9, time.monotonic() - t0)
            final = (f"last lr {lr:.3g} ({lr / tc.lr:.1%} of peak, decay {lr_progress:.0%} done, paced by "
                     f"{schedule.driven_by}); " if step > start_step and tc.lr else "")
            print(f"[robodit] stopped at step {step} ({stop_reason}); {rate:.1f} it/s; {final}"
                  f"checkpoint {last_saved}", flush=True)
        logger.close()
        return last_saved

    @torch.no_grad()
    def validate(self, policy, ema=None, max_batches: int = 8) -> dict[str, float]:
        """Denoising loss on held-out episodes with fixed noise (comparable across steps), over a fixed subset
        spread evenly across the whole split (every episode and store, not the first few windows), with the
        EMA weights that evaluation uses ("val/loss") and the raw ones ("val/loss_raw")."""
        from torch.utils.data import Subset

        n = min(len(self.val_set), max_batches * self.tc.batch_size)
        subset = Subset(self.val_set, np.unique(np.linspace(0, len(self.val_set) - 1, n).round().astype(int)).tolist())
        loader = DataLoader(subset, batch_size=self.tc.batch_size, shuffle=False)

        def loss() -> float:
            total, count = 0.0, 0
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(12345)
                for batch in loader:
                    total += policy.compute_loss(_to_device(batch, self.device))["loss"].item()
                    count += 1
            return total / max(1, count)

        policy.eval()
        out = {"val/loss_raw": loss()}
        if ema is not None:
            ema.store(policy.parameters())
            ema.copy_to(policy.parameters())
            policy.on_weights_changed()
            try:
                out["val/loss"] = loss()
            finally:
                ema.restore(policy.parameters())
                policy.on_weights_changed()
        else:
            out["val/loss"] = out["val/loss_raw"]
        policy.train()
        return out

    def _global_mean(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        """Each logged value averaged over the ranks that report it. Matched by name, not position: a policy may
        report a key on some ranks only (MoDE's per-noise-half expert usage when a rank's half is empty), and a
        positional all-reduce of unequal lists crashes (gloo) or mixes metrics up."""
        if self.dist.world_size == 1:
            return {k: float(v.detach().float()) for k, v in out.items()}
        names: list[list[str]] = [[] for _ in range(self.dist.world_size)]
        torch.distributed.all_gather_object(names, sorted(out))
        keys = sorted(set().union(*names))
        sums = torch.zeros(2, len(keys), device=self.device)
        for i, k in enumerate(keys):
            if k in out:
                sums[0, i], sums[1, i] = out[k].detach().float(), 1.0
        torch.distributed.all_reduce(sums)
        return {k: float(sums[0, i] / sums[1, i]) for i, k in enumerate(keys)}

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _config_record(self) -> dict:
        return {"policy": self._policy_config(), "shape_meta": self.shape_meta, "store": self.store_record,
                "train": OmegaConf.to_container(self.cfg, resolve=True)}

    def _save(self, step, policy, optimizer, scheduler, ema, config, elapsed, schedule) -> Path | None:
        rng = _rng_state()
        if self.dist.world_size > 1:  # every rank's RNG, so a resumed DDP run replays exactly
            states = [None] * self.dist.world_size
            torch.distributed.all_gather_object(states, rng)
            rng = {"per_rank": states}
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        model_state = ckpt_io.export_state(policy)
        ema_state = dict(model_state)
        for (name, _), shadow in zip(((n, p) for n, p in policy.named_parameters()), ema.shadow_params):
            ema_state[name] = shadow
        train_state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "lr_schedule": schedule.state_dict(), "ema": ema.state_dict(), "rng": rng, "elapsed_s": elapsed}
        path = ckpt_io.save_checkpoint(self.out_dir / "checkpoints" / f"step_{step:08d}", model_state=model_state,
                                       ema_state=ema_state, normalizer_state=policy.normalizer.state_dict_flat(),
                                       config=config, train_state=train_state)
        keep = self.tc.get("keep_checkpoints", 3)
        if keep:
            for old in ckpt_io.list_checkpoints(self.out_dir)[:-keep]:
                import shutil

                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return path

    def _find_resume(self) -> Path | None:
        found = ckpt_io.list_checkpoints(self.out_dir)
        if not found:
            if self.dist.is_main:
                print(f"[robodit] train.resume=true but no checkpoint under {self.out_dir}/checkpoints: "
                      "starting fresh", flush=True)
            return None
        return found[-1]

    def _check_clip(self, policy) -> None:
        """Refuse a sampler clip that would cut off actions the data holds (e.g. `gaussian` action normalisation,
        whose data reach beyond ±1, under the default clip of 1): the policy could never produce them."""
        clip = getattr(getattr(policy, "formulation", None), "clip_sample", None)
        mode, bound = self.action_bound
        if clip is None or bound is None or bound <= clip * (1 + 1e-4):
            return
        raise ValueError(f"the sampler clips normalised actions to ±{clip:g}, but with normalizer_modes.action="
                         f"{mode} this store's actions reach ±{bound:.3g}: the policy could never output the "
                         "extremes. Use limits (the default), or set policy.formulation.clip_sample="
                         f"{math.ceil(bound * 100) / 100:g} (or null)")

    def _check_resume(self, path: Path) -> None:
        """Check the checkpoint was trained with this policy and data layout (a resume under other settings would
        fail deep inside torch, or silently train under other statistics); say when the store has changed."""
        saved = ckpt_io.read_config(path)
        now = {"policy": self._policy_config(), "shape_meta": self.shape_meta}
        diffs = [f"{part}.{k}: {saved.get(part, {}).get(k)!r} then, {now[part].get(k)!r} now"
                 for part in now for k in sorted(set(saved.get(part, {})) | set(now[part]))
                 if saved.get(part, {}).get(k) != now[part].get(k)]
        if diffs:
            raise ValueError(f"train.resume=true: {path} was trained with other settings ({'; '.join(diffs[:6])}). "
                             "Resume with the same policy and store, or fine-tune with train.init_from")
        before, after = saved.get("store") or {}, self.store_record
        changed = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in ("path", "episodes")
                   if before.get(k) != after.get(k)]
        if changed and self.dist.is_main:
            print(f"[robodit] the training data changed since {path.name} ({', '.join(changed)}): continuing with "
                  "the checkpoint's normaliser; the data order is no longer a replay", flush=True)

    def _restore(self, path: Path, policy, optimizer, scheduler, ema, schedule) -> tuple[int, float]:
        self._check_resume(path)
        state = load_file(str(path / "model.safetensors"))
        missing = [k for k in ckpt_io.export_state(policy) if k not in state]
        if missing:  # its optimizer and EMA state hold fewer tensors than this policy has: nothing to continue
            raise ValueError(f"train.resume=true: {path} has no {missing[:3]}{' ...' if len(missing) > 3 else ''}: it "
                             "was saved by an older robodit whose layers differ, so its optimizer state cannot "
                             f"continue this run. Fine-tune from it instead: train.init_from={path}")
        policy.load_state_dict(state, strict=False)
        # the statistics the weights were trained under, not the store's as it is now (it may have grown)
        policy.normalizer.load_state_dict(load_file(str(path / "normalizer.safetensors")))
        ts = torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if "lr_schedule" in ts:  # older checkpoints: the closed-form schedule, which the fresh state computes
            schedule.load_state_dict(ts["lr_schedule"], int(ts["step"]))
        ema.load_state_dict(ts["ema"])
        ema.to(self.device)
        per_rank = ts["rng"].get("per_rank", [ts["rng"]])
        if len(per_rank) == self.dist.world_size:
            _set_rng_state(per_rank[self.dist.rank])
        else:  # world size changed: exact replay is impossible, reseed deterministically instead
            _seed_everything(self.tc.seed + 1000 * self.dist.rank + int(ts["step"]))
            if self.dist.is_main:
                b = self.tc.batch_size
                print(f"[robodit] resuming a {len(per_rank)}-rank run on {self.dist.world_size} rank(s): the global "
                      f"batch changes ({b} x {len(per_rank)} -> {b} x {self.dist.world_size}) and the data order "
                      "continues from the step count, so this is not an exact replay", flush=True)
        policy.on_weights_changed()
        return int(ts["step"]), float(ts.get("elapsed_s", 0.0))

    def _init_from(self, policy, path) -> None:
        """Fine-tune: take another checkpoint's (EMA) weights; shapes must match (`init_ignore_mismatched`: tensors
        of another shape start fresh, e.g. after switching `policy.image_pooling`), the normaliser is this data's.
        The policy's run-progress counters (`run_state_keys`, e.g. PAD's step count that switches its action loss
        on) are not weights: they stay at this run's own values, so `action_loss_start_step` counts fine-tune
        steps."""
        src = ckpt_io.resolve_checkpoint(path)
        src_policy = ckpt_io.read_config(src).get("policy") or {}
        family = src_policy.get("_target_")
        if family and family != self.cfg.policy._target_:
            raise ValueError(f"train.init_from={src} holds a {family.rsplit('.', 1)[-1]}, this run builds a "
                             f"{self.cfg.policy._target_.rsplit('.', 1)[-1]}: another family's weights do not "
                             "transfer (only tensor names that happen to match would load)")
        weights = src / ("ema.safetensors" if (src / "ema.safetensors").exists() else "model.safetensors")
        run_state = set(policy.run_state_keys)
        state = {k: v for k, v in load_file(str(weights)).items() if k not in run_state}
        own = ckpt_io.export_state(policy)
        mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
        bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
        if bad and self.tc.get("init_ignore_mismatched"):  # e.g. a new image pooling head: those start fresh
            state = {k: v for k, v in state.items() if k not in mismatched}
            if self.dist.is_main:
                print(f"[robodit] init_from: {len(bad)} tensor(s) of another shape start fresh "
                      f"(train.init_ignore_mismatched): {bad[:5]}", flush=True)
        elif bad:
            now = self._policy_config()
            keys = ("size", "width", "depth", "heads", "obs_horizon", "action_horizon")
            hint = [f"policy.{k}={src_policy.get(k)}" for k in keys if src_policy.get(k) != now.get(k)]
            raise ValueError(f"train.init_from={src}: shapes differ from this policy: {bad[:5]}"
                             + (f"; the checkpoint was trained with {' '.join(hint)}: pass the same" if hint else "")
                             + " (or train.init_ignore_mismatched=true to start those tensors fresh)")
        missing = [k for k in own if k not in state and k not in run_state]
        unused = [k for k in state if k not in own]
        policy.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        if self.dist.is_main:
            print(f"[robodit] initialised from {weights} ({len(state) - len(unused)} tensors loaded; "
                  f"{len(missing)} new" + (f"; {len(unused)} unused, e.g. {unused[:3]}" if unused else "") + ")",
                  flush=True)


def train(cfg: DictConfig | dict, evaluator_factory=None) -> Path | None:
    trainer = Trainer(cfg, evaluator_factory)
    try:
        return trainer.run()
    finally:
        trainer.dist.cleanup()

