"""What results.json says: rates with no episodes are null (not 0%), a run that measured nothing fails, a reused
out_dir holds only this run's files, counts per task are right, bad knobs and suite env keys fail at once."""

import json

import numpy as np
import pytest

import robodit.evaluation.evaluate as ev
from robodit.evaluation.chains import Job
from robodit.evaluation.engine import JobResult
from robodit.evaluation.report import console_summary
from robodit.evaluation.stats import chain_metrics, mean_rate, rate_summary
from robodit.evaluation.suites import SuiteError, load_suite


class _Engine:
    env_steps, video_fps, crashes = 10, 20.0, []


def _fake_run(outcomes):
    """run_suite stand-in: task -> list of True / False / "error" per episode, in the suite's job order."""

    def run_suite(suite, policy=None, env_kwargs=None, **kw):
        out, seen = [], {}
        for job in suite.jobs(0):
            o = outcomes[job.key][seen.setdefault(job.key, 0)]
            seen[job.key] += 1
            if o == "error":
                out.append(JobResult(job, error="env error on lane 0:\nValueError: boom"))
            else:
                out.append(JobResult(job, successes=[o], steps=[5]))
        return out, _Engine()

    return run_suite


def _suite(episodes):
    return {"name": "two", "kind": "tasks", "simulator": "metaworld", "episodes": 1, "seeds": [100_000],
            "tasks": [{"name": t, "episodes": n} for t, n in episodes.items()]}


def test_rates_over_no_episodes_are_null_and_left_out_of_means():
    assert rate_summary([])["success_rate"] is None
    assert rate_summary([True, False])["success_rate"] == 0.5
    assert mean_rate({"a": rate_summary([True]), "b": rate_summary([]), "c": rate_summary([False, True])}) == 0.75
    assert mean_rate({"a": rate_summary([])}) is None
    empty = chain_metrics([], 3)
    assert empty["avg_completed"] is None and empty["success_at_length"]["3"]["success_rate"] is None


def test_a_task_whose_episodes_all_errored_has_no_rate(monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "run_suite", _fake_run({"reach-v3": [True, False], "push-v3": ["error", "error"]}))
    s = ev.evaluate("expert", suite=_suite({"reach-v3": 2, "push-v3": 2}), out_dir=tmp_path, progress=False)
    assert s["tasks"]["push-v3"]["success_rate"] is None and s["tasks"]["push-v3"]["errors"] == 2
    assert s["success_rate"] == 0.5  # reach's rate alone: push measured nothing, it is not a 0% task
    assert json.loads((tmp_path / "results.json").read_text())["tasks"]["push-v3"]["success_rate"] is None
    assert [ln for ln in (tmp_path / "report.md").read_text().splitlines() if ln.startswith("| push-v3 |")][0].split(" | ")[2] == "n/a"


