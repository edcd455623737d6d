"""ShortConvolution against an independent F.conv1d computation, decoding, caches, varlen, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linmix.modules import ShortConvolution


def make_conv(D: int, W: int, *, bias: bool = True, activation: str | None = "silu") -> ShortConvolution:
    conv = ShortConvolution(D, kernel_size=W, bias=bias, activation=activation).double()
    with torch.no_grad():  # fresh random weights, not the default init
        conv.weight.normal_()
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def oracle(conv: ShortConvolution, x: torch.Tensor) -> torch.Tensor:
    """Left-zero-padded depthwise conv1d over [B, T, D], then the activation."""
    W = conv.weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), conv.weight, conv.bias, groups=x.shape[-1]).transpose(1, 2)
    return F.silu(y) if conv.activation == "silu" else y


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("activation", ["silu", None])
def test_matches_conv1d_with_left_padding(W, T, activation):
    conv = make_conv(6, W, activation=activation)
    x = torch.randn(2, T, 6, dtype=torch.float64)
    y, cache = conv(x)
    assert cache is None
    torch.testing.assert_close(y, oracle(conv, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("W", [1, 4])
def test_step_by_step_decoding_equals_forward(W):
    conv = make_conv(5, W)
    x = torch.randn(3, 9, 5, dtype=torch.float64)
    y_full, cache_full = conv(x, output_cache=True)
    cache, outs = None, []
    for t in range(x.shape[1]):
        y_t, cache = conv.step(x[:, t], cache)
        outs.append(y_t)
    torch.testing.assert_close(torch.stack(outs, 1), y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache, cache_full)


@pytest.mark.parametrize("split", [1, 2, 5, 8])
def test_two_halves_with_cache_equal_one_forward(split):
    conv = make_conv(4, 4)
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    y_full, cache_full = conv(x, output_cache=True)
    y1, c1 = conv(x[:, :split], output_cache=True)
    y2, c2 = conv(x[:, split:], cache=c1, output_cache=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c2, cache_full)
    # a length-1 forward with a cache is one step
    y_step, c_step = conv.step(x[:, split], c1)
    torch.testing.assert_close(y_step, y2[:, 0], rtol=1e-12, atol=1e-12)


def test_cu_seqlens_packing_equals_separate_sequences():
    W, D = 4, 5
    conv = make_conv(D, W)
    lengths = [3, 1, 7, 2]  # includes sequences shorter than W - 1
    seqs = [torch.randn(1, n, D, dtype=torch.float64) for n in lengths]
    caches = torch.randn(len(lengths), W - 1, D, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.cat(seqs, 1)
    for cache in (None, caches):
        y, new_cache = conv(x, cache=cache, cu_seqlens=cu, output_cache=True)
        for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
            c0 = None if cache is None else cache[n:n + 1]
            y_ref, c_ref = conv(seqs[n], cache=c0, output_cache=True)
            torch.testing.assert_close(y[:, a:b], y_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(new_cache[n:n + 1], c_ref)


def test_mask_zeroes_left_padding():
    conv = make_conv(4, 4)
    x = torch.randn(2, 8, 4, dtype=torch.float64)
    pad = [3, 0]
    mask = torch.ones(2, 8)
    mask[0, :pad[0]] = 0
    y, cache = conv(x, mask=mask, output_cache=True)
    for b in range(2):
        y_ref, c_ref = conv(x[b:b + 1, pad[b]:], output_cache=True)
        torch.testing.assert_close(y[b:b + 1, pad[b]:], y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cache[b:b + 1], c_ref)
    # without the mask the padding leaks into the first real tokens
    y_nomask, _ = conv(x)
    assert not torch.allclose(y_nomask[0, pad[0]], y[0, pad[0]])


def test_gradcheck():
    conv = make_conv(3, 3)
    x = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    cache = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 6])

    def f(x, cache, weight, bias):
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x,),
                                          {"cache": cache, "cu_seqlens": cu, "output_cache": True})

    w = conv.weight.detach().clone().requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, cache, w, b))
    x2 = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: conv(x)[0], (x2,))


def test_bf16_matches_float32():
    conv = make_conv(8, 4).float()
    x = torch.randn(2, 11, 8)
    y32, _ = conv(x)
    y16, c16 = conv.to(torch.bfloat16)(x.bfloat16(), output_cache=True)
    assert y16.dtype == c16.dtype == torch.bfloat16
    assert (y16.float() - y32).norm() / y32.norm() < 2e-2


def test_bad_inputs():
    conv = ShortConvolution(4)
    with pytest.raises(ValueError, match="x must have shape"):
        conv(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="cache must have shape"):
        conv(torch.randn(2, 5, 4), cache=torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="B must be 1"):
        conv(torch.randn(2, 5, 4), cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="mask must have shape"):
        conv(torch.randn(2, 5, 4), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="step: x must have shape"):
        conv.step(torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="activation"):
        ShortConvolution(4, activation="gelu")
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        conv(torch.ones(2, 5, 4, dtype=torch.long))
