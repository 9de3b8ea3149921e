"""Shared building blocks (robodit/nn): behaviour every policy family relies on."""

import torch

from robodit.nn.attention import RMSNorm


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