def test_a_run_where_every_episode_errored_fails_after_writing_results(monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "run_suite", _fake_run({"reach-v3": ["error", "error"]}))
    with pytest.raises(ev.EvaluationError, match="every one of the 2 episodes errored.*ValueError: boom"):
        ev.evaluate("expert", env="metaworld/reach-v3", episodes=2, out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["success_rate"] is None and len(saved["run"]["errors"]) == 2


def test_episode_counts_are_per_task_when_tasks_differ(monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "run_suite", _fake_run({"reach-v3": [True] * 4, "push-v3": [False]}))
    s = ev.evaluate("expert", suite=_suite({"reach-v3": 4, "push-v3": 1}), out_dir=tmp_path, progress=False)
    assert s["episodes_per_task"] == {"reach-v3": 4, "push-v3": 1}
    assert s["pooled"]["episodes"] == 5
    assert "1-4 episodes x 2 task(s), 5 valid" in console_summary(s, tmp_path)
    same = ev.evaluate("expert", suite=_suite({"reach-v3": 1, "push-v3": 1}), out_dir=tmp_path, progress=False)
    assert same["episodes_per_task"] == 1


def test_a_reused_out_dir_keeps_only_this_runs_outputs(monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "run_suite", _fake_run({"reach-v3": [True]}))
    for stale in ("push-v3_ep000.mp4", "chain_drawer_000.mp4", "frames.png", "report.md"):
        (tmp_path / stale).write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "goal_images").mkdir()
    ev.evaluate("expert", env="metaworld/reach-v3", episodes=1, out_dir=tmp_path, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["goal_images", "notes.txt", "report.md", "results.json", "success.png"]
    assert (tmp_path / "report.md").read_text() != "old"


@pytest.mark.parametrize("knob, match", [({"n_action_steps": 0}, "n_action_steps must be >= 1"),
                                          ({"num_inference_steps": 0}, "num_inference_steps must be >= 1")])
def test_zero_knobs_are_errors_not_silent_defaults(tmp_path, knob, match):
    with pytest.raises(ValueError, match=match):
        ev.evaluate("expert", env="metaworld/reach-v3", episodes=1, out_dir=tmp_path, progress=False, **knob)


def test_a_misspelt_suite_env_key_fails_before_anything_runs():
    with pytest.raises(SuiteError, match=r"suite 'x'.*env: metaworld envs take no bogus; their options: image_size"):
        load_suite({**_suite({"reach-v3": 1}), "name": "x", "env": {"bogus": 1}})


def test_cached_goal_images_are_remade_for_other_cameras_or_sizes(tmp_path):
    from robodit.evaluation.goal_images import _matches

    path = tmp_path / "reach-v3.npz"
    np.savez(path, image_corner2=np.zeros((32, 32, 3), np.uint8))
    assert _matches(path, {"image_size": 32, "cameras": ("corner2",)})
    assert not _matches(path, {"image_size": 48, "cameras": ("corner2",)})
    assert not _matches(path, {"image_size": 32, "cameras": ("corner2", "topview")})
    assert not _matches(tmp_path / "missing.npz", {"image_size": 32})


def _eval_into(monkeypatch, out, outcomes, **kw):
    monkeypatch.setattr(ev, "run_suite", _fake_run(outcomes))
    episodes = {t: len(v) for t, v in outcomes.items()}
    return ev.evaluate("expert", suite=_suite(episodes), out_dir=out, progress=False, **kw)


def test_compare_puts_runs_side_by_side_with_a_paired_test(monkeypatch, tmp_path):
    from robodit.evaluation.compare import compare, format_markdown, parse_columns

    _eval_into(monkeypatch, tmp_path / "a", {"reach-v3": [True, True, True, False], "push-v3": [True, True]})
    _eval_into(monkeypatch, tmp_path / "b", {"reach-v3": [False, True, False, False], "push-v3": [False, True]})
    result = compare(parse_columns([str(tmp_path / "a"), str(tmp_path / "b" / "results.json")]))
    assert result["rows"]["reach-v3"] == {"a": 0.75, "b": 0.25}
    assert result["rows"]["mean over tasks"] == {"a": 0.875, "b": 0.375}
    assert result["cells"]["reach-v3"]["a"].startswith("75.0% [")
    # same episodes (tasks, env seeds): a alone solved 3, b alone none -> exact two-sided p = 2 * 1/2^3
    assert result["paired"] == {"episodes": 6, "only_a": 3, "only_b": 0, "p_value": 0.25}
    text = format_markdown(result)
    assert "| **mean over tasks** | 87.5% | 37.5% |" in text and "McNemar exact p = 0.25 (a difference" in text
    assert not result["settings_that_differ"]


def test_compare_groups_seeds_and_says_what_differs(monkeypatch, tmp_path):
    from robodit.evaluation.compare import compare, parse_columns

    for i, reach in enumerate(([True, True], [True, False], [False, False])):
        _eval_into(monkeypatch, tmp_path / f"dit_s{i}", {"reach-v3": reach}, seed=i)
    _eval_into(monkeypatch, tmp_path / "mode", {"reach-v3": [True, True]})
    result = compare(parse_columns([f"dit={tmp_path}/dit_s*", str(tmp_path / "mode")]))
    assert result["rows"]["reach-v3"]["dit"] == pytest.approx(0.5)
    assert result["cells"]["reach-v3"]["dit"] == "50.0% ± 50.0% (3 runs)"
    assert result["paired"] is None  # only for two single runs
    assert "policy_seed" in result["settings_that_differ"]
    from robodit.evaluation.compare import plot_comparison

    columns = parse_columns([f"dit={tmp_path}/dit_s*", str(tmp_path / "mode")])
    assert plot_comparison(tmp_path / "c.png", columns, compare(columns)).stat().st_size > 0


def test_compare_refuses_what_is_not_an_evaluation(tmp_path):
    from robodit.evaluation.compare import parse_columns

    with pytest.raises(FileNotFoundError, match="no results.json"):
        parse_columns([str(tmp_path)])
    (tmp_path / "results.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a robodit evaluation"):
        parse_columns([str(tmp_path)])


def test_compare_cli_prints_and_writes_the_table(monkeypatch, tmp_path, capsys):
    from robodit.cli import main

    _eval_into(monkeypatch, tmp_path / "a", {"reach-v3": [True, False]})
    _eval_into(monkeypatch, tmp_path / "b", {"reach-v3": [True, True]})
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.md"),
                 "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "| | a | b |" in out and out.split("\nplot: ")[0].strip() == (tmp_path / "c.md").read_text().strip()
    assert json.loads((tmp_path / "c.json").read_text())["rows"]["reach-v3"] == {"a": 0.5, "b": 1.0}
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_compare_means_only_over_the_tasks_every_run_has(monkeypatch, tmp_path):
    """A mean over reach+push against a mean over push alone compared different things, without a word."""
    from robodit.evaluation.compare import compare, format_markdown, parse_columns

    _eval_into(monkeypatch, tmp_path / "both", {"reach-v3": [True, True], "push-v3": [False, False]})
    _eval_into(monkeypatch, tmp_path / "push", {"push-v3": [True, False]})
    result = compare(parse_columns([str(tmp_path / "both"), str(tmp_path / "push")]))
    assert result["shared_tasks"] == ["push-v3"]
    assert result["rows"]["mean over the 1 shared task(s)"] == {"both": 0.0, "push": 0.5}
    assert "tasks" in result["settings_that_differ"]
    assert "the mean is over the 1 every run has" in format_markdown(result)


def test_compare_flags_episode_limits_and_training_seeds(monkeypatch, tmp_path):
    from robodit.evaluation.compare import compare, parse_columns

    _eval_into(monkeypatch, tmp_path / "a", {"reach-v3": [True]})
    _eval_into(monkeypatch, tmp_path / "b", {"reach-v3": [True]})
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    saved["suite"]["max_steps"], saved["training_seeds"] = 30, [100000]
    (tmp_path / "b" / "results.json").write_text(json.dumps(saved))
    differ = compare(parse_columns([str(tmp_path / "a"), str(tmp_path / "b")]))["settings_that_differ"]
    assert {"suite.max_steps", "training_seeds"} <= set(differ)


def test_compare_gives_chain_lengths_their_intervals(tmp_path):
    from robodit.evaluation.compare import compare, parse_columns
    from robodit.evaluation.stats import chain_metrics

    for name, chains in (("a", [[True, True], [True, False]]), ("b", [[False], [True, True]])):
        m = chain_metrics(chains, 2)
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "schema": "robodit.eval/2", "kind": "chains", "suite": {"name": "c", "chain_length": 2},
            "chains": {"policy": m}, "success_rate": m["success_at_length"]["2"]["success_rate"]}))
    result = compare(parse_columns([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert result["cells"]["chain length 1"]["a"] == "100.0% [34, 100] n=2"
    assert result["rows"]["avg completed"] == {"a": 1.5, "b": 1.0}


def test_seed_blocks_are_checked_at_the_episode_counts_that_run():
    suite = {**_suite({"reach-v3": 10}), "seeds": [100_000, 100_003]}
    assert len(ev.resolve_suite(None, suite, episodes=3).jobs()) == 6  # was refused for the file's 10 episodes
    with pytest.raises(SuiteError, match="blocks 100000 and 100002 overlap with 4 episodes"):
        ev.resolve_suite(None, {**suite, "seeds": [100_000, 100_002], "episodes": 2}, episodes=4)  # ran twice


def test_a_negative_seed_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -5"):
        ev.evaluate("expert", env="metaworld/reach-v3", episodes=1, seed=-5, out_dir=tmp_path, progress=False)


def test_training_time_eval_checks_its_tasks_and_ranking_at_start(tmp_path):
    from robodit.evaluation.training_eval import PeriodicEvaluator

    record = {"tasks": ["reach-v3", "push-v3"], "env": {"name": "metaworld/reach-v3"}}
    with pytest.raises(ValueError, match=r"train.eval: tasks \['door-open-v3'"):  # was: after training, at step N
        PeriodicEvaluator({"every": 10, "suite": "mt10", "tasks": ["reach-v3", "door-open-v3"]}, tmp_path, record)
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_text(json.dumps({"suite": "metaworld_chains", "metric":
                                                            "eval/avg_completed", "ranking": []}))
    with pytest.raises(ValueError, match="cannot share a ranking"):
        PeriodicEvaluator({"every": 10}, tmp_path, record)


def test_compare_plot_of_seed_groups_over_different_task_sets(monkeypatch, tmp_path):
    """The plot recomputed a group's spread without the shared-task mean: ZeroDivisionError."""
    from robodit.evaluation.compare import compare, parse_columns, plot_comparison

    for i in range(2):
        _eval_into(monkeypatch, tmp_path / f"g_s{i}", {"reach-v3": [True, i == 0], "push-v3": [False, True]}, seed=i)
    _eval_into(monkeypatch, tmp_path / "push", {"push-v3": [True, False]})
    columns = parse_columns([f"g={tmp_path}/g_s*", str(tmp_path / "push")])
    assert plot_comparison(tmp_path / "c.png", columns, compare(columns)).stat().st_size > 0


def test_the_simulators_cameras_are_the_policys_image_keys():
    """Cameras are found by dtype/shape, not by an `image_` prefix: a policy trained on converted real-robot data
    with a `wrist` camera got no images from the simulator and failed later on a missing key; now the evaluator says
    why at once. Simulator cameras (`image_<camera>`) still become the env's cameras and image size."""
    from types import SimpleNamespace

    sim = SimpleNamespace(obs_shapes={"state": ((39,), "float32"), "image_corner2": ((32, 32, 3), "uint8"),
                                      "image_gripperPOV": ((32, 32, 3), "uint8")})
    assert ev.env_kwargs_from_record({}, sim) == {"image_size": 32, "cameras": ("corner2", "gripperPOV")}
    real = SimpleNamespace(obs_shapes={"state": ((39,), "float32"), "wrist": ((32, 32, 3), "uint8")})
    with pytest.raises(ValueError, match=r"cameras \['wrist'\] are not simulator cameras.*image_<camera>"):
        ev.env_kwargs_from_record({}, real)
