"""Trainer: checkpoints, exact resume, fine-tuning, load_policy."""

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import robodit
from robodit.training.checkpoint import list_checkpoints
from robodit.training.trainer import train


def _cfg(store, out, steps, **train_kw):
    base = OmegaConf.load("configs/train.yaml")
    cfg = OmegaConf.create({
        "out_dir": str(out),
        "policy": dict(OmegaConf.to_container(OmegaConf.load("configs/policy/dit.yaml")), size="tiny",
                       action_horizon=8, n_action_steps=4, num_inference_steps=3),
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(store)),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(base.train), steps=steps, batch_size=16, checkpoint_every=5,
                      log_every=1, val_every=0, warmup_steps=2, progress=False, keep_checkpoints=10, **train_kw),
    })
    return cfg


def test_resume_matches_uninterrupted_run(toy_store, tmp_path):
    """Lose the run after step 5 (delete the later checkpoint), resume: steps 6..10 must replay bit-exactly."""
    run = tmp_path / "run"
    train(_cfg(toy_store, run, 10))
    final = list_checkpoints(run)[-1]
    assert final.name == "step_00000010"
    expected = {f: load_file(str(final / f)) for f in ("model.safetensors", "ema.safetensors")}
    shutil.rmtree(final)
    resumed = train(_cfg(toy_store, run, 10, resume=True))
    assert resumed.name == "step_00000010"
    for f, want in expected.items():
        got = load_file(str(resumed / f))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (f, k)


def test_checkpoint_layout_and_load_policy(toy_store, tmp_path):
    last = train(_cfg(toy_store, tmp_path / "run", 6))
    names = {p.name for p in last.iterdir()}
    assert {"model.safetensors", "ema.safetensors", "normalizer.safetensors", "config.yaml", "train_state.pt"} <= names
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000005", "step_00000006"]
    policy = robodit.load_policy(tmp_path / "run")  # an out_dir resolves to its latest checkpoint
    assert policy.checkpoint_dir == last and not policy.training
    ema = load_file(str(last / "ema.safetensors"))
    assert torch.equal(policy.state_dict()["action_in.weight"], ema["action_in.weight"])
    out = policy.predict_action({"state": torch.zeros(1, 2, 5)})
    assert out.shape == (1, 8, 3)
    assert not list(tmp_path.glob("run/checkpoints/.*")), "temporary checkpoint dirs were left behind"


def test_init_from_and_max_minutes(toy_store, tmp_path):
    src = train(_cfg(toy_store, tmp_path / "src", 5))
    # max_minutes=0.0001 stops after the first step with a final checkpoint
    last = train(_cfg(toy_store, tmp_path / "ft", 1000, init_from=str(src), max_minutes=0.0001))
    assert last is not None and last.name == "step_00000001"


def test_init_from_shape_mismatch_is_clear(toy_store, tmp_path):
    src = train(_cfg(toy_store, tmp_path / "src", 2))
    cfg = _cfg(toy_store, tmp_path / "ft", 2, init_from=str(src))
    cfg.policy.action_horizon = 12
    with pytest.raises(ValueError, match="shapes differ"):
        train(cfg)


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        robodit.load_policy(tmp_path)
