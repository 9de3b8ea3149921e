"""An exported policy directory (`robodit export`) behind the Policy's `predict_action`.

No model code, Hydra or simulator is imported: the ONNX file runs in ONNX Runtime, the AOTInductor package in
torch's runtime, a native export in C (`robodit.deploy.native`; its condition graph in ONNX Runtime for images).
Inputs are checked as the server checks them (`wire.check_observation`: each problem names the key), images go in
HWC or CHW, and the starting noise is drawn exactly as the eager policy draws it from the
same generator, so `predict_action(obs, generator=torch.Generator().manual_seed(s))` gives the eager actions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robodit.deploy.wire import check_observation
from robodit.keys import is_image_key

MANIFEST = "export.json"


def is_exported(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def describe_export(path: str | Path, as_json: bool = False) -> str:
    """`robodit info EXPORT_DIR`: what the artifact computes and what running it needs (or the manifest as JSON)."""
    path = Path(path)
    m = json.loads((path / MANIFEST).read_text())
    if as_json:
        return json.dumps(m, indent=2)
    native = m.get("native", {})
    needs = {"onnx": "onnxruntime", "aoti": "torch (AOTInductor runtime)",
             "native": "a C compiler" + ("" if native.get("condition") == "native" else " and onnxruntime")}
    files = ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.1f} MiB)" for f in sorted(path.iterdir()) if f.is_file())
    lines = [f"{path}: {m['policy']} exported as {m['format']} ({m['sampler']}-{m['num_inference_steps']}, batch "
             f"{m.get('batch', 1)} per call), torch {m.get('torch', '?')} at export",
             f"  inputs: {', '.join(m['inputs'])}; observations "
             + ", ".join(f"{k} {s} {d}" for k, (s, d) in m["obs_shapes"].items()),
             f"  actions: {m['action_horizon']} x {m['action_dim']} per chunk, {m['n_action_steps']} executed",
             f"  tasks: {', '.join(m.get('task_names') or []) or m.get('num_tasks', 1)}",
             f"  runs with: numpy, torch (seeded noise), {needs.get(m['format'], '?')}"]
    if native:
        lines.append(f"  condition: {'in C (state observations)' if native.get('condition') == 'native' else 'ONNX graph'}")
    lines.append(f"  files: {files}")
    return "\n".join(lines)


class ExportedPolicy:
    """`predict_action(obs, goal=None, generator=None) -> [B, Tp, A]` in the robot's units, from an export dir."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.checkpoint_dir = Path(path)
        try:
            self.manifest = m = json.loads((self.checkpoint_dir / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.checkpoint_dir / MANIFEST} is not a readable export manifest: {exc}") from None
        self.format, self.name = m["format"], m["policy"]
        self.obs_shapes = {k: (tuple(s), str(d)) for k, (s, d) in m["obs_shapes"].items()}
        self.obs_horizon, self.action_horizon = int(m["obs_horizon"]), int(m["action_horizon"])
        self.n_action_steps, self.action_dim = int(m["n_action_steps"]), int(m["action_dim"])
        self.sampler, self.num_inference_steps = m["sampler"], int(m["num_inference_steps"])
        self.task_names, self.inputs = list(m.get("task_names") or []), list(m["inputs"])
        self.noise_shape = tuple(m["noise_shape"])
        self.device = torch.device("cpu")
        artifact = self.checkpoint_dir / m["artifact"]
        if not artifact.exists():
            raise FileNotFoundError(f"{artifact} is missing (named by {self.checkpoint_dir / MANIFEST})")
        runtimes = {"onnx": self._onnx, "aoti": self._aoti, "native": self._native}
        if self.format not in runtimes:
            raise ValueError(f"{self.checkpoint_dir / MANIFEST}: format {self.format!r} is not one this robodit "
                             f"runs ({', '.join(runtimes)})")
        self._run = runtimes[self.format](artifact, threads)

    # -- runtimes -------------------------------------------------------------------------------------------------
    def _onnx(self, artifact: Path, threads: int | None):
        session = self._onnx_session(artifact, threads)
        names = [i.name for i in session.get_inputs()]

        def run(arrays: list[np.ndarray]) -> np.ndarray:
            return session.run(None, dict(zip(names, arrays)))[0]
        return run

    @staticmethod
    def _onnx_session(artifact: Path, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(f"{artifact} needs onnxruntime (pip install 'robodit[export]')") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # MatMulAddFusion turns each linear on [B, N, D] tokens into Reshape, Gemm, Reshape: on a batch-1 chunk those
        # extra nodes cost more than the fused bias saves (1.11x dit/tiny, 1.10x dit/base without it, same-run A/B)
        return ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["MatMulAddFusion"])

    def _native(self, artifact: Path, threads: int | None):
        """The denoising loop in C (compiled on first load); the condition in C too for state observations, else the
        condition graph in ONNX Runtime."""
        from robodit.deploy.native import NativeLoop

        native = self.manifest["native"]
        loop = NativeLoop(artifact, native["dims"], native["floats"])
        if loop.has_condition:
            index = {name: i for i, name in enumerate(self.inputs)}
            order, task_at = [index[k] for k in native["state_keys"]], index.get("task_id")

            def run(arrays: list[np.ndarray]) -> np.ndarray:
                task = int(arrays[task_at][0]) if task_at is not None else 0
                return loop.from_states([arrays[i][0] for i in order], task, arrays[-1])[None]
            return run
        encoder = self._onnx_session(self.checkpoint_dir / native["encoder"], threads)
        names = [i.name for i in encoder.get_inputs()]

        def run(arrays: list[np.ndarray]) -> np.ndarray:
            kv = encoder.run(None, dict(zip(names, arrays[:-1])))[0]
            return loop(kv, arrays[-1])[None]
        return run

    def _aoti(self, artifact: Path, threads: int | None = None):
        runner = torch._inductor.aoti_load_package(str(artifact))

        def run(arrays: list[np.ndarray]) -> np.ndarray:
            out = runner(*[torch.from_numpy(a) for a in arrays])
            return (out[0] if isinstance(out, (list, tuple)) else out).numpy()
        return run

    # -- the Policy contract ------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return int(self.manifest.get("num_tasks", 1))

    @property
    def takes_task(self) -> bool:
        return "task_id" in self.inputs

    def goal_keys(self) -> list[str]:
        """The goal keys this artifact reads (the server tells its clients)."""
        return ["task", "task_id"] if self.takes_task else []

    def reset(self) -> None:
        """Stateless: nothing to forget between episodes."""

    def eval(self) -> "ExportedPolicy":
        return self

    def _observation(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        """numpy [B, To, ...] per key (a missing batch dimension added), checked, images CHW."""
        arrays = {}
        for key, value in obs.items():
            key = key[4:] if key.startswith("obs.") else key
            x = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if key in self.obs_shapes and x.ndim == len(self.obs_shapes[key][0]) + 1:
                x = x[None]
            arrays[key] = x
        arrays = check_observation(arrays, self.obs_shapes, self.obs_horizon, max_batch=1 << 16)
        for key, (shape, dtype) in self.obs_shapes.items():
            x = arrays[key]
            if is_image_key(shape, dtype) and x.shape[-1] == shape[2] and x.shape[-3] != shape[2]:
                arrays[key] = np.ascontiguousarray(np.moveaxis(x, -1, -3))  # HWC → CHW
        return arrays

    def _task_ids(self, goal: dict[str, Any] | None, batch: int) -> np.ndarray | None:
        if "task_id" not in self.inputs:
            return None
        goal = dict(goal or {})
        if "task" in goal:
            wanted = [goal["task"]] if isinstance(goal["task"], str) else list(goal["task"])
            unknown = [t for t in wanted if t not in self.task_names]
            if unknown:
                raise ValueError(f"goal task {unknown} is not one this policy was trained on: {self.task_names}")
            ids = np.asarray([self.task_names.index(t) for t in wanted])
        elif "task_id" in goal:
            task = goal["task_id"]
            ids = np.asarray(task.cpu() if isinstance(task, torch.Tensor) else task).reshape(-1)
        else:
            raise ValueError(f"this policy was trained on several tasks: pass goal={{'task': NAME}} or "
                             f"{{'task_id': ...}} (tasks: {self.task_names})")
        return np.broadcast_to(ids.astype(np.int64), (batch,))

    def predict_action(self, obs: dict[str, Any], goal: dict[str, Any] | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        arrays = self._observation(obs)
        batch = next(iter(arrays.values())).shape[0]
        tasks = self._task_ids(goal, batch)
        extra = [k for k in (goal or {}) if k not in ("task", "task_id")]
        if extra:
            raise ValueError(f"goal {extra}: the exported graph takes a task only ({self.checkpoint_dir})")
        # drawn as the eager policy draws it (DiffusionPolicy.chunk_noise): same generator, same actions
        noise = torch.randn((batch, *self.noise_shape), generator=generator).numpy()
        rows = []
        for b in range(batch):  # the graph is traced at batch 1
            inputs = [arrays[k][b:b + 1] for k in self.inputs if k in arrays]
            if tasks is not None:
                inputs.append(tasks[b:b + 1].copy())
            rows.append(self._run(inputs + [noise[b:b + 1]]))
        return torch.from_numpy(np.concatenate(rows))
