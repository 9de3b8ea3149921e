"""benchmarks/chains.py --action-error: the offline diagnosis lines a policy's chunk up with the demo actions it
is scored against (no simulator, no training: an oracle policy that knows the demos)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import robodit
from robodit.datasets.store import DemoStore

_spec = importlib.util.spec_from_file_location("bench_chains", Path(__file__).parents[1] / "benchmarks" / "chains.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TASKS = ("drawer-open-v3", "drawer-close-v3")


def _demo_action(episode: np.ndarray, frame: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(episode + 0.1 * frame), np.cos(episode - 0.2 * frame)], axis=-1).astype(np.float32)


class Oracle:
    """Knows every demo: the state is (episode, frame), and a chunk is the demo's next actions when the goal names
    the episode's task, their negation when it names the other task."""

    obs_horizon, num_inference_steps, language_encoder, image_goals = 2, 10, None, ()
    obs_shapes = {"state": ((2,), "float32")}

    def eval(self):
        return self

    def on_weights_changed(self):
        pass

    def predict_action(self, obs, goal=None, generator=None):
        state = np.asarray(obs["state"])
        assert state.shape[1:] == (2, 2)
        episode, frame = state[:, -1, 0], state[:, -1, 1]
        assert np.array_equal(state[:, 0, 1], np.maximum(frame - 1, 0))  # history clipped at the episode start
        chunk = _demo_action(episode[:, None], frame[:, None] + np.arange(10))
        right = np.array([t == TASKS[int(e) % 2] for t, e in zip(goal["task"], episode)])
        return torch.from_numpy(np.where(right[:, None, None], chunk, -chunk))


def test_action_error_scores_the_chunk_against_the_demo_actions_from_that_frame(tmp_path, monkeypatch):
    store = DemoStore.create(tmp_path / "chains.zarr", {"state": ((2,), "float32"), "action": ((2,), "float32")},
                             fps=10.0, robot="toy", env={"name": "toy/none"})
    rng = np.random.default_rng(0)
    with store:
        for e in range(12):
            n = int(rng.integers(8, 40))
            frames = np.arange(n, dtype=np.float32)
            store.append_episode({"state": np.stack([np.full(n, e, np.float32), frames], -1),
                                  "action": _demo_action(np.float32(e), frames)}, task=TASKS[e % 2])
    monkeypatch.setattr(robodit, "load_policy", lambda ckpt: Oracle())
    suite = SimpleNamespace(scenes={"drawer": list(TASKS)},
                            instructions={"drawer-open-v3": "open the drawer", "drawer-close-v3": "close the drawer"})
    out = bench.action_error("oracle", tmp_path / "chains.zarr", suite, n=10)
    assert out["segments"] == 10 and out["first_actions"] == 5
    assert out["right goal"] == 0.0 and out["right goal, 1 denoising step"] == 0.0
    assert out["other task's goal"] > 0.5 and out["mean |right - other| action"] > 0.5


def test_every_row_that_reuses_a_checkpoint_names_a_row_that_trains_one():
    """An evaluation-only row (`reuse`, e.g. mdt_reeval_rows) must point at a training row on the same store, or
    `--rows` fails only after the other rows have spent their 30 minutes."""
    for name, spec in bench.ROWS.items():
        if "reuse" in spec:
            source = bench.ROWS.get(spec["reuse"])
            assert source is not None and "policy" in source, (name, spec["reuse"])
            assert source["store"] == spec["store"], name
    one_step = bench.ROWS["mdt_image_fast_nomgf_1step_oh2_n5"]
    assert one_step["goal"] == "image" and one_step["eval"] == {"n_action_steps": 5, "num_inference_steps": 1}
    assert bench.ROWS["mdt_lang_fast_nomgf_oh2_n3"]["eval"] == {"n_action_steps": 3}
