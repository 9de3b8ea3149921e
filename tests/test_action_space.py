"""Unified 128-d action space: exact round trips, masks, and a clear error for robots without an adapter."""

import numpy as np
import pytest
import torch

from robodit.action_space import (
    ADAPTERS,
    SLOTS,
    UNIFIED_DIM,
    adapter_for,
    joint_arm,
    register_adapter,
    slots,
)

DIMS = {"metaworld_sawyer": (4, 4), "robosuite_panda": (7, 21), "robosuite_two_panda": (14, 42),
        "so100_follower": (6, 6), "so101_follower": (6, 6)}


@pytest.mark.parametrize("robot", sorted(ADAPTERS))
def test_every_adapter_round_trips_exactly(robot):
    ad = adapter_for(robot)
    a_dim, s_dim = DIMS[robot]
    assert ad.action_dim == a_dim and len(ad.state_slots) == s_dim
    rng = np.random.default_rng(0)
    action = rng.normal(size=(3, 5, a_dim)).astype(np.float32)
    u, mask = ad.action_to_unified(action)
    assert u.shape == (3, 5, UNIFIED_DIM) and mask.shape == (UNIFIED_DIM,) and mask.sum() == a_dim
    assert np.array_equal(ad.action_from_unified(u), action)
    assert not u[..., mask == 0].any(), "unused slots must be zero, not guessed"
    # torch in, torch out, same numbers
    ut, mt = ad.action_to_unified(torch.from_numpy(action))
    assert torch.equal(ut, torch.from_numpy(u)) and torch.equal(mt, torch.from_numpy(mask))
    assert torch.equal(ad.action_from_unified(ut), torch.from_numpy(action))
    # state: the mapped entries come back exactly
    state = rng.normal(size=(2, max(ad.state_index) + 4)).astype(np.float32)
    su, smask = ad.state_to_unified(state)
    assert np.array_equal(ad.state_from_unified(su), state[:, list(ad.state_index)])
    assert smask.sum() == s_dim and not su[..., smask == 0].any()


def test_layout_matches_the_rdt_table():
    assert SLOTS["right_joint_pos"] == (0, 10) and SLOTS["right_eef_rot6d"] == (33, 39)
    assert SLOTS["left_joint_pos"] == (50, 60) and SLOTS["left_eef_ang_vel"] == (92, 95)
    assert SLOTS["base_lin_vel"] == (100, 102) and SLOTS["base_ang_vel"] == (102, 103)
    mw = adapter_for("metaworld_sawyer")
    assert mw.action_slots == (39, 40, 41, 10)  # EEF delta → linear-velocity slots, gripper → gripper slot
    two = adapter_for("robosuite_two_panda")
    assert two.action_slots[:7] == (39, 40, 41, 42, 43, 44, 10) and two.action_slots[7:] == (89, 90, 91, 92, 93, 94, 60)


def test_unknown_robot_is_named():
    with pytest.raises(ValueError, match="'ur5_gizmo'.*no unified-action-space adapter"):
        adapter_for("ur5_gizmo")
    with pytest.raises(ValueError, match="no robot name"):
        adapter_for(None)
    with pytest.raises(ValueError, match="robosuite_panda actions have 7"):
        adapter_for("robosuite_panda").action_to_unified(np.zeros(4))


def test_register_and_bad_slots():
    register_adapter("Toy_Arm", lambda: joint_arm("toy_arm", 3, gripper=False))
    try:
        assert adapter_for("toy_arm").action_slots == (0, 1, 2)
    finally:
        ADAPTERS.pop("toy_arm")
    with pytest.raises(ValueError, match="holds 10"):
        slots("right_joint_pos", 11)
    with pytest.raises(ValueError, match="distinct"):
        joint_arm("bad", 10).__class__("bad", (0, 0))


def test_unified_layout_splits_state_from_context_and_normalisation_commutes():
    from robodit.action_space import UnifiedLayout

    obs = {"state": ((39,), "float32"), "goal": ((3,), "float32"), "image_cam": ((8, 8, 3), "uint8")}
    lay = UnifiedLayout.build("metaworld_sawyer", obs, "state", context_dim=48)
    assert lay.lowdim == (("goal", 3), ("state", 39)) and lay.context_width == 3 + 35
    rng = np.random.default_rng(0)
    native = {"goal": rng.normal(size=(2, 3)).astype(np.float32), "state": rng.normal(size=(2, 39)).astype(np.float32)}
    state, ctx = lay.state(native), lay.context(native)
    assert np.array_equal(state[:, [30, 31, 32, 10]], native["state"][:, :4])
    assert state[:, lay.state_mask == 0].sum() == 0
    assert np.array_equal(ctx[:, :3], native["goal"]) and np.array_equal(ctx[:, 3:38], native["state"][:, 4:])
    assert not ctx[:, 38:].any()
    assert torch.equal(lay.context({k: torch.from_numpy(v) for k, v in native.items()}), torch.from_numpy(ctx))
    # per-dim affine stats mapped into the layout: normalise-then-scatter == scatter-then-normalise
    stats = {k: (rng.normal(size=v.shape[-1]).astype(np.float32), rng.uniform(0.5, 2, v.shape[-1]).astype(np.float32))
             for k, v in {**native, "action": np.zeros((1, 4))}.items()}
    aff = lay.affine(stats)
    normed = {k: (v - stats[k][0]) / stats[k][1] for k, v in native.items()}
    state_n = (state - aff["state_offset"]) / aff["state_scale"] * lay.state_mask
    assert np.allclose(state_n, lay.state(normed), atol=1e-6)
    assert np.allclose((ctx - aff["context_offset"]) / aff["context_scale"], lay.context(normed), atol=1e-6)
    action = rng.normal(size=(5, 4)).astype(np.float32)
    a_n = (lay.action(action) - aff["action_offset"]) / aff["action_scale"]
    assert np.allclose(a_n, lay.action((action - stats["action"][0]) / stats["action"][1]), atol=1e-6)
    with pytest.raises(ValueError, match="context_dim=16"):
        UnifiedLayout.build("metaworld_sawyer", obs, "state", context_dim=16)
    with pytest.raises(ValueError, match=r"state\[3\].*\(2,\)"):
        UnifiedLayout.build("metaworld_sawyer", {"state": ((2,), "float32")}, "state", context_dim=8)
