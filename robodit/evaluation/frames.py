"""Predicted vs real future frames of a video-predicting policy (PAD) along one rollout, as a PNG grid.

Success rates say whether the policy works; this grid says whether its world model does: at each replan the
policy imagines frames t+s, ..., t+k*s; the rollout then executes the chunk open-loop and keeps what the camera
really saw at those steps. Rows are replans; columns are the current frame, then predicted/real pairs.
Any policy with `predict(obs, goal, generator) -> (actions, {image key: [B, k, C, S, S] in [0, 1]})`,
`future_frames`, `future_stride` and `to_model_frames` qualifies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from robodit.control.history import ObservationHistory


def supports_frame_grid(policy) -> bool:
    return policy is not None and callable(getattr(policy, "predict_frames", None))


def _model_view(policy, frame_hwc: np.ndarray) -> np.ndarray:
    """A real HWC uint8 frame at the policy's model resolution, HWC float in [0, 1] (what it was trained to predict)."""
    x = torch.as_tensor(np.ascontiguousarray(frame_hwc)).movedim(-1, 0)[None]
    return policy.to_model_frames(x)[0].add(1).div(2).clamp(0, 1).movedim(0, -1).cpu().numpy()


def frame_rollout(policy, env, *, seed: int, task: str | None = None, goal: dict[str, Any] | None = None,
                  replans: int = 4, key: str | None = None) -> list[dict[str, Any]]:
    """Roll out `replans` chunks open-loop; per replan {"step", "current", "predicted": [k], "real": [k or None]}."""
    key = key or policy.image_keys[0]
    k, stride = policy.future_frames, policy.future_stride
    horizon = min(policy.action_horizon, k * stride)  # real frames exist up to the end of the executed chunk
    keys = list(policy.obs_shapes)
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    policy.reset()
    obs = env.reset(task=task, seed=seed)
    history = ObservationHistory(policy.obs_horizon)
    history.reset(obs)
    low, high = env.spec.action_low, env.spec.action_high
    rows, step, done = [], 0, False
    for _ in range(replans):
        if done:
            break
        actions, frames = policy.predict(history.stacked(keys), goal=goal, generator=gen)
        row = {"step": step, "current": _model_view(policy, obs[key]),
               "predicted": list(frames[key][0].movedim(1, -1).cpu().numpy()), "real": [None] * k}
        for j, action in enumerate(actions[0].cpu().numpy()[:horizon], start=1):
            obs, success, done, _ = env.step(np.clip(action, low, high))
            history.push(obs)
            step += 1
            if j % stride == 0:
                row["real"][j // stride - 1] = _model_view(policy, obs[key])
            if success or done:
                done = True
                break
        rows.append(row)
    return rows


def write_frame_grid(path: str | Path, rows: list[dict[str, Any]], stride: int, title: str = "") -> Path:
    """Save the grid as a PNG (matplotlib Agg); a missing real frame (episode ended) is left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no rollout rows to draw")
    k = len(rows[0]["predicted"])
    cols = 1 + 2 * k
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols, 1.5 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        cells = [("now", row["current"])]
        for j in range(k):
            cells += [(f"pred t+{(j + 1) * stride}", row["predicted"][j]), (f"real t+{(j + 1) * stride}", row["real"][j])]
        for c, (label, img) in enumerate(cells):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if img is not None:
                ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            if r == 0:
                ax.set_title(label, fontsize=7)
        axes[r, 0].set_ylabel(f"t={row['step']}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def frame_grid(policy, env, path: str | Path, *, seed: int, task: str | None = None,
               goal: dict[str, Any] | None = None, replans: int = 4) -> Path:
    """One rollout → `path` (PNG of predicted vs real future frames)."""
    rows = frame_rollout(policy, env, seed=seed, task=task, goal=goal, replans=replans)
    return write_frame_grid(path, rows, policy.future_stride, title=f"{task or ''} seed {seed}".strip())


def suite_frame_grid(policy, suite, env_kwargs: dict, out_dir: str | Path, goal_fn=None, replans: int = 4) -> Path:
    """The grid for the suite's first task and first evaluation seed (what `evaluate` writes as frames.png)."""
    from robodit.envs import make_env

    task = suite.tasks[0].name
    seed = suite.seeds[0] if suite.kind == "tasks" else suite.seed
    env = make_env(f"{suite.simulator}/{task}", **{**env_kwargs, **suite.env, "seed": seed})
    try:
        return frame_grid(policy, env, Path(out_dir) / "frames.png", seed=seed, task=task,
                          goal=goal_fn(task) if goal_fn is not None else None, replans=replans)
    finally:
        env.close()
