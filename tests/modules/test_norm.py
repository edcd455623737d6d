"""RMSNorm and GatedRMSNorm against direct formulas; dtype handling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linmix.modules import GatedRMSNorm, RMSNorm


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def random_weight(norm: torch.nn.Module) -> None:
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))


@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_formula(affine):
    norm = RMSNorm(32, eps=1e-6, elementwise_affine=affine).double()
    if affine:
        random_weight(norm)
    x = torch.randn(3, 7, 32, dtype=torch.float64) * 3
    want = rms(x, 1e-6) * (norm.weight if affine else 1)
    torch.testing.assert_close(norm(x), want, rtol=1e-12, atol=1e-12)
    assert (norm.weight is None) != affine


def test_rmsnorm_bf16_preserves_dtype_and_computes_in_float32():
    norm = RMSNorm(64)
    random_weight(norm)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16) * 10
    y = norm(x)
    assert y.dtype == torch.bfloat16
    want = (rms(x.float(), 1e-6) * norm.weight).bfloat16()  # rounded once, at the end
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    # bf16 module weights too
    assert norm.to(torch.bfloat16)(x).dtype == torch.bfloat16


@pytest.mark.parametrize("activation, act", [("silu", F.silu), ("sigmoid", torch.sigmoid)])
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rmsnorm_formula(activation, act, norm_before_gate):
    norm = GatedRMSNorm(16, eps=1e-5, activation=activation, norm_before_gate=norm_before_gate).double()
    random_weight(norm)
    x = torch.randn(4, 3, 16, dtype=torch.float64)
    g = torch.randn(4, 3, 16, dtype=torch.float64)
    if norm_before_gate:
        want = rms(x, 1e-5) * norm.weight * act(g)
    else:
        want = rms(x * act(g), 1e-5) * norm.weight
    torch.testing.assert_close(norm(x, g), want, rtol=1e-12, atol=1e-12)


def test_gated_rmsnorm_groups():
    norm = GatedRMSNorm(12, group_size=4).double()
    x, g = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 5, 12, dtype=torch.float64)
    want = torch.cat([rms(c, 1e-5) for c in x.split(4, -1)], -1) * F.silu(g)
    torch.testing.assert_close(norm(x, g), want, rtol=1e-12, atol=1e-12)


def test_gated_rmsnorm_bf16_dtype():
    norm = GatedRMSNorm(32)
    x, g = torch.randn(2, 4, 32, dtype=torch.bfloat16), torch.randn(2, 4, 32, dtype=torch.bfloat16)
    y = norm(x, g)
    assert y.dtype == torch.bfloat16
    want = rms(x.float(), 1e-5) * F.silu(g.float())
    assert (y.float() - want).norm() / want.norm() < 1e-2


def test_bad_inputs():
    with pytest.raises(ValueError, match="hidden_size=8"):
        RMSNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="gate must have"):
        GatedRMSNorm(8)(torch.randn(2, 3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="group_size"):
        GatedRMSNorm(8, group_size=3)
    with pytest.raises(ValueError, match="activation"):
        GatedRMSNorm(8, activation="tanh")
    with pytest.raises(TypeError, match="floating"):
        RMSNorm(8)(torch.ones(2, 8, dtype=torch.long))
