"""`robodit export --format native`: a DiT's denoising loop in C, its condition in C too for state observations (an
ONNX graph for images), gives the eager actions for the same noise (task tokens, several state keys, images,
x0-prediction with clipping, 10 steps), loads behind `robodit.load_policy`, serves with `--backend native`, and
refuses what the C loop does not hold, by name."""

import numpy as np
import pytest
import torch
from _control_fakes import tiny_dit

import robodit
from robodit.cli import main
from robodit.deploy import native
from robodit.deploy.export import ExportError, export_policy
from robodit.deploy.exported import ExportedPolicy
from robodit.deploy.server import check_backend
from robodit.training.checkpoint import export_state, save_checkpoint
from test_export import _agree, _trained_looking  # noqa: E402  (random weights; eager vs exported, two seeds)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
if not native.shutil.which("cc") and not native.shutil.which("gcc"):
    pytest.skip("no C compiler", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    """A fresh compile cache for this module (the library is built once, on the first load)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ROBODIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def _dit(**kw):
    from robodit.datasets.normalizer import Normalizer
    from robodit.policies.dit import DiTPolicy

    shapes = kw.pop("shapes", {"state": {"shape": [6], "dtype": "float32"}})
    st = lambda d: {"min": -np.ones(d), "max": np.ones(d) * 2, "mean": np.zeros(d), "std": np.ones(d)}  # noqa: E731
    stats = {k: st(v["shape"][0]) for k, v in shapes.items() if len(v["shape"]) == 1}
    stats = {k: {**v, "min": v["min"] - i, "max": v["max"] + i} for i, (k, v) in enumerate(stats.items())}
    meta = {"obs": shapes, "action": {"shape": [3]}, "num_tasks": kw.pop("num_tasks", 1)}
    torch.manual_seed(0)
    return _trained_looking(DiTPolicy(meta, Normalizer({**stats, "action": st(3)}), size="tiny",
                                      action_horizon=8, n_action_steps=4, **kw))


def test_cli_export_matches_eager_with_task_tokens_and_serves(tmp_path, capsys):
    policy = _trained_looking(tiny_dit(state_dim=6, action_dim=4, steps=3, num_tasks=2))
    cfg = {"policy": {"_target_": "robodit.policies.dit.DiTPolicy", "size": "tiny", "action_horizon": 8,
                      "n_action_steps": 4, "num_inference_steps": 3},
           "shape_meta": policy.shape_meta, "store": {"fps": 30.0, "tasks": ["reach", "push"]}}
    ckpt = save_checkpoint(tmp_path / "ckpt" / "step_1", model_state=export_state(policy), ema_state=None,
                           normalizer_state=policy.normalizer.state_dict_flat(), config=cfg)
    out = tmp_path / "native"
    assert main(["export", str(ckpt), "--out", str(out), "--format", "native"]) == 0
    assert {p.name for p in out.iterdir()} >= {"denoiser.safetensors", "encoder.onnx", "export.json"}
    eager, exported = robodit.load_policy(ckpt), robodit.load_policy(out)
    assert isinstance(exported, ExportedPolicy) and exported.format == "native"
    obs = {"state": np.random.default_rng(0).normal(size=(3, 2, 6)).astype(np.float32)}
    _agree(eager, exported, obs, {"task": ["push", "reach", "push"]})
    # the same noise through the one-graph ONNX export: both artifacts compute the same chunk
    onnx = ExportedPolicy(export_policy(eager, tmp_path / "onnx", "onnx"))
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.allclose(exported.predict_action(obs, {"task_id": [1, 0, 1]}, generator=gen()),
                          onnx.predict_action(obs, {"task_id": [1, 0, 1]}, generator=gen()), atol=1e-4)
    main(["info", str(out)])
    info = capsys.readouterr().out
    assert "dit exported as native (ddim-3" in info and "condition: in C" in info and "reach, push" in info
    check_backend(out, "native")
    with pytest.raises(ValueError, match="--backend native"):
        check_backend(out, "onnx")


@pytest.mark.parametrize("variant", ["x0_clip", "images", "single_task_10_steps"])
def test_variants_match_eager(tmp_path, variant):
    if variant == "x0_clip":  # the DDIM table's clamped-x0 branch
        policy = _dit(formulation={"name": "ddpm", "prediction": "sample", "clip_sample": 1.0},
                      num_inference_steps=4)
        obs = {"state": torch.randn(2, 2, 6)}
    elif variant == "images":  # the condition graph holds the image encoder
        policy = _dit(shapes={"state": {"shape": [6], "dtype": "float32"},
                              "cam": {"shape": [16, 16, 3], "dtype": "uint8"}}, num_inference_steps=2)
        obs = {"state": torch.randn(1, 2, 6), "cam": torch.randint(0, 256, (1, 2, 3, 16, 16), dtype=torch.uint8)}
    else:
        policy = _dit(num_inference_steps=10)
        obs = {"state": torch.randn(1, 2, 6)}
    exported = ExportedPolicy(export_policy(policy, tmp_path, "native"))
    assert exported.manifest["native"]["condition"] == ("onnx" if variant == "images" else "native")
    _agree(policy, exported, obs)


def test_state_condition_runs_in_c_with_several_keys_and_tasks(tmp_path):
    """Two state keys whose sorted order is not the observation's order (the encoder sorts them), two tasks: the
    condition runs in C (no ONNX Runtime session), its actions equal eager's, and a bad task id is refused."""
    policy = _dit(shapes={"z_joints": {"shape": [5], "dtype": "float32"}, "a_gripper": {"shape": [2], "dtype": "float32"}},
                  num_tasks=2, num_inference_steps=3)
    exported = ExportedPolicy(export_policy(policy, tmp_path, "native"))
    assert exported.manifest["native"]["condition"] == "native"
    obs = {"z_joints": torch.randn(2, 2, 5), "a_gripper": torch.randn(2, 2, 2)}
    _agree(policy, exported, obs, {"task_id": torch.tensor([1, 0])})
    with pytest.raises(ValueError, match="task id 2 is out of range"):
        exported.predict_action(obs, {"task_id": torch.tensor([2, 0])})


def test_what_the_c_loop_does_not_hold_is_refused_by_name(tmp_path):
    from test_policy_mode import _policy

    with pytest.raises(ExportError, match="DiT family only.*--format onnx"):
        export_policy(_policy(num_inference_steps=2), tmp_path, "native")
    with pytest.raises(ExportError, match="DDIM sampler only"):
        export_policy(_dit(formulation="edm", num_inference_steps=2), tmp_path, "native")
    with pytest.raises(ExportError, match="token\\+global"):
        export_policy(_dit(num_tasks=2, task_conditioning="token+global"), tmp_path, "native")


def test_library_is_built_once_and_checks_its_inputs(tmp_path):
    policy = _dit(num_inference_steps=2)
    out = export_policy(policy, tmp_path, "native")
    ExportedPolicy(out)
    built = {p: p.stat().st_mtime_ns for p in native._cache_dir().glob("dit-*.so")}
    assert built
    exported = ExportedPolicy(out)  # loads the cached library: nothing compiled or rewritten
    assert {p: p.stat().st_mtime_ns for p in native._cache_dir().glob("dit-*.so")} == built
    loop = native.NativeLoop(out / native.WEIGHTS, exported.manifest["native"]["dims"],
                             exported.manifest["native"]["floats"])
    with pytest.raises(ValueError, match="context tokens"):
        loop(np.zeros(5, np.float32), np.zeros((1, 8, 3), np.float32))


def test_portable_c_path_agrees_too(monkeypatch, tmp_path):
    """Without -march=native (a CPU without AVX2, or ROBODIT_NATIVE_ARCH=portable) the plain C loops run."""
    monkeypatch.setenv("ROBODIT_NATIVE_ARCH", "portable")
    assert native.build_library().robodit_simd() == 0
    policy = _dit(num_tasks=2, num_inference_steps=3)
    _agree(policy, ExportedPolicy(export_policy(policy, tmp_path, "native")), {"state": torch.randn(2, 2, 6)},
           {"task_id": torch.tensor([0, 1])})


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.NativeBuildError, match="does not run"):
        native.build_library()
