"""`robodit run --dry-run` on a local checkpoint and through `robodit serve` (a real subprocess, loopback)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _control_fakes import tiny_dit

from robodit.cli import main
from robodit.envs.remote import RemotePolicy, healthz
from robodit.training.checkpoint import export_state, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cli-test-token-0123456789"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    policy = tiny_dit(state_dim=6, action_dim=4)
    cfg = {"policy": {"_target_": "robodit.policies.dit.DiTPolicy", "size": "tiny", "action_horizon": 8,
                      "n_action_steps": 4, "num_inference_steps": 2},
           "shape_meta": policy.shape_meta, "store": {"fps": 30.0}}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_1", model_state=export_state(policy),
                           ema_state=None, normalizer_state=policy.normalizer.state_dict_flat(), config=cfg)


@pytest.mark.parametrize("strategy", ["receding", "ensemble", "async"])
def test_run_dry_run_each_strategy(checkpoint, tmp_path, capsys, strategy):
    log = tmp_path / "steps.jsonl"
    rc = main(["run", "--policy", str(checkpoint), "--robot", str(ROOT / "configs/robot/dry_run.yaml"), "--dry-run",
               "--strategy", strategy, "--hz", "30", "--steps", "12", "--log", str(log)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 12 and summary["stopped"] is None and summary["executor"]["inferences"] >= 1
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 12 and {"late_ms", "send_late_ms", "infer_ms", "step_ms", "safety"} <= set(rows[0])


def test_run_refuses_a_mismatched_robot(checkpoint, capsys):
    rc = main(["run", "--policy", str(checkpoint), "--robot", str(ROOT / "configs/robot/metaworld.yaml"),
               "--steps", "1"])
    assert rc == 2 and "state" in capsys.readouterr().err  # 39-d Meta-World state vs the policy's 6-d


def test_serve_and_run_through_it(checkpoint, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1", ROBODIT_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "robodit.cli", "serve", str(checkpoint), "--port", "0",
                             "--threads", "1", "--max-seconds", "60"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("ws://127.0.0.1:") and healthz(url)["status"] == "ok"
        with RemotePolicy(url, TOKEN) as remote:
            assert remote.action_dim == 4 and remote.obs_shapes["state"] == ((6,), "float32")
        rc = main(["run", "--policy", url, "--token", TOKEN, "--robot", str(ROOT / "configs/robot/dry_run.yaml"),
                   "--dry-run", "--strategy", "async", "--hz", "20", "--steps", "10"])
        out = capsys.readouterr().out
        assert rc == 0 and '"steps": 10' in out
        rc = main(["run", "--policy", url, "--token", "wrong-token-wrong-token", "--robot",
                   str(ROOT / "configs/robot/dry_run.yaml"), "--dry-run"])
        assert rc == 2 and "401" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "server stopped" in out, err[-2000:]
