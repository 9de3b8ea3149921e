"""MetaWorldEnv: spec/obs agreement, seeded resets, upright images, the expert, and name errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from robodit.envs import make_env  # noqa: E402
from robodit.envs.metaworld import MetaWorldEnv, task_instruction  # noqa: E402
from robodit.envs.metaworld_chains import carry_state  # noqa: E402


@pytest.fixture(scope="module")
def env():
    e = MetaWorldEnv("reach-v3", image_size=32, cameras=("corner2", "corner"), seed=0)
    yield e
    e.close()


def _check_obs(obs, spec):
    assert set(obs) == set(spec.observation)
    for k, s in spec.observation.items():
        assert obs[k].shape == s.shape and obs[k].dtype == np.dtype(s.dtype), k


def test_spec_and_shapes(env):
    spec = env.spec
    assert spec.action_dim == 4 and spec.robot == "metaworld_sawyer"
    assert spec.control_hz == pytest.approx(80.0)  # timestep 0.0025 s x frame_skip 5
    assert spec.max_episode_steps == 500
    np.testing.assert_array_equal(spec.action_low, -1)
    np.testing.assert_array_equal(spec.action_high, 1)
    assert spec.observation["state"].shape == (39,)
    assert spec.observation["image_corner2"].shape == (32, 32, 3)
    obs = env.reset(seed=1)
    _check_obs(obs, spec)
    obs, success, done, info = env.step(np.array([5.0, 0, 0, -3.0]))  # out of bounds: clipped
    _check_obs(obs, spec)
    assert isinstance(success, bool) and isinstance(done, bool)
    np.testing.assert_array_equal(info["action"], [1, 0, 0, -1])
    frame = env.render()
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8


def test_seeded_reset(env):
    a = env.reset(seed=7)
    for _ in range(3):
        env.step(env.expert_action())
    b = env.reset(seed=8)
    c = env.reset(seed=7)
    np.testing.assert_array_equal(a["state"], c["state"])
    np.testing.assert_array_equal(a["image_corner2"], c["image_corner2"])
    assert not np.array_equal(a["state"][-3:], b["state"][-3:])  # another goal position


def test_goal_observable_and_expert_succeeds():
    env = MetaWorldEnv("reach-v3", seed=0)
    obs = env.reset(seed=3)
    np.testing.assert_allclose(obs["state"][-3:], env.unwrapped._target_pos, atol=1e-6)
    for _ in range(env.spec.max_episode_steps):
        obs, success, done, _ = env.step(env.expert_action())
        if done:
            break
    assert success and env._t < 150

    hidden = MetaWorldEnv("reach-v3", seed=0, goal_observable=False, max_episode_steps=150)
    obs = hidden.reset(seed=3)
    assert not obs["state"][-3:].any()
    for _ in range(150):  # the expert still gets the true goal
        obs, success, done, _ = hidden.step(hidden.expert_action(obs))
        if done:
            break
    assert success
    env.close()
    hidden.close()


def test_handle_pull_expert_lifts_the_handle_in_one_motion():
    """Meta-World's own handle-pull expert steers all axes to a scalar and ratchets the handle up in 3-5 lurches
    (90-126 steps from these resets); the replacement lifts it once, from a reset and after handle-press."""
    env = MetaWorldEnv("handle-pull-v3", seed=0, max_episode_steps=300)
    press = MetaWorldEnv("handle-press-v3", seed=0, max_episode_steps=300)
    try:
        for seed in range(4):
            env.reset(seed=seed)
            steps = _run_expert(env)
            assert steps is not None and steps < 80, (seed, steps)
            press.reset(seed=seed)
            assert _run_expert(press) is not None
            carry_state(press, env, seed)  # the handle pushed down, the hand left on it
            steps = _run_expert(env)
            assert steps is not None and steps < 100, (seed, steps)
    finally:
        env.close()
        press.close()


def _run_expert(env) -> int | None:
    """Steps the expert takes to succeed, None when it runs out."""
    for t in range(env.spec.max_episode_steps):
        _, success, done, _ = env.step(env.expert_action())
        if success:
            return t + 1
        if done:
            return None
    return None


def test_max_steps_override_and_task_switch():
    env = MetaWorldEnv("reach-v3", max_episode_steps=3)
    env.reset(seed=0)
    dones = [env.step(np.zeros(4))[2] for _ in range(3)]
    assert dones == [False, False, True]
    obs = env.reset(task="drawer-open-v3", seed=0)
    assert env.task == "drawer-open-v3" and obs["state"].shape == (39,)
    assert env.config()["tasks"] == ["drawer-open-v3"]
    env.close()


def _project_upright(model, data, cam_id, point, size):
    """Pixel (row, col) of a world point in an upright, unmirrored pinhole view from the camera's pose."""
    pos, rot = data.cam_xpos[cam_id], data.cam_xmat[cam_id].reshape(3, 3)
    view = -rot[:, 2]  # MuJoCo cameras look along -z
    right = np.cross(view, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, view)
    v = point - pos
    f = size / 2 / np.tan(np.deg2rad(model.cam_fovy[cam_id]) / 2)
    depth = v @ view
    return size / 2 - f * (v @ up) / depth - 0.5, size / 2 + f * (v @ right) / depth - 0.5


