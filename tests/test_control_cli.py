"""`robodit run --dry-run` on a local checkpoint and through `robodit serve` (a real subprocess, loopback)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _control_fakes import ConstantPolicy, CuePolicy, tiny_dit

from robodit.cli import main
from robodit.deploy.client import RemotePolicy, healthz
from robodit.training.checkpoint import export_state, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cli-test-token-0123456789"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    policy = tiny_dit(state_dim=6, action_dim=4)
    cfg = {"policy": {"_target_": "robodit.policies.dit.DiTPolicy", "size": "tiny", "action_horizon": 8,
                      "n_action_steps": 4, "num_inference_steps": 2},
           "shape_meta": policy.shape_meta, "store": {"fps": 30.0}}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_1", model_state=export_state(policy),
                           ema_state=None, normalizer_state=policy.normalizer.state_dict_flat(), config=cfg)


@pytest.mark.parametrize("strategy", ["receding", "ensemble", "async"])
def test_run_dry_run_each_strategy(checkpoint, tmp_path, capsys, strategy):
    log = tmp_path / "steps.jsonl"
    rc = main(["run", "--policy", str(checkpoint), "--robot", str(ROOT / "configs/robot/dry_run.yaml"), "--dry-run",
               "--strategy", strategy, "--hz", "30", "--steps", "12", "--log", str(log)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 12 and summary["stopped"] is None and summary["executor"]["inferences"] >= 1
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 12 and {"late_ms", "send_late_ms", "infer_ms", "step_ms", "safety"} <= set(rows[0])


def test_run_refuses_a_mismatched_robot(checkpoint, capsys):
    rc = main(["run", "--policy", str(checkpoint), "--robot", str(ROOT / "configs/robot/metaworld.yaml"),
               "--steps", "1"])
    assert rc == 2 and "state" in capsys.readouterr().err  # 39-d Meta-World state vs the policy's 6-d


def test_serve_and_run_through_it(checkpoint, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1", ROBODIT_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "robodit.cli", "serve", str(checkpoint), "--port", "0",
                             "--threads", "1", "--max-seconds", "60"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("ws://127.0.0.1:") and healthz(url)["status"] == "ok"
        with RemotePolicy(url, TOKEN) as remote:
            assert remote.action_dim == 4 and remote.obs_shapes["state"] == ((6,), "float32")
        rc = main(["run", "--policy", url, "--token", TOKEN, "--robot", str(ROOT / "configs/robot/dry_run.yaml"),
                   "--dry-run", "--strategy", "async", "--hz", "20", "--steps", "10"])
        out = capsys.readouterr().out
        assert rc == 0 and '"steps": 10' in out
        rc = main(["run", "--policy", url, "--token", "wrong-token-wrong-token", "--robot",
                   str(ROOT / "configs/robot/dry_run.yaml"), "--dry-run"])
        assert rc == 2 and "401" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "server stopped" in out, err[-2000:]


def run_fake(monkeypatch, policy, *extra, robot="configs/robot/dry_run.yaml", dry_run=True):
    """`robodit run` with `policy` standing in for a loaded checkpoint."""
    from robodit.training import checkpoint as ckpt_io

    monkeypatch.setattr(ckpt_io, "load_policy", lambda path, device="cpu": policy)
    return main(["run", "--policy", "fake-checkpoint", "--robot", str(ROOT / robot), *(["--dry-run"] * dry_run),
                 *extra])


def record_robots(monkeypatch) -> tuple[list, list]:
    """The robots `robodit run` builds, and an event list where closing one appends "robot.close"."""
    import robodit.control.robots as robots

    built, events, real = [], [], robots.build_robot

    def build(*args, **kwargs):
        robot = real(*args, **kwargs)
        close = robot.close
        robot.close = lambda: (events.append("robot.close"), close())
        built.append(robot)
        return robot

    monkeypatch.setattr(robots, "build_robot", build)
    return built, events


def six_dof(value=(0, 0, 0, 0, 0, 0)):
    policy = ConstantPolicy(list(value))
    policy.obs_shapes = {"state": ((6,), "float32")}
    return policy


def test_a_policy_failure_estops_prints_the_summary_and_exits_nonzero(monkeypatch, capsys, caplog):
    def fail():
        raise ConnectionError("policy server went away")

    rc = run_fake(monkeypatch, CuePolicy([0.1, 0, 0, 0], at=3, cue=fail), "--hz", "50", "--steps", "100")
    out, err = capsys.readouterr()
    assert rc == 2 and "ConnectionError: policy server went away" in err and len(err.strip().splitlines()) == 1
    assert "E-STOP" in caplog.text
    summary = json.loads(out[out.index("{"):])
    assert "went away" in summary["stopped"] and summary["steps"] == 8


def test_sigterm_estops_closes_and_exits_nonzero(monkeypatch, capsys, caplog):
    class Unhandled(Exception):
        pass

    def guard(signum, frame):
        raise Unhandled("SIGTERM reached the test's own handler: robodit run did not handle it")

    built, events = record_robots(monkeypatch)
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        policy = CuePolicy([0.1, 0, 0, 0], at=3, cue=lambda: os.kill(os.getpid(), signal.SIGTERM))
        rc = run_fake(monkeypatch, policy, "--hz", "50", "--steps", "1000")
        assert signal.getsignal(signal.SIGTERM) is guard  # run's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    assert rc == 2 and "SIGTERM" in err and "E-STOP" in caplog.text and '"steps": 8' in out
    assert "SIGTERM" in built[0].stopped and events == ["robot.close"]


def test_an_estop_closes_the_robot_before_waiting_on_a_hung_inference(tmp_path, monkeypatch, capsys):
    """Async: the server hangs, the watchdog e-stops; the robot is closed at once, and closing the policy (for a
    RemotePolicy: dropping the connection) ends the hung request, instead of waiting out its timeout first."""
    release = threading.Event()
    built, events = record_robots(monkeypatch)

    class HungPolicy(CuePolicy):
        def close(self):
            events.append("policy.close")
            release.set()

    cfg = tmp_path / "robot.yaml"
    cfg.write_text("robot: {type: dry_run}\nsafety: {action_low: -1, action_high: 1, "
                   "watchdog: {timeout_ms: 100, on_timeout: stop}}\n")
    t0 = time.monotonic()
    rc = run_fake(monkeypatch, HungPolicy([0.1, 0, 0, 0], at=2, cue=lambda: release.wait(4)), "--strategy", "async",
                  "--hz", "50", "--steps", "1000", robot=cfg)
    assert rc == 2 and "watchdog" in capsys.readouterr().err
    assert events[:2] == ["robot.close", "policy.close"] and time.monotonic() - t0 < 2.5


def test_a_bad_reference_key_is_refused_before_the_robot_moves(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "mdr.yaml"
    cfg.write_text("robot: {type: dry_run}\nsafety: {action_low: -1, action_high: 1, max_delta: 0.5, "
                   "max_delta_reference: {key: joint_pos}}\n")
    built, _ = record_robots(monkeypatch)
    rc = run_fake(monkeypatch, ConstantPolicy([0.1, 0, 0, 0]), robot=cfg)
    assert rc == 2 and "'joint_pos'" in capsys.readouterr().err and not built


def test_dry_run_takes_the_configured_robots_bounds():
    from robodit.control.robots import build_robot, load_robot_config

    cfg = load_robot_config(ROOT / "configs/robot/so101_lerobot.yaml")
    robot = build_robot(cfg, six_dof(), dry_run=True, hz=30)
    try:
        np.testing.assert_allclose(robot.low, [-110, -100, -100, -95, -160, 0])
        np.testing.assert_allclose(robot.high, [110, 100, 100, 95, 160, 100])
        assert robot.spec.max_episode_steps == 900 and robot.spec.control_hz == 30
        robot.reset(seed=0)
        for _ in range(10):  # ramps at max_delta [5, 5, 5, 5, 10, 10] deg per tick, then holds the target
            _, _, _, info = robot.step(np.array([30, 40, 0, 0, 0, 80.0]))
        np.testing.assert_allclose(info["safe_action"], [30, 40, 0, 0, 0, 80])
    finally:
        robot.close()


def test_dry_run_refuses_a_policy_that_does_not_fit_the_configured_robot(monkeypatch, capsys):
    policy = ConstantPolicy([0, 0, 0, 0])
    policy.obs_shapes = {"state": ((6,), "float32")}
    rc = run_fake(monkeypatch, policy, robot="configs/robot/so101_lerobot.yaml")
    assert rc == 2 and "4-d actions" in capsys.readouterr().err


def test_run_passes_the_policy_timeout(monkeypatch, capsys):
    import robodit.deploy.client as remote

    seen = {}

    class Recorder:
        def __init__(self, url, token=None, timeout=30.0):
            seen.update(url=url, timeout=timeout)
            raise remote.RemotePolicyError("no server here")

    monkeypatch.setattr(remote, "RemotePolicy", Recorder)
    rc = main(["run", "--policy", "ws://127.0.0.1:9", "--robot", str(ROOT / "configs/robot/dry_run.yaml"),
               "--dry-run", "--policy-timeout", "2.5"])
    assert rc == 2 and seen["timeout"] == 2.5 and "no server here" in capsys.readouterr().err


def test_a_missing_lerobot_dependency_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "draccus", None)  # `import draccus` fails as if it were not installed
    rc = run_fake(monkeypatch, six_dof(), robot="configs/robot/so101_lerobot.yaml", dry_run=False)
    err = capsys.readouterr().err
    assert rc == 2 and "'draccus'" in err and "pip install" in err and len(err.strip().splitlines()) == 1


def test_run_gives_a_multi_task_policy_its_task_and_instruction(monkeypatch, capsys):
    """`robodit run` passed no goal at all: a multi-task or language policy could not be driven from the CLI."""
    seen = []

    class Recording(ConstantPolicy):
        task_names = ["reach-v3", "push-v3"]

        def predict_action(self, obs, goal=None, generator=None):
            seen.append(goal)
            return super().predict_action(obs, goal=goal, generator=generator)

    rc = run_fake(monkeypatch, Recording([0.0, 0, 0, 0]), "--hz", "50", "--steps", "3", "--goal-task", "push-v3",
                  "--instruction", "push the puck")
    assert rc == 0, capsys.readouterr().err
    assert seen and all(g == {"task": "push-v3", "instruction": "push the puck"} for g in seen)


def test_a_simulators_task_is_the_goal_of_a_policy_that_knows_it():
    from types import SimpleNamespace

    from robodit.control.loop import run_goal

    multi = SimpleNamespace(task_names=["reach-v3", "push-v3"], takes_task=True)
    args = lambda **kw: SimpleNamespace(**{"task": None, "goal_task": None, "instruction": None, **kw})  # noqa: E731
    assert run_goal(args(task="push-v3"), multi) == {"task": "push-v3"}
    assert run_goal(args(task="push-v3"), SimpleNamespace(task_names=["push-v3"], takes_task=False)) is None  # one task
    # goal-conditioned (MDT) on a multi-task store: it reads instructions or goal images, and refuses task ids
    assert run_goal(args(task="push-v3"), SimpleNamespace(task_names=["reach-v3", "push-v3"], takes_task=False)) is None
    assert run_goal(args(task="door-open-v3"), multi) is None  # unknown: the policy's own error says which exist
