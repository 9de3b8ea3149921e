"""The safety layer: every violation clipped and reported; watchdog; e-stop latch."""

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from _control_fakes import ConstantPolicy, FakeClock, RecordingRobot

from robodit.control import ControlLoop, RecedingHorizon, policy_infer
from robodit.envs.safety import SafeRobot, SafetyConfig, SafetyStop

ROOT = Path(__file__).resolve().parents[1]


def safe(cfg=None, **kw):
    robot = RecordingRobot()
    return robot, SafeRobot(robot, cfg or {}, watchdog_thread=False, **kw)


def test_bounds_are_clipped_and_logged(caplog):
    robot, s = safe({"action_low": [-0.5] * 4, "action_high": [0.5] * 4})
    s.reset()
    with caplog.at_level(logging.WARNING, logger="robodit.safety"):
        _, _, _, info = s.step(np.array([2.0, 0.1, -3.0, 0.0]))
    np.testing.assert_allclose(robot.commands[-1], [0.5, 0.1, -0.5, 0.0])
    assert info["safety"] == ["bounds"] and s.stats["bounds"] == 1
    assert "bounds" in caplog.text and "[0, 2]" in caplog.text
    _, _, _, info = s.step(np.array([0.1, 0.1, 0.1, 0.1]))
    assert info["safety"] == []


def test_repeated_violations_are_counted_not_flooded(caplog):
    _, s = safe({"action_high": [0.5] * 4, "action_low": [-1] * 4, "log_interval_s": 60})
    s.reset()
    with caplog.at_level(logging.WARNING, logger="robodit.safety"):
        for _ in range(20):
            s.step(np.ones(4))
    assert s.stats["bounds"] == 20 and caplog.text.count("safety bounds") == 1


def test_max_delta_and_measured_reference():
    robot, s = safe({"max_delta": 0.1, "max_delta_reference": {"key": "state", "index": [0, 1, 2, 3]}})
    s.reset()  # measured state is all zeros: the first command may move 0.1 at most
    _, _, _, info = s.step(np.array([0.5, -0.05, 0.0, -0.5]))
    np.testing.assert_allclose(robot.commands[-1], [0.1, -0.05, 0.0, -0.1], atol=1e-6)
    assert info["safety"] == ["max_delta"]
    s.step(np.array([0.5, -0.05, 0.0, -0.5]))  # now relative to the last safe command
    np.testing.assert_allclose(robot.commands[-1], [0.2, -0.05, 0.0, -0.2], atol=1e-6)


def test_workspace_box_delta_mode():
    ws = {"low": [-0.01, -1, -1], "high": [0.005, 1, 1], "mode": "delta", "scale": 0.01}
    robot, s = safe({"workspace": ws})
    s.reset()  # pose x = 0, box edge at x = 0.005: a delta of at most 0.5 fits
    _, _, _, info = s.step(np.array([1.0, 0.2, 0.0, 0.0]))
    np.testing.assert_allclose(robot.commands[-1], [0.5, 0.2, 0.0, 0.0], atol=1e-6)
    assert info["safety"] == ["workspace"]
    robot.pose[0] = 0.02  # pushed outside: moving further out is refused, but nothing forces it back
    s._last_obs = {"state": robot.pose.copy()}
    s.step(np.array([0.3, 0.0, 0.0, 0.0]))
    assert robot.commands[-1][0] == 0.0
    s.step(np.array([-0.3, 0.0, 0.0, 0.0]))
    assert robot.commands[-1][0] == pytest.approx(-0.3)


def test_workspace_needs_a_reported_pose():
    with pytest.raises(ValueError, match="ee_pos"):  # refused from the robot's spec, before it is even reset
        safe({"workspace": {"low": [0, 0, 0], "high": [1, 1, 1], "pose_key": "ee_pos"}})


def test_nan_action_estops_and_latches():
    reasons = []
    robot, s = safe(on_estop=reasons.append)
    s.reset()
    s.step(np.zeros(4))
    with pytest.raises(SafetyStop, match="non-finite"):
        s.step(np.array([0.0, np.nan, 0.0, 0.0]))
    assert reasons and robot.stopped == 1 and len(robot.commands) == 1
    with pytest.raises(SafetyStop):
        s.step(np.zeros(4))
    with pytest.raises(SafetyStop, match="rearm"):
        s.reset()
    s.rearm()
    s.reset()


def test_nan_action_hold_mode():
    robot, s = safe({"nonfinite": "hold"})
    s.reset()
    s.step(np.full(4, 0.2))
    _, _, _, info = s.step(np.full(4, np.inf))
    assert info["safety"] == ["nonfinite"]
    np.testing.assert_allclose(robot.commands[-1], 0.2)


