"""Chain collection (`robodit collect metaworld/chains`): segments continue one scene, chains stay whole through a
kill, seeds stay clear of the chain suite's, and a store of chains is split for validation by whole chains."""

import numpy as np
import pytest

from robodit.datasets.collect_chains import chain_count, collect_chains
from robodit.datasets.sampler import split_episodes, store_split_groups
from robodit.datasets.store import DemoStore
from robodit.envs import make_env
from robodit.envs.metaworld_chains import carry_state
from robodit.evaluation.suites import load_suite

SUITE = load_suite("metaworld_chains")
DRAWER = {"drawer": SUITE.scenes["drawer"]}


def _collect(path, chains, length=3, **kw):
    return collect_chains(DRAWER, chains, length, path, eval_seed=SUITE.seed, instructions=SUITE.instructions,
                          max_steps=SUITE.max_steps, progress=False, **kw)


def _chains(store):
    """{chain id: [episode indices in position order]}"""
    out = {}
    for i in range(len(store)):
        info = store.episode_info(i)
        out.setdefault(info["chain"], []).append((info["chain_pos"], i))
    return {c: [i for _, i in sorted(v)] for c, v in out.items()}


def test_segments_start_from_the_state_the_previous_subtask_left(tmp_path):
    path = tmp_path / "chains.zarr"
    summary = _collect(path, 2, language_fraction=0.5)
    store = DemoStore.open(path)
    assert chain_count(store) == 2 and summary["chains"] == 2
    assert store.env["name"] == "metaworld/chains" and store.env["chains"]["scenes"] == DRAWER
    envs = {t: make_env(f"metaworld/{t}", max_episode_steps=SUITE.max_steps) for t in DRAWER["drawer"]}
    try:
        for seed, episodes in _chains(store).items():
            infos = [store.episode_info(i) for i in episodes]
            assert [i["chain_pos"] for i in infos] == list(range(len(infos)))
            tasks = [i["task"] for i in infos]
            assert all(a != b for a, b in zip(tasks, tasks[1:]))  # open, close, open: the scene's cycle
            for info in infos:
                if info["has_language"]:
                    assert SUITE.instructions[info["task"]] in info["instruction"]
            # replay from the chain's one reset: each segment's actions reproduce its states, and the next segment
            # starts exactly where they left the scene (carried, not reset)
            env = envs[tasks[0]]
            obs = env.reset(seed=seed)
            for k, i in enumerate(episodes):
                ep = store.episode(i)
                if k:
                    nxt = envs[tasks[k]]
                    fresh = nxt.reset(seed=seed)["state"]
                    obs = carry_state(env, nxt, seed)
                    env = nxt
                    np.testing.assert_array_equal(ep["state"][0], obs["state"])
                    assert np.abs(fresh[:3] - ep["state"][0, :3]).max() > 1e-3  # not task k's own reset
                    assert np.abs(end_hand - ep["state"][0, :3]).max() < 1e-6  # the hand stayed put
                for t in range(len(ep["action"])):
                    np.testing.assert_allclose(ep["state"][t], obs["state"], atol=1e-6)
                    obs, success, _, _ = env.step(ep["action"][t])
                assert success  # each stored segment ends at its subtask's success
                end_hand = obs["state"][:3].copy()
    finally:
        for e in envs.values():
            e.close()
    # a chain's segments stay on one side of the validation split
    groups = store_split_groups(store)
    train, val = split_episodes(len(store), 0.5, seed=0, groups=groups)
    assert len(train) and len(val)
    for eps in _chains(store).values():
        assert set(eps) <= set(train) or set(eps) <= set(val)


class _Kill(BaseException):
    """Stands for SIGKILL: nothing after it runs (BaseException skips `except Exception` handlers)."""


def test_killed_chain_collection_keeps_whole_chains_and_resumes(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    ref = tmp_path / "ref.zarr"
    _collect(ref, 3)
    with DemoStore.open(ref) as store:
        want = {c: [store.episode(i)["state"] for i in eps] for c, eps in _chains(store).items()}

    # kill the second chain's append after a few object writes: data written, commit not
    path = tmp_path / "killed.zarr"
    real_set, real_append = LocalStore.set, DemoStore.append_episodes
    budget, calls = [10**9], [0]

    async def counted_set(self, *args, **kw):
        budget[0] -= 1
        if budget[0] < 0:
            raise _Kill
        return await real_set(self, *args, **kw)

    def append(self, episodes):
        calls[0] += 1
        if calls[0] == 2:
            budget[0] = 4
        return real_append(self, episodes)

    monkeypatch.setattr(LocalStore, "set", counted_set)
    monkeypatch.setattr(DemoStore, "append_episodes", append)
    with pytest.raises(_Kill):
        _collect(path, 3)
    monkeypatch.undo()
    with DemoStore.open(path) as store:
        chains = _chains(store)
        assert len(chains) == 1  # the first chain, whole; nothing of the killed one
        (c, eps), = chains.items()
        assert len(eps) == len(want[c]) and all(np.array_equal(store.episode(i)["state"], s)
                                                for i, s in zip(eps, want[c]))
    # the same command again: resumes to 3 chains, each whole and exactly as an uninterrupted run stores it (the
    # killed chain's seed was never committed, so it is collected again from the start)
    summary = _collect(path, 3)
    assert summary["chains"] == 3 and summary["new_chains"] == 2
    with DemoStore.open(path) as store:
        chains = _chains(store)
        assert sorted(chains) == sorted(want)
        for c, eps in chains.items():
            assert [store.episode_info(i)["chain_pos"] for i in eps] == list(range(len(eps)))
            assert {store.episode_info(i)["seed"] for i in eps} == {c}
            assert len(eps) == len(want[c])
            assert all(np.array_equal(store.episode(i)["state"], s) for i, s in zip(eps, want[c]))
    assert _collect(path, 3)["new_chains"] == 0  # complete: nothing more to do


def test_chain_seeds_stay_below_the_evaluation_seeds(tmp_path):
    with pytest.raises(ValueError, match="evaluation seeds"):
        _collect(tmp_path / "x.zarr", 1, seed=SUITE.seed)
    assert not (tmp_path / "x.zarr").exists()


def test_split_without_chains_is_unchanged():
    assert [a.tolist() for a in split_episodes(10, 0.2, 0)] == [a.tolist() for a in split_episodes(10, 0.2, 0, None)]
    train, val = split_episodes(6, 0.5, 0, groups=np.array([7, 7, 7, 9, 9, 9]))
    assert sorted([train.tolist(), val.tolist()]) == [[0, 1, 2], [3, 4, 5]]


def test_cli_collects_chains_without_a_camera_option(tmp_path):
    """`robodit collect metaworld/chains` with no --cameras (as the docs show it) crashed on cameras=None."""
    from robodit.cli import main

    path = tmp_path / "c.zarr"
    assert main(["collect", "metaworld/chains", "--chains", "1", "--chain-length", "2", "--scenes", "drawer",
                 "--out", str(path), "--language-encoder", ""]) == 0
    store = DemoStore.open(path)
    assert chain_count(store) == 1 and len(store) == 2 and "image_corner2" not in store.keys
