"""DDP under torchrun on CPU (gloo, 2 processes): ranks stay identical, equal one process at the same global
batch, only rank 0 writes, and a resumed DDP run replays the uninterrupted one bit for bit."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from robodit.training.checkpoint import list_checkpoints

WORKER = Path(__file__).parent / "_ddp_worker.py"
ROOT = Path(__file__).parent.parent


def _launch(nproc, store, out, report, steps, batch_size, **kw):
    report.mkdir(parents=True, exist_ok=True)
    args = json.dumps({"store": str(store), "out": str(out), "steps": steps, "batch_size": batch_size,
                       "report": str(report), **kw})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable])
    r = subprocess.run(cmd + [str(WORKER), args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], torch.tensor([r["train/loss"] for r in rows], dtype=torch.float64)


def test_ddp_equals_single_process_and_only_rank0_writes(toy_store, tmp_path):
    """With noise a fixed function of each sample (`det`), the split over ranks must not matter."""
    _launch(2, toy_store, tmp_path / "ddp", tmp_path / "rep_ddp", 6, 8, det=True)
    _launch(1, toy_store, tmp_path / "one", tmp_path / "rep_one", 6, 16, det=True)
    for step in (3, 6):
        p0, p1, ref = (torch.load(tmp_path / d / f"params_rank{r}_step{step}.pt")
                       for d, r in (("rep_ddp", 0), ("rep_ddp", 1), ("rep_one", 0)))
        assert torch.equal(p0, p1), f"ranks diverged by step {step}"
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5)  # only summation order differs
    steps, ddp_loss = _losses(tmp_path / "ddp")
    _, one_loss = _losses(tmp_path / "one")
    assert steps == [1, 2, 3, 4, 5, 6]  # one writer: no line twice
    torch.testing.assert_close(ddp_loss, one_loss, rtol=1e-5, atol=0)  # the logged loss is the global mean
    calls = [json.loads((tmp_path / f"rep_ddp/calls_rank{r}.json").read_text()) for r in (0, 1)]
    assert [c["save_checkpoint"] for c in calls] == [2, 0]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert [p.name for p in list_checkpoints(tmp_path / "ddp")] == ["step_00000003", "step_00000006"]


def test_ddp_resume_replays_exactly(toy_store, tmp_path):
    """Real per-rank diffusion noise: resuming needs every rank's RNG state from the checkpoint."""
    out = tmp_path / "run"
    _launch(2, toy_store, out, tmp_path / "rep_a", 6, 8)
    final = list_checkpoints(out)[-1]
    want = {f: load_file(str(final / f)) for f in ("model.safetensors", "ema.safetensors")}
    shutil.rmtree(final)  # the run "died" after step 3's checkpoint
    _launch(2, toy_store, out, tmp_path / "rep_b", 6, 8, resume=True)
    resumed = list_checkpoints(out)[-1]
    assert resumed.name == final.name
    for f, tensors in want.items():
        got = load_file(str(resumed / f))
        assert all(torch.equal(got[k], v) for k, v in tensors.items()), f
    # both ranks resumed in step: identical parameters at the re-saved step
    assert torch.equal(torch.load(tmp_path / "rep_b/params_rank0_step6.pt"),
                       torch.load(tmp_path / "rep_b/params_rank1_step6.pt"))


def test_metrics_some_ranks_lack_are_averaged_by_name(toy_store, tmp_path):
    """A key reported by rank 1 only: the positional all-reduce crashed (gloo: 'collective mismatch')."""
    _launch(2, toy_store, tmp_path / "run", tmp_path / "rep", 2, 8, rank_key=True)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["train/only_rank1"] for r in rows] == [5.0, 5.0] and all("train/loss" in r for r in rows)


@pytest.mark.slow
def test_torchrun_train_py_only_rank0_writes(toy_store, tmp_path):
    """The documented command: Hydra on rank 1 must not write .hydra/ or a log, nor resolve its own out_dir."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           "policy=dit", "policy.size=tiny", "policy.action_horizon=8", "policy.n_action_steps=4",
           f"dataset.path={toy_store}", "train.steps=2", "train.batch_size=8", "train.progress=false", "logger=none"]
    r = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "outputs/train").iterdir())  # the default out_dir has ${now:...} in it
    assert len(runs) == 1 and [p.name for p in list_checkpoints(runs[0])] == ["step_00000002"]
    assert len((runs[0] / "metrics.jsonl").read_text().splitlines()) == 1  # log_every 50: the last step only
