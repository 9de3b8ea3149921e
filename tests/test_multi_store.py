"""Multi-embodiment training: several stores of different robots → one RDT in the unified 128-d space."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import robodit
from robodit.datasets.multi import build_multi_store, store_paths
from robodit.datasets.sampler import WindowConfig
from robodit.action_space import adapter_for
from robodit.training.checkpoint import read_config, resolve_checkpoint
from robodit.training.trainer import Trainer, train
from conftest import make_toy_store

MW, TWO = "metaworld_sawyer", "robosuite_two_panda"


def _stores(tmp_path):
    a = make_toy_store(tmp_path / "mw.zarr", episodes=3, length=(12, 16), state_dim=39, action_dim=4, robot=MW,
                       fps=80.0, tasks=("reach",))
    b = make_toy_store(tmp_path / "two.zarr", episodes=3, length=(12, 16), state_dim=60, action_dim=14, robot=TWO,
                       fps=20.0, tasks=("lift", "reach"), seed=1)
    return str(a), str(b)


def _policy_cfg(**kw):
    cfg = OmegaConf.to_container(OmegaConf.load("configs/policy/rdt.yaml"))
    return dict(cfg, size="tiny", action_horizon=8, n_action_steps=4, num_inference_steps=2, **kw)


def _cfg(tmp_path, name, dataset, steps=3, **train):
    base = OmegaConf.load("configs/train.yaml")
    return OmegaConf.create({
        "out_dir": str(tmp_path / name), "policy": _policy_cfg(), "logger": {"kind": "none"},
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), **dataset),
        "train": {**OmegaConf.to_container(base.train), "steps": steps, "batch_size": 8, "checkpoint_every": steps,
                  "log_every": 1, "val_every": 0, "warmup_steps": 1, "progress": False, **train}})


def test_samples_of_two_robots_share_one_unified_layout(tmp_path):
    paths = _stores(tmp_path)
    wcfg = WindowConfig(obs_horizon=2, action_horizon=8)
    data = build_multi_store(paths, wcfg, OmegaConf.create({"val_fraction": 0.0}), _policy_cfg(), seed=0)
    ds = data.train_set
    first, last = ds[0], ds[len(ds) - 1]
    for sample, robot, a_dim, ctx in ((first, MW, 4, 35), (last, TWO, 14, 60 - 42)):
        ad = adapter_for(robot)
        assert sample["obs.state"].shape == (2, 128) and sample["obs.context"].shape == (2, 64)
        assert sample["action"].shape == (8, 128) and sample["action_is_pad"].shape == (8,)
        assert torch.equal(sample["action_mask"], torch.as_tensor(ad.action_mask))
        assert torch.equal(sample["state_mask"], torch.as_tensor(ad.state_mask))
        assert not sample["action"][:, ad.action_mask == 0].any()  # nothing outside the robot's slots
        assert sample["obs.context"][:, ctx:].abs().sum() == 0 and sample["obs.context"][:, :ctx].abs().sum() > 0
    assert first["store_id"] == 0 and last["store_id"] == 1
    # values sit in their slots: Meta-World's xyz delta in the EEF-velocity slots, the two-arm's right gripper at 10
    raw = ds.parts[1][len(ds.parts[1]) - 1]
    assert torch.equal(last["action"][:, [39, 40, 41, 10]], raw["action"][:, [0, 1, 2, 6]])
    assert torch.equal(last["obs.state"][:, 80:83], raw["obs.state"][:, 43:46])  # robot1 (left) eef_pos
    # one task table over both stores (by name); per-store stats under <key>@<i>
    assert data.record["tasks"] == ["reach", "lift"] and len(data.record["stores"]) == 2
    assert {"state@0", "action@0", "state@1", "action@1"} <= set(data.normalizer.keys)
    assert data.shape_meta["num_tasks"] == 2 and [s["robot"] for s in data.shape_meta["stores"]] == [MW, TWO]


def test_store_paths_and_errors(tmp_path):
    assert store_paths(OmegaConf.create({"path": "a.zarr", "paths": None})) == ["a.zarr"]
    assert store_paths(OmegaConf.create({"path": None, "paths": ["a", "b"]})) == ["a", "b"]
    with pytest.raises(ValueError, match="dataset.paths"):
        store_paths(OmegaConf.create({"path": None, "paths": None}))
    a, _ = _stores(tmp_path)
    odd = make_toy_store(tmp_path / "odd.zarr", episodes=2, length=(10, 12), robot="ur5_gizmo")
    wcfg = WindowConfig(obs_horizon=2, action_horizon=8)
    dc = OmegaConf.create({"val_fraction": 0.0})
    with pytest.raises(ValueError, match=r"odd\.zarr.*'ur5_gizmo'"):
        build_multi_store([a, str(odd)], wcfg, dc, _policy_cfg(), seed=0)
    dit = {"_target_": "robodit.policies.dit.DiTPolicy"}
    with pytest.raises(ValueError, match="policy=rdt"):
        build_multi_store([a, str(odd)], wcfg, dc, dit, seed=0)
    with pytest.raises(ValueError, match="context_dim=8"):
        build_multi_store([a], wcfg, dc, _policy_cfg(context_dim=8), seed=0)


def test_train_on_two_robots_then_fine_tune_on_one(tmp_path):
    paths = _stores(tmp_path)
    last = train(_cfg(tmp_path, "pre", {"paths": list(paths), "val_fraction": 0.34}, val_every=3))
    cfg = read_config(resolve_checkpoint(last))
    assert [s["robot"] for s in cfg["store"]["stores"]] == [MW, TWO]  # every store recorded
    assert cfg["store"]["env"] == {"name": "toy/none"} and cfg["store"]["tasks"] == ["reach", "lift"]
    policy = robodit.load_policy(last)
    assert policy.robot == MW and policy.control_hz == 80.0
    with torch.no_grad():
        for p in policy.head.parameters():  # make predictions non-zero so units are visible
            torch.nn.init.normal_(p, std=0.5)
    out = policy.predict_action({"state": np.zeros((2, 60), np.float32)}, goal={"task_id": 1})
    assert out.shape == (1, 8, 14) and policy.robot == TWO and policy.control_hz == 20.0  # picked by layout
    assert torch.isfinite(out).all()
    assert policy.predict_action({"state": np.zeros((2, 39), np.float32)}, goal={"task_id": 0}).shape == (1, 8, 4)
    assert policy.select_store(TWO) == 1 and policy.action_dim == 14 and policy.select_store(0) == 0
    with pytest.raises(ValueError, match="no training store matches 'ur5'"):
        policy.select_store("ur5")
    assert policy.task_names == ["reach", "lift"]  # goal={"task": "lift"} is goal={"task_id": 1}
    from robodit.training.info import format_checkpoint, summarize_checkpoint

    text = format_checkpoint(summarize_checkpoint(last))  # every robot's shapes, not only the first store's
    assert "observes state (39,); action (4,)" in text and "observes state (60,); action (14,)" in text

    # fine-tune on the two-arm store alone: same weight shapes, pretrained trunk loaded
    tuned = train(_cfg(tmp_path, "ft", {"path": paths[1]}, steps=1, init_from=str(last), lr=1e-12,
                       warmup_steps=1, ema_decay=0.0))
    before, after = load_file(str(last / "ema.safetensors")), load_file(str(tuned / "model.safetensors"))
    shared = [k for k in after if k in before and not k.startswith("task_embedding")]
    assert len(shared) > 20 and all(torch.allclose(before[k], after[k], atol=1e-5) for k in shared)
    single = robodit.load_policy(tuned)
    assert single.robot == TWO and len(single.layouts) == 1
    assert single.predict_action({"state": np.zeros((2, 60), np.float32)}, goal={"task_id": 0}).shape == (1, 8, 14)


def test_store_weights_set_each_robots_share_of_a_batch(tmp_path):
    paths = _stores(tmp_path)
    trainer = Trainer(_cfg(tmp_path, "w", {"paths": list(paths), "weights": [1, 3]}))
    trainer._build_data()
    batch = next(iter(trainer._build_loader(0)))
    assert torch.bincount(batch["store_id"], minlength=2).tolist() == [2, 6]  # batch 8 split 1:3
    assert train(_cfg(tmp_path, "run", {"paths": list(paths), "weights": [1, 3]}, steps=2)) is not None
    single = Trainer(_cfg(tmp_path, "one", {"path": paths[0], "weights": [1]}))
    single._build_data()
    with pytest.raises(ValueError, match="dataset.weights needs several stores"):
        single._build_loader(0)
    bad = Trainer(_cfg(tmp_path, "bad", {"paths": list(paths), "weights": [1, 1, 1]}))
    bad._build_data()
    with pytest.raises(ValueError, match="3 sampling weights for 2 stores"):
        bad._build_loader(0)


def test_record_for_env_picks_the_store():
    from robodit.datasets.multi import record_for_env

    rec = {"env": {"name": "metaworld/reach-v3"}, "stores": [{"env": {"name": "metaworld/reach-v3"}},
                                                            {"env": {"name": "robosuite/Lift", "tasks": ["Lift"]}}]}
    assert record_for_env(rec, "robosuite/Lift")["env"]["tasks"] == ["Lift"]
    assert record_for_env(rec, None) is rec and record_for_env({"env": {}}, "robosuite/Lift") == {"env": {}}


def test_eval_builds_the_env_of_the_store_it_is_asked_for():
    """A multi-store checkpoint evaluated with env=<store 1's env> gets store 1's env kwargs, not store 0's."""
    from types import SimpleNamespace

    from robodit.evaluation.evaluate import _store_record

    s0 = {"env": {"name": "metaworld/reach-v3", "goal_observable": True}, "robot": "metaworld_sawyer"}
    s1 = {"env": {"name": "robosuite/TwoArmLift", "max_episode_steps": 300}, "robot": "robosuite_two_panda"}
    policy = SimpleNamespace(checkpoint_config={"store": {**s0, "tasks": ["reach-v3", "TwoArmLift"], "stores": [s0, s1]}})
    assert _store_record(policy, "robosuite/TwoArmLift")["env"] == s1["env"]
    assert _store_record(policy, None)["env"] == s0["env"]  # default: store 0
    assert _store_record(policy, "metaworld/drawer-open-v3")["env"] == s0["env"]