@pytest.mark.parametrize("camera", ["corner2", "behindGripper"])
def test_images_upright(env, camera):
    """Place the puck at two table spots; its pixels must sit where an upright camera projects it.

    A vertical flip or a left-right mirror moves the puck by many pixels, so either would fail.
    """
    import mujoco

    env.reset(seed=0)
    mw = env.unwrapped
    model, data, size = mw.model, mw.data, 160
    renderer = env._renderer
    cam_id = renderer.camera_id(camera)
    geoms = [g for g in range(model.ngeom) if model.geom_bodyid[g] == model.body("obj").id]
    for xy in [(-0.15, 0.55), (0.15, 0.8)]:
        mw._set_obj_xyz(np.array([xy[0], xy[1], 0.02]))
        mujoco.mj_forward(model, data)
        seg = renderer.render(camera, size, segmentation=True)
        mask = np.isin(seg[..., 0], geoms) & (seg[..., 1] == mujoco.mjtObj.mjOBJ_GEOM)
        assert mask.sum() > 8, "puck not visible"
        rows, cols = np.nonzero(mask)
        row, col = _project_upright(model, data, cam_id, data.xpos[model.body("obj").id], size)
        assert abs(rows.mean() - row) < 4 and abs(cols.mean() - col) < 4, (rows.mean(), row, cols.mean(), col)
        # the check can tell: the flipped / mirrored positions are far from the projection
        assert abs((size - 1 - rows.mean()) - row) > 10 or abs((size - 1 - cols.mean()) - col) > 10
    # the RGB frame takes the same orientation as the segmentation frame
    rgb = renderer.render(camera, size)
    assert rgb.shape == (size, size, 3) and rgb.dtype == np.uint8


def test_unknown_names_suggest():
    with pytest.raises(ValueError, match="reach-v3"):
        make_env("metaworld/reach-v2")
    with pytest.raises(ValueError, match="metaworld"):
        make_env("metawrld/reach-v3")
    with pytest.raises(ValueError, match="unknown camera"):
        MetaWorldEnv("reach-v3", image_size=16, cameras=("nope",))


def test_instructions():
    assert task_instruction("reach-v3") == "reach the goal"
    assert task_instruction("drawer-open-v3") == "open the drawer"
    assert task_instruction("cabinet-open-v3") == "open the cabinet"  # fallback template


def test_culling_geoms_outside_the_view_changes_no_pixel(env):
    """The fast renderer drops geoms outside a camera's frustum before drawing: the frames must not change."""
    from robodit.envs.rendering import FastRenderer

    env.reset(seed=3)
    m, d = env.unwrapped.model, env.unwrapped.data
    culled, full = FastRenderer(m, d, cull=True), FastRenderer(m, d, cull=False)
    try:
        for cam in ("corner2", "topview", "gripperPOV", "behindGripper"):
            assert np.array_equal(culled.render(cam, 64), full.render(cam, 64)), cam
    finally:
        culled.close()
        full.close()


def test_env_close_releases_renderer_before_simulator_and_twice_is_harmless():
    """Every simulator env closes through `envs.base.release`: renderer first (it draws the simulator's model),
    then the simulator; a second close() (the context manager after an explicit close) does nothing."""
    from robodit.envs.base import release

    closed = []

    class Resource:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    class Env:
        _renderer, _env = Resource("renderer"), Resource("simulator")

    env = Env()
    release(env, "_renderer", "_env")
    release(env, "_renderer", "_env", "_never_built")
    assert closed == ["renderer", "simulator"] and env._renderer is None and env._env is None
