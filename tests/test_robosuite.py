"""robosuite behind the ControlInterface: spec, seeded resets, a flat state the unified adapters read."""

import numpy as np
import pytest

pytest.importorskip("robosuite")

from robodit.action_space import adapter_for
from robodit.envs.robosuite import RobosuiteEnv, check_task


def test_two_arm_lift_spec_seeds_state_and_images():
    env = RobosuiteEnv("TwoArmLift", image_size=32, cameras=("agentview",), max_episode_steps=3)
    try:
        spec = env.spec
        assert spec.action_dim == 14 and spec.robot == "robosuite_two_panda" and spec.control_hz == 20.0
        assert spec.unified_slots == adapter_for("robosuite_two_panda").action_slots
        a, b, c = env.reset(seed=3), env.reset(seed=3), env.reset(seed=4)
        assert np.array_equal(a["state"], b["state"]) and not np.array_equal(a["state"], c["state"])
        assert a["state"].shape == spec.observation["state"].shape and a["image_agentview"].shape == (32, 32, 3)
        raw = env.unwrapped._get_observations(force_update=True)
        unified, mask = adapter_for(spec.robot).state_to_unified(c["state"])
        assert np.allclose(unified[30:33], raw["robot0_eef_pos"]) and np.allclose(unified[80:83], raw["robot1_eef_pos"])
        assert np.allclose(unified[0:7], raw["robot0_joint_pos"]) and mask[33:39].sum() == 0  # rotation unmapped
        for _ in range(3):
            _, success, done, info = env.step(np.zeros(14))
        assert done and not success and info["steps"] == 3
        with pytest.raises(ValueError, match="14 action values"):
            env.step(np.zeros(7))
    finally:
        env.close()


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="TwoArmLift"):
        check_task("TwoArmLfit")


@pytest.mark.parametrize("task", ["Lift", "TwoArmLift"])
def test_scripted_expert_succeeds(task):
    env = RobosuiteEnv(task, max_episode_steps=150)
    try:
        wins = 0
        for seed in range(3):
            env.reset(seed=seed)
            done = success = False
            while not done:
                _, success, done, _ = env.step(env.expert_action())
            wins += success
        assert wins == 3  # 30/30 on seeds 100-129 for both tasks, ~45 / ~55 steps an episode
    finally:
        env.close()


def test_collect_through_the_registry(tmp_path):
    from robodit.datasets.collect import collect
    from robodit.datasets.store import DemoStore
    from robodit.envs import SIMULATORS, register_simulator

    added = "robosuite" not in SIMULATORS  # until robodit/envs/__init__.py registers it
    if added:
        register_simulator("robosuite", "robodit.envs.robosuite:RobosuiteEnv", "robodit.envs.robosuite:check_task")
    try:
        collect("robosuite/Lift", 1, tmp_path / "lift.zarr", max_steps=150, progress=False)
    finally:
        if added:
            SIMULATORS.pop("robosuite")
    with DemoStore.open(tmp_path / "lift.zarr") as store:
        assert store.robot == "robosuite_panda" and len(store) == 1
        assert adapter_for(store.robot).action_dim == store.keys["action"][0][0] == 7


@pytest.mark.slow
def test_handover_expert_succeeds_and_is_reproducible():
    """27/30 on seeds 100-129 (env seed 0); ~200 steps an episode, so a few seeds here (≈ 25 s)."""
    def run(seeds):
        env = RobosuiteEnv("TwoArmHandover", max_episode_steps=300, seed=0)
        try:
            out = []
            for seed in seeds:
                env.reset(seed=seed)
                done = success = False
                while not done:
                    obs, success, done, _ = env.step(env.expert_action())
                out.append((success, env._t, float(obs["state"].sum())))
            return out
        finally:
            env.close()

    first = run(range(100, 105))
    assert sum(s for s, _, _ in first) >= 4
    assert run([100]) == first[:1]  # a fresh env (same seed) replays an episode exactly
