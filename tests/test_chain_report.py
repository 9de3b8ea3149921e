"""The chain report: per scene, where chains break (transition matrix), captioned whole-chain videos, every
number read from results.json; `robodit compare` on two chain evaluations: the average-length difference with a
bootstrap interval over chains."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest

from robodit.envs.metaworld_chains import ChainEpisode
from robodit.evaluation.compare import Column, compare, format_markdown
from robodit.evaluation.evaluate import evaluate
from robodit.evaluation.report import write_report
from robodit.evaluation.stats import bootstrap_mean_difference, transition_failures


@pytest.fixture(scope="module")
def expert_chains(tmp_path_factory):
    out = tmp_path_factory.mktemp("chains")
    summary = evaluate("expert", suite="metaworld_chains", tasks=["drawer-open-v3", "drawer-close-v3"], episodes=3,
                       out_dir=out, workers=0, num_envs=3, progress=False, videos=1)
    return out, summary


def test_report_numbers_come_from_results_json(expert_chains):
    out, summary = expert_chains
    res = json.loads((out / "results.json").read_text())
    m = res["chains"]["expert"]
    assert len(m["per_chain"]) == 3 and [sum(1 for _ in c["successes"]) for c in m["per_chain"]] == [
        len(c["successes"]) for c in m["per_chain"]]
    start = m["per_scene"]["drawer"]["transitions"]["(start)"]
    assert sum(v["attempts"] for v in start.values()) == 3  # every chain starts once
    # change the numbers in results.json: the report regenerated from it shows the changed ones
    m["avg_completed"] = 1.23
    first = next(iter(start))
    m["per_scene"]["drawer"]["transitions"]["(start)"][first] = {"attempts": 9, "failures": 7}
    m["per_scene"]["drawer"]["avg_completed"] = 4.56
    (out / "results.json").write_text(json.dumps(res))
    text = write_report(out).read_text()
    assert "**1.23**" in text and "| drawer | 3 | 4.56 |" in text and "7/9 failed" in text
    assert "Where chains break" in text


def test_one_captioned_video_per_scene_plays_the_whole_chain(expert_chains):
    out, summary = expert_chains
    videos = [p for p in summary["videos"] if "chain_drawer" in p]
    assert len(videos) == 1
    frames = imageio.mimread(videos[0], memtest=False)
    chain = summary["chains"]["expert"]["per_chain"][0]
    steps_total = sum(1 for _ in frames)
    assert steps_total >= 5  # the whole chain, not one subtask: about sum(steps) / stride frames
    band, picture = frames[0][:28], frames[0][28:]
    assert picture.shape[:2] == (256, 256)
    assert band.max() > 200 and np.median(band) < 60  # white caption text on the dark band
    assert len(chain["tasks"]) == 5


def test_frame_subtasks_follow_the_step_counts():
    # frames at chain steps 0, 4, 8, 12, 16; subtasks ended at steps 5 and 12
    assert ChainEpisode.frame_subtasks([5, 7], 5, video_stride=4) == [0, 0, 1, 1, 1]
    assert ChainEpisode.frame_subtasks([8, 4], 4, video_stride=4) == [0, 0, 0, 1]  # frame 8 shows subtask 0's end


def test_transition_failures_and_bootstrap():
    t = transition_failures([(["a", "b", "a"], [True, False]), (["b", "a", "b"], [True, True, True]),
                             (["a", "b", "a"], [False])])
    assert t["(start)"] == {"a": {"attempts": 2, "failures": 1}, "b": {"attempts": 1, "failures": 0}}
    assert t["a"]["b"] == {"attempts": 2, "failures": 1} and t["b"]["a"] == {"attempts": 1, "failures": 0}
    same = bootstrap_mean_difference([1, 2, 3, 4], [1, 2, 3, 4], paired=True)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]  # paired: identical chains cancel exactly
    a = np.array([0, 10, 1, 9, 2, 8] * 5)
    b = a + np.array([1, 0, 1, 1, 1, 1] * 5)  # b completes one more subtask on 5 of every 6 chains
    shifted = bootstrap_mean_difference(a, b, paired=True)
    assert shifted["difference"] == pytest.approx(5 / 6) and 0.5 < shifted["ci95"][0] <= shifted["ci95"][1] <= 1
    unpaired = bootstrap_mean_difference(a, b, paired=False)
    assert unpaired["ci95"][0] < 0 < unpaired["ci95"][1]  # the same gap is noise without the pairing


def test_compare_two_chain_evaluations_gives_the_length_difference(expert_chains):
    out, _ = expert_chains
    a = json.loads((out / "results.json").read_text())
    b = json.loads(json.dumps(a))
    done = a["chains"]["expert"]["completed_per_chain"]
    b["chains"]["expert"]["completed_per_chain"] = [max(0, d - 1) for d in done]
    result = compare([Column("A", [a]), Column("B", [b])])
    diff = result["avg_completed_difference"]
    assert diff["paired"] and diff["difference"] == pytest.approx(np.mean([max(0, d - 1) for d in done]) - np.mean(done))
    assert diff["ci95"][0] <= diff["difference"] <= diff["ci95"][1]
    assert "Average completed length, B − A" in format_markdown(result)
    # a chain that errored in one run (absent there) is left out of both: still paired, over the shared ones
    b["chains"]["expert"]["per_chain"] = b["chains"]["expert"]["per_chain"][1:]
    b["chains"]["expert"]["completed_per_chain"] = b["chains"]["expert"]["completed_per_chain"][1:]
    diff = compare([Column("A", [a]), Column("B", [b])])["avg_completed_difference"]
    assert diff["paired"] and diff["units"] == [2, 2] and diff["left_out"] == [1, 0]
    for c in b["chains"]["expert"]["per_chain"]:  # other chains altogether: resampled independently
        c["seed"] += 1000
    assert not compare([Column("A", [a]), Column("B", [b])])["avg_completed_difference"]["paired"]


def test_compare_labels_two_eval_dirs_apart(tmp_path, expert_chains):
    """Two `<run>/eval` dirs were both labelled "eval": the table showed the second run in both columns."""
    from robodit.evaluation.compare import parse_columns

    out, _ = expert_chains
    res = json.loads((out / "results.json").read_text())
    for name, avg in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name / "eval").mkdir(parents=True)
        res["chains"]["expert"]["avg_completed"] = avg
        (tmp_path / name / "eval" / "results.json").write_text(json.dumps(res))
    columns = parse_columns([str(tmp_path / "a" / "eval"), str(tmp_path / "b" / "eval")])
    assert [c.label for c in columns] == ["a/eval", "b/eval"]
    assert compare(columns)["rows"]["avg completed"] == {"a/eval": 1.0, "b/eval": 2.0}
