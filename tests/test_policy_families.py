"""What every policy family promises alike: cameras found by dtype/shape whatever their names."""

import re

import numpy as np
import pytest
import torch
from conftest import CAMERAS, make_toy_store

from robodit.datasets.normalizer import Normalizer, compute_stats
from robodit.datasets.sampler import WindowConfig, WindowDataset
from robodit.datasets.store import DemoStore
from robodit.policies.dit import DiTPolicy
from robodit.policies.mdt import MDTPolicy
from robodit.policies.mode import MoDEPolicy
from robodit.policies.pad import PADPolicy
from robodit.policies.rdt import RDTPolicy
from robodit.training.trainer import shape_meta_from_store

FAMILIES = {"dit": DiTPolicy, "mdt": MDTPolicy, "mode": MoDEPolicy, "pad": PADPolicy, "rdt": RDTPolicy}
TINY = {"dit": {}, "mode": {}, "rdt": {"robot": "metaworld_sawyer"},
        "pad": {"image_size": 16, "patch_size": 8, "future_frames": 1, "future_stride": 2},
        "mdt": {"language_encoder": None, "goal_offsets": (2, 4), "future_stride": 2, "mgf_patch": 8,
                "mgf_width": 32, "mgf_depth": 1}}


@pytest.fixture(scope="module")
def camera_store(tmp_path_factory):
    """Cameras named `wrist` and `agentview_image` (neither starts with `image`), a Sawyer-sized state for RDT."""
    return make_toy_store(tmp_path_factory.mktemp("cams") / "s.zarr", episodes=2, length=(12, 14), state_dim=39,
                          action_dim=4, image_size=16, robot="metaworld_sawyer", fps=80.0)


def _tiny(family, store_path):
    with DemoStore.open(store_path) as store:
        keys = ("state", *CAMERAS)
        meta = shape_meta_from_store(store, keys)
        normalizer = Normalizer(compute_stats(store, ["state", "action"]))
    torch.manual_seed(0)
    return FAMILIES[family](meta, normalizer, size="tiny", obs_horizon=1, action_horizon=4, n_action_steps=2,
                            num_inference_steps=2, **TINY[family])


def _batch(policy, store_path, n=4):
    cfg = WindowConfig(obs_horizon=policy.obs_horizon, action_horizon=policy.action_horizon, image_shift=0,
                       future_frames=getattr(policy, "future_frames", 0),
                       future_stride=getattr(policy, "future_stride", 1),
                       goal_offsets=getattr(policy, "goal_offsets", None))
    data = WindowDataset(store_path, cfg, train=False)
    items = [data[(i, i)] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize("family", FAMILIES)
def test_cameras_are_found_by_dtype_and_shape_not_by_name(family, camera_store):
    """RDT kept only keys starting with `image` and failed on a `wrist` camera (KeyError); every family now trains
    and acts on cameras named anything, and each camera reaches the action."""
    policy = _tiny(family, camera_store)
    loss = policy.compute_loss(_batch(policy, camera_store))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    with torch.no_grad():  # leave the zero-initialised heads and gates: a fresh net ignores every input
        for p in policy.parameters():
            p.add_(0.03 * torch.randn_like(p))
    policy.eval()
    rng = np.random.default_rng(0)
    obs = {"state": rng.normal(size=(1, 39)).astype(np.float32),
           **{k: rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8) for k in CAMERAS}}
    goal = {k: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for k in CAMERAS} if family == "mdt" else None
    act = lambda o: policy.predict_action(o, goal, generator=torch.Generator().manual_seed(0))  # noqa: E731
    base = act(obs)
    assert base.shape == (1, 4, 4) and torch.isfinite(base).all()
    for cam in CAMERAS:
        assert not torch.allclose(act({**obs, cam: 255 - obs[cam]}), base), f"{family} ignores camera {cam!r}"


# -- one path from goal to condition (Policy.resolve_goal) --------------------------------------------------------
TASKS = ["reach-v3", "push-v3", "drawer-open-v3"]
GOAL_KEYS = {  # on a three-task store, without / with a language encoder
    "dit": (["task", "task_id"], ["task", "task_id"]),
    "mode": (["task", "task_id"], ["task", "task_id"]),
    "pad": (["task", "task_id"], ["task", "task_id", "instruction", "lang_emb", "has_lang"]),
    "rdt": (["task", "task_id", "lang_emb", "has_lang"], ["task", "task_id", "instruction", "lang_emb", "has_lang"]),
    "mdt": (["lang_emb", "has_lang", *sorted(CAMERAS), "no_goal"],
            ["instruction", "lang_emb", "has_lang", *sorted(CAMERAS), "no_goal"]),
}


