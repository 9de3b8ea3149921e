"""`robodit info CHECKPOINT [--routes] [--json]`: what a checkpoint is, without loading its weights.

A user holding a checkpoint directory wants to know which policy and process it is, what it observes and
outputs, what it was trained on and for how long, and how big it is: all of that comes from `config.yaml` and
the safetensors headers, so this is instant even for a 1B-parameter model. `--routes` loads the weights and
adds a MoDE checkpoint's inference routing (each sampling step's experts per layer, the fused cache's plan).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from robodit.training.checkpoint import STEP_DIR, read_config, resolve_checkpoint

POLICY_KEYS = ("size", "obs_horizon", "action_horizon", "n_action_steps", "sampler", "num_inference_steps",
               "task_conditioning", "image_pooling", "image_stem_stride")


def is_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint dir, a training out_dir with checkpoints, or its checkpoints/ folder."""
    try:
        resolve_checkpoint(path)
    except FileNotFoundError:
        return False
    return True


def _tensor_count(path: Path) -> tuple[int, int]:
    """(number of values, tensors) from a safetensors header: no tensor data is read."""
    values = tensors = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            values, tensors = values + n, tensors + 1
    return values, tensors


def _formulation(policy_cfg: dict) -> dict:
    """The process as the policy builds it (a bare name or none resolved to the family's settings), with every
    option spelled out: `ddpm` alone does not say ε or x0."""
    from hydra.utils import get_class

    from robodit.diffusion import make_formulation

    f = policy_cfg.get("formulation")
    try:
        cls = get_class(policy_cfg["_target_"])
        form = make_formulation(cls.formulation_config(f) if hasattr(cls, "formulation_config") else f)
    except Exception:  # noqa: BLE001 - an unloadable config is reported as written
        return {"name": f} if isinstance(f, str) else dict(f or {"name": "(class default)"})
    return {"name": form.name, **form.options}


def _active_parameters(cfg: dict) -> dict[str, int] | None:
    """The family's own count (total / active) where it has one, built on the meta device (no memory)."""
    import torch

    from robodit.datasets.normalizer import Normalizer
    from robodit.training.checkpoint import build_policy

    with torch.device("meta"):
        policy = build_policy(cfg["policy"], cfg["shape_meta"], Normalizer())
    counts = getattr(policy, "parameter_counts", None)
    return dict(counts()) if callable(counts) else None


def summarize_checkpoint(path: str | Path, routes: bool = False) -> dict[str, Any]:
    """Everything `info` reports about a checkpoint, as JSON-ready values."""
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    for key in ("policy", "shape_meta"):
        if key not in cfg:
            raise ValueError(f"{ckpt / 'config.yaml'} has no {key!r} section (not a robodit checkpoint?)")
    policy_cfg = cfg["policy"]
    step = STEP_DIR.match(ckpt.name)
    weights = ckpt / ("ema.safetensors" if (ckpt / "ema.safetensors").exists() else "model.safetensors")
    values, tensors = _tensor_count(ckpt / "model.safetensors")
    meta = cfg["shape_meta"]
    train = (cfg.get("train") or {}).get("train") or {}
    store = cfg.get("store") or {}
    stores = store.get("stores") or ([store] if store else [])
    summary: dict[str, Any] = {
        "path": str(ckpt),
        "step": int(step.group(1)) if step else None,
        "policy": {"class": policy_cfg.get("_target_"),
                   **{k: policy_cfg[k] for k in POLICY_KEYS if k in policy_cfg},
                   "formulation": _formulation(policy_cfg)},
        "parameters": {"total": values, "tensors": tensors},
        "weights": weights.name,
        "bytes": sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file()),
        "observations": {k: list(v["shape"]) for k, v in (meta.get("obs") or {}).items()},
        "action": list((meta.get("action") or {}).get("shape", [])),
        "num_tasks": meta.get("num_tasks"),
        "stores": [{"path": s.get("path"), "env": (s.get("env") or {}).get("name"), "robot": s.get("robot"),
                    "episodes": s.get("episodes"), "tasks": list(s.get("tasks") or []),
                    # several robots (RDT): each store's own observations and native action
                    **({"observations": {k: list(v["shape"]) for k, v in m.get("obs", {}).items()},
                        "action": list(m.get("action", {}).get("shape", []))} if m else {})}
                   for s, m in zip(stores, meta.get("stores") or [None] * len(stores))],
        # init_from: the checkpoint a fine-tune started from (its steps and minutes are not in this run's)
        "training": {k: train[k] for k in ("steps", "batch_size", "lr", "seed", "init_from") if train.get(k) is not None},
        # how the learning-rate schedule stood at this checkpoint (checkpoints from before it was recorded: None)
        "schedule": cfg.get("schedule"),
    }
    counts = _active_parameters(cfg)
    if counts:
        summary["parameters"].update({k: int(v) for k, v in counts.items() if k != "total"})
    if routes:
        from robodit.training.checkpoint import load_policy

        policy = load_policy(ckpt)
        if not hasattr(policy, "inference_routing"):
            raise ValueError(f"--routes: {policy_cfg.get('_target_')} has no expert routing (MoDE checkpoints do)")
        summary["routes"] = [{"noise_cond": round(float(r["noise_cond"]), 4),
                              "experts": [list(e) for e in r["experts"]],
                              "weights": [[round(float(w), 3) for w in ws] for ws in r["weights"]]}
                             for r in policy.inference_routing()]
        # The fused MLPs are copies of the chosen experts' weights (gates folded in): memory a deployment pays.
        mode = ("fused" if policy.expert_cache_fused else "in_place") if policy.expert_cache else "off"
        summary["expert_cache"] = {"mode": mode, "bytes": policy.expert_cache_bytes(),
                                   "fused_mlps": len(summary["routes"]) * policy.depth if mode == "fused" else 0,
                                   "weights_bytes": sum(p.numel() * p.element_size() for p in policy.parameters())}
    return summary


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _format_schedule(c: dict) -> str:
    """The last step's learning rate against the peak, and what set the decay's pace: the step count or the
    wall-clock budget (train.max_minutes)."""
    frac = c.get("lr_fraction")
    if c.get("driven_by") == "max_minutes":
        pace = f"decayed on the {c['max_minutes']:g}-minute budget (train.max_minutes)"
    else:
        pace = f"decay over train.steps {c.get('steps')}" + (
            f" (train.max_minutes {c['max_minutes']:g} did not end it first)" if c.get("max_minutes") else "")
    share = f" = {100 * frac:.3g}% of peak {c['peak_lr']:.3g}" if frac is not None else ""
    return (f"last step at lr {c['lr']:.3g}{share} (floor {100 * c.get('min_lr_ratio', 0.0):.3g}%), "
            f"decay {100 * c.get('progress', 0.0):.3g}% done; {pace}")


