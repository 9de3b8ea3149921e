"""Run logging: metrics.jsonl always (greppable, no service needed), wandb when configured (offline default)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, out_dir: Path, kind: str = "none", project: str = "robodit", mode: str = "offline",
                 config: dict | None = None, name: str | None = None, enabled: bool = True,
                 resume_step: int | None = None):
        """`resume_step`: a resumed run continues its log: rows past that step (written after the checkpoint it
        resumes from, and about to be written again) are dropped, and wandb continues the same run."""
        self.enabled = enabled
        self.wandb = None
        self._file = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _step(line) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self._file = open(path, "a", buffering=1)
        if kind == "wandb":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            id_file = out_dir / "wandb_run_id"  # one wandb run per out_dir, across resumes
            run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=project, mode=mode, dir=str(out_dir), config=config, name=name,
                                    id=run_id, resume="allow")
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


def _step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # an unreadable (torn) line goes with the rows after the checkpoint
