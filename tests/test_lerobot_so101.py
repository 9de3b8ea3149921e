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
from _control_fakes import ConstantPolicy, tiny_dit
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
TARGET = [30.0, -20.0, 15.0, 0.0, 45.0, 60.0]  # where the test policy sends it (deg; gripper 0-100)
LIMIT = np.array([5, 5, 5, 5, 10, 10])  # the shipped config's max_delta per tick


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
    """A tiny untrained DiT on the SO-101's 6 joints. Untrained, it outputs the middle of its action range, set
    to TARGET, so every run drives the arm from START towards TARGET."""
    import torch

    policy = tiny_dit(state_dim=6, action_dim=6)
    stats = policy.normalizer.state_dict_flat()
    stats.update(action__offset=torch.tensor(TARGET, dtype=torch.float32), action__scale=torch.full((6,), 2.0),
                 state__scale=torch.full((6,), 180.0))
    cfg = {"policy": {"_target_": "robodit.policies.dit.DiTPolicy", "size": "tiny", "action_horizon": 8,
                      "n_action_steps": 4, "num_inference_steps": 2},
           "shape_meta": policy.shape_meta, "store": {"fps": 30.0}}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_1", model_state=export_state(policy),
                           ema_state=None, normalizer_state=stats, config=cfg)


def so101_config(tmp_path, port: str) -> Path:
    """configs/robot/so101_lerobot.yaml as shipped (safety settings and all), with the fake arm's port."""
    cfg = yaml.safe_load((ROOT / "configs/robot/so101_lerobot.yaml").read_text())
    cal_dir = tmp_path / "calibration"
    cal_dir.mkdir(exist_ok=True)
    (cal_dir / f"{cfg['robot']['lerobot']['id']}.json").write_text(json.dumps(CALIBRATION))
    cfg["robot"]["lerobot"].update(port=port, calibration_dir=str(cal_dir))
    path = tmp_path / "so101.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def reading(name: str, ticks: int) -> float:
    """LeRobot's reading of a present position: degrees from the range middle, the gripper 0-100 of its range."""
    c = CALIBRATION[name]
    if name == "gripper":
        return (ticks - c["range_min"]) / (c["range_max"] - c["range_min"]) * 100
    return (ticks - (c["range_min"] + c["range_max"]) / 2) * 360 / 4095


def readings(goal: dict[int, int]) -> np.ndarray:
    return np.array([reading(m, goal[i + 1]) for i, m in enumerate(MOTORS)])


# one encoder tick in LeRobot's units (its float-to-ticks conversion truncates)
GRIPPER_TICKS = CALIBRATION["gripper"]["range_max"] - CALIBRATION["gripper"]["range_min"]
TICK = np.array([360 / 4095] * 5 + [100 / GRIPPER_TICKS])


def close(a, b) -> bool:
    """Equal to within the encoder tick LeRobot's float-to-ticks truncation may lose."""
    return bool(np.all(np.abs(np.subtract(a, b)) <= 1.01 * TICK))


