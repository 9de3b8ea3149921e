"""`robodit export --format native`: a DiT's denoising loop as one C call (csrc/dit.c), for small policies on a CPU.

Why: at batch 1 a small DiT is bound by operator dispatch, not arithmetic. ONNX Runtime runs dit/tiny's ~700 graph
nodes at ~2 us each, more than their FLOPs cost; the C loop runs the same steps as straight-line code over one
workspace. The condition (observations -> each block's cross-attention keys and values, once per chunk) runs in C
too when every observation is a state vector; with images it stays an ONNX graph (`encoder.onnx`, written for
every native export), so every observation kind the policy reads still works.

The directory holds encoder.onnx, denoiser.safetensors (the loop's tensors, every step-only quantity precomputed:
AdaLN modulations per step, the stacked Q/K/V, the DDIM step table, the action un-normalisation; and for states
the observation normaliser, embedding MLPs, positions, task embedding and context-encoder blocks) and export.json.
The loader compiles csrc/dit.c once per machine with the system C compiler (`cc -O3 -march=native`; AVX2/FMA
kernels where the CPU has them, plain C elsewhere or with ROBODIT_NATIVE_ARCH=portable) into a cache directory
($ROBODIT_CACHE, else ~/.cache/robodit), so a robot computer needs a C compiler, numpy and safetensors (and
onnxruntime for image observations), and no training code.

What it holds: the DiT family (`policy=dit`), DDPM's DDIM sampler, task ids as a condition token. Anything else is
refused by name (`ExportError`); `--format onnx` exports every family.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).parent / "csrc" / "dit.c"
WEIGHTS = "denoiser.safetensors"
# The C side's layout (csrc/dit.c's enums, same order): checked against the library at load.
DIMS = ("tokens", "width", "heads", "depth", "action_dim", "steps", "context_tokens", "hidden", "rmsnorm",
        "qk_norm", "clip", "keys", "obs_horizon", "state_hidden", "enc_depth", "enc_hidden", "task_token")
FLOATS = ("norm_eps", "qk_eps", "clip")
GLOBALS = ("action_w", "action_add", "table", "head_mod", "head_w", "head_b", "un_scale", "un_offset", "pos",
           "task_emb")
BLOCK = ("mod", "qkv_w", "qkv_b", "q_norm", "k_norm", "out_w", "out_b", "normx_w", "normx_b", "cross_q_w",
         "cross_q_b", "cross_q_norm", "cross_out_w", "cross_out_b", "cross_gate", "mlp1_w", "mlp1_b", "mlp2_w",
         "mlp2_b", "kv_w", "kv_b", "cross_k_norm")
KEY = ("offset", "scale", "w1", "b1", "w2", "b2")  # a state observation's normaliser and embedding MLP
ENCODER = ("norm1_w", "norm1_b", "qkv_w", "qkv_b", "q_norm", "k_norm", "out_w", "out_b", "norm2_w", "norm2_b",
           "mlp1_w", "mlp1_b", "mlp2_w", "mlp2_b")
# GEMM weights [in, out]: the loader packs them in csrc/dit.c's column groups
PACKED = ("action_w", "head_w", "qkv_w", "out_w", "cross_q_w", "cross_out_w", "mlp1_w", "mlp2_w", "kv_w", "w1", "w2")


class NativeBuildError(RuntimeError):
    """The C loop could not be compiled on this machine; the message says what to install or use instead."""


# -- export side: the loop's tensors from a DiT policy ------------------------------------------------------------

def native_refusal(policy) -> str | None:
    """Why `policy` cannot run on the native loop, or None."""
    from torch import nn

    from robodit.nn.attention import RMSNorm

    if getattr(policy, "name", None) != "dit":
        return (f"{getattr(policy, 'name', type(policy).__name__)}: the native loop holds the DiT family only "
                "(policy=dit); export this policy with --format onnx")
    if policy.formulation.name != "ddpm" or policy.sampler != "ddim":
        return (f"dit with formulation {policy.formulation.name!r} and sampler {policy.sampler!r}: the native loop "
                "runs DDPM's DDIM sampler only (--sampler ddim on a ddpm checkpoint), or use --format onnx")
    if getattr(policy, "task_embedding", None) is not None and policy.task_conditioning == "token+global":
        return ("dit with task_conditioning='token+global' adds the task to every step's modulation; the native loop "
                "takes the task as a condition token only ('token'); use --format onnx")
    for i, block in enumerate(policy.blocks):
        if block.cross is None:
            return f"dit block {i} has no cross-attention; the native loop expects the DiT's layout"
        norms = {type(m) for m in (block.norm1, block.norm2, block.norm_x, policy.head.norm)}
        if not (norms <= {nn.LayerNorm} or norms <= {RMSNorm}):
            return f"dit block {i} mixes norm kinds {sorted(t.__name__ for t in norms)}"
    return None


def condition_refusal(policy) -> str | None:
    """Why the condition (observations -> K/V) cannot run in C too, or None: it can for state observations
    embedded by the state MLP and LayerNorm context blocks; images keep the ONNX condition graph."""
    from torch import nn

    from robodit.nn.attention import TransformerEncoderBlock

    encoder = policy.obs_encoder
    for key in encoder.keys:
        mlp = encoder.encoders[key]
        if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(mlp[1], nn.SiLU)):
            return f"observation {key!r} is not a state vector"
    for block in policy.context_encoder:
        if not isinstance(block, TransformerEncoderBlock) or not isinstance(block.norm1, nn.LayerNorm):
            return "the context encoder is not LayerNorm TransformerEncoderBlocks"
    return None


def _np(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().float().numpy())


def dit_tensors(policy, context_tokens: int) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(dims, floats, tensors) of `policy`'s denoising loop: what csrc/dit.c reads. GEMM weights [in, out]."""
    import torch

    from robodit.nn.attention import RMSNorm

    plan = policy._inference_plan()  # the fast path's own precomputation: the loop cannot differ from it
    steps, blocks = policy.num_inference_steps, list(policy.blocks)
    width, heads = policy.action_in.out_features, blocks[0].attn.heads
    rms = isinstance(blocks[0].norm1, RMSNorm)
    qk = isinstance(blocks[0].attn.q_norm, RMSNorm)
    clip = policy.formulation.clip_sample
    weight_t, addend = plan["action_in"]
    off, sc = policy.normalizer._params("action", torch.zeros(policy.action_dim))
    t = {"action_w": _np(weight_t), "action_add": _np(addend.reshape(policy.action_horizon, width)),
         "table": np.asarray([row[1:] for row in policy.formulation.ddim_table(steps)], np.float32),
         "head_mod": _np(torch.stack([torch.cat(plan["head"][s]) for s in range(steps)])),
         "head_w": _np(policy.head.proj.weight.t()), "head_b": _np(policy.head.proj.bias),
         "un_scale": _np(sc), "un_offset": _np(off)}
    for i, (block, qkv) in enumerate(zip(blocks, plan["qkv"])):
        mods = torch.stack([torch.cat(list(plan["steps"][s][i])) for s in range(steps)])
        cross, mlp = block.cross, block.mlp.net
        b = {"mod": mods, "qkv_w": qkv.weight.t(), "qkv_b": qkv.bias, "q_norm": qkv.q_norm, "k_norm": qkv.k_norm,
             "out_w": block.attn.out.weight.t(), "out_b": block.attn.out.bias,
             "normx_w": getattr(block.norm_x, "weight", None), "normx_b": getattr(block.norm_x, "bias", None),
             "cross_q_w": cross.q.weight.t(), "cross_q_b": cross.q.bias,
             "cross_q_norm": cross.q_norm.weight if qk else None,
             "cross_out_w": cross.out.weight.t(), "cross_out_b": cross.out.bias, "cross_gate": block.cross_gate,
             "mlp1_w": mlp[0].weight.t(), "mlp1_b": mlp[0].bias, "mlp2_w": mlp[-1].weight.t(), "mlp2_b": mlp[-1].bias,
             "kv_w": cross.kv.weight.t(), "kv_b": cross.kv.bias, "cross_k_norm": cross.k_norm.weight if qk else None}
        t.update({f"block{i}.{k}": _np(v) for k, v in b.items() if v is not None})
    native_condition = condition_refusal(policy) is None
    encoder, key_dims, state_hidden, enc_hidden = policy.obs_encoder, [], 0, 0
    if native_condition:
        t["pos"] = _np(encoder.pos.reshape(-1, width))
        if policy.task_embedding is not None:
            t["task_emb"] = _np(policy.task_embedding.weight)
        for k, key in enumerate(encoder.keys):
            mlp = encoder.encoders[key]
            off_k, sc_k = policy.normalizer._params(key, torch.zeros(mlp[0].in_features))
            t.update({f"key{k}.{n}": _np(v) for n, v in zip(KEY, (off_k, sc_k, mlp[0].weight.t(), mlp[0].bias,
                                                                   mlp[2].weight.t(), mlp[2].bias))})
            key_dims.append(mlp[0].in_features)
            state_hidden = mlp[0].out_features
        for e, block in enumerate(policy.context_encoder):
            fused, net = block.attn.fused_qkv(), block.mlp.net
            parts = (block.norm1.weight, block.norm1.bias, fused.weight.t(), fused.bias, fused.q_norm, fused.k_norm,
                     block.attn.out.weight.t(), block.attn.out.bias, block.norm2.weight, block.norm2.bias,
                     net[0].weight.t(), net[0].bias, net[-1].weight.t(), net[-1].bias)
            t.update({f"enc{e}.{n}": _np(v) for n, v in zip(ENCODER, parts) if v is not None})
            enc_hidden = net[0].out_features
    norm = blocks[0].norm1
    dims = {"tokens": policy.action_horizon, "width": width, "heads": heads, "depth": len(blocks),
            "action_dim": policy.action_dim, "steps": steps, "context_tokens": context_tokens,
            "hidden": blocks[0].mlp.net[0].out_features, "rmsnorm": int(rms), "qk_norm": int(qk),
            "clip": int(clip is not None), "keys": len(key_dims), "obs_horizon": policy.obs_horizon,
            "state_hidden": state_hidden, "enc_depth": len(policy.context_encoder) if native_condition else 0,
            "enc_hidden": enc_hidden, "task_token": int(policy.task_embedding is not None), "key_dims": key_dims}
    floats = {"norm_eps": float(norm.eps), "qk_eps": float(blocks[0].attn.q_norm.eps) if qk else 0.0,
              "clip": float(clip or 0.0)}
    return dims, floats, t


