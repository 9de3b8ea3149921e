import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from robodit.datasets.sampler import (ResumableBatchSampler, WindowConfig, WindowDataset, batch_shares,
                                      split_episodes)
from robodit.datasets.store import DemoStore
from conftest import make_toy_store


@pytest.mark.parametrize("cache", [True, False])
def test_edges_pad_observations_and_flag_actions(toy_store, cache):
    ds = WindowDataset(toy_store, WindowConfig(obs_horizon=3, action_horizon=8, cache=cache), train=False)
    with DemoStore.open(toy_store) as store:
        ep = store.episode(0)
        n = len(ep["action"])
    first = ds[0]  # frame 0 of episode 0: history repeats frame 0
    assert first["obs.state"].shape == (3, 5) and first["action"].shape == (8, 3)
    for k in range(3):
        np.testing.assert_array_equal(first["obs.state"][k].numpy(), ep["state"][0])
    np.testing.assert_array_equal(first["action"].numpy(), ep["action"][:8])
    assert not first["action_is_pad"].any()
    last = ds[n - 1]  # last frame: actions past the end repeat the last action and are flagged
    np.testing.assert_array_equal(last["obs.state"].numpy(), ep["state"][n - 3:n])
    assert last["action_is_pad"].tolist() == [False] + [True] * 7
    np.testing.assert_array_equal(last["action"][1:].numpy(), np.repeat(ep["action"][-1:], 7, 0))
    second = ds[n]  # first frame of episode 1 never sees episode 0
    with DemoStore.open(toy_store) as store:
        np.testing.assert_array_equal(second["obs.state"][0].numpy(), store.episode(1)["state"][0])
    with DemoStore.open(toy_store) as store:
        assert len(ds) == store.num_frames


def test_split_is_by_episode_and_disjoint():
    train, val = split_episodes(10, 0.2, seed=0)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert split_episodes(1, 0.5, 0)[0].tolist() == [0]


def test_images_are_uint8_chw_and_shift_keeps_shape(tmp_path):
    path = make_toy_store(tmp_path / "img.zarr", episodes=2, image_size=16)
    ds = WindowDataset(path, WindowConfig(obs_horizon=2, action_horizon=4, image_shift=2), train=True)
    x = ds[(5, 7)]["obs.wrist"]
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 16, 16)
    assert torch.equal(x, ds[(5, 7)]["obs.wrist"])  # same seed → same augmentation


def test_batches_are_deterministic_resumable_and_work_with_workers(toy_store):
    ds = WindowDataset(toy_store, WindowConfig(obs_horizon=2, action_horizon=4))
    full = ResumableBatchSampler(len(ds), 8, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(40)]  # crosses an epoch boundary
    resumed = iter(ResumableBatchSampler(len(ds), 8, seed=3, start_batch=25))
    assert [next(resumed) for _ in range(15)] == batches[25:]
    loader = DataLoader(ds, batch_sampler=ResumableBatchSampler(len(ds), 8, seed=3), num_workers=2)
    got = next(iter(loader))
    assert got["obs.state"].shape == (8, 2, 5)
    direct = torch.stack([ds[i]["obs.state"] for i in batches[0]])
    assert torch.equal(got["obs.state"], direct)


def test_ddp_ranks_split_one_global_batch(toy_store):
    ds = WindowDataset(toy_store, WindowConfig())
    single = next(iter(ResumableBatchSampler(len(ds), 8, seed=1)))
    r0 = next(iter(ResumableBatchSampler(len(ds), 4, seed=1, rank=0, world_size=2)))
    r1 = next(iter(ResumableBatchSampler(len(ds), 4, seed=1, rank=1, world_size=2)))
    assert sorted(r0 + r1) == sorted(single)


def test_bad_key_is_named(toy_store):
    with pytest.raises(ValueError, match="nope"):
        WindowDataset(toy_store, WindowConfig(obs_keys=("nope",)))


def test_co_training_batches_hold_a_fixed_share_of_action_windows():
    mask = np.zeros(200, dtype=bool)
    mask[::5] = True  # 20% of windows have actions, as with much action-free video
    full = ResumableBatchSampler(200, 10, seed=4, action_mask=mask, action_fraction=0.5)
    it = iter(full)
    batches = [[i for i, _ in next(it)] for _ in range(12)]
    assert all(mask[b].sum() == 5 for b in batches)  # exactly half of every batch, not ~20%
    seen = sorted({i for b in batches[:8] for i in b if mask[i]})
    assert seen == list(np.flatnonzero(mask))  # 8 batches x 5 = one full pass over the 40 action windows
    resumed = next(iter(ResumableBatchSampler(200, 10, seed=4, start_batch=7, action_mask=mask, action_fraction=0.5)))
    assert [i for i, _ in resumed] == batches[7]  # exact resume
    r0 = next(iter(ResumableBatchSampler(200, 5, seed=4, rank=0, world_size=2, action_mask=mask, action_fraction=0.5)))
    r1 = next(iter(ResumableBatchSampler(200, 5, seed=4, rank=1, world_size=2, action_mask=mask, action_fraction=0.5)))
    assert sorted(i for i, _ in r0 + r1) == sorted(batches[0])  # ranks split the same global batch
    with pytest.raises(ValueError, match="action_fraction"):
        ResumableBatchSampler(200, 10, action_mask=mask, action_fraction=1.5)


