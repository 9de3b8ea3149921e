"""`robodit run` on LeRobot 0.4.4's own SO-101 follower, with the arm faked at the serial port.

Nothing of LeRobot is stood in for: `make_lerobot_robot` builds lerobot's `SOFollower`, whose `FeetechMotorsBus`
talks through `scservo_sdk` and pyserial to a pseudo-terminal where tests/_feetech_fake.py answers as six STS3215
servos. So LeRobot's own handshake, calibration check and write, configure, sync_read and sync_write, and its
torque handling at disconnect all run against bytes on a port, as they would on `/dev/ttyACM0`.

LeRobot runs in a subprocess (`python -m robodit.cli run ...`, what a lab engineer types): its `lerobot.processor`
imports torchvision at module level, which cannot be installed beside this CPU torch (shared/notes/simulators.md),
so the subprocess gets an empty torchvision package on its path when none is installed; the robot path never
calls it.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from _control_fakes import tiny_dit
from _feetech_fake import MOTORS, FakeArm

from robodit.training.checkpoint import export_state, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SO101_DEPS = ("lerobot", "draccus", "deepdiff", "serial", "scservo_sdk")
needs_so101 = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in SO101_DEPS),
    reason="lerobot's SO-101 stack not installed: `make install` (pip install --no-deps lerobot==0.4.4 plus "
           "draccus, deepdiff, pyserial, feetech-servo-sdk)")

# What `lerobot-calibrate` wrote for this arm: joints centred near 2048 ticks, position limits per joint.
CALIBRATION = {m: {"id": i + 1, "drive_mode": 0, "homing_offset": 40 * (i - 2), "range_min": 700 + 10 * i,
                   "range_max": 3400 - 10 * i} for i, m in enumerate(MOTORS)}
START = {m: 2048 + 30 * i for i, m in enumerate(MOTORS)}  # shaft angles (ticks) the arm rests at


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a lab machine with lerobot[feetech] installed, offline, calibration under tmp."""
    paths = [str(ROOT)]
    if importlib.util.find_spec("torchvision") is None:
        stub = tmp_path_factory.mktemp("stub") / "torchvision"
        (stub / "transforms").mkdir(parents=True)
        for f in ("__init__.py", "transforms/__init__.py", "transforms/functional.py"):
            (stub / f).write_text('"""Empty: lerobot.processor imports it; the robot path never calls it."""\n')
        paths.append(str(stub.parent))
    home = tmp_path_factory.mktemp("hf_lerobot")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
                HF_LEROBOT_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MUJOCO_GL="egl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained DiT on the SO-101's 6 joints; its action range is +-20 (deg; gripper 0-40)."""
    policy = tiny_dit(state_dim=6, action_dim=6)
    import torch

    lo, hi = np.array([-20.0] * 5 + [0.0]), np.array([20.0] * 5 + [40.0])
    stats = policy.normalizer.state_dict_flat()
    stats.update(action__offset=torch.tensor((lo + hi) / 2).float(), action__scale=torch.tensor((hi - lo) / 2).float(),
                 state__scale=torch.full((6,), 180.0))
    cfg = {"policy": {"_target_": "robodit.policies.dit.DiTPolicy", "size": "tiny", "action_horizon": 8,
                      "n_action_steps": 4, "num_inference_steps": 2},
           "shape_meta": policy.shape_meta, "store": {"fps": 30.0}}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_1", model_state=export_state(policy),
                           ema_state=None, normalizer_state=stats, config=cfg)


def so101_config(tmp_path, port: str, **robot) -> Path:
    """configs/robot/so101_lerobot.yaml as shipped (safety settings and all), with the fake arm's port."""
    cfg = yaml.safe_load((ROOT / "configs/robot/so101_lerobot.yaml").read_text())
    cal_dir = tmp_path / "calibration"
    cal_dir.mkdir(exist_ok=True)
    (cal_dir / f"{cfg['robot']['lerobot']['id']}.json").write_text(json.dumps(CALIBRATION))
    cfg["robot"]["lerobot"].update(port=port, calibration_dir=str(cal_dir))
    cfg["robot"].update(robot)
    path = tmp_path / "so101.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def degrees(arm: FakeArm, name: str, ticks: int) -> float:
    """LeRobot's reading of `ticks` (present position) in degrees: (ticks - range middle) * 360 / 4095."""
    c = CALIBRATION[name]
    return (ticks - (c["range_min"] + c["range_max"]) / 2) * 360 / 4095


def run_cli(env, checkpoint, config, *extra, stdin="", timeout=240, popen=False):
    cmd = [sys.executable, "-m", "robodit.cli", "run", "--policy", str(checkpoint), "--robot", str(config),
           "--threads", "1", *extra]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


@needs_so101
def test_robodit_run_drives_lerobots_so101_over_the_serial_port(env, checkpoint, tmp_path):
    """A fresh arm (factory EEPROM) and a calibration file: LeRobot asks, ENTER writes the file to the motors;
    then 24 ticks of the policy through the shipped config's safety layer reach the servos as Goal_Position."""
    arm = FakeArm(START)
    with arm.serve() as port:
        r = run_cli(env, checkpoint, so101_config(tmp_path, port.path), "--steps", "24", stdin="\n")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["steps"] == 24 and summary["stopped"] is None
    assert "so101_follower" in r.stdout or "SOFollower" in r.stdout
    for name in MOTORS:  # LeRobot's calibrate() wrote the file's calibration into each servo's EEPROM
        s, c = arm.servo(name), CALIBRATION[name]
        assert (s.homing_offset, *s.limits) == (c["homing_offset"], c["range_min"], c["range_max"])
    goals = arm.goal_writes()
    assert len(goals) >= 24 and all(sorted(g) == [1, 2, 3, 4, 5, 6] for g in goals)
    # max_delta [5, 5, 5, 5, 10, 10] deg per tick, measured from the arm's joints: the first command is within
    # 5 deg (+1 tick of LeRobot's rounding) of where the arm stood
    first = [degrees(arm, m, goals[0][i + 1]) for i, m in enumerate(MOTORS)]
    stood = [degrees(arm, m, (START[m] - CALIBRATION[m]["homing_offset"]) % 4096) for m in MOTORS]
    step = 360 / 4095
    assert np.all(np.abs(np.subtract(first, stood)) <= np.array([5, 5, 5, 5, 10, 10]) + step)
    assert not [e for e in arm.log if e[0].startswith("unsupported")]
    assert not any(s.torque for s in arm.servos.values())  # a normal end: LeRobot's torque-off at disconnect