def format_checkpoint(s: dict) -> str:
    p = s["policy"]
    params = s["parameters"]
    extra = ", ".join(f"{k} {_millions(v)}" for k, v in params.items() if k not in ("total", "tensors"))
    form = p["formulation"]
    lines = [
        f"checkpoint: {s['path']}" + (f" (step {s['step']})" if s["step"] is not None else ""),
        f"policy:     {p['class']}" + (f", size {p['size']}" if "size" in p else ""),
        f"process:    {form.get('name')}" + "".join(f", {k} {v}" for k, v in form.items() if k != "name")
        + (f"; sampler {p['sampler']} x {p['num_inference_steps']} steps" if "sampler" in p else ""),
        f"horizons:   {p.get('obs_horizon', '?')} observation step(s), chunk {p.get('action_horizon', '?')}, "
        f"{p.get('n_action_steps', '?')} executed",
        f"parameters: {_millions(params['total'])} in {params['tensors']} tensors" + (f" ({extra})" if extra else ""),
        "observes:   " + ", ".join(f"{k} {tuple(v)}" for k, v in s["observations"].items())
        + (f"; {s['num_tasks']} task ids" if (s.get("num_tasks") or 0) > 1 else "")
        + (f" ({p['task_conditioning']})" if (s.get("num_tasks") or 0) > 1 and "task_conditioning" in p else "")
        + (f"; images pooled by {p['image_pooling']}" if p.get("image_pooling", "avg") != "avg" else "")
        + (f"; image stem stride {p['image_stem_stride']}" if p.get("image_stem_stride", 1) != 1 else ""),
        f"action:     {tuple(s['action'])}",
        f"weights:    {s['weights']} (checkpoint {s['bytes'] / 2**20:.1f} MiB on disk)",
    ]
    t = s["training"]
    if t:
        lines.append("training:   " + ", ".join(f"{k} {v}" for k, v in t.items()))
    if s.get("schedule"):
        lines.append("schedule:   " + _format_schedule(s["schedule"]))
    for st in s["stores"]:
        tasks = st["tasks"]
        shown = ", ".join(tasks[:6]) + (f", ... ({len(tasks)} tasks)" if len(tasks) > 6 else "")
        lines.append(f"store:      {st['path']} ({st['episodes']} episodes, env {st['env']}, robot {st['robot']})"
                     + (f"\n            tasks: {shown}" if tasks else "")
                     + (f"\n            observes {', '.join(f'{k} {tuple(v)}' for k, v in st['observations'].items())}"
                        f"; action {tuple(st['action'])}" if "observations" in st else ""))
    if len(s["stores"]) > 1:
        lines.append("            (eval.py evaluates the first store's env unless env= names another)")
    for i, r in enumerate(s.get("routes", [])):
        if i == 0:
            lines.append("routes:     step  noise_cond  experts per layer (weights)")
        layers = "  ".join(f"{'+'.join(map(str, e))}({'/'.join(f'{w:.2f}' for w in ws)})"
                           for e, ws in zip(r["experts"], r["weights"]))
        lines.append(f"            {i:>4}  {r['noise_cond']:>10.4g}  {layers}")
    if "expert_cache" in s:
        c = s["expert_cache"]
        what = {"fused": f"{c['fused_mlps']} fused MLPs", "in_place": "routes only, the experts used in place",
                "off": "off: routed at every step"}[c.get("mode", "fused")]
        lines.append(f"cache:      {c['bytes'] / 2**20:.1f} MiB, {what} (the weights: {c['weights_bytes'] / 2**20:.1f} MiB)")
    return "\n".join(lines)
