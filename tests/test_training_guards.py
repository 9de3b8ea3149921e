"""Mistakes a user makes with their own data and runs fail loudly instead of training something else:
resuming under changed data or settings, clipped actions, damaged stores, misspelt keys, float images."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training import _cfg

from conftest import make_toy_store
from robodit.datasets.normalizer import compute_stats
from robodit.datasets.store import DemoStore, StoreError
from robodit.training.checkpoint import list_checkpoints
from robodit.training.trainer import train


def test_resume_keeps_the_checkpoints_normaliser_when_the_store_grew(toy_store, tmp_path, capsys):
    run = tmp_path / "run"
    first = train(_cfg(toy_store, run, 3))
    saved = load_file(str(first / "normalizer.safetensors"))
    with DemoStore.open(toy_store, "a") as store:  # new demos with a far wider action range
        store.append_episode({"state": np.ones((20, 5), np.float32), "action": np.full((20, 3), 9.0, np.float32)},
                             task="toy-task")
    last = train(_cfg(toy_store, run, 5, resume=True))
    assert "the training data changed since step_00000003 (episodes 6 -> 7)" in capsys.readouterr().out
    for k, v in load_file(str(last / "normalizer.safetensors")).items():
        assert torch.equal(v, saved[k]), k  # before: recomputed from the grown store under the old weights


def test_resume_under_other_policy_settings_is_a_clear_error(toy_store, tmp_path):
    run = tmp_path / "run"
    train(_cfg(toy_store, run, 2))
    cfg = _cfg(toy_store, run, 4, resume=True)
    cfg.policy.size = "base"
    with pytest.raises(ValueError, match=r"train.resume=true: .* other settings \(policy.size: 'tiny' then, "
                                         r"'base' now\).*train.init_from"):
        train(cfg)


def test_a_resumed_run_gets_its_own_max_minutes(toy_store, tmp_path):
    run = tmp_path / "run"
    first = train(_cfg(toy_store, run, 2))
    state = torch.load(first / "train_state.pt", weights_only=False)
    state["elapsed_s"] = 3600.0  # the first run had used an hour
    torch.save(state, first / "train_state.pt")
    last = train(_cfg(toy_store, run, 4, resume=True, max_minutes=30))
    assert last.name == "step_00000004"  # before: the hour counted against this run's 30 minutes: one step


def test_gaussian_actions_under_the_default_clip_are_refused(toy_store, tmp_path):
    cfg = _cfg(toy_store, tmp_path / "run", 2)
    cfg.dataset.normalizer_modes = {"action": "gaussian"}
    with pytest.raises(ValueError, match=r"clips normalised actions to ±1, but with normalizer_modes.action="
                                         r"gaussian this store's actions reach ±[0-9.]+.*clip_sample="):
        train(cfg)
    cfg.policy.formulation.clip_sample = None
    assert train(cfg) is not None


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.dataset.update(normalizer_modes={"stat": "gaussian"}), r"normalizer_modes names \['stat'\]"),
    (lambda c: c.dataset.update(obs_keys=["state", "action"]), "include 'action'"),
    (lambda c: c.dataset.update(paths=["other.zarr"]), "both dataset.path=.* and dataset.paths="),
])
def test_misconfigured_data_is_refused(toy_store, tmp_path, edit, match):
    cfg = _cfg(toy_store, tmp_path / "run", 2)
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        train(cfg)


@pytest.mark.parametrize("key, value, match", [
    ("_target_", "robodit.policies.mode.MoDEPolicy", "holds a DiTPolicy, this run builds a MoDEPolicy"),
    ("size", "base", "the checkpoint was trained with policy.size=tiny: pass the same"),
])
def test_init_from_a_mismatched_checkpoint_says_what_differs(toy_store, tmp_path, key, value, match):
    src = train(_cfg(toy_store, tmp_path / "src", 2))
    cfg = _cfg(toy_store, tmp_path / "ft", 2, init_from=str(src))
    cfg.policy[key] = value
    with pytest.raises(ValueError, match=match):
        train(cfg)


def test_warmup_longer_than_the_run_is_shortened(toy_store, tmp_path, capsys):
    cfg = _cfg(toy_store, tmp_path / "run", 10)
    cfg.train.warmup_steps = 200
    train(cfg)
    assert "train.warmup_steps=200 >= train.steps=10: warming up over 1 steps instead" in capsys.readouterr().out


def test_a_store_missing_a_chunk_is_damage_not_zeros(tmp_path):
    path = make_toy_store(tmp_path / "s.zarr", episodes=3)
    with DemoStore.open(path) as store:
        assert store.missing_chunks() == {}
        store.verify()
    (path / "data" / "state" / "c" / "0" / "0").unlink()  # an interrupted copy
    with DemoStore.open(path) as store:
        assert store.missing_chunks() == {"state": [0]}
        with pytest.raises(StoreError, match=r"missing in \['state'\] \(first: data/state/c/0/0, frames 0\.\."):
            store.verify()
    with pytest.raises(StoreError, match="damaged"):
        train(_cfg(path, tmp_path / "run", 2))


def test_all_zero_chunks_are_written_so_they_are_not_mistaken_for_damage(tmp_path):
    store = DemoStore.create(tmp_path / "z.zarr", {"state": ((2,), "float32"), "action": ((1,), "float32")},
                             fps=10, robot="toy")
    with store:
        store.append_episode({"state": np.zeros((5, 2), np.float32), "action": np.zeros((5, 1), np.float32)},
                             task="t")
        assert store.missing_chunks() == {}  # zarr skips writing all-fill chunks unless told otherwise


def test_stats_cover_every_frame(tmp_path):
    path = make_toy_store(tmp_path / "s.zarr", episodes=5)
    with DemoStore.open(path) as store:
        stats = compute_stats(store, ["state", "action"])
        for key in ("state", "action"):
            x = store.read(key, 0, store.num_frames)
            np.testing.assert_allclose(stats[key]["max"], x.max(0))
            np.testing.assert_allclose(stats[key]["mean"], x.mean(0), rtol=1e-5, atol=1e-6)


def test_float_images_are_refused_not_guessed(tmp_path):
    import robodit

    path = make_toy_store(tmp_path / "img.zarr", episodes=2, image_size=16, cameras=("wrist",))
    cfg = _cfg(path, tmp_path / "run", 1)
    train(cfg)
    policy = robodit.load_policy(list_checkpoints(tmp_path / "run")[-1])
    obs = {"state": np.zeros((2, 5), np.float32), "wrist": np.zeros((2, 16, 16, 3), np.uint8)}
    assert policy.predict_action(obs).shape == (1, 8, 3)
    with pytest.raises(ValueError, match="'wrist' is float32; images go in as uint8"):
        policy.predict_action({**obs, "wrist": obs["wrist"].astype(np.float32) / 255})


def test_a_fresh_run_into_a_used_out_dir_is_refused(toy_store, tmp_path):
    """Pruning kept the old run's later checkpoints and deleted the new run's final one, which load_policy and
    eval.py then silently skipped."""
    train(_cfg(toy_store, tmp_path / "run", 6))
    with pytest.raises(ValueError, match=r"already holds checkpoints of a run \(latest step_00000006\).*resume=true"):
        train(_cfg(toy_store, tmp_path / "run", 3))


def test_a_resume_cleans_up_after_a_killed_save_and_continues_the_log(toy_store, tmp_path):
    import json

    run = tmp_path / "run"
    train(_cfg(toy_store, run, 10))  # checkpoints at 5 and 10, a metrics row per step
    stale = run / "checkpoints" / ".step_00000010.tmp-deadbeef"  # a save killed mid-way
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000010")  # ... so the run resumes from step 5
    train(_cfg(toy_store, run, 10, resume=True))
    assert not stale.exists()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # rows 6..10 of the lost stretch are not there twice


def test_logged_lr_is_the_rate_the_step_used_and_throughput_is_logged(toy_store, tmp_path):
    import json

    cfg = _cfg(toy_store, tmp_path / "run", 4)  # warmup 2: steps 1, 2 at lr/2, lr; then cosine decay
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = cfg.train.lr
    assert [r["train/lr"] for r in rows][:2] == pytest.approx([lr / 2, lr])
    assert rows[-1]["train/lr"] > 0  # the last step trained at a positive rate (the next one's is 0)
    assert all(r["train/steps_per_s"] > 0 and r["train/samples_per_s"] > 0 for r in rows)


def test_validation_spans_the_split_and_scores_the_ema_weights(toy_store, tmp_path):
    import json

    cfg = _cfg(toy_store, tmp_path / "run", 4)
    cfg.dataset.val_fraction = 0.5
    cfg.train.val_every = 2
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val/loss"] != r["val/loss_raw"] for r in val)


def test_a_checkpoint_from_before_the_cross_attention_gate(toy_store, tmp_path, monkeypatch):
    """AdaLNZeroBlock gained a zero-initialised `cross_gate` (a fresh block is the identity). A checkpoint saved
    before it still loads and acts as it was trained (gate = 1, its ungated cross-attention) and fine-tunes with
    init_from; resuming its optimizer state, which has one tensor fewer per block, is a clear error."""
    import robodit
    from robodit.nn.attention import AdaLNZeroBlock

    build = AdaLNZeroBlock.__init__

    def before_the_gate(self, *args, **kwargs):  # the block as older versions built it
        build(self, *args, **kwargs)
        if self.cross is not None:
            gate = self._parameters.pop("cross_gate")  # ungated: a gate of one that no checkpoint holds
            self.register_buffer("cross_gate", torch.ones_like(gate.data), persistent=False)

    with monkeypatch.context() as m:
        m.setattr(AdaLNZeroBlock, "__init__", before_the_gate)
        old = train(_cfg(toy_store, tmp_path / "old", 2))
        old_policy = robodit.load_policy(old)
    assert "blocks.0.cross_gate" not in load_file(str(old / "model.safetensors"))
    policy = robodit.load_policy(old)
    assert torch.equal(policy.blocks[0].cross_gate, torch.ones_like(policy.blocks[0].cross_gate))
    obs = {"state": np.random.default_rng(0).normal(size=(1, 2, 5)).astype(np.float32)}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(policy.predict_action(obs, generator=gen()),
                               old_policy.predict_action(obs, generator=gen()))
    train(_cfg(toy_store, tmp_path / "tuned", 1, init_from=str(old)))
    with pytest.raises(ValueError, match=r"train.resume=true: .*older robodit.*train.init_from"):
        train(_cfg(toy_store, tmp_path / "old", 4, resume=True))
