"""The Policy contract and the registry every family plugs into.

A policy is a `torch.nn.Module` that owns its normaliser, so `predict_action` takes raw observations and
returns actions in the robot's units; the trainer and the runner never normalise anything themselves.

Goals take one path too: whoever asks (a user, `robodit run`, the policy server, the evaluator, a training
batch) passes `goal` as a dict, and `Policy.resolve_goal` alone turns it into what the family conditions on:
a task name becomes its id in the training store's table, an instruction its embedding (embedded once, cached),
and every value becomes a tensor with one row per sample. A key the family does not read is refused with the
keys it does read, rather than ignored or left to fail inside torch.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch
from torch import nn

from robodit.datasets.normalizer import Normalizer
from robodit.keys import is_image_key

POLICIES: dict[str, type["Policy"]] = {}


def register_policy(name: str):
    def wrap(cls):
        POLICIES[name] = cls
        cls.name = name
        return cls

    return wrap


def _to_tensor(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return torch.as_tensor(np.asarray(x), device=device)


def keep_in_graph(x: torch.Tensor, parameters) -> torch.Tensor:
    """x + 0 · Σ parameters: a branch this batch did not use (language on an unlabelled batch, a contrast with too
    few samples) still joins the graph, so DDP (find_unused_parameters=False) sees a gradient for every parameter
    on every rank. Same value, zero gradient."""
    return x + 0.0 * sum(p.sum() for p in parameters)


def _is_text(v: Any) -> bool:
    """A string, a list of strings, or a numpy array of them."""
    if isinstance(v, np.ndarray):
        return v.dtype.kind in "USO"
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and bool(v) and isinstance(v[0], str))


class Policy(nn.Module, abc.ABC):
    """`compute_loss(batch) -> dict`, `predict_action(obs, goal=None) -> [B, Tp, A]`, `reset()`.

    `shape_meta` = {"obs": {key: {"shape": [...], "dtype": str}}, "action": {"shape": [A]}, "num_tasks": int}
    is recorded in the checkpoint so `load_policy` rebuilds the exact network without the dataset.
    """

    name = "policy"
    # What `goal` may carry (see `goal_keys`); a family sets these for what its network reads.
    task_goals = False  # "task" / "task_id" pick a task embedding (when the store held several tasks)
    language_goals = False  # "lang_emb" (+ "has_lang"): an instruction embedding; "instruction" with an encoder
    language_tokens = False  # "lang_emb" may hold several tokens per row, [B, L, lang_dim]
    image_goals: tuple[str, ...] = ()  # cameras a goal image is given for
    language_encoder: str | None = None  # name of the sentence encoder instructions are embedded with
    lang_dim = 0
    task_names: list[str] = []  # task_id i is task_names[i] (load_policy records the training store's table)
    # State-dict entries that count a training run's progress rather than hold what was learned (PAD's
    # `train_steps`): a resume restores them, fine-tuning (`train.init_from`) starts them fresh with the new run.
    run_state_keys: tuple[str, ...] = ()

    def __init__(self, shape_meta: dict, normalizer: Normalizer | None = None, obs_horizon: int = 2,
                 action_horizon: int = 16, n_action_steps: int = 8):
        super().__init__()
        if not 1 <= n_action_steps <= action_horizon:
            raise ValueError(f"n_action_steps={n_action_steps} must be in [1, action_horizon={action_horizon}]")
        self.shape_meta = shape_meta
        self.obs_shapes = {k: (tuple(v["shape"]), str(v["dtype"])) for k, v in shape_meta["obs"].items()}
        self.action_dim = int(shape_meta["action"]["shape"][0])
        self.num_tasks = int(shape_meta.get("num_tasks", 1))
        self.obs_horizon, self.action_horizon, self.n_action_steps = obs_horizon, action_horizon, n_action_steps
        self.normalizer = normalizer if normalizer is not None else Normalizer()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- normalisation --------------------------------------------------------------------------------------
    def normalize_obs(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, (shape, dtype) in self.obs_shapes.items():
            if key not in obs:
                raise KeyError(f"observation is missing key {key!r}; the policy expects {sorted(self.obs_shapes)}")
            x = obs[key]
            if is_image_key(shape, dtype):
                out[key] = x
            else:
                out[key] = self.normalizer.normalize(key, x.float()) if key in self.normalizer else x.float()
        return out

    @staticmethod
    def split_batch(batch: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in batch.items() if k.startswith(prefix + ".")}

    def prepare_obs(self, obs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Accept `state` or `obs.state` keys, numpy or torch, with or without the batch dimension; check shapes."""
        obs = {k[4:] if k.startswith("obs.") else k: v for k, v in obs.items()}
        out = {}
        for key, (shape, dtype) in self.obs_shapes.items():
            if key not in obs:
                raise KeyError(f"observation is missing key {key!r}; the policy expects {sorted(self.obs_shapes)}")
            x = _to_tensor(obs[key], self.device)
            if is_image_key(shape, dtype) and x.shape[-1] == shape[-1] and x.shape[-3] != shape[-1]:
                x = x.movedim(-1, -3)  # HWC → CHW
            frame = (shape[2], shape[0], shape[1]) if is_image_key(shape, dtype) else shape
            if tuple(x.shape[-len(frame):]) != tuple(frame):
                raise ValueError(f"observation {key!r} has shape {tuple(x.shape)}; expected [B, "
                                 f"{self.obs_horizon}, {', '.join(map(str, frame))}]")
            if x.ndim == len(frame) + 1:
                x = x[None]
            if x.ndim != len(frame) + 2 or x.shape[1] != self.obs_horizon:
                raise ValueError(f"observation {key!r} has shape {tuple(x.shape)}; expected [B, "
                                 f"{self.obs_horizon}, {', '.join(map(str, frame))}] (obs_horizon={self.obs_horizon})")
            if is_image_key(shape, dtype) and x.dtype != torch.uint8:  # a float image's range is a guess
                raise ValueError(f"observation {key!r} is {str(x.dtype).removeprefix('torch.')}; images go in as "
                                 "uint8 0-255, as the store holds them (the policy scales them itself)")
            if not is_image_key(shape, dtype) and not torch.isfinite(x).all():
                raise ValueError(f"observation {key!r} contains NaN or inf")
            out[key] = x
        return out

    # -- goals: one path from what a caller gives to what the family conditions on -----------------------------
    @property
    def takes_task(self) -> bool:
        return self.task_goals and self.num_tasks > 1

    def goal_keys(self) -> list[str]:
        """The goal keys this policy reads; anything else is refused."""
        keys = ["task", "task_id"] if self.takes_task else []
        if self.language_goals:
            keys += (["instruction"] if self.language_encoder else []) + ["lang_emb", "has_lang"]
        return keys + list(self.image_goals)

    def task_table(self) -> str:
        """' (ids: 0 reach-v3, 1 push-v3, ...)' for error messages, when the checkpoint recorded the names."""
        names = list(self.task_names or [])
        return f" (ids: {', '.join(f'{i} {n}' for i, n in enumerate(names))})" if names else ""

    def resolve_goal(self, goal: dict[str, Any] | None, batch: int) -> dict[str, torch.Tensor]:
        """`goal` (task name or id, instruction, language embedding, goal images; numpy, torch, scalars or text;
        one value for the whole batch or one row per sample) → tensors on the policy's device, one row per sample:
        task_id [B] long, lang_emb [B, lang_dim] (or [B, L, lang_dim]) with has_lang [B] bool, goal images uint8
        [B, ...] per camera, other keys the family declares as they came. Unknown keys, unknown task names, ids
        out of range, wrong widths and a missing task are errors that say what the policy takes."""
        goal = dict(goal or {})
        accepted = self.goal_keys()
        unknown = sorted(set(goal) - set(accepted))
        if unknown:
            raise ValueError(f"goal {unknown}: {type(self).__name__} takes "
                             f"{accepted if accepted else 'no goal (one task, no language or goal images)'}"
                             + self._goal_hint(unknown))
        text = [k for k, v in goal.items() if k not in ("task", "instruction") and _is_text(v)]
        if text:
            raise ValueError(f"goal {text} holds text; text goes in 'task' (a task name) or 'instruction'")
        if "task" in goal:
            if "task_id" in goal:
                raise ValueError("goal has both 'task' and 'task_id': give one")
            names = list(self.task_names or [])
            wanted = goal.pop("task")
            wanted = [wanted] if isinstance(wanted, str) else [str(t) for t in wanted]
            missing = [t for t in wanted if t not in names]
            if missing:
                raise ValueError(f"goal task {missing} is not one this policy was trained on: {names}")
            goal["task_id"] = np.asarray([names.index(t) for t in wanted], dtype=np.int64)
        if "instruction" in goal:
            texts = goal.pop("instruction")
            if "lang_emb" in goal:
                raise ValueError("goal has both 'instruction' and 'lang_emb': give one")
            goal["lang_emb"] = self.embed_instructions([texts] if isinstance(texts, str) else [str(t) for t in texts])
        task = goal.get("task_id")
        if task is not None and not (isinstance(task, torch.Tensor) and task.is_cuda):  # checked where no sync
            ids = np.asarray(task.cpu() if isinstance(task, torch.Tensor) else task).reshape(-1)
            if ids.dtype.kind in "iu" and len(ids) and not (0 <= ids.min() and ids.max() < self.num_tasks):
                raise ValueError(f"goal task_id {ids.tolist()} is outside the {self.num_tasks} tasks this policy was "
                                 f"trained on{self.task_table()}")
        out = {k: self._goal_rows(k, v, batch) for k, v in goal.items()}
        if "lang_emb" in out:
            out["has_lang"] = out.get("has_lang", torch.ones(batch, dtype=torch.bool, device=self.device))
        elif "has_lang" in out:
            raise ValueError("goal has 'has_lang' without 'lang_emb'")
        if self.takes_task and "task_id" not in out and not ("lang_emb" in out and bool(out["has_lang"].all())):
            options = "{'task': NAME} or {'task_id': ...}" + (" or an instruction" if self.language_goals else "")
            raise ValueError(f"this policy was trained on {self.num_tasks} tasks: pass goal={options}"
                             f"{self.task_table()}")
        return out

    def _goal_hint(self, unknown: list[str]) -> str:
        if {"instruction", "lang_emb"} & set(unknown):
            if self.language_goals:
                return (f"; {type(self).__name__} was trained without a language encoder (policy.language_encoder): "
                        "pass lang_emb, not instructions")
            return "; instructions need a policy trained with a language encoder (policy.language_encoder)"
        if {"task", "task_id"} & set(unknown):
            return "; it conditions on no task id (a single-task store, or a goal-conditioned family)"
        return ""

    def _goal_rows(self, key: str, value: Any, batch: int) -> torch.Tensor:
        """One goal value → a tensor with `batch` rows (a single value serves every row)."""
        x = _to_tensor(value, self.device)
        if key in ("task_id", "has_lang"):
            if x.is_floating_point() or x.is_complex():
                raise ValueError(f"goal {key!r} must be {'integers' if key == 'task_id' else 'booleans'}, got "
                                 f"{str(x.dtype).removeprefix('torch.')}")
            x = x.reshape(-1).to(torch.long if key == "task_id" else torch.bool)
        elif key == "lang_emb":
            x = x.float()
            x = x[None] if x.ndim == 1 else x
            if x.shape[-1] != self.lang_dim or x.ndim > (3 if self.language_tokens else 2):
                want = f"[B, {'L, ' if self.language_tokens else ''}{self.lang_dim}]"
                raise ValueError(f"goal lang_emb has shape {tuple(x.shape)}; this policy takes {want} or "
                                 f"[{self.lang_dim}] (lang_dim={self.lang_dim}, {self.language_encoder!r} embeddings)")
        elif key in self.image_goals:
            h, w, c = self.obs_shapes[key][0]
            if x.dtype != torch.uint8 or x.ndim not in (3, 4) or tuple(x.shape[-3:]) not in ((h, w, c), (c, h, w)):
                raise ValueError(f"goal image {key!r} is {str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}; "
                                 f"expected uint8 [{h}, {w}, {c}] or [B, {h}, {w}, {c}] with B = {batch} (or 1)")
            x = x if x.ndim == 4 else x[None]
        else:
            x = x.reshape(-1) if x.ndim == 0 else x
        if x.shape[0] not in (1, batch):
            raise ValueError(f"goal {key!r} has {x.shape[0]} rows; the observation has {batch}")
        return x.expand(batch, *x.shape[1:])

    def embed_instructions(self, texts: list[str]) -> np.ndarray:
        """[N, lang_dim] embeddings of any instructions, each encoded once per process and cached on the policy:
        a sentence never seen in training is simply encoded, nothing is looked up in a fixed table."""
        cache = self.__dict__.setdefault("_lang_cache", {})
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        if todo:
            from robodit.nn.language import get_language_encoder

            if not self.language_encoder:
                raise ValueError(f"{type(self).__name__} was trained without a language encoder: give goal ids, not "
                                 "instructions")
            encoder = get_language_encoder(self.language_encoder)
            if encoder.dim != self.lang_dim:
                raise ValueError(f"language encoder {self.language_encoder!r} gives {encoder.dim}-d embeddings; this "
                                 f"policy was built for {self.lang_dim}")
            cache.update(zip(todo, encoder.encode(todo)))
        return np.stack([cache[t] for t in texts])

    def goal_from_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch's goal (`goal.*` from the sampler; its task_id where the family reads tasks)."""
        goal = self.split_batch(batch, "goal")
        if "task_id" in batch and self.takes_task:
            goal["task_id"] = batch["task_id"]
        return goal

    # -- the contract -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training loss: {"loss": scalar, ...named parts for logging}."""

    @abc.abstractmethod
    def predict_action(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Action chunk [B, action_horizon, action_dim] in the robot's units."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`compute_loss`, reachable through `forward` so DDP's gradient hooks see the call."""
        return self.compute_loss(batch)

    def reset(self) -> None:  # noqa: B027 - stateless policies need nothing
        """Forget per-episode state (called by the runner at every reset)."""

    def on_weights_changed(self) -> None:  # noqa: B027 - hook for inference caches
        """Called by the trainer after each optimizer step and after `load_state_dict`: drop inference caches."""

    def train(self, mode: bool = True):
        """Switching train/eval drops inference caches too (their weights are about to change, or just did)."""
        self.on_weights_changed()
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.on_weights_changed()
        return result
