"""benchmarks/libero.py's policy options: which fixed initial states a policy row ran, and which rows the JSON
keeps (no simulator needed)."""

import importlib.util
from pathlib import Path

import pytest

from robodit.evaluation.evaluate import restrict_suite
from robodit.evaluation.suites import SuiteError, load_suite

_spec = importlib.util.spec_from_file_location("bench_libero", Path(__file__).parents[1] / "benchmarks" / "libero.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _states(first: int, episodes: int) -> dict[str, list[int]]:
    s = restrict_suite(load_suite(bench.policy_suite("libero_object", first), "test", check_blocks=False),
                       None, episodes, None)
    out: dict[str, list[int]] = {}
    for job in s.jobs():
        out.setdefault(job.key, []).append(job.seed)
    return out


def test_first_state_moves_every_task_to_held_out_initial_states():
    assert bench.policy_suite("libero_object", 0) == "libero_object"  # the standard rows: states 0..N-1
    standard, later = _states(0, 10), _states(10, 10)
    assert len(later) == 10 and later.keys() == standard.keys()
    assert all(seeds == list(range(10, 20)) for seeds in later.values())
    assert all(seeds == list(range(10)) for seeds in standard.values())
    with pytest.raises(SuiteError, match="has 50 fixed initial states.*would need state 54"):
        _states(45, 10)
    with pytest.raises(ValueError, match="--first-state must be >= 0"):
        bench.policy_suite("libero_object", -1)


def test_rows_of_other_settings_are_kept_and_a_rerun_replaces_its_own():
    old = {"checkpoint": "runs/a", "initial_states": "0..9", "training": {"policy": {"n_action_steps": 8}}}
    fewer = {"checkpoint": "runs/a", "n_action_steps": 4, "first_state": 0}
    later = {"checkpoint": "runs/a", "n_action_steps": 4, "first_state": 10}
    rows = bench.keep_row(bench.keep_row([old], fewer), later)
    assert rows == [old, fewer, later]
    rerun = {"checkpoint": "runs/a", "n_action_steps": 8, "first_state": 0, "training": old["training"]}
    assert bench.keep_row(rows, rerun) == [fewer, later, rerun]  # the policy's own 8 is what the old row ran
    assert bench.keep_row(rows, {**fewer, "pooled": 1}) == [old, later, {**fewer, "pooled": 1}]
    one_step = {**fewer, "num_inference_steps": 1}  # another sampler setting is another row
    assert bench.keep_row(rows, one_step) == [old, fewer, later, one_step]


def test_policy_row_survives_its_checkpoint_rotating_out_during_the_evaluation(toy_store, tmp_path, monkeypatch):
    """A training run keeps only its last checkpoints: one evaluated while the run goes on can be deleted before
    the evaluation ends (it happened: a 23-minute LIBERO evaluation lost its row). The budget is read first."""
    import json
    import shutil
    import sys

    import robodit.evaluation.evaluate as ev
    from test_info import _checkpoint

    monkeypatch.chdir(Path(__file__).parents[1])
    ckpt = _checkpoint(toy_store, tmp_path / "run", "dit")
    task = {"successes": 3, "episodes": 4, "success_rate": 0.75, "ci95": [0.3, 0.95], "mean_steps": 10.0}

    def rotated_out(checkpoint, **kwargs):
        assert kwargs["n_action_steps"] == 2 and kwargs["suite"]["seeds"] == [10]
        shutil.rmtree(checkpoint)
        return {"success_rate": 0.75, "pooled": {"episodes": 4, "successes": 3, "ci95": [0.3, 0.95]},
                "tasks": {"libero_object/t": task}, "run": {"env_steps_per_s": 1.0}}

    monkeypatch.setattr(ev, "evaluate", rotated_out)
    out = tmp_path / "libero.json"
    monkeypatch.setattr(sys, "argv", ["libero.py", "--skip", "speed,expert", "--checkpoint", str(ckpt),
                                      "--n-action-steps", "2", "--first-state", "10", "--policy-episodes", "4",
                                      "--json", str(out), "--out", str(tmp_path / "bench")])
    bench.main()
    row = json.loads(out.read_text())["policies"][-1]
    assert (row["training"]["step"], row["n_action_steps"], row["initial_states"]) == (2, 2, "10..13")
