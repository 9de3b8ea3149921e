"""`robodit export`: a policy's whole chunk computation as one artifact that runs without the training stack.

The artifact computes what `predict_action` computes once the inputs are checked
(`DiffusionPolicy.chunk_from_noise`): normalisation in, the condition encoded once, the fixed-step denoising loop
unrolled with every step-only quantity (noise embeddings, AdaLN modulations, MoDE's fused experts, the
cross-attention K/V) folded in as constants, un-normalisation out. The starting noise is an input, so the same
noise gives the same actions as eager torch and a seeded caller reproduces a run. PAD's noise is its flat joint
state (future frames, then actions): the graph denoises both and returns the actions; a multi-task PAD holds every
task's per-step modulations and gathers by the task-id input.

Formats (onnx and aoti trace the same graph with torch.export):
- onnx: ONNX Runtime runs it; the robot computer needs onnxruntime and numpy (torch only to draw seeded noise).
- aoti: torch's AOTInductor package, C++ compiled for this CPU; needs torch at run time, no robodit model code.
- native (DiT only): the denoising loop as one C call, the condition in C too for state observations (a small ONNX
  graph for images; `robodit.deploy.native`): for small policies, whose graph is bound by per-operator dispatch.

The directory holds policy.onnx, policy.pt2 or denoiser.safetensors + encoder.onnx, export.json (what
`robodit.deploy.exported` needs to feed it:
inputs, shapes, horizons, the schedule it was traced with, task names) and the checkpoint's config.yaml.
Batch is fixed at 1 (a robot's control loop); the loader runs a larger batch row by row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from robodit.deploy.exported import MANIFEST  # the loader owns the manifest's name

FORMATS = ("onnx", "aoti", "native")
ARTIFACT = {"onnx": "policy.onnx", "aoti": "policy.pt2", "native": "denoiser.safetensors"}
NATIVE_ENCODER = "encoder.onnx"
EXPORT_VERSION = 1
# ONNX opset 23 has RMSNormalization and Attention: one node each where opset 18 spells out five to eight (dit/tiny
# DDIM-10: 1025 nodes instead of 1483), 1.17x faster in ONNX Runtime on one thread (same-run A/B); needs
# onnxruntime >= 1.23.
ONNX_OPSET = 23
# Samplers that draw fresh noise inside the loop: the artifact's only randomness is its noise input.
STOCHASTIC_SAMPLERS = ("ddpm",)


class ExportError(ValueError):
    """A policy, option or environment that cannot be exported; the message names the reason and what to do."""


class ChunkGraph(nn.Module):
    """(observation tensors in `obs_keys` order, [task_id], noise) → actions [1, Tp, A]: the traced function.

    Observations come as `Policy.prepare_obs` leaves them: [B, To, ...] float32, images uint8 CHW."""

    def __init__(self, policy, obs_keys: list[str], goal_keys: list[str]):
        super().__init__()
        self.policy, self.obs_keys, self.goal_keys = policy, list(obs_keys), list(goal_keys)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = len(self.obs_keys)
        obs = dict(zip(self.obs_keys, inputs[:n]))
        goal = dict(zip(self.goal_keys, inputs[n:-1]))
        return self.policy.chunk_from_noise(obs, goal, inputs[-1])


class ConditionGraph(nn.Module):
    """(observation tensors, [task_id]) → every block's cross-attention K and V, stacked
    [depth, 2, 1, heads, context, head_dim]: the once-per-chunk half of a native export."""

    def __init__(self, policy, obs_keys: list[str], goal_keys: list[str]):
        super().__init__()
        self.policy, self.obs_keys, self.goal_keys = policy, list(obs_keys), list(goal_keys)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        n = len(self.obs_keys)
        obs, goal = dict(zip(self.obs_keys, inputs[:n])), dict(zip(self.goal_keys, inputs[n:]))
        cond = self.policy.encode(self.policy.normalize_obs(obs), goal)
        return torch.stack([torch.stack(kv) for kv in cond["kv"]])


def check_exportable(policy) -> None:
    """Refuse what the traced graph cannot hold, by name and with the reason."""
    from robodit.policies.diffusion_policy import DiffusionPolicy

    name = getattr(policy, "name", type(policy).__name__)
    if not isinstance(policy, DiffusionPolicy):
        raise ExportError(f"{name}: only diffusion policies export (predict_action must run chunk_from_noise)")
    if policy.sampler in STOCHASTIC_SAMPLERS:
        raise ExportError(f"{name}: sampler {policy.sampler!r} draws fresh noise at every step; the exported chunk "
                          "takes its noise as its only input. Use a deterministic sampler (ddim, dpmsolver++, "
                          "euler, heun) with --sampler")
    if getattr(policy, "language_encoder", None):
        raise ExportError(f"{name}: this policy reads instructions through a text encoder "
                          f"({policy.language_encoder}); the exported graph takes observations, noise and a task "
                          "id only")


def goal_keys(policy) -> list[str]:
    """Goal inputs of the graph: the task id when the policy was trained on several tasks."""
    return ["task_id"] if policy.takes_task else []


def example_inputs(policy, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Batch-1 observation, goal and noise of the shapes the graph takes (values only steer the trace)."""
    from robodit.keys import is_image_key

    gen = torch.Generator().manual_seed(seed)
    obs = {}
    for key, (shape, dtype) in policy.obs_shapes.items():
        if is_image_key(shape, dtype):
            obs[key] = torch.randint(0, 256, (1, policy.obs_horizon, shape[2], shape[0], shape[1]),
                                     dtype=torch.uint8, generator=gen)
        else:
            obs[key] = torch.randn(1, policy.obs_horizon, *shape, generator=gen)
    goal = {k: torch.zeros(1, dtype=torch.long) for k in goal_keys(policy)}
    return obs, goal, policy.chunk_noise(1, gen)


