"""Shared building blocks (robodit/nn): behaviour every policy family relies on."""

import pytest
import torch

from robodit.nn.attention import AdaLNZeroBlock, RMSNorm


def test_rmsnorm_is_the_rms_formula_and_keeps_the_input_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 16) * 3
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    # bf16 activations with fp32 weights (autocast) stay bf16, statistics taken in fp32
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    plain = RMSNorm(16, affine=False)
    assert plain.weight is None
    torch.testing.assert_close(plain(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + plain.eps))


def test_moe_dispatch_matches_a_dense_mixture_in_value_and_gradient():
    """Sparse dispatch (each sample through its k experts) = every expert on every sample weighted by a mixing
    matrix that is zero off the route; experts no sample chose get a zero gradient."""
    from robodit.nn.moe import NoiseRoutedMoE, swiglu

    torch.manual_seed(0)
    moe = NoiseRoutedMoE(dim=8, hidden=16, num_experts=4, top_k=2)
    x = torch.randn(5, 3, 8)
    experts = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 1], [1, 2]])  # expert 3 unused
    weights = torch.rand(5, 2)
    weights = weights / weights.sum(-1, keepdim=True)
    out = moe.dispatch(x, experts, weights)
    grads = torch.autograd.grad(out.square().sum(), [moe.w_in, moe.w_out])
    mix = torch.zeros(5, 4).scatter(1, experts, weights)
    ref = sum(mix[:, e, None, None] * swiglu(x, moe.w_in[e], moe.w_out[e]) for e in range(4))
    ref_grads = torch.autograd.grad(ref.square().sum(), [moe.w_in, moe.w_out])
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
        assert g[3].abs().max() == 0 and g[:3].abs().max() > 0


def test_a_fresh_adaln_zero_block_is_the_identity():
    """The docstring promised it, but the cross-attention branch was not gated: a fresh block moved x."""
    torch.manual_seed(0)
    block = AdaLNZeroBlock(16, 2)
    x, context, cond = torch.randn(3, 4, 16), torch.randn(3, 5, 16), torch.randn(3, 16)
    torch.testing.assert_close(block(x, cond, context=context), x, rtol=0, atol=0)
    with torch.no_grad():  # once trained, every branch contributes
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert (block(x, cond, context=context) - x).abs().max() > 1e-2


def test_a_block_saved_before_the_cross_gate_loads_as_it_ran():
    """Older checkpoints have no `cross_gate`; they load with the gate at one (their ungated cross-attention)
    and compute what they computed, under strict loading too."""
    torch.manual_seed(0)
    trained = torch.nn.Sequential(AdaLNZeroBlock(16, 2))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
        trained[0].cross_gate.fill_(1.0)
    old = {k: v for k, v in trained.state_dict().items() if not k.endswith("cross_gate")}
    loaded = torch.nn.Sequential(AdaLNZeroBlock(16, 2))
    loaded.load_state_dict(old)
    assert torch.equal(loaded[0].cross_gate, torch.ones(16))
    x, context, cond = torch.randn(3, 4, 16), torch.randn(3, 5, 16), torch.randn(3, 16)
    torch.testing.assert_close(loaded[0](x, cond, context=context), trained[0](x, cond, context=context))


@pytest.mark.parametrize("norm,cross", [("layernorm", True), ("rmsnorm", False)])
def test_the_inference_fast_path_computes_the_block(norm, cross):
    """`AdaLNZeroBlock.infer` (one shared modulation per step, stacked Q/K/V, fused norm + modulation) is
    `forward` in fewer ops: the families' cached sampling runs it, training and the uncached path run `forward`."""
    from robodit.nn.attention import StepModulation

    torch.manual_seed(0)
    block = AdaLNZeroBlock(16, 2, cross_attention=cross, norm=norm).eval()
    with torch.no_grad():  # trained-looking: a fresh block is the identity and would hide any bug
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, context, cond = torch.randn(3, 5, 16), torch.randn(3, 4, 16), torch.randn(2, 16)
    mask = torch.rand(5, 5) > 0.3
    mask.fill_diagonal_(True)
    kv = block.cross.keys_values(context) if cross else None
    with torch.no_grad():
        steps = StepModulation.split(block.ada(cond))
        for s in range(2):
            want = block(x, context=context, mask=mask, modulation=block.ada(cond[s:s + 1]).expand(3, -1))
            got = block.infer(x, steps[s], block.attn.fused_qkv(), mask=mask, context_kv=kv)
            assert (want - x).abs().max() > 0.1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- image pooling: average (what things are) vs spatial softmax (also where they are) ----------------------------
