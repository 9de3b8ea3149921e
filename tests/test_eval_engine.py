"""Parallel rollouts: fixed seeds reproduce exactly for any worker count, and a worker crash changes nothing."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import robodit
from robodit.evaluation.evaluate import evaluate, run_suite
from robodit.evaluation.suites import suite_from_tasks


@pytest.fixture(scope="module")
def reach_checkpoint(tmp_path_factory):
    """A tiny DiT trained for 2 steps on one scripted reach-v3 demo (state observations)."""
    from robodit.datasets.collect import collect
    from robodit.training.trainer import train

    root = tmp_path_factory.mktemp("reach")
    collect("metaworld/reach-v3", episodes=1, out=root / "demos.zarr", seed=0, progress=False)
    cfg = OmegaConf.create({
        "out_dir": str(root / "run"),
        "policy": dict(OmegaConf.to_container(OmegaConf.load("configs/policy/dit.yaml")), size="tiny",
                       action_horizon=8, n_action_steps=4, num_inference_steps=2),
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")),
                        path=str(root / "demos.zarr")),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(OmegaConf.load("configs/train.yaml").train), steps=2, batch_size=8,
                      val_every=0, progress=False),
    })
    return train(cfg)


def _digests(results):
    return [(r.job.index, r.job.seed, r.success, tuple(r.steps), r.digest) for r in results]


def test_seeded_results_identical_for_any_worker_count(reach_checkpoint):
    policy = robodit.load_policy(reach_checkpoint)
    suite = suite_from_tasks("metaworld", ["reach-v3"], episodes=5, seed=100_000, max_steps=30)
    kw = dict(num_envs=3, pipeline_groups=2, seed=7, videos=0, progress=False)
    base, _ = run_suite(suite, policy, workers=0, **kw)
    again, _ = run_suite(suite, policy, workers=0, **kw)
    two, engine = run_suite(suite, policy, workers=2, **kw)
    assert _digests(base) == _digests(again) == _digests(two)
    assert len({r.digest for r in base}) == 5  # five different episodes, not one repeated
    assert engine.env_steps == sum(sum(r.steps) for r in two) and not engine.crashes
    other_seed, _ = run_suite(suite, policy, workers=0, **{**kw, "seed": 8})
    assert _digests(other_seed) != _digests(base)  # the policy noise does follow the seed


def test_worker_crash_is_survived_reported_and_changes_nothing(reach_checkpoint, tmp_path):
    """Episode 1's worker dies (os._exit) at its 9th step: replaced, episode re-run, same results as no crash."""
    kw = dict(episodes=4, max_steps=24, num_envs=2, pipeline_groups=1, workers=1, videos=0, progress=False)
    clean = evaluate(reach_checkpoint, out_dir=tmp_path / "clean", **kw)
    crashed = evaluate(reach_checkpoint, out_dir=tmp_path / "crash", inject_crash={1: 9}, **kw)
    (crash,) = crashed["run"]["crashes"]
    assert crash["exitcode"] == 17 and crash["job"] == 1 and crash["seed"] == 100_001 and crash["at_step"] == 8
    assert crash["action"].startswith("re-ran from seed, replayed 8 actions exactly")
    assert crash["rerun_jobs"] == [0, 1]  # episode 0 shared the worker: re-run too
    assert crashed["run"]["restarted_episodes"] == 2 and crashed["run"]["errors"] == []
    t_clean, t_crash = clean["tasks"]["reach-v3"], crashed["tasks"]["reach-v3"]
    assert t_crash["episodes"] == 4  # nothing dropped, nothing counted as a failure
    assert t_crash["fingerprint"] == t_clean["fingerprint"]
    assert t_crash["success_per_episode"] == t_clean["success_per_episode"]
    saved = json.loads((tmp_path / "crash" / "results.json").read_text())
    assert saved["run"]["crashes"][0]["job"] == 1
    report = (tmp_path / "crash" / "report.md").read_text()
    assert "Env worker crashes" in report and "none counted as failures" in report


def test_episode_that_always_kills_its_worker_is_an_error_not_a_failure(reach_checkpoint, tmp_path):
    from robodit.evaluation.engine import RolloutEngine

    policy = robodit.load_policy(reach_checkpoint)
    suite = suite_from_tasks("metaworld", ["reach-v3"], episodes=2, seed=100_000, max_steps=12)
    engine = RolloutEngine("metaworld", {}, policy, None, num_envs=2, workers=1, pipeline_groups=1, max_attempts=1,
                           inject_crash={0: 3})
    results = engine.run(suite.jobs(videos=0))
    assert results[0].error and "died" in results[0].error and results[0].successes == []
    assert results[1].error is None and sum(results[1].steps) == 12
    assert engine.crashes[0]["action"].startswith("gave up")


