"""Suite YAML: the shipped suites load; a wrong one fails before anything runs, naming the file and key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robodit.evaluation.suites import SuiteError, load_suite

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, data, name="s.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_suites_load():
    mt10, mt50 = load_suite("mt10"), load_suite("mt50")
    assert len(mt10.tasks) == 10 and len(mt50.tasks) == 50
    assert all(t.instruction for t in mt50.tasks)
    jobs = mt10.jobs(videos=1)
    assert len(jobs) == 10 * 10 and jobs[0].seed == 100_000 and jobs[9].seed == 100_009
    assert sum(j.record for j in jobs) == 10  # first episode of each task
    chains = load_suite("metaworld_chains")
    assert chains.kind == "chains" and chains.chains >= 100 and chains.chain_length == 5
    cj = chains.jobs()
    assert len(cj) == chains.chains and all(len(j.tasks) == 5 for j in cj)
    assert all(a != b for j in cj for a, b in zip(j.tasks, j.tasks[1:]))  # a cycle never repeats a subtask


@pytest.mark.parametrize("patch, match", [
    ({"tasks": [{"name": "reach-v3"}, {"name": "rech-v3"}]}, r"s\.yaml: tasks\[1\]\.name: unknown Meta-World task "
                                                             r"'rech-v3'; did you mean reach-v3"),
    ({"episodes": 0}, r"s\.yaml: episodes: must be an integer >= 1, got 0"),
    ({"tasks": [{"name": "reach-v3", "episodes": 0}]}, r"tasks\[0\]\.episodes: must be an integer >= 1"),
    ({"episode": 3}, r"s\.yaml: unknown key\(s\) \['episode'\]"),
    ({"tasks": []}, r"tasks: must be a non-empty list"),
    ({"seeds": [0, 5]}, r"seeds: blocks 0 and 5 overlap"),
    ({"simulator": "gazebo"}, r"simulator: must be one of"),
    ({"tasks": [{"name": "reach-v3", "goal_image": "nope.png"}]}, r"tasks\[0\]\.goal_image: .*nope.png does not exist"),
])
def test_bad_task_suites_are_clear_errors(tmp_path, patch, match):
    data = {"name": "s", "kind": "tasks", "simulator": "metaworld", "episodes": 10, "seeds": [100000],
            "tasks": [{"name": "reach-v3"}], **patch}
    with pytest.raises(SuiteError, match=match):
        load_suite(_write(tmp_path, data))


def test_bad_chain_suites_are_clear_errors(tmp_path):
    base = {"kind": "chains", "simulator": "metaworld", "chains": 3}
    with pytest.raises(SuiteError, match=r"scenes\.mixed: tasks do not share one scene model"):
        load_suite(_write(tmp_path, {**base, "scenes": {"mixed": ["drawer-open-v3", "window-open-v3"]}}))
    with pytest.raises(SuiteError, match=r"chains: must be an integer >= 1, got 0"):
        load_suite(_write(tmp_path, {**base, "chains": 0, "scenes": {"d": ["drawer-open-v3", "drawer-close-v3"]}}))
    with pytest.raises(SuiteError, match=r"scenes\.d\[1\]: unknown Meta-World task"):
        load_suite(_write(tmp_path, {**base, "scenes": {"d": ["drawer-open-v3", "drawer-shut-v3"]}}))


def test_unknown_suite_name_lists_the_known_ones():
    with pytest.raises(SuiteError, match="mt10"):
        load_suite("mt11")


def test_eval_cli_rejects_a_bad_suite_before_running(tmp_path):
    """`eval.py suite=NAME` reports the bad key of the suite file and starts no rollout."""
    (tmp_path / "suite").mkdir()
    _write(tmp_path / "suite", {"kind": "tasks", "simulator": "metaworld", "episodes": 0,
                                "tasks": [{"name": "reach-v3"}]}, "broken.yaml")
    env = dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, "eval.py", "checkpoint=expert", "suite=broken",
                           f"hydra.searchpath=[file://{tmp_path}]", f"out_dir={tmp_path / 'out'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{tmp_path}/suite/broken.yaml: episodes: must be an integer >= 1, got 0" in out
    assert not (tmp_path / "out" / "results.json").exists()
