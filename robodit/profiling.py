"""Device-independent measurements of a call, for benchmarks and tests.

Counted on the CPU, they still say what a GPU will do: an op whose result the host must read (`nonzero`,
`.item()`, `.tolist()`) makes a CUDA host wait until the device has caught up, emptying its launch queue; at batch 1
a policy that does that per layer and step is bound by those stalls, not by its FLOPs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode

# as the dispatcher sees them: `.item()` / `.tolist()` / `bool(t)` arrive as _local_scalar_dense or is_nonzero
HOST_SYNC_OPS = frozenset({"nonzero", "_local_scalar_dense", "is_nonzero", "equal"})


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in HOST_SYNC_OPS
        return func(*args, **(kwargs or {}))


def count_host_syncs(fn: Callable[..., Any], *args, **kwargs) -> int:
    """Host-device synchronisations that `fn(*args, **kwargs)` performs."""
    with _SyncCounter() as counter:
        fn(*args, **kwargs)
    return counter.count


def cpu_model() -> str:
    """The CPU's marketing name, which benchmarks record next to every figure (/proc/cpuinfo;
    platform.processor() says only 'x86_64' on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"
