"""Human-readable outputs of an evaluation: report.md and mp4 videos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_video(path: Path, frames: list[np.ndarray], fps: int = 30) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=7, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    lines = [f"# Evaluation of `{summary['checkpoint']}`", "",
             f"env `{summary['env']}` · {summary['episodes_per_task']} episodes per task · seeds from {summary['seed']} · "
             f"sampler {summary['sampler']} × {summary['num_inference_steps']} steps · "
             f"{summary['n_action_steps']} actions per chunk · {summary['wall_time_s']} s", "",
             "| task | success | episodes | mean steps | ms / chunk |", "|---|---:|---:|---:|---:|"]
    for task, r in summary["tasks"].items():
        lines.append(f"| {task} | {100 * r['success_rate']:.1f}% | {r['episodes']} | {r['mean_steps']:.1f} | "
                     f"{r['ms_per_chunk']:.1f} |")
    lines += ["", f"**Mean success: {100 * summary['success_rate']:.1f}%**", ""]
    if summary.get("videos"):
        lines += ["Videos: " + ", ".join(f"`{Path(v).name}`" for v in summary["videos"]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
