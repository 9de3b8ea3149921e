"""`robodit export`: the whole chunk as one ONNX graph gives the eager actions for the same noise (dit, mode with its
expert cache, rdt, pad), loads behind `robodit.load_policy`, serves with `robodit serve --backend onnx`, and refuses what
it cannot hold by name. Policies are tiny with 2 denoising steps: the trace, not the model, costs the time."""

import numpy as np
import pytest
import torch
from _control_fakes import tiny_dit

import robodit
from robodit.cli import main
from robodit.deploy.client import RemotePolicy
from robodit.deploy.export import ExportError, check_exportable, export_policy
from robodit.deploy.exported import ExportedPolicy
from robodit.deploy.server import PolicyServer, check_backend
from robodit.training.checkpoint import export_state, save_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
TOKEN = "export-test-token-0123456789"


def _trained_looking(policy):
    """Random weights everywhere: the zero-initialised heads of a fresh policy would predict zeros."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    policy.on_weights_changed()
    return policy.eval()


def _agree(policy, exported, obs, goal=None):
    for seed in (0, 1):
        eager = policy.predict_action(obs, goal, generator=torch.Generator().manual_seed(seed))
        got = exported.predict_action(obs, goal, generator=torch.Generator().manual_seed(seed))
        assert got.shape == eager.shape and eager.abs().max() > 0.05
        assert torch.allclose(got, eager, atol=1e-4), (got - eager).abs().max()


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    """A tiny two-task DiT checkpoint exported through the CLI."""
    policy = _trained_looking(tiny_dit(state_dim=6, action_dim=4, num_tasks=2))
    cfg = {"policy": {"_target_": "robodit.policies.dit.DiTPolicy", "size": "tiny", "action_horizon": 8,
                      "n_action_steps": 4, "num_inference_steps": 2},
           "shape_meta": policy.shape_meta, "store": {"fps": 30.0, "tasks": ["reach", "push"]}}
    ckpt = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_1", model_state=export_state(policy),
                           ema_state=None, normalizer_state=policy.normalizer.state_dict_flat(), config=cfg)
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    return ckpt, out


def test_dit_export_matches_eager_and_loads_behind_load_policy(dit_export):
    ckpt, out = dit_export
    eager, exported = robodit.load_policy(ckpt), robodit.load_policy(out)
    assert isinstance(exported, ExportedPolicy) and exported.n_action_steps == 4 and exported.task_names
    obs = {"state": np.random.default_rng(0).normal(size=(3, 2, 6)).astype(np.float32)}
    _agree(eager, exported, obs, {"task": ["push", "reach", "push"]})
    _agree(eager, exported, {"obs.state": obs["state"][0]}, {"task_id": 1})  # prefixed keys, no batch dimension
    with pytest.raises(ValueError, match="'state'.*shape"):
        exported.predict_action({"state": np.zeros((1, 2, 5), np.float32)}, {"task_id": 0})
    with pytest.raises(ValueError, match="task"):
        exported.predict_action(obs)


def test_served_with_the_onnx_backend(dit_export, capsys):
    ckpt, out = dit_export
    assert main(["info", str(out)]) == 0  # `robodit info` describes an export directory
    assert "dit exported as onnx (ddim-2" in capsys.readouterr().out
    check_backend(out, "onnx")
    with pytest.raises(ValueError, match="--backend onnx"):
        check_backend(out, "torch")
    with pytest.raises(ValueError, match="robodit export"):
        check_backend(ckpt, "onnx")
    obs = {"state": np.random.default_rng(1).normal(size=(2, 2, 6)).astype(np.float32)}
    eager = robodit.load_policy(ckpt)
    with PolicyServer(robodit.load_policy(out), TOKEN, host="127.0.0.1", port=0) as server:
        with RemotePolicy(server.url, TOKEN) as remote:
            got = remote.predict_action(obs, {"task_id": np.array([0, 1])}, generator=torch.Generator().manual_seed(5))
    # the client sends its generator's state: the served exported chunk equals the local eager one
    want = eager.predict_action(obs, {"task_id": np.array([0, 1])}, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, want, atol=1e-4)


def test_mode_with_its_expert_cache_exports(tmp_path):
    from test_policy_mode import _policy

    policy = _trained_looking(_policy(num_inference_steps=2))
    assert policy.expert_cache
    out = export_policy(policy, tmp_path, "onnx")
    _agree(policy, ExportedPolicy(out), {"state": torch.randn(2, 2, 5)})


def test_rdt_exports_with_dpm_solver(tmp_path):
    from test_policy_rdt import _obs, _policy

    policy = _trained_looking(_policy(num_inference_steps=2))
    assert policy.sampler == "dpmsolver++"
    out = export_policy(policy, tmp_path, "onnx")
    _agree(policy, ExportedPolicy(out), _obs())


@pytest.mark.parametrize("num_tasks", [1, 2])
def test_pad_exports_its_joint_denoising(tmp_path, num_tasks):
    """PAD denoises the future frames with the chunk: the graph holds both streams from one flat noise input and
    returns the actions; one task runs the fast path's constants, several take the task id as an input."""
    from test_policy_pad import SHAPES, _batch

    from robodit.datasets.normalizer import Normalizer
    from robodit.policies.pad import PADPolicy

    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}  # noqa: E731
    policy = _trained_looking(PADPolicy(dict(SHAPES, num_tasks=num_tasks), Normalizer({"state": st(5), "action": st(3)}),
                                        size="tiny", action_horizon=4, n_action_steps=2, image_size=16, patch_size=4,
                                        num_inference_steps=2))
    batch = _batch(b=2)
    obs = {"state": batch["obs.state"], "wrist": batch["obs.wrist"]}
    exported = ExportedPolicy(export_policy(policy, tmp_path, "onnx"))
    assert exported.noise_shape == (policy.flat_dim,)
    _agree(policy, exported, obs, {"task_id": torch.tensor([0, 1])} if num_tasks > 1 else None)


def test_what_cannot_export_is_refused_by_name(tmp_path):
    policy = tiny_dit()
    policy.sampler = "ddpm"
    with pytest.raises(ExportError, match="'ddpm' draws fresh noise"):
        check_exportable(policy)
    with pytest.raises(ExportError, match="--format 'tflite'"):
        export_policy(tiny_dit(), tmp_path, "tflite")


def test_constant_gates_fold_into_the_gemm_before_them():
    """`onnx_passes.fold_gates`: Gemm → Mul(constant gate) becomes one Gemm with the same output; a Gemm that
    something else also reads keeps its Mul (folding would change that reader's input)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from robodit.deploy.onnx_passes import optimize

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in [("w", (4, 3)), ("b", (4,)), ("gate", (4,)), ("w2", (4, 4)), ("b2", (4,))]]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
             helper.make_node("Mul", ["gate", "y"], ["gated"]),
             helper.make_node("Gemm", ["gated", "w2", "b2"], ["z"]),
             helper.make_node("Mul", ["z", "gate"], ["zg"]),
             helper.make_node("Add", ["zg", "z"], ["out"])]  # z has two readers: its Mul stays
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = {"x": rng.standard_normal((5, 3)).astype(np.float32)}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]

    want = run(model)
    folded = optimize(onnx.load_from_string(model.SerializeToString()))
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Gemm", "Mul", "Add"]
    np.testing.assert_allclose(run(folded), want, rtol=1e-5, atol=1e-6)
