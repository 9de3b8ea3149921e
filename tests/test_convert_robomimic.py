"""robomimic HDF5 -> DemoStore: a file in the robomimic layout (written here with h5py) round-trips."""

import json

import numpy as np
import pytest

from robodit.cli import main as cli_main
from robodit.datasets.convert import ConvertError, convert_robomimic
from robodit.datasets.store import DemoStore

h5py = pytest.importorskip("h5py", reason="pip install 'robodit[convert]'")
QUIET = dict(progress=False, log=lambda m: None)


def _write(path, lengths=(7, 5, 9), language=None):
    """demo_N groups out of order (demo_10 sorts after demo_2), float64 low-dim obs, uint8 images."""
    rng = np.random.default_rng(0)
    want = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1,
                                             "env_kwargs": {"robots": ["Panda"], "control_freq": 20}})
        if language:
            data.attrs["problem_info"] = json.dumps({"language_instruction": language})
        for idx, n in zip((0, 10, 2), lengths):
            g = data.create_group(f"demo_{idx}")
            g.attrs["num_samples"] = n
            arrays = {"actions": rng.uniform(-1, 1, (n, 7)),
                      "obs/robot0_eef_pos": rng.normal(size=(n, 3)),
                      "obs/robot0_gripper_qpos": rng.normal(size=(n, 2)).astype(np.float32),
                      "obs/agentview_image": rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                      "states": rng.normal(size=(n, 32)), "rewards": np.zeros(n), "dones": np.zeros(n, np.int64)}
            for k, v in arrays.items():
                g.create_dataset(k, data=v)
            want[idx] = arrays
        mask = f.create_group("mask")
        mask.create_dataset("train", data=np.array([b"demo_0", b"demo_10"]))
        mask.create_dataset("valid", data=np.array([b"demo_2"]))
    return want


def test_roundtrip_order_keys_and_resume(tmp_path):
    want = _write(tmp_path / "lift.hdf5", language="lift the cube")
    lines = []
    s = convert_robomimic(tmp_path / "lift.hdf5", tmp_path / "s.zarr", limit=2, progress=False, log=lines.append)
    text = "\n".join(lines)
    assert "obs/agentview_image      ->  image_agentview" in text and "not stored: dones, rewards, states" in text
    assert s["remaining"] == 1
    assert convert_robomimic(tmp_path / "lift.hdf5", tmp_path / "s.zarr", **QUIET)["converted"] == 1
    store = DemoStore.open(tmp_path / "s.zarr")
    assert sorted(store.keys) == ["action", "image_agentview", "robot0_eef_pos", "robot0_gripper_qpos"]
    assert (store.robot, store.fps, len(store)) == ("Panda", 20.0, 3)
    for e, idx in enumerate((0, 2, 10)):  # numeric demo order
        ep, src = store.episode(e), want[idx]
        np.testing.assert_array_equal(ep["action"], src["actions"].astype(np.float32))
        np.testing.assert_array_equal(ep["robot0_eef_pos"], src["obs/robot0_eef_pos"].astype(np.float32))
        np.testing.assert_array_equal(ep["robot0_gripper_qpos"], src["obs/robot0_gripper_qpos"])
        np.testing.assert_array_equal(ep["image_agentview"], src["obs/agentview_image"])
        info = store.episode_info(e)
        assert (info["task"], info["instruction"]) == ("Lift", "lift the cube")
    assert store.env["converted_from"][0]["episodes"] == [[0, 1], [2, 3], [10, 11]]


def test_filter_map_and_cli(tmp_path, capsys):
    want = _write(tmp_path / "lift.hdf5")
    out = tmp_path / "s.zarr"
    argv = ["convert", "robomimic", str(tmp_path / "lift.hdf5"), "--out", str(out), "--filter", "train",
            "--map", "reward=rewards", "--drop", "obs/agentview_image"]
    assert cli_main(argv) == 0
    store = DemoStore.open(out)
    assert len(store) == 2 and "reward" in store.keys and "image_agentview" not in store.keys
    assert store.episode_info(0)["instruction"] is None and store.episode_info(0)["task"] == "Lift"
    np.testing.assert_array_equal(store.episode(1)["reward"][:, 0], want[10]["rewards"])
    assert cli_main(argv[:5] + ["--filter", "nope"]) == 2
    assert "no filter 'mask/nope' (filters: ['train', 'valid'])" in capsys.readouterr().err


def test_bad_files_are_named(tmp_path):
    _write(tmp_path / "lift.hdf5", lengths=(7, 5, 9))
    with h5py.File(tmp_path / "lift.hdf5", "a") as f:
        f["data/demo_2"].attrs["num_samples"] = 6  # disagrees with its arrays
    with pytest.raises(ConvertError, match=r"lift.hdf5:/data/demo_2: num_samples is 6 but"):
        convert_robomimic(tmp_path / "lift.hdf5", tmp_path / "a.zarr", **QUIET)
    assert len(DemoStore.open(tmp_path / "a.zarr")) == 1  # the good demo before it is kept
    _write(tmp_path / "lift2.hdf5")
    with h5py.File(tmp_path / "lift2.hdf5", "a") as f:
        del f["data/demo_10/actions"]
    with pytest.raises(ConvertError, match=r"lift2.hdf5:/data/demo_10/actions: dataset missing"):
        convert_robomimic(tmp_path / "lift2.hdf5", tmp_path / "b.zarr", **QUIET)
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(ConvertError, match="not a readable HDF5 file"):
        convert_robomimic(tmp_path / "junk.hdf5", tmp_path / "c.zarr", **QUIET)


def test_skip_bad_leaves_out_a_corrupt_demo_and_goes_on(tmp_path):
    want = _write(tmp_path / "lift.hdf5")
    with h5py.File(tmp_path / "lift.hdf5", "a") as f:
        f["data/demo_2/actions"][3, 1] = np.nan  # the middle demo (numeric order 0, 2, 10) is corrupt
    with pytest.raises(ConvertError, match="episode 2, feature 'actions': non-finite value"):
        convert_robomimic(tmp_path / "lift.hdf5", tmp_path / "a.zarr", **QUIET)
    lines = []
    s = convert_robomimic(tmp_path / "lift.hdf5", tmp_path / "b.zarr", skip_bad=True, progress=False,
                          log=lines.append)
    assert s["converted"] == 2 and [r["episode"] for r in s["rejected"]] == [2]
    assert "non-finite value (NaN/inf) at frame 3" in s["rejected"][0]["error"]
    assert "1 bad episode(s) left out: 2" in lines[-1]
    store = DemoStore.open(tmp_path / "b.zarr")
    assert len(store) == 2
    np.testing.assert_array_equal(store.episode(1)["action"], want[10]["actions"].astype(np.float32))
    assert cli_main(["convert", "robomimic", str(tmp_path / "lift.hdf5"), "--out", str(tmp_path / "c.zarr"),
                     "--skip-bad"]) == 0
    assert len(DemoStore.open(tmp_path / "c.zarr")) == 2