def trace(policy, device: str | torch.device = "cpu"
          ) -> tuple[ChunkGraph, tuple[torch.Tensor, ...], torch.export.ExportedProgram]:
    """The chunk as an ExportedProgram (float32, eval, batch 1; on the CPU for the artifacts, on the policy's
    device for compiled inference), the inference caches built first so the trace folds them in as constants."""
    check_exportable(policy)
    policy = policy.to(device).float().eval()
    obs, goal, noise = example_inputs(policy)
    obs, goal, noise = ({k: v.to(device) for k, v in obs.items()}, {k: v.to(device) for k, v in goal.items()},
                        noise.to(device))
    graph = ChunkGraph(policy, list(obs), list(goal)).eval()
    args = (*obs.values(), *goal.values(), noise)
    with torch.no_grad():
        graph(*args)  # builds the caches outside the trace
        program = torch.export.export(graph, args)
    return graph, args, program


def export_policy(policy, out_dir: str | Path, fmt: str = "onnx", config_yaml: str | Path | None = None) -> Path:
    """Write the artifact for `policy` into `out_dir`; returns the directory."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact, extra = out / ARTIFACT[fmt], {}
    if fmt == "native":
        names, noise_shape, extra = _write_native(policy, out)
    else:
        graph, args, program = trace(policy)
        names, noise_shape = [*graph.obs_keys, *graph.goal_keys, "noise"], list(args[-1].shape[1:])
        if fmt == "onnx":
            _write_onnx(program, args, names, artifact)
        else:
            _write_aoti(program, artifact)
    manifest = {
        "format": fmt, "version": EXPORT_VERSION, "artifact": artifact.name, "policy": policy.name,
        "inputs": names, "output": "action", "batch": 1,
        "obs_shapes": {k: [list(s), d] for k, (s, d) in policy.obs_shapes.items()},
        "obs_horizon": policy.obs_horizon, "action_horizon": policy.action_horizon,
        "n_action_steps": policy.n_action_steps, "action_dim": policy.action_dim,
        "noise_shape": noise_shape, "sampler": policy.sampler,
        "num_inference_steps": policy.num_inference_steps, "formulation": policy.formulation.config,
        "task_names": list(getattr(policy, "task_names", None) or []), "num_tasks": policy.num_tasks,
        "torch": torch.__version__, **extra,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    if config_yaml is not None and Path(config_yaml).exists():
        shutil.copyfile(config_yaml, out / "config.yaml")
    return out


def _write_native(policy, out: Path) -> tuple[list[str], list[int], dict]:
    """encoder.onnx (the condition graph) and the loop's tensors; returns (inputs, noise shape, manifest entries)."""
    from safetensors.numpy import save_file

    from robodit.deploy.native import WEIGHTS, dit_tensors, native_refusal

    check_exportable(policy)
    policy = policy.to("cpu").float().eval()
    reason = native_refusal(policy)
    if reason:
        raise ExportError(f"--format native: {reason}")
    obs, goal, noise = example_inputs(policy)
    graph = ConditionGraph(policy, list(obs), list(goal)).eval()
    args = (*obs.values(), *goal.values())
    with torch.no_grad():
        policy.chunk_from_noise(obs, goal, noise)  # builds the inference caches the loop's tensors come from
        kv = graph(*args)
        program = torch.export.export(graph, args)
    _write_onnx(program, args, [*graph.obs_keys, *graph.goal_keys], out / NATIVE_ENCODER, output="kv")
    dims, floats, tensors = dit_tensors(policy, context_tokens=kv.shape[-2])
    save_file(tensors, str(out / WEIGHTS))
    # the condition runs in C when the observations are states (no ONNX Runtime needed); encoder.onnx is written
    # either way (images need it; for states it is the reference the C condition is tested against)
    native = {"encoder": NATIVE_ENCODER, "dims": dims, "floats": floats, "kv_shape": list(kv.shape),
              "condition": "native" if dims["keys"] else "onnx", "state_keys": list(policy.obs_encoder.keys)}
    return [*graph.obs_keys, *graph.goal_keys, "noise"], list(noise.shape[1:]), {"native": native}


