"""`collect` / `robodit collect`: expert demos into a DemoStore, appends with fresh seeds, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from robodit.cli import main  # noqa: E402
from robodit.datasets.collect import collect  # noqa: E402
from robodit.datasets.store import DemoStore  # noqa: E402
from robodit.envs.metaworld import MetaWorldEnv  # noqa: E402


def test_collect_state_only_then_append(tmp_path):
    out = tmp_path / "reach.zarr"
    summary = collect("metaworld/reach-v3", 2, out, seed=0, progress=False)
    assert summary["kept"] == 2 and summary["seeds"] == [0, 1]
    with DemoStore.open(out) as store:
        assert len(store) == 2 and store.robot == "metaworld_sawyer" and store.fps == pytest.approx(80.0)
        env = store.env
        assert env["name"] == "metaworld/reach-v3" and env["simulator"] == "metaworld"
        assert env["tasks"] == ["reach-v3"] and env["goal_observable"] is True
        assert env["image_size"] == 0 and env["max_episode_steps"] == 500 and env["seeds_used"] == [0, 1]
        assert store.tasks == [{"name": "reach-v3", "instructions": ["reach the goal"]}]
        for i, length in enumerate(summary["episode_lengths"]):
            ep, info = store.episode(i), store.episode_info(i)
            assert info["length"] == length and info["has_language"]
            assert ep["state"].shape == (length, 39) and ep["state"].dtype == np.float32
            assert ep["action"].shape == (length, 4) and np.abs(ep["action"]).max() <= 1.0
            assert ep["state"][:, -3:].any()  # the goal is in the stored state
        first_states = [store.episode(i)["state"][0] for i in range(2)]

    # replaying seed 0's actions from the stored first state reaches success on the last step exactly
    replay = MetaWorldEnv("reach-v3")
    obs = replay.reset(seed=0)
    with DemoStore.open(out) as store:
        ep = store.episode(0)
    np.testing.assert_array_equal(obs["state"], ep["state"][0])
    successes = [replay.step(a)[1] for a in ep["action"]]
    assert successes[-1] and not any(successes[:-1])
    replay.close()

    # same command again: appends new seeds, no duplicated initial states
    again = collect("metaworld/reach-v3", 2, out, seed=0, progress=False)
    assert again["seeds"] == [2, 3] and again["total_episodes"] == 4
    with DemoStore.open(out) as store:
        assert store.env["seeds_used"] == [0, 1, 2, 3]
        firsts = first_states + [store.episode(i)["state"][0] for i in range(2, 4)]
    assert len({f.tobytes() for f in firsts}) == 4


def test_collect_images(tmp_path):
    out = tmp_path / "img.zarr"
    summary = collect("metaworld/reach-v3", 1, out, image_size=32, cameras="corner2", seed=5, progress=False)
    with DemoStore.open(out) as store:
        ep = store.episode(0)
        T = summary["episode_lengths"][0]
        assert ep["image_corner2"].shape == (T, 32, 32, 3) and ep["image_corner2"].dtype == np.uint8
        assert ep["state"].shape == (T, 39)
        assert store.env["cameras"] == ["corner2"] and store.env["image_size"] == 32
        assert ep["image_corner2"].std() > 5  # a rendered scene, not a blank buffer
    # appending with another image size is refused before anything is written
    with pytest.raises(Exception, match="does not match|image_size"):
        collect("metaworld/reach-v3", 1, out, image_size=16, seed=5, progress=False)


def test_collect_gives_up_after_max_attempts(tmp_path):
    out = tmp_path / "short.zarr"
    with pytest.raises(RuntimeError, match="only 0 of 2 episodes succeeded after 3 attempts"):
        collect("metaworld/reach-v3", 2, out, max_steps=2, max_attempts=3, progress=False)
    with DemoStore.open(out) as store:
        assert len(store) == 0 and store.env["seeds_failed"] == [0, 1, 2]


def test_unknown_task_writes_nothing(tmp_path):
    out = tmp_path / "bad.zarr"
    with pytest.raises(ValueError, match="reach-v3"):
        collect("metaworld/reach-v9", 1, out, progress=False)
    with pytest.raises(ValueError, match="metaworld"):
        collect("meta-world/reach-v3", 1, out, progress=False)
    assert not out.exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    rc = main(["collect", "metaworld/reach-v3", "--episodes", "1", "--out", str(out), "--seed", "3"])
    assert rc == 0
    with DemoStore.open(out) as store:
        assert len(store) == 1 and store.env["seeds_used"] == [3]
        # its instruction is embedded, as multi-task collection does (MDT trains on it with no `robodit embed`)
        encoder, table = store.language_embeddings()
        assert encoder == "minilm" and list(table) == ["reach the goal"]
    capsys.readouterr()
    rc = main(["collect", "metaworld/rech-v3", "--episodes", "1", "--out", str(tmp_path / "no.zarr")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown Meta-World task 'rech-v3'" in err and "reach-v3" in err
    assert not (tmp_path / "no.zarr").exists()