# -- load side: compile once per machine, run through ctypes ----------------------------------------------------

def _cache_dir() -> Path:
    root = os.environ.get("ROBODIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "robodit")
    return Path(root) / "native"


def _cpu_signature() -> str:
    """What -march=native compiles for: a library built on another CPU (a shared home directory) is not reused."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_library(source: Path = SOURCE) -> ctypes.CDLL:
    """The compiled loop for this machine, built on first use and cached (keyed by source, compiler and CPU)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise NativeBuildError("the native policy compiles csrc/dit.c on first load and no C compiler was found "
                               "(install gcc or clang, or set CC); or export with --format onnx")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"C compiler {cc!r} does not run: {exc}") from None
    code = source.read_bytes()
    # ROBODIT_NATIVE_ARCH=portable: no -march=native (plain C loops; a library for several CPUs, or a check of the
    # portable path on an AVX2 machine)
    portable = os.environ.get("ROBODIT_NATIVE_ARCH", "native") == "portable"
    archs = [[]] if portable else [["-march=native"], []]  # a compiler without -march=native still gets plain C
    key = hashlib.sha256(b"\0".join([code, cc.encode(), version.encode(), _cpu_signature().encode(),
                                      str(portable).encode()])).hexdigest()
    lib = _cache_dir() / f"dit-{key[:16]}.so"
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (a service user on a robot computer): the system's temp directory
        lib = Path(tempfile.gettempdir()) / f"robodit-native-{os.getuid() if hasattr(os, 'getuid') else 0}" / lib.name
        lib.parent.mkdir(parents=True, exist_ok=True)
    if not lib.exists():
        errors = []
        for arch in archs:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            cmd = [cc, "-O3", *arch, "-std=gnu11", "-fPIC", "-shared", str(source), "-o", tmp, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, lib)  # atomic: a concurrent loader sees the whole library or none
                break
            os.unlink(tmp)
            errors.append(f"{' '.join(cmd)}\n{proc.stderr.strip()}")
        else:
            raise NativeBuildError("compiling the native loop failed:\n" + "\n".join(errors))
    dll = ctypes.CDLL(str(lib))
    if portable and dll.robodit_simd():
        raise NativeBuildError(f"{lib}: ROBODIT_NATIVE_ARCH=portable built the AVX2 path")
    dll.robodit_dit_workspace.restype = ctypes.c_int64
    dll.robodit_dit_workspace.argtypes = [ctypes.c_void_p]
    dll.robodit_dit_chunk.restype = ctypes.c_int
    dll.robodit_dit_chunk.argtypes = [ctypes.c_void_p] * 7
    dll.robodit_dit_condition_workspace.restype = ctypes.c_int64
    dll.robodit_dit_condition_workspace.argtypes = [ctypes.c_void_p]
    dll.robodit_dit_condition.restype = ctypes.c_int
    dll.robodit_dit_condition.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_void_p] * 2
    counts = (ctypes.c_int * 6)()
    dll.robodit_layout(counts)
    if tuple(counts) != (len(DIMS), len(FLOATS), len(GLOBALS), len(BLOCK), len(KEY), len(ENCODER)):
        raise NativeBuildError(f"{lib}: layout {tuple(counts)} does not match robodit.deploy.native's")
    return dll