def _multi_task(family, store_path, language):
    with DemoStore.open(store_path) as store:
        meta = dict(shape_meta_from_store(store, ("state", *CAMERAS)), num_tasks=len(TASKS))
        normalizer = Normalizer(compute_stats(store, ["state", "action"]))
    torch.manual_seed(0)
    extra = {**TINY[family], **({"language_encoder": "minilm"} if language and family != "dit"
                                and family != "mode" else {})}
    policy = FAMILIES[family](meta, normalizer, size="tiny", obs_horizon=1, action_horizon=4, n_action_steps=2,
                              num_inference_steps=2, **extra)
    policy.task_names = list(TASKS)  # as load_policy records the store's table
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.03 * torch.randn_like(p))
    return policy.eval()


def _obs():
    rng = np.random.default_rng(0)
    return {"state": rng.normal(size=(2, 1, 39)).astype(np.float32),
            **{k: rng.integers(0, 256, (2, 1, 16, 16, 3), dtype=np.uint8) for k in CAMERAS}}


@pytest.mark.parametrize("language", [False, True], ids=["ids", "language"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_its_goal_through_one_path(family, language, camera_store):
    """Goal resolution lived in three places (the base, PAD's encode, RDT's language path) and PAD's copy missed task
    names. Now every family resolves task names, task ids and instructions alike, and refuses what it cannot
    read with the keys it can."""
    policy = _multi_task(family, camera_store, language)
    assert policy.goal_keys() == GOAL_KEYS[family][language]
    act = lambda goal: policy.predict_action(_obs(), goal, generator=torch.Generator().manual_seed(0))  # noqa: E731
    with pytest.raises(ValueError, match=r"goal \['colour'\]: \w+Policy takes " + re.escape(str(policy.goal_keys()))):
        act({"colour": np.zeros(2)})
    if policy.takes_task:
        by_name = act({"task": ["drawer-open-v3", "reach-v3"]})
        assert torch.equal(by_name, act({"task_id": np.array([2, 0])}))
        assert not torch.equal(by_name, act({"task_id": 1}))
        with pytest.raises(ValueError, match=r"3 tasks: pass goal=.*ids: 0 reach-v3, 1 push-v3, 2 drawer-open-v3"):
            act(None)
        with pytest.raises(ValueError, match=r"task_id \[5\] is outside the 3 tasks"):
            act({"task_id": 5})
    if "instruction" in policy.goal_keys():
        said = act({"instruction": "open the drawer"})
        emb = policy.embed_instructions(["open the drawer"])
        assert torch.equal(said, act({"lang_emb": emb}))
        assert not torch.equal(said, act({"instruction": "push the puck"}))
    elif "lang_emb" in policy.goal_keys():
        with pytest.raises(ValueError, match="without a language encoder"):
            act({"instruction": "open the drawer"})
    else:
        with pytest.raises(ValueError, match="instructions need a policy trained with a language encoder"):
            act({"instruction": "open the drawer"})
    if "lang_emb" in policy.goal_keys():
        with pytest.raises(ValueError, match=rf"lang_emb has shape \(1, 7\); this policy takes .*{policy.lang_dim}"):
            act({"lang_emb": np.zeros(7, np.float32)})


# -- one source for each default: configs/policy/<family>.yaml builds what the class builds by default -------------
def _hyper_parameters(policy) -> dict:
    """Everything a policy resolved from its arguments: plain attributes, the process, every tensor's shape."""
    plain = (bool, int, float, str, tuple, type(None))
    out = {k: v for k, v in vars(policy).items() if not k.startswith("_") and isinstance(v, plain)}
    out["formulation"] = policy.formulation.config
    out["shapes"] = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_the_yaml_config_builds_the_class_default(family):
    """MoDE's class used horizons 2/16/8 and its YAML 1/10/10, PAD's class 50 sampling steps and its YAML 10: a
    policy built in Python differed from the one train.py builds. Now Policy(**yaml) == Policy() for every family."""
    from omegaconf import OmegaConf

    yaml = OmegaConf.to_container(OmegaConf.load(f"configs/policy/{family}.yaml"))
    assert yaml.pop("_target_") == f"{FAMILIES[family].__module__.rsplit('.', 1)[0]}.{FAMILIES[family].__name__}"
    meta = {"obs": {"state": {"shape": [39], "dtype": "float32"},
                    **{k: {"shape": [16, 16, 3], "dtype": "uint8"} for k in CAMERAS}},
            "action": {"shape": [4]}, "num_tasks": 2, "robot": "metaworld_sawyer"}
    with torch.device("meta"):
        from_yaml = _hyper_parameters(FAMILIES[family](meta, **yaml))
        default = _hyper_parameters(FAMILIES[family](meta))
    shapes = from_yaml.pop("shapes"), default.pop("shapes")
    differ = {k: (from_yaml.get(k), default.get(k)) for k in from_yaml.keys() | default.keys()
              if from_yaml.get(k) != default.get(k)}
    assert not differ, f"configs/policy/{family}.yaml vs {FAMILIES[family].__name__}(): {differ}"
    assert shapes[0] == shapes[1]