def test_a_worker_that_hangs_while_replaying_is_replaced_again(reach_checkpoint, tmp_path):
    """Recovery is re-entrant: episode 1 kills its worker at step 9; the replacement then hangs while replaying
    episode 0 (its 2nd start, step 5 of the 12 it replays). That timeout was not caught and aborted the whole
    evaluation; now the replacement is replaced too, and the results still equal the clean run's."""
    kw = dict(episodes=4, max_steps=24, num_envs=2, pipeline_groups=1, workers=1, videos=0, progress=False,
              timeout_s=8.0)
    clean = evaluate(reach_checkpoint, out_dir=tmp_path / "clean", **kw)
    crashed = evaluate(reach_checkpoint, out_dir=tmp_path / "crash", inject_crash={1: 9, 0: [None, ("hang", 5)]},
                       **kw)
    first, second = crashed["run"]["crashes"]
    assert first["job"] == 1 and first["exitcode"] == 17 and first["during"] == "run"
    assert first["action"] == "the replacement failed too, replaying episode 0: replaced again"
    assert second["job"] == 0 and "no reply for 8 s" in second["reason"] and second["during"] == "replay"
    assert second["attempt"] == 1 and second["action"].startswith("re-ran from seed, replayed 12 actions exactly")
    assert crashed["run"]["errors"] == []
    t_clean, t_crash = clean["tasks"]["reach-v3"], crashed["tasks"]["reach-v3"]
    assert t_crash["episodes"] == 4 and t_crash["fingerprint"] == t_clean["fingerprint"]


def test_an_episode_that_crashes_every_replay_is_errored_and_the_run_goes_on(reach_checkpoint, tmp_path):
    """Episode 0 kills its worker at step 9, then again at step 2 of every replay: after max_attempts (3) it is
    reported as errored; episode 1 (same worker, replayed each time) and the others finish as in a clean run."""
    kw = dict(episodes=4, max_steps=24, num_envs=2, pipeline_groups=1, workers=1, videos=0, progress=False)
    clean = evaluate(reach_checkpoint, out_dir=tmp_path / "clean", **kw)
    crashed = evaluate(reach_checkpoint, out_dir=tmp_path / "crash", inject_crash={0: [9, 2, 2, 2, 2]}, **kw)
    crashes = crashed["run"]["crashes"]
    assert [c["job"] for c in crashes] == [0, 0, 0] and [c["attempt"] for c in crashes] == [1, 2, 3]
    assert [c["during"] for c in crashes] == ["run", "replay", "replay"]
    assert crashes[-1]["action"].startswith("gave up")
    (error,) = crashed["run"]["errors"]
    assert error["job"] == 0 and "3 times" in error["error"]
    t_clean, t_crash = clean["tasks"]["reach-v3"], crashed["tasks"]["reach-v3"]
    assert t_crash["episodes"] == 3 and t_crash["errors"] == 1
    assert t_crash["seeds"] == t_clean["seeds"][1:]
    assert t_crash["success_per_episode"] == t_clean["success_per_episode"][1:]
    saved = json.loads((tmp_path / "crash" / "results.json").read_text())
    assert saved["run"]["errors"][0]["job"] == 0


def test_env_names_the_task_run_and_overlap_with_training_is_flagged(reach_checkpoint, tmp_path):
    """env=SIM/TASK overrides the store's tasks (it was silently ignored); evaluating on the demos' own seed
    (0) or on a task the checkpoint never saw is recorded and said, not hidden."""
    kw = dict(episodes=1, max_steps=4, num_envs=1, workers=0, videos=0, progress=False)
    other = evaluate(reach_checkpoint, env="metaworld/push-v3", out_dir=tmp_path / "push", **kw)
    assert list(other["tasks"]) == ["push-v3"] and other["untrained_tasks"] == ["push-v3"]
    assert other["training_seeds"] == []  # default seeds 100000+ are held out
    own = evaluate(reach_checkpoint, seed=0, out_dir=tmp_path / "own", **kw)
    assert list(own["tasks"]) == ["reach-v3"] and own["untrained_tasks"] == [] and own["training_seeds"] == [0]
    assert own["policy_seed"] == 0 and own["seed"] == 0
    with pytest.raises(ValueError, match="n_action_steps=9 exceeds the 8 actions"):
        evaluate(reach_checkpoint, n_action_steps=9, out_dir=tmp_path / "x", **kw)


