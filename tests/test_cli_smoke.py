"""The user path end to end: robodit collect → train.py → eval.py (tiny sizes, a few steps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def run(*args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_collect_train_eval(tmp_path):
    store = tmp_path / "demos.zarr"
    run("-m", "robodit.cli", "collect", "metaworld/reach-v3", "--episodes", "2", "--out", store,
        "--image-size", "32", "--cameras", "corner2")
    out = tmp_path / "run"
    train = run("train.py", "policy=dit", "policy.size=tiny", f"dataset.path={store}", "train.steps=20",
                "train.batch_size=8", "logger=none", f"out_dir={out}", "train.progress=false")
    assert "stopped at step 20" in train.stdout
    assert (out / "checkpoints" / "step_00000020" / "model.safetensors").exists()
    eval_dir = tmp_path / "eval"
    ev = run("eval.py", f"checkpoint={out}", "episodes=1", "max_steps=16", f"out_dir={eval_dir}", "progress=false")
    assert "success rate" in ev.stdout
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["env"] == "metaworld/reach-v3" and results["tasks"]["reach-v3"]["episodes"] == 1
    assert (eval_dir / "report.md").exists() and list(eval_dir.glob("*.mp4"))
    # resume continues from step 20
    more = run("train.py", "policy=dit", "policy.size=tiny", f"dataset.path={store}", "train.steps=25",
               "train.batch_size=8", "logger=none", f"out_dir={out}", "train.resume=true", "train.progress=false")
    assert "resumed at step 20" in more.stdout and "stopped at step 25" in more.stdout


def test_eval_of_missing_checkpoint_is_a_clear_error(tmp_path):
    proc = run("eval.py", f"checkpoint={tmp_path}", "episodes=1", f"out_dir={tmp_path / 'e'}", check=False)
    assert proc.returncode != 0 and "no checkpoint" in (proc.stderr + proc.stdout)


@pytest.mark.slow
def test_demo_sized_run_learns_reach(tmp_path):
    """Slow: a real (short) training run must beat chance on reach-v3 with state observations."""
    store = tmp_path / "demos.zarr"
    run("-m", "robodit.cli", "collect", "metaworld/reach-v3", "--episodes", "30", "--out", store)
    run("train.py", f"dataset.path={store}", "train.steps=1500", "logger=none", f"out_dir={tmp_path / 'run'}",
        "train.progress=false", timeout=1200)  # ~4 it/s on this 2-core VM: 300 s was not enough for 1500 steps
    run("eval.py", f"checkpoint={tmp_path / 'run'}", "episodes=10", f"out_dir={tmp_path / 'eval'}", "progress=false")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["success_rate"] >= 0.5
