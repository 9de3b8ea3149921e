"""RDT policy: unified-space masking, alternating condition injection, the 1b size, training + reload."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import robodit
from robodit.datasets.normalizer import Normalizer
from robodit.action_space import UNIFIED_DIM
from robodit.policies.rdt import RDTPolicy
from robodit.training.trainer import train
from conftest import make_toy_store

MW = {"obs": {"state": {"shape": [39], "dtype": "float32"}, "wrist": {"shape": [16, 16, 3], "dtype": "uint8"}},
      "action": {"shape": [4]}, "num_tasks": 1}


def _normalizer(state=39, action=4):
    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}
    return Normalizer({"state": st(state), "action": st(action)})


def _policy(**kw):
    kw = {"size": "tiny", "robot": "metaworld_sawyer", "action_horizon": 8, "n_action_steps": 4, **kw}
    return RDTPolicy(MW, _normalizer(), **kw)


def _obs(b=2):
    g = torch.Generator().manual_seed(0)
    return {"state": torch.randn(b, 2, 39, generator=g),
            "wrist": torch.randint(0, 255, (b, 2, 3, 16, 16), dtype=torch.uint8, generator=g)}


def _batch(b=4, tp=8):
    obs = _obs(b)
    return {"obs.state": obs["state"], "obs.wrist": obs["wrist"],
            "action": torch.tanh(torch.randn(b, tp, 4)), "action_is_pad": torch.zeros(b, tp, dtype=torch.bool)}


def test_predict_native_units_and_mask_zeroes_unused_slots():
    torch.manual_seed(0)
    policy = _policy().eval()
    for p in policy.head.parameters():  # a trained-looking head: non-zero everywhere
        torch.nn.init.normal_(p, std=0.5)
    unified = policy.predict_unified(_obs(), generator=torch.Generator().manual_seed(1))
    assert unified.shape == (2, 8, UNIFIED_DIM)
    unused = policy.action_mask == 0
    assert unified[..., ~unused].abs().sum() > 0 and not unified[..., unused].any()
    a = policy.predict_action(_obs(), generator=torch.Generator().manual_seed(1))
    b = policy.predict_action(_obs(), generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 8, 4) and torch.equal(a, b)
    assert torch.equal(a, unified[..., [39, 40, 41, 10]])  # identity normaliser: native = gathered slots


def test_robot_errors_are_clear():
    with pytest.raises(ValueError, match="'ur5_gizmo'"):
        RDTPolicy(MW, _normalizer(), size="tiny", robot="ur5_gizmo")
    with pytest.raises(ValueError, match="no robot name"):
        RDTPolicy(MW, _normalizer(), size="tiny")
    with pytest.raises(ValueError, match="7-d actions"):
        RDTPolicy(MW, _normalizer(), size="tiny", robot="robosuite_panda")
    with pytest.raises(ValueError, match="store records"):
        RDTPolicy(dict(MW, robot="so101_follower"), _normalizer(), size="tiny", robot="metaworld_sawyer")
    RDTPolicy(dict(MW, robot="metaworld_sawyer"), _normalizer(), size="tiny")  # from shape_meta


@pytest.mark.parametrize("training", [True, False])
def test_condition_injection_alternates(training):
    policy = _policy(cond_dropout=0.0).train(training)
    seen = {}
    hooks = [blk.cross.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[1]))
             for i, blk in enumerate(policy.blocks)]
    lang = torch.randn(2, 3, policy.lang_dim)  # 3 language tokens vs 2 steps x 2 keys = 4 observation tokens
    if training:
        policy.compute_loss(dict(_batch(2), **{"goal.lang_emb": lang}))
    else:
        policy.predict_action(_obs(), goal={"lang_emb": lang})
    for h in hooks:
        h.remove()
    assert sorted(seen) == list(range(len(policy.blocks))) and len(seen) >= 4
    for i, ctx in seen.items():
        assert ctx.shape[1] == (3 if i % 2 == 0 else 4), (i, ctx.shape)
    # the cached keys/values used at inference come from the same alternating contexts
    policy.eval()
    cond = policy.encode(policy.normalize_obs(policy.prepare_obs(_obs())), {"lang_emb": lang})
    x, c = torch.randn(2, 8, UNIFIED_DIM), torch.full((2,), 500.0)
    for p in policy.head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    cached = policy.denoise(x, c, cond)
    uncached = policy.denoise(x, c, dict(cond, kv=[None] * len(policy.blocks)))
    assert torch.allclose(cached, uncached, atol=1e-5)
    swapped = dict(cond, kv=[None] * len(policy.blocks), contexts=[cond["obs"] if i % 2 == 0 else cond["lang"]
                                                                     for i in range(len(policy.blocks))])
    assert not torch.allclose(policy.denoise(x, c, swapped), cached, atol=1e-3)


def test_no_language_uses_null_or_task_token():
    policy = _policy(cond_dropout=0.0).eval()
    cond = policy.encode(policy.normalize_obs(policy.prepare_obs(_obs())), None)
    assert cond["lang"].shape == (2, 1, 64)
    multi = RDTPolicy(dict(MW, num_tasks=3), _normalizer(), size="tiny", robot="metaworld_sawyer").eval()
    with pytest.raises(ValueError, match="task_id"):
        multi.predict_action(_obs())
    assert multi.predict_action(_obs(), goal={"task_id": 2}).shape == (2, 16, 4)


def test_condition_dropout_only_in_training():
    policy = _policy(cond_dropout=0.5)
    obs = policy.normalize_obs(policy.prepare_obs(_obs(64)))
    torch.manual_seed(0)
    dropped = policy.train().encode(obs, None)
    kept = policy.eval().encode(obs, None)
    same = (dropped["obs"] == kept["obs"]).flatten(1).all(1)
    assert 10 < int(same.sum()) < 54  # about half the samples lose their observation tokens
    assert not torch.equal(dropped["prefix"], kept["prefix"])


def test_1b_on_meta_device_has_about_1_2b_parameters():
    with torch.device("meta"):
        policy = RDTPolicy(MW, Normalizer(), size="1b", robot="metaworld_sawyer", obs_horizon=1, action_horizon=64,
                           n_action_steps=64)
    n = sum(p.numel() for p in policy.parameters())
    assert len(policy.blocks) == 28 and policy.blocks[0].attn.heads == 32 and policy.pos.shape[-1] == 2048
    assert 1.15e9 < n < 1.3e9, n
    assert next(policy.parameters()).is_meta


def test_tiny_trains_through_the_trainer_and_reloads(tmp_path):
    store = make_toy_store(tmp_path / "mw.zarr", episodes=3, length=(12, 16), state_dim=39, action_dim=4,
                           robot="metaworld_sawyer", fps=80.0, image_size=16)  # cameras `wrist`, `agentview_image`
    base = OmegaConf.load("configs/train.yaml")
    policy_cfg = dict(OmegaConf.to_container(OmegaConf.load("configs/policy/rdt.yaml")), size="tiny",
                      robot="metaworld_sawyer", action_horizon=8, n_action_steps=4, num_inference_steps=3)
    cfg = OmegaConf.create({
        "out_dir": str(tmp_path / "run"), "policy": policy_cfg,
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(store)),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(base.train), steps=4, batch_size=8, checkpoint_every=4, log_every=1,
                      val_every=0, warmup_steps=1, progress=False),
    })
    last = train(cfg)
    policy = robodit.load_policy(tmp_path / "run")
    assert policy.checkpoint_dir == last and isinstance(policy, RDTPolicy) and policy.control_hz == 80.0  # the store's fps
    assert sorted(policy.image_shapes) == ["agentview_image", "wrist"]  # a `wrist` camera was dropped (KeyError)
    cams = {k: np.zeros((2, 16, 16, 3), np.uint8) for k in policy.image_shapes}
    out = policy.predict_action({"state": np.zeros((2, 39), np.float32), **cams})
    assert out.shape == (1, 8, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("lang", [False, True])
def test_every_parameter_gets_a_gradient(lang):
    """DDP (find_unused_parameters=False) fails on parameters a batch never touched: language, nulls, tasks."""
    policy = RDTPolicy(dict(MW, num_tasks=2), _normalizer(), size="tiny", robot="metaworld_sawyer",
                       action_horizon=8, cond_dropout=0.0)
    batch = dict(_batch(2), task_id=torch.tensor([0, 1]))
    if lang:
        batch["goal.lang_emb"] = torch.randn(2, policy.lang_dim)
    policy.compute_loss(batch)["loss"].backward()
    assert [n for n, p in policy.named_parameters() if p.grad is None] == []


def test_goals_by_task_name_and_by_instruction():
    """A multi-task checkpoint's ids were anonymous and an instruction died in torch.as_tensor; now goal={"task":
    name} maps through the recorded task table, and an RDT with a language encoder embeds instructions."""
    multi = RDTPolicy(dict(MW, num_tasks=3), _normalizer(), size="tiny", robot="metaworld_sawyer").eval()
    multi.task_names = ["reach-v3", "push-v3", "door-open-v3"]  # what load_policy records from the store
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(multi.predict_action(_obs(), goal={"task": "door-open-v3"}, generator=g()),
                       multi.predict_action(_obs(), goal={"task_id": 2}, generator=g()))
    with pytest.raises(ValueError, match=r"ids: 0 reach-v3, 1 push-v3, 2 door-open-v3"):
        multi.predict_action(_obs())
    with pytest.raises(ValueError, match=r"goal task \['drawer'\] is not one this policy was trained on"):
        multi.predict_action(_obs(), goal={"task": "drawer"})
    with pytest.raises(ValueError, match="trained without a language encoder"):
        _policy().eval().predict_action(_obs(), goal={"instruction": "reach the goal"})
    talking = _policy(language_encoder="minilm", cond_dropout=0.0).eval()
    assert talking.predict_action(_obs(), goal={"instruction": "reach the goal"}).shape == (2, 8, 4)
