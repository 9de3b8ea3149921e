"""CALVIN-style chains: the next subtask's own success check reads the scene state carried from the last one."""

import numpy as np
import pytest
import torch

from robodit.envs import make_env
from robodit.evaluation.chains import LayoutMismatch, carry_state, success_now
from robodit.evaluation.evaluate import run_suite, summarize_chains
from robodit.evaluation.suites import load_suite


@pytest.fixture
def drawer_envs():
    envs = {t: make_env(f"metaworld/{t}") for t in ("drawer-open-v3", "drawer-close-v3")}
    yield envs
    for e in envs.values():
        e.close()


def _joint(env, name):
    return float(env.unwrapped.data.joint(name).qpos[0])


def test_success_check_reads_the_carried_state(drawer_envs):
    opener, closer = drawer_envs["drawer-open-v3"], drawer_envs["drawer-close-v3"]
    # drawer-close's own reset pulls the drawer open: not a success
    closer.reset(seed=5)
    assert not success_now(closer)
    # carry drawer-open's freshly reset scene (drawer closed) into drawer-close: its check passes at once
    opener.reset(seed=5)
    carry_state(opener, closer, seed=5)
    assert success_now(closer)
    assert _joint(closer, "goal_slidey") == _joint(opener, "goal_slidey")
    # open the drawer with the expert, carry it over: now drawer-close sees an open drawer ...
    opener.reset(seed=5)
    for _ in range(300):
        _, success, done, _ = opener.step(opener.expert_action())
        if success or done:
            break
    assert success
    obs = carry_state(opener, closer, seed=5)
    assert not success_now(closer)
    np.testing.assert_array_equal(closer.unwrapped.data.qpos, opener.unwrapped.data.qpos)
    np.testing.assert_allclose(obs["state"][:3], opener.raw_state[:3], atol=1e-6)  # the hand did not move
    # ... and the scene placement is drawer-open's, not drawer-close's own draw for that seed
    np.testing.assert_array_equal(closer.unwrapped.model.body("drawer").pos, opener.unwrapped.model.body("drawer").pos)
    # and closing it (drawer-close's expert, drawer-close's check) succeeds on that carried drawer
    for _ in range(300):
        _, success, done, _ = closer.step(closer.expert_action())
        if success or done:
            break
    assert success and _joint(closer, "goal_slidey") > -0.05


def test_tasks_of_different_scenes_refuse_to_carry(drawer_envs):
    window = make_env("metaworld/window-open-v3")
    try:
        window.reset(seed=1)
        with pytest.raises(LayoutMismatch):
            carry_state(window, drawer_envs["drawer-close-v3"], seed=1)
    finally:
        window.close()


def test_scripted_expert_completes_at_least_4_of_5(tmp_path):
    """One seeded chain per shipped scene (5 chains, in-process); deterministic, so not flaky."""
    suite = load_suite("metaworld_chains")
    suite.chains = len(suite.scenes)
    results, engine = run_suite(suite, None, workers=0, num_envs=5, videos=0, progress=False)
    m = summarize_chains(results, suite)
    assert m["chains"] == len(suite.scenes) and not engine.crashes
    assert all(len(r.successes) <= 5 for r in results)
    assert m["avg_completed"] >= 4.0, m["completed_per_chain"]
    assert m["success_at_length"]["1"]["success_rate"] >= m["success_at_length"]["5"]["success_rate"]


class ExpertBehindThePolicyInterface:
    """A 'policy' that maps (task id, state) to the scripted expert's action: drives chains through the same
    batched policy path a network takes, so the per-subtask goal switch is exercised end to end."""

    name = "expert-policy"
    obs_shapes = {"state": ((39,), "float32")}
    obs_horizon, n_action_steps, device = 1, 1, torch.device("cpu")
    takes_task = True  # reads task ids, as a multi-task family does (make_goal_fn asks)

    def __init__(self, tasks):
        from metaworld.policies import ENV_POLICY_MAP

        self.tasks, self.num_tasks = tasks, len(tasks)
        self.checkpoint_config = {"store": {"tasks": tasks}}
        self.experts = [ENV_POLICY_MAP[t]() for t in tasks]

    def predict_action(self, obs, goal=None, generator=None):
        rows = [self.experts[int(i)].get_action(np.asarray(s[-1], np.float64))
                for s, i in zip(obs["state"], goal["task_id"])]
        return torch.as_tensor(np.stack(rows), dtype=torch.float32)[:, None]


@pytest.mark.filterwarnings("ignore::UserWarning")  # the experts warn when a gain saturates
def test_chain_goals_switch_per_subtask_through_the_policy_path():
    suite = load_suite("metaworld_chains")
    suite.scenes = {k: suite.scenes[k] for k in ("drawer", "window")}
    suite.tasks = [t for t in suite.tasks if any(t.name in c for c in suite.scenes.values())]
    suite.chains = 2
    policy = ExpertBehindThePolicyInterface([t.name for t in suite.tasks])
    results, _ = run_suite(suite, policy, workers=0, num_envs=2, videos=0, progress=False)
    assert [len(r.successes) for r in results] == [5, 5] and all(r.success for r in results)


def test_carried_scene_keeps_the_reset_reward_reference():
    """Meta-World shapes rewards from `init_tcp`; measured from a carried hand sitting on the handle its margin went
    negative and the success check raised (an evaluation chain errored). The reset's reference stays."""
    press, pull = make_env("metaworld/handle-press-v3"), make_env("metaworld/handle-pull-v3")
    try:
        pull.reset(seed=3)
        home = pull.unwrapped.init_tcp.copy()
        press.reset(seed=3)
        for _ in range(300):
            _, success, done, _ = press.step(press.expert_action())
            if success or done:
                break
        assert success and np.abs(press.unwrapped.tcp_center - home).max() > 0.05  # the hand moved off home
        carry_state(press, pull, seed=3)
        np.testing.assert_allclose(pull.unwrapped.init_tcp, home, atol=1e-3)  # the reset hand, settled
        np.testing.assert_allclose(pull.unwrapped.tcp_center, press.unwrapped.tcp_center)
        success_now(pull)
    finally:
        press.close()
        pull.close()
