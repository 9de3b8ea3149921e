"""Robot configs (configs/robot/*.yaml) → a ControlInterface behind the safety layer.

```yaml
robot:                      # what to drive
  type: sim                 # sim | lerobot | dry_run
  env: metaworld/reach-v3   # sim: a make_env name (+ kwargs)
control_hz: 10              # the loop's rate; `robodit run --hz` overrides
strategy: {name: receding, n_action_steps: 8}   # optional defaults for `robodit run`
safety: {...}               # robodit.envs.safety.SafetyConfig
```
Every robot gets a SafeRobot: there is no switch to turn the safety layer off, only its limits to configure.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from robodit.envs.base import ControlInterface
from robodit.envs.safety import SafeRobot, SafetyConfig

TOP_KEYS = {"robot", "control_hz", "strategy", "safety", "name"}
ROBOT_TYPES = ("sim", "lerobot", "dry_run")


def load_robot_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"robot config {p} does not exist (examples: configs/robot/*.yaml)")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{p} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{p} must hold a mapping with keys {sorted(TOP_KEYS)}")
    unknown = [k for k in cfg if k not in TOP_KEYS]
    if unknown:
        close = {k: difflib.get_close_matches(k, TOP_KEYS, n=1) for k in unknown}
        raise ValueError(f"{p}: unknown keys " + ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "")
                                                             for k, c in close.items()))
    robot = cfg.setdefault("robot", {"type": "dry_run"})
    if robot.get("type") not in ROBOT_TYPES:
        raise ValueError(f"{p}: robot.type must be one of {ROBOT_TYPES}, got {robot.get('type')!r}")
    SafetyConfig.from_dict(cfg.get("safety"))  # validate early, before any hardware is touched
    return cfg


def build_robot(cfg: dict[str, Any], policy=None, *, dry_run: bool = False, hz: float | None = None,
                on_estop=None) -> SafeRobot:
    """The configured robot (or, with `dry_run`, a simulated one with the configured robot's action bounds and
    the policy's observations) inside a SafeRobot whose watchdog holds at the loop's rate `hz`."""
    r = dict(cfg.get("robot") or {})
    source = r.pop("type", "dry_run")
    kind = "dry_run" if dry_run else source
    hz = float(hz or cfg.get("control_hz") or 10.0)
    safety = SafetyConfig.from_dict(cfg.get("safety"))
    robot: ControlInterface
    if kind == "dry_run":
        robot = _dry_run_robot(r, source, policy, safety, hz)
    elif kind == "sim":
        from robodit.envs import make_env

        if "env" not in r:
            raise ValueError("robot.type sim needs robot.env (e.g. metaworld/reach-v3)")
        robot = make_env(r["env"], **(r.get("kwargs") or {}))
    else:
        from robodit.envs.lerobot_robot import LeRobotRobot

        robot = LeRobotRobot.from_config(r, control_hz=hz)
    return SafeRobot(robot, safety, on_estop=on_estop, control_hz=hz)


def _dry_run_robot(r: dict[str, Any], source: str, policy, safety: SafetyConfig, hz: float) -> ControlInterface:
    """A DryRunRobot that takes the commands the configured robot would: its action bounds (so the safety layer
    clips as it would on hardware), its action size and episode length; observations shaped like the policy's.
    A LeRobot arm takes joint targets, so its dry run tracks absolute targets."""
    from robodit.envs.dry_run import DryRunRobot

    if policy is None:
        raise ValueError("a dry run needs the policy (its observation shapes)")
    opts: dict[str, Any] = {"mode": "absolute", "max_speed": float("inf")} if source == "lerobot" else {}
    opts.update({k: r[k] for k in ("mode", "scale", "max_speed", "step_latency_s", "seed") if k in r})
    opts.update(r.get("dry_run") or {})
    if "max_episode_steps" in r:
        opts.setdefault("max_episode_steps", int(r["max_episode_steps"]))
    low = safety.action_low if safety.action_low is not None else r.get("action_low")
    high = safety.action_high if safety.action_high is not None else r.get("action_high")
    sizes = {len(b) for b in (low, high) if b is not None and np.ndim(b) == 1}
    if len(sizes) > 1:
        raise ValueError(f"action_low has {len(low)} values and action_high {len(high)}; they must match")
    ws = safety.workspace
    if ws is not None and ws["pose_key"] in policy.obs_shapes:  # start in the middle of the allowed box
        center = (np.asarray(ws["low"], np.float32) + np.asarray(ws["high"], np.float32)) / 2
        opts.setdefault("initial_pose", (ws["pose_key"], list(ws["pose_index"]), center))
    return DryRunRobot.from_policy(policy, action_dim=sizes.pop() if sizes else None, action_low=low,
                                   action_high=high, control_hz=hz, **opts)