def test_an_episode_does_not_depend_on_what_shares_its_batch(reach_checkpoint):
    """Noise is drawn per episode: re-running one task alone, or with other num_envs / pipeline_groups,
    reproduces its episodes exactly (before, noise was per batch, so the suite's other tasks changed them)."""
    policy = robodit.load_policy(reach_checkpoint)
    kw = dict(seed=7, videos=0, progress=False, workers=0)
    both = suite_from_tasks("metaworld", ["reach-v3", "push-v3"], episodes=3, seed=100_000, max_steps=20)
    alone = suite_from_tasks("metaworld", ["push-v3"], episodes=3, seed=100_000, max_steps=20)
    mixed, _ = run_suite(both, policy, num_envs=4, pipeline_groups=2, **kw)
    single, _ = run_suite(alone, policy, num_envs=1, pipeline_groups=1, **kw)
    assert [r.digest for r in mixed if r.job.key == "push-v3"] == [r.digest for r in single]
    assert len({r.digest for r in single}) == 3


def test_a_lone_row_is_padded_so_it_takes_the_batched_path(reach_checkpoint, monkeypatch):
    """A batch of one can take another matmul path (4.5e-8 off on a trained MT10 DiT, enough for the simulator to
    diverge): the engine never calls the policy with one row, so num_envs=1 reproduces batched runs."""
    policy = robodit.load_policy(reach_checkpoint)
    sizes, predict = [], policy.predict_action
    monkeypatch.setattr(policy, "predict_action", lambda obs, **kw: sizes.append(len(obs["state"])) or predict(obs, **kw))
    suite = suite_from_tasks("metaworld", ["reach-v3"], episodes=2, seed=100_000, max_steps=12)
    kw = dict(seed=3, videos=0, progress=False, workers=0)
    alone, _ = run_suite(suite, policy, num_envs=1, pipeline_groups=1, **kw)
    assert sizes and min(sizes) == 2
    batched, _ = run_suite(suite, policy, num_envs=2, pipeline_groups=1, **kw)
    assert [r.digest for r in alone] == [r.digest for r in batched]


def test_eval_through_a_policy_server_gives_the_local_episodes(reach_checkpoint, tmp_path, monkeypatch):
    """`eval.py checkpoint=ws://...` evaluates a policy served by `robodit serve`: the tasks come from the server's
    meta (the checkpoint's store record), each episode's noise generator travels with its request, and every
    episode (success, steps, every action) equals the local evaluation of the same checkpoint."""
    root = Path(__file__).resolve().parents[1]
    token = "eval-test-token-0123456789"
    env = dict(os.environ, OMP_NUM_THREADS="1", ROBODIT_TOKEN=token)
    server = subprocess.Popen([sys.executable, "-m", "robodit.cli", "serve", str(reach_checkpoint), "--port", "0",
                               "--threads", "1", "--max-batch", "2", "--max-seconds", "300"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "serving" in line, line + server.stderr.read()
        url = line.split(" on ")[1].split()[0]
        knobs = dict(episodes=3, max_steps=20, num_envs=2, pipeline_groups=1, workers=0, seed=100_000)
        remote = subprocess.run([sys.executable, "eval.py", f"checkpoint={url}", f"out_dir={tmp_path / 'remote'}",
                                 "videos=0", "progress=false", *(f"{k}={v}" for k, v in knobs.items())],
                                cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert remote.returncode == 0, remote.stderr[-3000:]
        monkeypatch.delenv("ROBODIT_TOKEN", raising=False)
        with pytest.raises(ValueError, match=r"put its token in \$ROBODIT_TOKEN"):
            evaluate(url, out_dir=tmp_path / "x", episodes=1)
        monkeypatch.setenv("ROBODIT_TOKEN", token)
        with pytest.raises(ValueError, match="batches of 3 observations.*at most 2"):
            evaluate(url, out_dir=tmp_path / "x", episodes=1, num_envs=6, pipeline_groups=2)
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    local = evaluate(reach_checkpoint, out_dir=tmp_path / "local", videos=0, progress=False, **knobs)
    served = json.loads((tmp_path / "remote" / "results.json").read_text())
    assert served["server"]["checkpoint"] == str(reach_checkpoint) and served["checkpoint"] == url
    assert list(served["tasks"]) == list(local["tasks"]) == ["reach-v3"]  # from the store record, via the meta
    mine, theirs = served["tasks"]["reach-v3"], local["tasks"]["reach-v3"]
    for key in ("seeds", "success_per_episode", "mean_steps", "fingerprint"):
        assert mine[key] == theirs[key], key
    assert served["run"]["env_steps"] == local["run"]["env_steps"]
