"""LeRobotRobot with a test double that has LeRobot's robot API (lerobot itself is never imported)."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _control_fakes import ConstantPolicy

from robodit.control import ControlLoop, make_executor, policy_infer
from robodit.envs.lerobot_robot import LeRobotRobot
from robodit.envs.safety import SafeRobot

MOTORS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex"]


class FakeSO100:
    """LeRobot's method names and feature conventions: "<motor>.pos" floats, cameras as (H, W, C) tuples."""

    def __init__(self, camera=True):
        self.pos = {f"{m}.pos": 0.0 for m in MOTORS}
        self.connected, self.sent, self.camera = False, [], camera
        self.connect_calls = []

    @property
    def observation_features(self):
        return {**{k: float for k in self.pos}, **({"front": (24, 32, 3)} if self.camera else {})}

    @property
    def action_features(self):
        return {k: float for k in self.pos}

    @property
    def is_connected(self):
        return self.connected

    def connect(self, calibrate: bool = True):
        self.connected = True
        self.connect_calls.append(calibrate)

    def get_observation(self):
        assert self.connected
        obs = dict(self.pos)
        if self.camera:
            obs["front"] = np.full((24, 32, 3), 7, np.uint8)
        return obs

    def send_action(self, action):
        assert self.connected and set(action) == set(self.pos)
        self.sent.append(dict(action))
        for k, v in action.items():  # moves there at once (no dynamics)
            self.pos[k] = v
        return action

    def disconnect(self):
        self.connected = False


def test_spec_from_features_and_no_lerobot_import():
    robot = LeRobotRobot(FakeSO100(), action_low=[-1] * 4, action_high=[1] * 4, control_hz=30)
    assert robot.spec.observation["state"].shape == (4,) and robot.spec.observation["image_front"].shape == (24, 32, 3)
    assert robot.spec.action_dim == 4 and robot.state_names == [f"{m}.pos" for m in MOTORS]
    code = "import sys, robodit.envs.lerobot_robot as m; m.LeRobotRobot; assert 'lerobot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # the adapter never imports lerobot


def test_fifty_steps_through_the_safety_layer(caplog):
    fake = FakeSO100(camera=False)
    robot = SafeRobot(LeRobotRobot(fake, action_low=[-1] * 4, action_high=[1] * 4, control_hz=200),
                      {"max_delta": 0.05, "max_delta_reference": {"key": "state", "index": [0, 1, 2, 3]},
                       "action_high": [0.5, 1, 1, 1], "action_low": [-1] * 4, "watchdog": {"timeout_ms": 500}})
    policy = ConstantPolicy([0.8, -0.3, 0.0, 0.1])
    ex = make_executor("receding", policy_infer(policy), hz=200, n_action_steps=4)
    with caplog.at_level(logging.WARNING, logger="robodit.safety"):
        res = ControlLoop(robot, policy, ex, 200).run(50)
    robot.close()
    assert res.steps == 50 and len(fake.sent) == 50 and not res.stopped
    first = fake.sent[0]
    assert first["shoulder_pan.pos"] == pytest.approx(0.05)  # rate-limited from the measured 0
    pan = [s["shoulder_pan.pos"] for s in fake.sent]
    assert max(np.abs(np.diff(pan))) <= 0.05 + 1e-6 and max(pan) == pytest.approx(0.5)  # ramps, then bounded
    assert res.safety["max_delta"] > 0 and res.safety["bounds"] == 50
    assert "safety bounds" in caplog.text and "safety max_delta" in caplog.text
    assert fake.connect_calls == [True] and not fake.connected  # connected on reset, disconnected on close


def test_estop_holds_the_measured_position():
    fake = FakeSO100(camera=False)
    robot = SafeRobot(LeRobotRobot(fake, action_low=[-1] * 4, action_high=[1] * 4), {}, watchdog_thread=False)
    robot.reset()
    robot.step(np.array([0.2, 0.2, 0.2, 0.2]))
    robot.estop("test")
    assert fake.sent[-1] == {f"{m}.pos": pytest.approx(0.2) for m in MOTORS}


def test_unbounded_lerobot_robot_needs_safety_bounds():
    with pytest.raises(ValueError, match="infinite"):
        SafeRobot(LeRobotRobot(FakeSO100()), {}, watchdog_thread=False)


def test_from_config_with_a_factory():
    cfg = {"factory": f"{__name__}:FakeSO100", "kwargs": {"camera": False}, "action_low": [-2] * 4,
           "action_high": [2] * 4, "max_episode_steps": 3}
    robot = LeRobotRobot.from_config(cfg, control_hz=15)
    assert robot.spec.control_hz == 15 and robot.spec.action_high.tolist() == [2] * 4
    robot.reset()
    dones = [robot.step(np.zeros(4))[2] for _ in range(3)]
    assert dones == [False, False, True]