def _write_onnx(program, args, names: list[str], path: Path, output: str = "action") -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; the error below says how to get it)
    except ImportError:
        raise ExportError("--format onnx needs onnxscript and onnx (pip install 'robodit[export]')") from None
    import onnx

    from robodit.deploy.onnx_passes import optimize

    torch.onnx.export(program, args, str(path), input_names=names, output_names=[output], dynamo=True,
                      external_data=False, verbose=False, opset_version=ONNX_OPSET)
    onnx.save(optimize(onnx.load(str(path))), str(path))  # fewer nodes to dispatch (see onnx_passes)


def _write_aoti(program, path: Path) -> None:
    if path.exists():
        path.unlink()
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def export_command(args) -> None:
    """`robodit export CHECKPOINT --out DIR [--format onnx|aoti|native] [--sampler S] [--num-inference-steps N]`."""
    from robodit.training.checkpoint import load_policy

    policy = load_policy(args.checkpoint, device="cpu")
    if args.sampler:
        if args.sampler not in policy.formulation.samplers:
            raise ExportError(f"--sampler {args.sampler!r} is not one of {policy.formulation.name!r}'s: "
                              f"{', '.join(policy.formulation.samplers)}")
        policy.sampler = args.sampler
    if args.num_inference_steps:
        policy.num_inference_steps = int(args.num_inference_steps)
    out = export_policy(policy, args.out, args.format, config_yaml=policy.checkpoint_dir / "config.yaml")
    print(f"exported {policy.checkpoint_dir} ({policy.name}, {policy.sampler}-{policy.num_inference_steps}) "
          f"as {args.format} to {out}; load it with robodit.load_policy({str(out)!r})")