def test_language_share_fixes_the_labelled_windows_per_batch_and_mixes_their_order():
    """MDT's separate language loader: a quarter of every batch from the 10% of windows with an instruction,
    and pooled batches shuffled, so a loss on a batch's first samples (mgf_batch) sees both pools."""
    mask = np.zeros(400, dtype=bool)
    mask[::10] = True
    it = iter(ResumableBatchSampler(400, 16, seed=2, language_mask=mask, language_fraction=0.25))
    batches = [[i for i, _ in next(it)] for _ in range(20)]
    assert all(mask[b].sum() == 4 for b in batches)  # not ~1.6 of 16
    assert any(mask[b[:8]].any() for b in batches) and any(not mask[b[:8]].all() for b in batches)
    assert {tuple(np.flatnonzero(mask[b])) for b in batches} != {(0, 1, 2, 3)}  # labelled rows are not always first
    again = next(iter(ResumableBatchSampler(400, 16, seed=2, start_batch=5, language_mask=mask,
                                            language_fraction=0.25)))
    assert [i for i, _ in again] == batches[5]  # exact resume, shuffle included
    with pytest.raises(ValueError, match="no training window's episode carries language"):
        ResumableBatchSampler(400, 16, language_mask=np.zeros(400, bool), language_fraction=0.25)
    with pytest.raises(ValueError, match="cannot be combined"):
        ResumableBatchSampler(400, 16, action_mask=mask, action_fraction=0.5, language_mask=mask,
                              language_fraction=0.25)


def test_store_weights_fix_each_stores_share_of_every_batch():
    groups = np.repeat([0, 1, 2], [150, 40, 10])  # three stores of very different sizes
    full = ResumableBatchSampler(200, 8, seed=1, groups=groups, group_weights=[1, 2, 1])
    it = iter(full)
    batches = [[i for i, _ in next(it)] for _ in range(10)]
    assert all(np.bincount(groups[b], minlength=3).tolist() == [2, 4, 2] for b in batches)
    assert sorted({i for b in batches[:5] for i in b if groups[i] == 2}) == list(range(190, 200))  # small store cycles
    resumed = next(iter(ResumableBatchSampler(200, 8, seed=1, start_batch=6, groups=groups, group_weights=[1, 2, 1])))
    assert [i for i, _ in resumed] == batches[6]
    r0 = next(iter(ResumableBatchSampler(200, 4, seed=1, rank=0, world_size=2, groups=groups, group_weights=[1, 2, 1])))
    r1 = next(iter(ResumableBatchSampler(200, 4, seed=1, rank=1, world_size=2, groups=groups, group_weights=[1, 2, 1])))
    assert sorted(i for i, _ in r0 + r1) == sorted(batches[0])
    skip = next(iter(ResumableBatchSampler(200, 8, groups=groups, group_weights=[1, 0, 3])))
    assert np.bincount(groups[[i for i, _ in skip]], minlength=3).tolist() == [2, 0, 6]  # weight 0 leaves it out
    assert batch_shares([1, 1, 1], 8) == [3, 3, 2] and sum(batch_shares([0.3, 0.7], 7)) == 7


@pytest.mark.parametrize("weights, match", [([1, 1], "2 sampling weights for 3 stores"),
                                            ([1, -1, 1], "finite, >= 0"), ([0, 0, 0], "not all 0"),
                                            ([100, 100, 1], "store 2's weight 1 is less than one window")])
def test_bad_store_weights_are_named(weights, match):
    with pytest.raises(ValueError, match=match):
        ResumableBatchSampler(200, 8, groups=np.repeat([0, 1, 2], [150, 40, 10]), group_weights=weights)


def test_validation_windows_are_fixed_pass_after_pass(tmp_path):
    """Validation reads plain indices (no sampler seed): its goal frames must not change between passes or
    between dataset instances (they were drawn from an unseeded RNG), while training keeps fresh draws."""
    path = make_toy_store(tmp_path / "goal.zarr", episodes=3, length=(40, 60), image_size=8)
    cfg = WindowConfig(obs_horizon=1, action_horizon=4, goal_offsets=(1, 30), image_shift=2)
    val, again = WindowDataset(path, cfg, train=False), WindowDataset(path, cfg, train=False)
    idx = range(0, len(val), 3)
    first = [val[i]["goal.wrist"] for i in idx]
    assert all(torch.equal(a, val[i]["goal.wrist"]) for a, i in zip(first, idx))
    assert all(torch.equal(a, again[i]["goal.wrist"]) for a, i in zip(first, idx))
    train = WindowDataset(path, cfg, train=True)
    assert len({train[0]["goal.wrist"].numpy().tobytes() for _ in range(12)}) > 1


def test_validation_loss_is_the_same_on_every_pass(tmp_path):
    """Trainer.validate promises a fixed subset: two passes over an MDT (goal-image) store, same weights, same
    loss to the bit."""
    from omegaconf import OmegaConf

    from robodit.training.trainer import Trainer
    from test_policy_mdt import LANG, _mdt_store

    path, _ = _mdt_store(tmp_path / "s.zarr", lang_every=2)
    base = OmegaConf.load("configs/train.yaml")
    policy_cfg = dict(OmegaConf.to_container(OmegaConf.load("configs/policy/mdt.yaml")), size="tiny",
                      action_horizon=4, n_action_steps=2, lang_dim=LANG, goal_offsets=[1, 30], mgf_patch=4,
                      mgf_width=32, mgf_depth=1, num_inference_steps=3)
    cfg = OmegaConf.create({
        "out_dir": str(tmp_path / "run"), "policy": policy_cfg, "logger": {"kind": "none"},
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(path),
                        val_fraction=0.5),
        "train": dict(OmegaConf.to_container(base.train), batch_size=8, device="cpu")})
    trainer = Trainer(cfg)
    trainer._build_data()
    torch.manual_seed(0)
    policy = trainer._build_policy()
    passes = [trainer.validate(policy, max_batches=2) for _ in range(3)]
    assert passes[0] == passes[1] == passes[2]