def test_camera_keys_are_the_ones_convert_lerobot_stores():
    from robodit.keys import safe_key

    class DottedCamera(FakeSO100):
        @property
        def observation_features(self):
            return {**{k: float for k in self.pos}, "wrist.cam": (24, 32, 3)}

        def get_observation(self):
            return {**self.pos, "wrist.cam": np.zeros((24, 32, 3), np.uint8)}

    robot = LeRobotRobot(DottedCamera(), action_low=[-1] * 4, action_high=[1] * 4)
    key = "image_" + safe_key("wrist.cam")
    assert key == "image_wrist_cam" and key in robot.spec.observation and key in robot.reset()


class TorqueConfig:
    disable_torque_on_disconnect = True  # LeRobot's default


class FakeSOWithTorque(FakeSO100):
    """Records whether disconnect() would turn torque off (as LeRobot's SO follower does from its config)."""

    def __init__(self):
        super().__init__(camera=False)
        self.config, self.torque_off_at_disconnect = TorqueConfig(), None

    def disconnect(self):
        self.torque_off_at_disconnect = self.config.disable_torque_on_disconnect
        super().disconnect()


@pytest.mark.parametrize("estop,torque_off_after_estop,expected", [
    (True, False, False),  # held by the e-stop: keep torque on, the arm must not drop
    (True, True, True),  # the user asked for it explicitly
    (False, False, True),  # no e-stop: LeRobot's own setting applies
])
def test_torque_stays_on_at_close_after_an_estop(estop, torque_off_after_estop, expected):
    fake = FakeSOWithTorque()
    robot = SafeRobot(LeRobotRobot(fake, action_low=[-1] * 4, action_high=[1] * 4,
                                   torque_off_after_estop=torque_off_after_estop), {}, watchdog_thread=False)
    robot.reset()
    robot.step(np.full(4, 0.1))
    if estop:
        robot.estop("test")
    robot.close()
    assert fake.torque_off_at_disconnect is expected and not fake.connected


def test_so101_config_keeps_torque_on_after_an_estop():
    from robodit.control.robots import load_robot_config

    cfg = load_robot_config(Path(__file__).resolve().parents[1] / "configs/robot/so101_lerobot.yaml")
    assert cfg["robot"]["torque_off_after_estop"] is False


def test_an_uncalibrated_arm_is_refused_before_it_moves():
    """`calibrate: false` skips LeRobot's calibration check; motors whose calibration differs from the file would
    then be driven with wrong joint readings and position limits: refused at connect, nothing sent."""
    from robodit.errors import CLIError

    class Uncalibrated(FakeSO100):
        is_calibrated = False

    fake = Uncalibrated(camera=False)
    robot = LeRobotRobot(fake, action_low=[-1] * 4, action_high=[1] * 4, calibrate=False)
    with pytest.raises(CLIError, match="calibrat"):
        robot.reset()
    assert fake.connect_calls == [False] and not fake.sent
    robot.close()
    assert not fake.connected


def test_lerobot_config_without_a_type_is_a_clear_error():
    with pytest.raises(ValueError, match="robot.lerobot needs type"):
        LeRobotRobot.from_config({"lerobot": {"port": "/dev/ttyACM0"}})


def test_estop_after_a_transaction_cut_short_still_holds():
    """Ctrl-C or SIGTERM raised while LeRobot waits for the servos' reply leaves the SDK's port marked busy
    (scservo_sdk's `port_handler.is_using`): every later read failed with "Port is in use!", so the e-stop never
    held the arm. The stand-in models LeRobot's bus attributes (tests/test_lerobot_so101.py does it for real)."""

    class Serial:
        is_open, flushed = True, 0

        def reset_input_buffer(self):
            self.flushed += 1

    class Port:
        is_open, is_using, ser = True, False, Serial()

    class WithBus(FakeSO100):
        def __init__(self):
            super().__init__(camera=False)
            self.bus = type("Bus", (), {"port_handler": Port(), "port": "/dev/ttyACM0"})()

        def get_observation(self):
            if self.bus.port_handler.is_using:
                raise ConnectionError("Failed to sync read 'Present_Position' [TxRxResult] Port is in use!")
            return super().get_observation()

    fake = WithBus()
    robot = SafeRobot(LeRobotRobot(fake, action_low=[-1] * 4, action_high=[1] * 4), {}, watchdog_thread=False)
    robot.reset()
    robot.step(np.full(4, 0.3))
    fake.bus.port_handler.is_using = True  # the interrupted read's state
    robot.estop("SIGTERM received")
    assert len(fake.sent) == 2 and fake.sent[-1] == {f"{m}.pos": pytest.approx(0.3) for m in MOTORS}
    assert fake.bus.port_handler.ser.flushed >= 1  # the unread reply is dropped, not taken for the next one
    robot.close()
