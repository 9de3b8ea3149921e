"""Chunk execution strategies, with fake policies and a fake clock."""

import threading
import time

import numpy as np
import pytest
from _control_fakes import ConstantPolicy, CuePolicy, FakeClock, RecordingRobot

from robodit.control import AsyncInference, ControlLoop, RecedingHorizon, TemporalEnsemble, make_executor, policy_infer
from robodit.envs.safety import SafeRobot

OBS = {"state": np.zeros((1, 2, 4), np.float32)}


def counting_infer(horizon=6, dim=2):
    """Chunk n is [[n*100 + i] * dim for i in range(horizon)]: each action names its chunk and index."""
    calls = []

    def infer(obs):
        n = len(calls)
        calls.append(n)
        return np.array([[n * 100 + i] * dim for i in range(horizon)], np.float32)

    return infer, calls


def test_receding_horizon_executes_k_of_h():
    infer, calls = counting_infer()
    ex = RecedingHorizon(infer, 0.1, n_action_steps=3)
    got = [ex.next_action(OBS)[0] for _ in range(7)]
    assert got == [0, 1, 2, 100, 101, 102, 200] and len(calls) == 3


def test_temporal_ensemble_of_constant_chunks_is_the_constant():
    c = np.array([0.3, -1.2, 7.0], np.float32)
    ex = TemporalEnsemble(lambda obs: np.tile(c, (8, 1)), 0.1, m=0.5)
    for _ in range(20):
        np.testing.assert_allclose(ex.next_action(OBS), c, rtol=1e-6)
    assert ex.stats["inferences"] == 20


def test_temporal_ensemble_weights_favour_the_oldest_chunk():
    infer, _ = counting_infer(horizon=4, dim=1)
    ex = TemporalEnsemble(infer, 0.1, m=0.1)
    assert ex.next_action(OBS)[0] == 0  # only chunk 0: its action 0
    a = ex.next_action(OBS)[0]  # chunk 0 says 1 (weight 1), chunk 1 says 100 (weight e^-0.1)
    w = np.exp(-0.1)
    assert a == pytest.approx((1 + 100 * w) / (1 + w))
    ex.reset()
    assert ex.next_action(OBS)[0] == 200  # reset forgets old chunks


def test_async_drops_stale_actions_with_fake_clock():
    clock = FakeClock()
    gate = threading.Event()
    infer_calls = []

    def infer(obs):
        infer_calls.append(clock())
        if len(infer_calls) > 1:
            gate.wait(5)  # the second inference finishes only when the test says so
        return np.arange(8, dtype=np.float32)[:, None] + 100 * (len(infer_calls) - 1)

    ex = AsyncInference(infer, dt=0.1, n_action_steps=4, clock=clock)
    played = []
    for _ in range(4):  # the first chunk (requested at t=0) plays at 0.0, 0.1, 0.2, 0.3
        played.append(ex.next_action(OBS)[0])
        clock.t += 0.1
    assert played == [0, 1, 2, 3]
    # 4 of 8 left: at t=0.4 (where receding horizon would replan) the next inference starts in the background
    for _ in range(3):
        played.append(ex.next_action(OBS)[0])
        clock.t += 0.1
    assert ex.pending is not None and ex.pending_t == pytest.approx(0.4)
    assert played[4:] == [4, 5, 6]  # chunk 0's tail plays meanwhile
    gate.set()
    ex.pending.result(5)
    # now t=0.7: chunk 1's actions stamped 0.4, 0.5, 0.6 have passed and are dropped; 0.7 is its index 3
    assert ex.next_action(OBS)[0] == 103
    assert ex.stats["dropped_stale"] == 3 and len(infer_calls) == 2
    ex.close()


def test_async_starves_when_every_action_is_used_up():
    clock = FakeClock()
    gate = threading.Event()
    n = []

    def infer(obs):
        n.append(1)
        if len(n) > 1:
            gate.wait(5)
        return np.zeros((3, 2), np.float32)

    ex = AsyncInference(infer, dt=0.1, n_action_steps=1, clock=clock)
    got = []
    for _ in range(5):
        got.append(ex.next_action(OBS))
        clock.t += 0.1
    assert [g is None for g in got] == [False, False, False, True, True] and ex.stats["starved"] == 2
    gate.set()
    ex.close()


def test_loop_timing_on_a_fake_clock():
    clock = FakeClock()
    robot = RecordingRobot()
    policy = ConstantPolicy([0.5, 0, 0, 0])
    ex = make_executor("receding", policy_infer(policy), hz=10, n_action_steps=4, clock=clock)
    res = ControlLoop(robot, policy, ex, 10, clock=clock, sleep=clock.sleep).run(12)
    s = res.summary()
    assert res.steps == 12 and len(robot.commands) == 12 and policy.calls == 3
    assert s["late_max_ms"] == pytest.approx(0, abs=1e-6) and s["interval_mean_ms"] == pytest.approx(100)


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="receding, ensemble, async"):
        make_executor("fastest", lambda o: None, hz=10, n_action_steps=2)


@pytest.mark.parametrize("latency", [0.4, 1.0])
def test_async_first_chunk_plays_from_its_start(latency):
    """The robot waits for the first chunk, so none of it is stale: it plays from action 0 when it arrives."""
    clock = FakeClock()

    def infer(obs):
        clock.t += latency if not infer.calls else 0.0  # the first inference takes `latency` s
        infer.calls += 1
        return np.arange(16, dtype=np.float32)[:, None] + 100 * (infer.calls - 1)

    infer.calls = 0
    ex = AsyncInference(infer, dt=0.05, n_action_steps=8, clock=clock)
    played = [ex.next_action(OBS, clock())[0]]
    for _ in range(5):
        clock.t += 0.05
        played.append(ex.next_action(OBS, clock())[0])
    ex.close()
    assert played == [0, 1, 2, 3, 4, 5] and ex.stats["dropped_stale"] == 0 and ex.stats["starved"] == 0


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("strategy", ["receding", "async"])
def test_policy_failure_mid_run_estops_the_robot(strategy):
    """A policy (or server) that fails mid-run: the robot is e-stopped and the run ends with the reason."""
    def fail():
        raise Boom("server gone")

    robot = RecordingRobot(hz=200)
    s = SafeRobot(robot, {"watchdog": {"timeout_ms": 500}}, watchdog_thread=False)
    policy = CuePolicy([0.1, 0, 0, 0], at=2, cue=fail, horizon=8, n_action_steps=4)
    ex = make_executor(strategy, policy_infer(policy), hz=200, n_action_steps=4)
    t0 = time.monotonic()
    res = ControlLoop(s, policy, ex, 200).run(400)
    ex.close()
    assert "server gone" in res.stopped and "Boom" in res.stopped and isinstance(res.error, Boom)
    assert s.stopped and robot.stopped == 1 and 4 <= len(robot.commands) <= 8 and time.monotonic() - t0 < 2


def test_a_run_after_rearm_starts_clean():
    clock = FakeClock()
    policy = ConstantPolicy([0.1, 0, 0, 0])
    s = SafeRobot(RecordingRobot(), {}, clock=clock, watchdog_thread=False)
    loop = ControlLoop(s, policy, make_executor("receding", policy_infer(policy), hz=10, n_action_steps=4,
                                                clock=clock), 10, clock=clock, sleep=clock.sleep)
    assert loop.run(5).steps == 5
    s.estop("operator pedal")
    s.rearm()
    res = loop.run(5)
    assert res.steps == 5 and res.stopped is None