def _blob(row: int, col: int, channels: int = 4, size: int = 8) -> torch.Tensor:
    """A feature map that is zero except for one bright position."""
    x = torch.zeros(1, channels, size, size)
    x[..., row, col] = 10.0
    return x


def test_spatial_softmax_keypoints_follow_a_bright_blob_where_average_pooling_cannot():
    """The reason for the option: a policy that reached the right bottle and then missed the grasp needs to know
    where the bottle is. Each keypoint is the expected (x, y) of its softmax map, so it sits on the blob and moves
    with it; the average of the same feature map is identical wherever the blob is."""
    from robodit.nn.encoders import AveragePool, SpatialSoftmax

    pool = SpatialSoftmax(channels=4, keypoints=2)
    with torch.no_grad():  # both keypoint maps respond to the sum of the channels: the blob dominates the softmax
        pool.maps.weight.fill_(1.0)
        pool.maps.bias.zero_()
    grid = torch.linspace(-1, 1, 8)
    for row, col in [(0, 0), (2, 5), (7, 3), (4, 7)]:
        kp = pool.keypoints(_blob(row, col))
        assert kp.shape == (1, 2, 2)
        assert torch.allclose(kp[0], torch.stack([grid[col], grid[row]]).expand(2, 2), atol=1e-4), (row, col, kp)
    assert pool(_blob(1, 1)).shape == (1, 4)  # flat (x, y) per keypoint, what the head takes
    avg = AveragePool(4)
    assert torch.equal(avg(_blob(0, 0)), avg(_blob(6, 7)))


@pytest.mark.parametrize("pooling", ["avg", "spatial_softmax"])
def test_image_encoder_pooling_shapes(pooling):
    """uint8 H×W×C with any leading dims, at any resolution, gives one vector per image with either pooling."""
    from robodit.nn.encoders import ResNetImageEncoder

    torch.manual_seed(0)
    enc = ResNetImageEncoder(16, channels=(8, 16, 32, 32), pooling=pooling)
    for size in (32, 64):
        images = torch.randint(0, 256, (2, 3, size, size, 3), dtype=torch.uint8)
        assert enc(images).shape == (2, 3, 16)
    if pooling == "spatial_softmax":
        kp = enc.pool.keypoints(enc.features(images))
        assert kp.shape == (6, 32, 2) and kp.abs().max() <= 1.0
    else:  # what checkpoints written before the option hold: the same tensors, nothing new
        assert sorted({k.split(".")[0] for k in enc.state_dict()}) == ["blocks", "head", "stem"]


def test_an_unknown_image_pooling_is_named_even_without_a_camera():
    from robodit.nn.encoders import ObservationEncoder, ResNetImageEncoder

    with pytest.raises(ValueError, match=r"image pooling 'max' is unknown.*policy.image_pooling"):
        ResNetImageEncoder(16, pooling="max")
    with pytest.raises(ValueError, match=r"image pooling 'spatial' is unknown"):
        ObservationEncoder({"state": ((5,), "float32")}, 16, 1, image_pooling="spatial")


def test_image_stem_stride_2_quarters_the_feature_map_and_keeps_the_output():
    """image_stem_stride=2 (cheap CPU training): same tensors and output shape, a feature map of half the side;
    anything but 1 or 2 is refused by name."""
    from robodit.nn.encoders import ResNetImageEncoder

    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    full, cheap = ResNetImageEncoder(16, (8, 16, 32, 32)), ResNetImageEncoder(16, (8, 16, 32, 32), stem_stride=2)
    assert full.features(images).shape[-2:] == (4, 4) and cheap.features(images).shape[-2:] == (2, 2)
    assert cheap(images).shape == full(images).shape == (2, 16)
    assert {k: v.shape for k, v in cheap.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}
    with pytest.raises(ValueError, match="image_stem_stride must be 1 or 2"):
        ResNetImageEncoder(16, stem_stride=4)
