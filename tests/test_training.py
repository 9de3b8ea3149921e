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


def test_image_pooling_is_recorded_in_the_checkpoint_and_old_checkpoints_load_as_avg(tmp_path):
    """policy.image_pooling=spatial_softmax trains, and load_policy rebuilds the same keypoint layer from the
    checkpoint's config; a checkpoint written before the option (no image_pooling in config.yaml) loads with
    average pooling, exactly as it was trained."""
    import yaml
    from conftest import CAMERAS, make_toy_store

    from robodit.nn.encoders import AveragePool, SpatialSoftmax
    from robodit.training.info import format_checkpoint, summarize_checkpoint

    store = make_toy_store(tmp_path / "cams.zarr", episodes=2, length=(12, 14), image_size=32)
    cfg = _cfg(store, tmp_path / "run", 2)
    cfg.policy.image_pooling = "spatial_softmax"
    last = train(cfg)
    policy = robodit.load_policy(last)
    assert policy.image_pooling == "spatial_softmax"
    ema = load_file(str(last / "ema.safetensors"))
    for cam in CAMERAS:
        assert isinstance(policy.obs_encoder.encoders[cam].pool, SpatialSoftmax)
        key = f"obs_encoder.encoders.{cam}.pool.maps.weight"
        assert torch.equal(policy.state_dict()[key], ema[key])
    obs = {"state": torch.zeros(1, 2, 5), **{c: torch.zeros(1, 2, 32, 32, 3, dtype=torch.uint8) for c in CAMERAS}}
    assert policy.predict_action(obs).shape == (1, 8, 3)
    assert "images pooled by spatial_softmax" in format_checkpoint(summarize_checkpoint(last))  # robodit info

    cfg = _cfg(store, tmp_path / "stem", 2)
    cfg.policy.image_stem_stride = 2  # the cheap stem is a recorded choice too, not a default a reload could miss
    stem = robodit.load_policy(train(cfg))
    assert all(stem.obs_encoder.encoders[c].stem[0].stride == (2, 2) for c in CAMERAS)
    assert "image stem stride 2" in format_checkpoint(summarize_checkpoint(tmp_path / "stem"))

    old = train(_cfg(store, tmp_path / "old", 2))
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["policy"]["image_pooling"], config["policy"]["image_stem_stride"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    policy = robodit.load_policy(old)
    assert all(isinstance(policy.obs_encoder.encoders[c].pool, AveragePool) for c in CAMERAS)
    assert all(policy.obs_encoder.encoders[c].stem[0].stride == (1, 1) for c in CAMERAS)
    assert policy.predict_action(obs).shape == (1, 8, 3)


def test_init_from_and_max_minutes(toy_store, tmp_path):
    src = train(_cfg(toy_store, tmp_path / "src", 5))
    # max_minutes=0.0001 stops after the first step with a final checkpoint
    last = train(_cfg(toy_store, tmp_path / "ft", 1000, init_from=str(src), max_minutes=0.0001))
    assert last is not None and last.name == "step_00000001"
    from robodit.training.info import summarize_checkpoint

    # a fine-tune names where it started (its budget excludes the source's steps); a fresh run names nothing
    assert summarize_checkpoint(last)["training"]["init_from"] == str(src)
    assert "init_from" not in summarize_checkpoint(src)["training"]


def test_init_from_shape_mismatch_is_clear(toy_store, tmp_path):
    src = train(_cfg(toy_store, tmp_path / "src", 2))
    cfg = _cfg(toy_store, tmp_path / "ft", 2, init_from=str(src))
    cfg.policy.action_horizon = 12
    with pytest.raises(ValueError, match="shapes differ"):
        train(cfg)


def test_init_ignore_mismatched_starts_only_the_reshaped_tensors_fresh(tmp_path):
    """Switching the image pooling for a fine-tune: the pooling head's weight changes shape and starts fresh,
    every other tensor comes from the source checkpoint."""
    from conftest import make_toy_store
    from safetensors.torch import load_file

    store = make_toy_store(tmp_path / "cams.zarr", episodes=2, length=(12, 14), image_size=32)
    src = train(_cfg(store, tmp_path / "src", 2))
    cfg = _cfg(store, tmp_path / "ft", 1, init_from=str(src))
    cfg.policy.image_pooling = "spatial_softmax"
    with pytest.raises(ValueError, match="init_ignore_mismatched"):
        train(cfg)
    cfg.train.init_ignore_mismatched = True
    cfg.train.lr = 0.0  # the fine-tune's single step changes no weight: what loaded is what was saved
    cfg.train.ema_decay = 0.0
    ft = train(cfg)
    before, after = load_file(str(src / "ema.safetensors")), load_file(str(ft / "model.safetensors"))
    fresh = [k for k in after if k in before and after[k].shape != before[k].shape]
    assert fresh and all(k.endswith("head.weight") for k in fresh)
    same = [k for k in after if k in before and after[k].shape == before[k].shape and after[k].is_floating_point()]
    assert same and all(torch.equal(after[k], before[k]) for k in same)


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        robodit.load_policy(tmp_path)


def _lrs(run):
    import json

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/lr"] for r in rows if "train/lr" in r]


def test_a_time_budget_anneals_the_schedule_and_info_says_so(toy_store, tmp_path):
    """max_minutes with the default 10,000 steps: the decay follows the budget, so the run ends near the floor
    (it stopped at ~peak lr, a few hundred steps into a 10,000-step cosine); a resume continues from there."""
    from robodit.training.info import format_checkpoint, summarize_checkpoint

    run = tmp_path / "run"
    cfg = _cfg(toy_store, run, 10000, max_minutes=0.05)
    cfg.train.checkpoint_every = 10**6
    last = train(cfg)
    lrs, peak = _lrs(run), cfg.train.lr
    assert 3 < len(lrs) < 10000
    assert lrs[:2] == pytest.approx([peak / 2, peak])  # warm-up stays in steps
    assert all(b <= a for a, b in zip(lrs[1:], lrs[2:]))  # never back up
    assert 0 < lrs[-1] <= 0.15 * peak  # the last step ran close to the floor (min_lr_ratio 0), not at a dead 0
    s = summarize_checkpoint(last)["schedule"]
    assert s["driven_by"] == "max_minutes" and s["lr"] == lrs[-1] and s["progress"] > 0.7
    text = format_checkpoint(summarize_checkpoint(last))
    assert "schedule:" in text and "0.05-minute budget (train.max_minutes)" in text

    more = _cfg(toy_store, run, 10000, max_minutes=0.02, resume=True)  # its own budget, from where it was
    more.train.checkpoint_every = 10**6
    train(more)
    resumed = _lrs(run)[len(lrs):]
    assert resumed and max(resumed) <= lrs[-1] + 1e-12


def test_without_a_budget_the_schedule_is_the_closed_form_over_steps(toy_store, tmp_path):
    import math

    from robodit.training.info import summarize_checkpoint

    last = train(_cfg(toy_store, tmp_path / "run", 8, min_lr_ratio=0.1))
    peak, w, n = 1.0, 2, 8
    want = [(k + 1) / w if k < w else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - w) / (n - w))) for k in range(n)]
    peak = _cfg(toy_store, tmp_path, 8).train.lr
    assert _lrs(tmp_path / "run") == [peak * f for f in want]
    s = summarize_checkpoint(last)["schedule"]
    assert s["driven_by"] == "steps" and s["max_minutes"] is None and s["lr"] == peak * want[-1]


