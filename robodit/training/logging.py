"""Run logging: metrics.jsonl always (greppable, no service needed), wandb when configured (offline default)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, out_dir: Path, kind: str = "none", project: str = "robodit", mode: str = "offline",
                 config: dict | None = None, name: str | None = None, enabled: bool = True):
        self.enabled = enabled
        self.wandb = None
        self._file = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if kind == "wandb":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=project, mode=mode, dir=str(out_dir), config=config, name=name,
                                    resume="allow")
        elif kind != "none":
            raise ValueError(f"unknown logger {kind!r}; expected 'wandb' or 'none'")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
