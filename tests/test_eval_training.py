"""Training-time evaluation: a small suite every N steps, best-k checkpoints by success, training unchanged."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import robodit
from robodit.evaluation.training_eval import PeriodicEvaluator
from robodit.training.trainer import train


def _cfg(store, out, steps, **eval_kw):
    base = OmegaConf.load("configs/train.yaml")
    return OmegaConf.create({
        "out_dir": str(out),
        "policy": dict(OmegaConf.to_container(OmegaConf.load("configs/policy/dit.yaml")), size="tiny",
                       action_horizon=8, n_action_steps=4, num_inference_steps=2),
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(store)),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(base.train), steps=steps, batch_size=8, checkpoint_every=100,
                      log_every=100, val_every=0, warmup_steps=2, progress=False,
                      eval=dict(OmegaConf.to_container(base.train.eval), **eval_kw)),
    })


@pytest.fixture(scope="module")
def reach_store(tmp_path_factory):
    from robodit.datasets.collect import collect

    path = tmp_path_factory.mktemp("store") / "demos.zarr"
    collect("metaworld/reach-v3", episodes=1, out=path, seed=0, progress=False)
    return path


def test_periodic_eval_logs_success_and_keeps_best_k(reach_store, tmp_path):
    run = tmp_path / "run"
    last = train(_cfg(reach_store, run, 6, every=2, episodes=2, max_steps=8, keep_best=2, workers=0, num_envs=2), evaluator_factory=PeriodicEvaluator)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/success_rate" in r]
    assert [r["step"] for r in evals] == [2, 4, 6] and all(r["eval/episodes"] == 2 for r in evals)
    best = json.loads((run / "best" / "best.json").read_text())
    assert len(best["ranking"]) == 2 and best["best"] == best["ranking"][0]["path"]
    kept = sorted(p.name for p in (run / "best").iterdir() if p.is_dir())
    assert kept == sorted(f"step_{e['step']:08d}" for e in best["ranking"])
    assert (run / "evals" / "step_00000004.json").exists()
    policy = robodit.load_policy(best["best"])  # a best checkpoint is a normal checkpoint (EMA weights)
    assert policy.predict_action({"state": torch.zeros(1, 2, 39)}).shape == (1, 8, 4)
    # 8 steps never reach the goal: all ties at 0, so the later steps are kept
    assert [e["step"] for e in best["ranking"]] == [6, 4]
    # the kept weights are the EMA weights the trainer saved at the same step
    ema = load_file(str(last / "ema.safetensors"))
    got = load_file(str(run / "best" / "step_00000006" / "model.safetensors"))
    assert got.keys() <= ema.keys() and all(torch.equal(got[k], ema[k]) for k in got)


def test_eval_does_not_change_training(reach_store, tmp_path):
    """Same seed with and without evaluation: bit-identical weights (evaluation touches no training RNG)."""
    a = train(_cfg(reach_store, tmp_path / "a", 4), evaluator_factory=PeriodicEvaluator)
    b = train(_cfg(reach_store, tmp_path / "b", 4, every=2, episodes=1, max_steps=4, workers=0, num_envs=1), evaluator_factory=PeriodicEvaluator)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (tmp_path / "a" / "best").exists()


def test_best_k_ranking_prefers_success_then_later_step(tmp_path):
    ev = PeriodicEvaluator({"every": 1, "keep_best": 2, "suite": "mt10", "tasks": ["reach-v3"]}, tmp_path, {})

    class Stub:  # what _keep_if_best needs from a policy and the checkpoint module
        class normalizer:
            @staticmethod
            def state_dict_flat():
                return {}

    saved = []

    class Io:
        @staticmethod
        def export_state(policy):
            return {}

        @staticmethod
        def save_checkpoint(path, **kw):
            path.mkdir(parents=True)
            saved.append(path.name)

    for step, rate in [(1, 0.5), (2, 0.2), (3, 0.5), (4, 0.9), (5, 0.1)]:
        ev._keep_if_best(step, rate, Stub(), {}, Io)
    assert [e["step"] for e in ev.entries] == [4, 3]  # 0.9, then the later of the two 0.5s
    assert saved == ["step_00000001", "step_00000002", "step_00000003", "step_00000004"]  # 5 never made top 2
    assert sorted(p.name for p in tmp_path.joinpath("best").iterdir() if p.is_dir()) == ["step_00000003",
                                                                                        "step_00000004"]
    resumed = PeriodicEvaluator({"every": 1, "keep_best": 2, "suite": "mt10", "tasks": ["reach-v3"]}, tmp_path, {})
    assert [e["step"] for e in resumed.entries] == [4, 3]


def test_eval_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        PeriodicEvaluator({"every": 1, "epsiodes": 3}, tmp_path, {})
    with pytest.raises(ValueError, match="records no SIM/TASK env"):
        PeriodicEvaluator({"every": 1}, tmp_path, {"env": {"name": None}})