def test_schedule_resumes_from_the_progress_it_reached():
    """A budget-paced checkpoint resumed without a budget decays on from its progress over the remaining steps
    (not back up to the step fraction's 1%); a steps-paced one replays the closed form."""
    from robodit.training.schedule import LRSchedule

    paced = LRSchedule(10, 10_000, budget_s=60.0)
    paced.start(0.0)
    paced.factor(100)
    paced.observe(paced.time_fraction(0.0, 100))  # warm-up over: the budget's decay starts here
    paced.observe(paced.time_fraction(54.0, 101))  # 90% of the budget gone
    before = paced.factor(101)
    assert paced.driven_by == "max_minutes" and paced.progress == pytest.approx(0.9, abs=0.01)
    resumed = LRSchedule(10, 10_000)
    resumed.load_state_dict(paced.state_dict(), step=101)
    assert resumed.factor(101) == pytest.approx(before) and resumed.factor(102) <= before
    assert resumed.factor(10_000) == 0.0
    plain = LRSchedule(10, 10_000)
    plain.factor(500)
    again = LRSchedule(10, 10_000)
    again.load_state_dict(plain.state_dict(), step=500)
    assert [again.factor(k) for k in (501, 7000)] == [LRSchedule(10, 10_000).factor(k) for k in (501, 7000)]