def test_watchdog_hold_and_stop_with_fake_clock():
    clock = FakeClock()
    robot = RecordingRobot()
    s = SafeRobot(robot, {"watchdog": {"timeout_ms": 100, "on_timeout": "hold"}}, clock=clock, watchdog_thread=False)
    s.reset()
    assert s.check_watchdog() is None  # not armed before the first action
    s.step(np.full(4, 0.3))
    clock.t += 0.05
    assert s.check_watchdog() is None
    clock.t += 0.1
    assert s.check_watchdog() == "hold"
    assert len(robot.commands) == 2 and np.allclose(robot.commands[-1], 0.3)
    stop = SafeRobot(RecordingRobot(), {"watchdog": {"timeout_ms": 100, "on_timeout": "stop"}}, clock=clock,
                     watchdog_thread=False)
    stop.reset()
    stop.step(np.zeros(4))
    clock.t += 0.2
    assert stop.check_watchdog() == "stop" and "watchdog" in stop.stopped


def test_watchdog_fires_with_a_slow_policy():
    """Real threads: a policy slower than the timeout → the watchdog holds (hold_action) between chunks."""
    robot = RecordingRobot(hz=50)
    s = SafeRobot(robot, {"watchdog": {"timeout_ms": 60, "on_timeout": "hold", "hold_action": [0, 0, 0, 0.7]}})
    policy = ConstantPolicy([0.1, 0.1, 0.1, 0.1], horizon=4, n_action_steps=2, delay=0.25)
    ex = RecedingHorizon(policy_infer(policy), 1 / 50, 2)
    res = ControlLoop(s, policy, ex, 50).run(6)
    s.close()
    holds = [c for c in robot.commands if np.allclose(c, [0, 0, 0, 0.7])]
    assert res.steps == 6 and s.stats["watchdog"] >= 1 and holds
    assert robot.closed


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="did you mean 'max_delta'"):
        SafetyConfig.from_dict({"max_detla": 0.1})
    with pytest.raises(ValueError, match="on_timeout"):
        SafetyConfig.from_dict({"watchdog": {"on_timeout": "panic"}})
    with pytest.raises(ValueError, match="infinite"):
        SafeRobot(RecordingRobot(low=-np.inf, high=np.inf), {}, watchdog_thread=False)
    with pytest.raises(ValueError, match="4 dimensions"):
        SafeRobot(RecordingRobot(), {"max_delta": [0.1, 0.2]}, watchdog_thread=False)


def test_estop_from_another_thread_stops_the_loop():
    import threading

    robot = RecordingRobot(hz=100)
    s = SafeRobot(robot, {})
    policy = ConstantPolicy([0.0] * 4)
    loop = ControlLoop(s, policy, RecedingHorizon(policy_infer(policy), 0.01, 4), 100)
    threading.Timer(0.1, s.estop, args=("operator pressed the pedal",)).start()
    t0 = time.monotonic()
    res = loop.run(1000)
    s.close()
    assert res.stopped and "pedal" in res.stopped and time.monotonic() - t0 < 2 and res.steps < 1000


def test_hold_passes_max_delta_and_becomes_its_reference():
    """A hold of 0 after commands of 1.0 (max_delta 0.2): the hold ramps down, the next command ramps up."""
    clock = FakeClock()
    robot = RecordingRobot()
    s = SafeRobot(robot, {"max_delta": 0.2, "watchdog": {"timeout_ms": 100, "hold_action": [0, 0, 0, 0]}},
                  clock=clock, watchdog_thread=False)
    s.reset()
    for v in (0.2, 0.4, 0.6, 0.8, 1.0):
        s.step(np.full(4, v))
    clock.t += 0.5
    assert s.check_watchdog() == "hold"
    np.testing.assert_allclose(robot.commands[-1], 0.8)  # the hold is rate-limited like any command
    clock.t += 0.1
    s.check_watchdog()
    np.testing.assert_allclose(robot.commands[-1], 0.6)
    _, _, _, info = s.step(np.full(4, 1.0))  # limited from the hold actually sent, not from the last 1.0
    np.testing.assert_allclose(robot.commands[-1], 0.8)
    assert info["safety"] == ["max_delta"]


