"""The policy server's wire format (msgpack maps, numpy arrays as {"__ndarray__": 1, dtype, shape, data})
and the checks a decoded observation must pass before it reaches a model.

Decoding trusts nothing: only plain numeric dtypes (never object / pickle), at most 8 dimensions, and the byte
count must equal prod(shape) * itemsize, so a hostile message cannot make the server allocate or execute
anything beyond the bounded bytes it already received.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from robodit.keys import is_image_key

PROTOCOL = 1  # bumped on any incompatible change of the messages below
MIN_TOKEN_LEN = 16
TOKEN_ENV = "ROBODIT_TOKEN"

DTYPES = {"bool", "uint8", "int8", "uint16", "int16", "int32", "uint32", "int64", "float16", "float32", "float64"}
MAX_NDIM = 8


class WireError(ValueError):
    """A message that is not valid robodit wire format; `code` says which kind of problem for the reply."""

    def __init__(self, message: str, code: str = "malformed"):
        super().__init__(message)
        self.code = code


def _default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in DTYPES:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}; use one of {sorted(DTYPES)}")
        arr = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<"))
        return {"__ndarray__": 1, "dtype": obj.dtype.name, "shape": list(arr.shape), "data": arr.tobytes()}
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor
        return _default(obj.detach().cpu().numpy())
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode_array(d: dict) -> np.ndarray:
    dtype, shape, data = d.get("dtype"), d.get("shape"), d.get("data")
    if dtype not in DTYPES:
        raise WireError(f"array dtype {dtype!r} is not allowed; use one of {sorted(DTYPES)}", "bad_dtype")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise WireError(f"array shape {shape!r} is not a list of at most {MAX_NDIM} non-negative ints", "bad_shape")
    if not isinstance(data, bytes):
        raise WireError("array data must be bytes")
    dt = np.dtype(dtype).newbyteorder("<")
    if len(data) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
        raise WireError(f"array of shape {shape} and dtype {dtype} needs "
                        f"{int(np.prod(shape, dtype=np.int64)) * dt.itemsize} bytes, got {len(data)}", "bad_shape")
    return np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))  # a writable copy


def _hook(d: dict):
    if d.get("__ndarray__") == 1:
        return _decode_array(d)
    return d


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode one message; any problem is a WireError (never another exception type)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("messages must be binary msgpack, got a text frame")
    try:
        return msgpack.unpackb(bytes(data), object_hook=_hook, raw=False, strict_map_key=True)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise WireError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None


# a generator's state as torch.Generator.get_state() gives it (CPU Mersenne Twister: 5056 bytes; CUDA: 16)
MAX_GENERATOR_STATE = 8192


def check_generators(gen, batch: int) -> list[dict] | dict | None:
    """Validate the sampling-noise generators of a request: null, one {"device": str, "state": uint8 array}
    for the whole batch, or a list of them, one per row (each row's noise then comes from its own)."""
    if gen is None:
        return None
    rows = gen if isinstance(gen, list) else [gen]
    if isinstance(gen, list) and len(gen) != batch:
        raise WireError(f"'generator' lists {len(gen)} generator states for a batch of {batch}; expected one per row",
                        "bad_request")
    for g in rows:
        if not (isinstance(g, dict) and isinstance(g.get("device"), str) and isinstance(g.get("state"), np.ndarray)):
            raise WireError("a 'generator' entry must be a map {device: str, state: uint8 array}", "bad_request")
        state = g["state"]
        if state.dtype != np.uint8 or state.ndim != 1 or state.size > MAX_GENERATOR_STATE:
            raise WireError(f"a generator state must be a 1-d uint8 array of at most {MAX_GENERATOR_STATE} bytes, got "
                            f"{state.dtype} {list(state.shape)}", "bad_request")
    return gen


def check_observation(obs, obs_shapes: dict, obs_horizon: int, max_batch: int) -> dict[str, np.ndarray]:
    """Validate a decoded observation against the policy's shapes; every problem names the key (WireError)."""
    if not isinstance(obs, dict):
        raise WireError("'obs' must be a map {key: array}", "bad_request")
    missing, extra = sorted(set(obs_shapes) - set(obs)), sorted(set(obs) - set(obs_shapes))
    if missing or extra:
        raise WireError(f"observation keys: missing {missing}, unexpected {extra}; the policy expects "
                        f"{sorted(obs_shapes)}", "bad_request")
    out, batch = {}, None
    for key, (shape, dtype) in obs_shapes.items():
        x = obs[key]
        if not isinstance(x, np.ndarray):
            raise WireError(f"observation {key!r} must be an array, got {type(x).__name__}", "bad_request")
        image = is_image_key(shape, dtype)
        if image and x.dtype != np.uint8:
            raise WireError(f"observation {key!r} has dtype {x.dtype}; expected uint8 (an image)", "bad_dtype")
        if not image and x.dtype.kind != "f":
            raise WireError(f"observation {key!r} has dtype {x.dtype}; expected float32", "bad_dtype")
        frames = [tuple(shape)] + ([(shape[2], shape[0], shape[1])] if image else [])  # HWC or CHW
        want = f"[B, {obs_horizon}, {', '.join(map(str, shape))}]"
        if x.ndim != len(shape) + 2 or x.shape[1] != obs_horizon or tuple(x.shape[2:]) not in frames:
            raise WireError(f"observation {key!r} has shape {list(x.shape)}; expected {want}", "bad_shape")
        if not 1 <= x.shape[0] <= max_batch or (batch is not None and x.shape[0] != batch):
            raise WireError(f"observation {key!r} has batch size {x.shape[0]}; expected 1..{max_batch}, "
                            "the same for every key", "bad_shape")
        batch = x.shape[0]
        if not image and not np.isfinite(x).all():
            raise WireError(f"observation {key!r} contains NaN or inf", "nonfinite")
        out[key] = x if image else x.astype(np.float32, copy=False)
    return out


# goal keys that carry text: an instruction for language-conditioned policies, a task by name for multi-task ones
TEXT_GOALS = ("instruction", "task")
MAX_TEXT, MAX_TEXTS = 1000, 1024


def is_text(v) -> bool:
    """A string, or a non-empty list of strings (one per row)."""
    return isinstance(v, str) or (isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v))


def check_goal(goal) -> dict[str, Any] | None:
    """{key: array}, plus text under TEXT_GOALS (bounded: at most MAX_TEXTS strings of MAX_TEXT characters)."""
    if goal is None:
        return None
    if not isinstance(goal, dict):
        raise WireError("'goal' must be null or a map {key: array}", "bad_request")
    for key, v in goal.items():
        if key in TEXT_GOALS and is_text(v):
            texts = [v] if isinstance(v, str) else v
            if len(texts) > MAX_TEXTS or max(map(len, texts)) > MAX_TEXT:
                raise WireError(f"goal {key!r}: at most {MAX_TEXTS} strings of {MAX_TEXT} characters", "bad_request")
            continue
        if not isinstance(v, np.ndarray):
            raise WireError(f"goal {key!r} must be an array" + (" or text" if key in TEXT_GOALS else "")
                            + f" (text goes in {', '.join(TEXT_GOALS)})", "bad_request")
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise WireError(f"goal {key!r} contains NaN or inf", "nonfinite")
    return goal
