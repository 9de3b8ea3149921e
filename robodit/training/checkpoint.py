"""Checkpoint directories: written atomically, found again on resume, loaded with no training code.

Layout (DESIGN.md): model.safetensors, ema.safetensors, normalizer.safetensors, config.yaml (resolved, with
the dataset's shape_meta and env record), train_state.pt (optimizer, scheduler, EMA, step, RNG). A directory
is written under a temporary name and renamed into place, so a crash never leaves a half checkpoint that
`resume` or `load_policy` could pick up.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED = ("model.safetensors", "config.yaml", "normalizer.safetensors")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied weights); clone makes every tensor its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(directory: str | Path, *, model_state: dict, ema_state: dict | None, normalizer_state: dict,
                    config: dict, train_state: dict | None = None) -> Path:
    """Write a checkpoint directory atomically (tmp dir + rename); returns its final path."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_state_for_safetensors(model_state), str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file(_state_for_safetensors(ema_state), str(tmp / "ema.safetensors"))
        save_file(_state_for_safetensors(normalizer_state), str(tmp / "normalizer.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the `.step_*.tmp-*` / `.old-*` dirs a save killed mid-way leaves (each a full copy of weights and
    optimizer: repeated preemptions would otherwise fill the disk). Only while no save is running: at start-up."""
    root = Path(run_dir) / "checkpoints"
    stale = [p for pattern in (".*.tmp-*", ".*.old-*") for p in root.glob(pattern) if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint dirs under `run_dir/checkpoints`, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
             and all((p / f).exists() for f in REQUIRED)]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a run's out_dir or its checkpoints/ folder; return the checkpoint dir."""
    p = Path(path).expanduser()
    if (p / "model.safetensors").exists():
        missing = [f for f in REQUIRED if not (p / f).exists()]
        if missing:
            raise FileNotFoundError(f"checkpoint {p} is incomplete: missing {missing}")
        return p
    found = list_checkpoints(p.parent if p.name == "checkpoints" else p)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no checkpoint at {p} (expected a directory with {', '.join(REQUIRED)}, "
                            "or a training out_dir with checkpoints/step_*)")


def read_config(ckpt: Path) -> dict:
    try:
        return yaml.safe_load((ckpt / "config.yaml").read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{ckpt / 'config.yaml'} is not valid YAML: {exc}") from exc


def build_policy(policy_cfg: dict, shape_meta: dict, normalizer) -> torch.nn.Module:
    """Instantiate a policy from its config (`_target_` + kwargs)."""
    from hydra.utils import get_class

    cfg = dict(policy_cfg)
    target = cfg.pop("_target_", None)
    if target is None:
        raise ValueError("policy config has no _target_ (the class to build)")
    return get_class(target)(shape_meta=shape_meta, normalizer=normalizer, **cfg)


def load_policy(path: str | Path, device: str | torch.device = "cpu", ema: bool = True) -> torch.nn.Module:
    """Rebuild the policy of a checkpoint in eval mode; EMA weights when present (what evaluation should use).
    A directory written by `robodit export` loads as an ExportedPolicy (ONNX Runtime / AOTInductor, CPU) behind
    the same predict_action."""
    from robodit.datasets.normalizer import Normalizer
    from robodit.deploy.exported import ExportedPolicy, is_exported

    if is_exported(path):
        if torch.device(device).type != "cpu":
            raise ValueError(f"{path} is an exported policy, which runs on the CPU; load the checkpoint it was "
                             f"exported from for device={device!r}")
        return ExportedPolicy(path)
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    normalizer = Normalizer.from_flat(load_file(str(ckpt / "normalizer.safetensors")))
    policy = build_policy(cfg["policy"], cfg["shape_meta"], normalizer)
    weights = ckpt / ("ema.safetensors" if ema and (ckpt / "ema.safetensors").exists() else "model.safetensors")
    state = load_file(str(weights))
    state.update({f"normalizer.{k}": v for k, v in normalizer.state_dict_flat().items()})
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the policy built from {ckpt / 'config.yaml'}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    policy.to(device).eval()
    policy.on_weights_changed()
    policy.checkpoint_dir = ckpt
    policy.checkpoint_config = cfg
    policy.task_names = list((cfg.get("store") or {}).get("tasks") or [])  # task_id i is task_names[i]
    return policy


def export_state(module: torch.nn.Module) -> dict[str, Any]:
    """Parameters and buffers except the normaliser (saved on its own)."""
    return {k: v for k, v in module.state_dict().items() if not k.startswith("normalizer.")}