def test_delta_robot_holds_still_inside_the_workspace():
    """No hold_action on a delta robot: a hold is a zero action, never a re-sent velocity (which drifts)."""
    clock = FakeClock()
    robot = RecordingRobot()
    box = {"low": [-0.05] * 3, "high": [0.05] * 3, "scale": 0.01}  # mode delta (the default): a delta robot
    s = SafeRobot(robot, {"workspace": box, "watchdog": {"timeout_ms": 100}}, clock=clock, watchdog_thread=False)
    s.reset()
    s.step(np.array([1.0, 0, 0, 0]))
    for _ in range(30):
        clock.t += 0.2
        s.check_watchdog()
    assert s.stats["watchdog"] == 30 and robot.pose[0] == pytest.approx(0.01)  # moved once, then held
    np.testing.assert_allclose(robot.commands[-1], 0.0)


def test_dry_run_config_holds_with_zero():
    """configs/robot/dry_run.yaml: a delta dry-run robot without hold_action stands still on a hold."""
    from robodit.control.robots import build_robot, load_robot_config

    cfg = load_robot_config(ROOT / "configs/robot/dry_run.yaml")
    s = build_robot(cfg, ConstantPolicy([0.5, 0, 0, 0]), dry_run=True)
    try:
        s.reset(seed=0)
        s.step(np.array([0.5, 0.0, 0.0, 0.0]))
        assert s.check_watchdog(now=time.monotonic() + 1.0) == "hold"
        np.testing.assert_allclose(s.robot.commands[-1], 0.0)
    finally:
        s.close()


def test_hold_action_null_keeps_that_dimension():
    """Meta-World's gripper (4th dim) is an effort: a hold keeps its last command instead of loosening the grasp."""
    from robodit.control.robots import load_robot_config

    hold = load_robot_config(ROOT / "configs/robot/metaworld.yaml")["safety"]["watchdog"]["hold_action"]
    assert hold == [0, 0, 0, None]
    clock = FakeClock()
    robot = RecordingRobot()
    s = SafeRobot(robot, {"watchdog": {"timeout_ms": 100, "hold_action": hold}}, clock=clock, watchdog_thread=False)
    s.reset()
    s.step(np.array([0.5, 0.5, 0.5, 1.0]))
    clock.t += 0.2
    assert s.check_watchdog() == "hold"
    np.testing.assert_allclose(robot.commands[-1], [0, 0, 0, 1.0])


def test_config_refuses_values_that_move_or_disarm_the_robot():
    for cfg, words in [({"max_delta": -0.1}, "max_delta"), ({"max_delta": [0.1, -0.1, 0.1, 0.1]}, "max_delta"),
                       ({"watchdog": {"timeout_ms": -5}}, "timeout_ms"),
                       ({"watchdog": {"timeout_ms": 0}}, "timeout_ms"),
                       ({"watchdog": {"timeout": 100}}, "'timeout'"),
                       ({"workspace": {"low": [1, 0, 0], "high": [0, 1, 1]}}, r"low > high in dims \[0\]"),
                       ({"max_delta_reference": {"kye": "state"}}, "'kye'"),
                       ({"action_mode": "velocity"}, "action_mode")]:
        with pytest.raises(ValueError, match=words):
            SafetyConfig.from_dict(cfg)


def test_max_delta_reference_key_is_checked_before_the_first_command():
    with pytest.raises(ValueError, match="'joint_pos'"):
        SafeRobot(RecordingRobot(), {"max_delta": 0.5, "max_delta_reference": {"key": "joint_pos"}},
                  watchdog_thread=False)
    with pytest.raises(ValueError, match="index"):
        SafeRobot(RecordingRobot(), {"max_delta": 0.5, "max_delta_reference": {"index": [0, 1, 2, 9]}},
                  watchdog_thread=False)


def test_watchdog_holds_at_the_loop_rate():
    """A simulator's spec says 1000 Hz (its physics rate); the loop runs at 10 Hz: holds come at the loop's rate
    (here every timeout/2 = 50 ms), not every millisecond."""
    robot = RecordingRobot(hz=1000)
    s = SafeRobot(robot, {"watchdog": {"timeout_ms": 100}}, control_hz=10)
    s.reset()
    s.step(np.zeros(4))
    time.sleep(0.45)
    s.close()
    holds = len(robot.commands) - 1
    assert 1 <= holds <= 12, holds


def test_build_robot_passes_the_loop_rate_to_a_simulator(monkeypatch):
    import robodit.envs

    monkeypatch.setattr(robodit.envs, "make_env", lambda name, **kw: RecordingRobot(hz=80))
    from robodit.control.robots import build_robot

    s = build_robot({"robot": {"type": "sim", "env": "fake/task"}, "control_hz": 10}, hz=5)
    assert s.robot.spec.control_hz == 80 and s.control_hz == 5
    s.close()