def pack_columns(w: np.ndarray) -> np.ndarray:
    """[K, N] → its column groups of 16 (then one of 8, then the rest), each [K, width] contiguous: the layout
    csrc/dit.c's `gemm_w` streams."""
    parts, j, n = [], 0, w.shape[1]
    while j < n:
        width = 16 if n - j >= 16 else 8 if n - j >= 8 else n - j
        parts.append(w[:, j:j + width].reshape(-1))
        j += width
    return np.concatenate(parts)


class NativeLoop:
    """The exported denoising loop, un-normalisation included: `loop(kv, noise)` from the condition graph's K/V
    ([depth, 2, 1, heads, context, head_dim]), or `loop.from_states(states, task, noise)` with the condition
    computed in C too (state observations: `has_condition`). noise: the unit Gaussian [1, Tp, A]; returns actions
    [Tp, A]. One workspace per loop: calls are serialised by a lock (a server's threads may share one policy)."""

    def __init__(self, weights: str | Path, dims: dict, floats: dict):
        from safetensors.numpy import load_file

        self.dims = dims
        tensors = load_file(str(weights))
        names = [*GLOBALS, *(f"block{i}.{k}" for i in range(dims["depth"]) for k in BLOCK),
                 *(f"key{i}.{k}" for i in range(dims["keys"]) for k in KEY),
                 *(f"enc{i}.{k}" for i in range(dims["enc_depth"]) for k in ENCODER)]
        missing = [n for n in ("action_w", "table", "head_w") if n not in tensors]
        if missing:
            raise ValueError(f"{weights} lacks {missing}: not a native DiT export")
        chunks, offsets, at = [], [], 0
        for name in names:
            arr = tensors.get(name)
            if arr is None:
                offsets.append(-1)
                continue
            offsets.append(at)
            arr = np.ascontiguousarray(arr, np.float32)
            chunks.append(pack_columns(arr) if name.rsplit(".", 1)[-1] in PACKED else arr.reshape(-1))
            at += chunks[-1].size
        self._params = np.concatenate(chunks)
        self._offsets = np.asarray(offsets, np.int64)
        self._dims = np.asarray([int(dims[k]) for k in DIMS] + list(dims["key_dims"]), np.int32)
        self._floats = np.asarray([float(floats[k]) for k in FLOATS], np.float32)
        self._lib = build_library()
        size = max(self._lib.robodit_dit_workspace(self._dims.ctypes.data),
                   self._lib.robodit_dit_condition_workspace(self._dims.ctypes.data))
        self._work = np.zeros(int(size), np.float32)
        self._static = [a.ctypes.data for a in (self._dims, self._floats, self._params, self._offsets)]
        self._kv = np.zeros(dims["depth"] * 2 * dims["width"] * dims["context_tokens"], np.float32)
        self._shape = (dims["tokens"], dims["action_dim"])
        self._num_tasks = tensors["task_emb"].shape[0] if "task_emb" in tensors else 1
        self._lock = threading.Lock()

    @property
    def has_condition(self) -> bool:
        """Whether the condition runs here too (state observations), so no ONNX Runtime is needed."""
        return self.dims["keys"] > 0

    def _chunk(self, kv: np.ndarray, noise: np.ndarray) -> np.ndarray:
        x = np.array(noise, np.float32).reshape(self._shape)  # a copy: the loop works in place
        status = self._lib.robodit_dit_chunk(*self._static, kv.ctypes.data, x.ctypes.data, self._work.ctypes.data)
        if status:
            raise RuntimeError(f"native loop returned {status}")
        return x

    def __call__(self, kv: np.ndarray, noise: np.ndarray) -> np.ndarray:
        kv = np.ascontiguousarray(kv, np.float32)
        if kv.size != self._kv.size:
            raise ValueError(f"condition K/V has {kv.size} values; this loop reads {self._kv.size} "
                             f"(depth x 2 x width x {self.dims['context_tokens']} context tokens)")
        with self._lock:
            return self._chunk(kv, noise)

    def from_states(self, states: list[np.ndarray], task: int, noise: np.ndarray) -> np.ndarray:
        """`states`: each state key's [obs_horizon, width] (or [1, obs_horizon, width]) in the policy's sorted key
        order, which back to back is the layout csrc/dit.c reads; `task`: the task id (0 for a single task)."""
        steps, widths = self.dims["obs_horizon"], self.dims["key_dims"]
        if [np.size(x) for x in states] != [steps * w for w in widths]:
            raise ValueError(f"states {[np.shape(x) for x in states]}: this loop reads {steps} steps of "
                             f"{widths} values (one array per key)")
        if not 0 <= int(task) < self._num_tasks:
            raise ValueError(f"task id {task} is out of range: this policy has {self._num_tasks} task(s)")
        obs = np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in states])
        with self._lock:
            status = self._lib.robodit_dit_condition(*self._static, obs.ctypes.data, int(task), self._kv.ctypes.data,
                                                     self._work.ctypes.data)
            if status:
                raise RuntimeError(f"native condition returned {status} (this export holds no condition weights)")
            return self._chunk(self._kv, noise)
