"""CUDA paths (skipped without a GPU): bf16 autocast training, torch.compile, GPU inference."""

import pytest
import torch

from test_training import _cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bf16_training_and_gpu_inference(toy_store, tmp_path):
    import robodit
    from robodit.training.trainer import train

    last = train(_cfg(toy_store, tmp_path / "run", 20, device="cuda", bf16=True))
    policy = robodit.load_policy(last, device="cuda")
    out = policy.predict_action({"state": torch.zeros(3, 2, 5)})
    assert out.device.type == "cuda" and out.shape == (3, 8, 3) and torch.isfinite(out).all()
    metrics = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20


def test_compiled_training_step(toy_store, tmp_path):
    from robodit.training.trainer import train

    last = train(_cfg(toy_store, tmp_path / "run", 10, device="cuda", compile=True))
    assert last.name == "step_00000010"