def test_eval_env_on_a_one_store_rdt_selects_nothing():
    """`eval.py env=robosuite/TwoArmLift` on an RDT fine-tuned on that one store failed: 'no training store
    matches'. Only a policy of several stores has one to select."""
    from types import SimpleNamespace

    from robodit.evaluation.evaluate import select_store_for_env

    picked = []
    one = SimpleNamespace(store_names=["the store"], select_store=lambda e: 1 / 0)
    select_store_for_env(one, "robosuite/TwoArmLift", {"name": "robosuite/TwoArmLift"})
    two = SimpleNamespace(store_names=["a", "b"], select_store=picked.append)
    select_store_for_env(two, "robosuite/TwoArmLift", {"name": "robosuite/TwoArmLift"})
    assert picked == ["robosuite/TwoArmLift"]


def test_tasks_held_only_as_action_free_video_are_not_evaluated_by_default(tmp_path):
    from types import SimpleNamespace

    from robodit.datasets.multi import store_record
    from robodit.datasets.store import DemoStore
    from robodit.evaluation.evaluate import resolve_suite, training_overlap
    from robodit.evaluation.suites import suite_from_tasks

    store = DemoStore.create(tmp_path / "s.zarr", {"state": ((2,), "float32"), "action": ((1,), "float32")},
                             fps=10, robot="toy", env={"name": "metaworld/reach-v3",
                                                       "tasks": ["reach-v3", "drawer-close-v3"]})
    with store:
        ep = {"state": np.zeros((4, 2), np.float32), "action": np.zeros((4, 1), np.float32)}
        store.append_episode(ep, task="reach-v3")
        store.append_episode({"state": ep["state"]}, task="drawer-close-v3", has_actions=False)
        record = store_record(tmp_path / "s.zarr", store)
    assert record["tasks_without_actions"] == ["drawer-close-v3"]
    policy = SimpleNamespace(checkpoint_config={"store": record}, checkpoint_dir=tmp_path)
    assert [t.name for t in resolve_suite(policy, episodes=1).tasks] == ["reach-v3"]  # was both
    asked = suite_from_tasks("metaworld", ["drawer-close-v3"], 1, 100_000)
    assert training_overlap(asked, record["env"], policy)["untrained_tasks"] == ["drawer-close-v3"]