def run_cli(env, checkpoint, config, *extra, stdin="", timeout=300):
    cmd = [sys.executable, "-m", "robodit.cli", "run", "--policy", str(checkpoint), "--robot", str(config),
           "--threads", "1", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


@needs_so101
def test_robodit_run_drives_lerobots_so101_over_the_serial_port(env, checkpoint, tmp_path):
    """A fresh arm (factory EEPROM) and a calibration file: LeRobot asks, ENTER writes the file to the motors;
    then the policy's commands pass the shipped config's safety layer and reach the servos as Goal_Position."""
    arm = FakeArm(START)
    with arm.serve() as port:
        r = run_cli(env, checkpoint, so101_config(tmp_path, port.path), "--steps", "24", "--strategy", "receding",
                    stdin="\n")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["steps"] == summary["sent"] == 24 and summary["stopped"] is None
    assert "Writing calibration file" in r.stderr  # LeRobot's own calibrate(), answered by the ENTER
    for name in MOTORS:  # ... which wrote the file's calibration into each servo's EEPROM
        s, c = arm.servo(name), CALIBRATION[name]
        assert (s.homing_offset, *s.limits) == (c["homing_offset"], c["range_min"], c["range_max"])
    goals = [readings(g) for g in arm.goal_writes()]  # one sync write of all six joints per command
    assert len(goals) >= 24  # the policy's 24, and a watchdog hold (the last target again) if inference stalled
    # max_delta is measured from the arm: the first command is one limit away from where the arm stood, and
    # each next one a limit further, until the policy's target is reached and held
    stood = readings({i + 1: START[m] - CALIBRATION[m]["homing_offset"] for i, m in enumerate(MOTORS)})
    ramp = [g for k, g in enumerate(goals) if k == 0 or not np.array_equal(g, goals[k - 1])]
    for k, got in enumerate(ramp):
        want = stood + np.clip(np.subtract(TARGET, stood), -(k + 1) * LIMIT, (k + 1) * LIMIT)
        assert close(got, want), f"command {k}: {got} != {want}"
    assert close(goals[-1], TARGET)
    assert "safety max_delta" in r.stderr and not [e for e in arm.log if e[0].startswith("unsupported")]
    assert not any(s.torque for s in arm.servos.values())  # a normal end: LeRobot turns torque off


@needs_so101
def test_a_stop_mid_motion_holds_the_arm_where_it_is_and_keeps_torque_on(env, checkpoint, tmp_path):
    """A stop mid-motion: the e-stop commands the joints' measured positions (the servos lag their goals here),
    no command follows, and the arm stays powered after robodit exits instead of dropping. (SIGTERM, which robodit
    run treats as Ctrl-C: a child of a background shell, as under CI, ignores SIGINT.)"""
    arm = FakeArm(START, speed=50)  # ~4.4 deg/s, far slower than the commands ramp: goal and position differ
    arm.calibrate(CALIBRATION)  # calibrated before: LeRobot asks nothing
    with arm.serve() as port:
        cmd = [sys.executable, "-m", "robodit.cli", "run", "--policy", str(checkpoint), "--robot",
               str(so101_config(tmp_path, port.path)), "--threads", "1", "--steps", "100000"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while len(arm.goal_writes()) < 8 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        at_exit = {i + 1: arm.present()[m] for i, m in enumerate(MOTORS)}
    assert proc.returncode == 2 and "stopped" in err and "E-STOP" in err, err[-3000:]
    assert "stop failed" not in err and "E-STOP failed" not in err, err[-3000:]
    goals = arm.goal_writes()
    hold = readings(goals[-1])
    assert close(hold, readings(at_exit)), (hold, readings(at_exit))  # held where it was...
    assert np.abs(readings(goals[-2]) - hold).max() > 1.0  # ...not at the last target it was moving to
    assert not close(hold, TARGET)
    assert all(s.torque for s in arm.servos.values()), "torque was turned off after the e-stop: the arm drops"



@pytest.fixture
def forget_lerobot():
    """Drop what a failed lerobot import left in sys.modules, so later imports in this process start afresh."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("lerobot", "draccus", "serial", "deepdiff"):
            del sys.modules[name]


@pytest.mark.parametrize("hidden,package", [
    ("lerobot", "pip install --no-deps lerobot==0.4.4"),
    ("draccus", "pip install draccus==0.10.0"),
    pytest.param("serial", "pip install pyserial", marks=needs_so101),  # the module is not named like its package
    pytest.param("deepdiff", "pip install deepdiff", marks=needs_so101),
])
def test_a_missing_module_names_the_package_to_install(monkeypatch, capsys, forget_lerobot, hidden, package):
    """`robodit run` on the SO-101 config where part of LeRobot's stack is missing (hidden here): one line
    naming the module and the pip package that provides it. (scservo_sdk: the slow test below.)"""
    from robodit.cli import main
    from robodit.training import checkpoint as ckpt_io

    policy = ConstantPolicy([0.0] * 6)
    policy.obs_shapes = {"state": ((6,), "float32")}
    monkeypatch.setattr(ckpt_io, "load_policy", lambda path, device="cpu": policy)
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` fails as if it were not installed
    rc = main(["run", "--policy", "ckpt", "--robot", str(ROOT / "configs/robot/so101_lerobot.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"Python module {hidden!r}" in err and package in err, err


@needs_so101
@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong port", "type typo", "key typo", "no feetech sdk", "cable pulled",
                                  "uncalibrated without a terminal", "uncalibrated with calibrate: false"])
def test_what_goes_wrong_on_the_bench_is_one_clear_line(env, checkpoint, tmp_path, case):
    """Each mistake or fault is exit status 2 and one line saying what to fix, never a traceback."""
    arm = FakeArm(START, mute_after=10 if case == "cable pulled" else None)  # pulled after the 10th command
    if not case.startswith("uncalibrated"):  # else the motors' EEPROM differs from the calibration file
        arm.calibrate(CALIBRATION)
    with arm.serve() as port:
        robot = {"wrong port": {"port": str(tmp_path / "ttyACM9")}, "type typo": {"type": "so101_folower"},
                 "key typo": {"prot": port.path}}.get(case, {})
        cfg = yaml.safe_load(so101_config(tmp_path, port.path).read_text())
        cfg["robot"]["lerobot"].update(robot)
        if case == "uncalibrated with calibrate: false":
            cfg["robot"]["calibrate"] = False
        (tmp_path / "so101.yaml").write_text(yaml.safe_dump(cfg))
        argv = ["run", "--policy", str(checkpoint), "--robot", str(tmp_path / "so101.yaml"), "--threads", "1",
                "--steps", "60", "--strategy", "receding"]
        hide = "scservo_sdk" if case == "no feetech sdk" else "no_such_module"
        code = (f"import sys; sys.modules[{hide!r}] = None\n"  # `import scservo_sdk` fails as if not installed
                "from robodit.cli import main; sys.exit(main(sys.argv[1:]))")
        r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("robodit run: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    expect = {"wrong port": ["did not connect", "ttyACM9"],
              "type typo": ["'so101_folower'", "did you mean 'so101_follower'"],
              "key typo": ["'prot'", "did you mean 'port'"],
              "no feetech sdk": ["'scservo_sdk'", "pip install feetech-servo-sdk"],
              "cable pulled": ["stopped", "Present_Position"],
              "uncalibrated without a terminal": ["calibration", "lerobot-calibrate"],
              "uncalibrated with calibrate: false": ["calibration differs", "robot.calibrate: true"]}[case]
    assert all(e in errors[0] for e in expect), errors[0]
    if case == "cable pulled":  # the e-stop could not reach the arm; robodit still exits (no hang, no retry loop)
        assert len(arm.goal_writes()) == 10
    else:
        assert not arm.goal_writes()  # refused before the arm was commanded
