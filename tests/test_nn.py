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
