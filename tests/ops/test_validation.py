"""Bad input to linear_attn / simple_gla / gla raises a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

from linmix.ops import gla, linear_attn, simple_gla

B, T, H, K, V = 2, 12, 3, 8, 6


def inputs(op, **over):
    x = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V)}
    if op is simple_gla:
        x["g"] = -torch.rand(B, T, H)
    if op is gla:
        x["g"] = -torch.rand(B, T, H, K)
    x.update(over)
    return x


ALL = [linear_attn, simple_gla, gla]


@pytest.mark.parametrize("op", ALL)
@pytest.mark.parametrize("name,value,error,match", [
    ("q", torch.randn(B, T, H), ValueError, r"q must have 4 dimensions"),
    ("k", torch.randn(B, T, H, K + 1), ValueError, r"k must have shape"),
    ("k", torch.randn(B, T + 1, H, K), ValueError, r"k must have shape"),
    ("v", torch.randn(B, T, H + 1, V), ValueError, r"v must have shape"),
    ("v", torch.randn(B, T, H, V, dtype=torch.float64), TypeError, r"share one dtype"),
    ("q", torch.randint(0, 3, (B, T, H, K)), TypeError, r"q must be float16"),
    ("q", [1.0], TypeError, r"q must be a torch.Tensor"),
])
def test_bad_qkv(op, name, value, error, match):
    with pytest.raises(error, match=match):
        op(**inputs(op, **{name: value}))


@pytest.mark.parametrize("op", ALL)
def test_bad_initial_state(op):
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N=2, H=3, K=8, V=6\]"):
        op(**inputs(op), initial_state=torch.randn(B, H, V, K))


@pytest.mark.parametrize("op", ALL)
def test_bad_scale_backend_chunk(op):
    with pytest.raises(TypeError, match="scale"):
        op(**inputs(op), scale="0.1")
    with pytest.raises(ValueError, match="backend"):
        op(**inputs(op), backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        op(**inputs(op), chunk_size=0)


@pytest.mark.parametrize("op", ALL)
def test_non_causal_has_no_state(op):
    with pytest.raises(ValueError, match="causal=False"):
        op(**inputs(op), causal=False, output_final_state=True)
    with pytest.raises(ValueError, match="causal=False"):
        op(**inputs(op), causal=False, initial_state=torch.zeros(B, H, K, V))
    with pytest.raises(TypeError, match="causal must be a bool"):
        op(**inputs(op), causal=0)


@pytest.mark.parametrize("op", ALL)
def test_bad_cu_seqlens(op):
    packed = {n: t[:1] for n, t in inputs(op).items()}
    with pytest.raises(ValueError, match="B must be 1"):
        op(**inputs(op), cu_seqlens=torch.tensor([0, 5, T], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 or int64"):
        op(**packed, cu_seqlens=torch.tensor([0.0, 5.0, T]))
    with pytest.raises(ValueError, match="non-decreasing"):
        op(**packed, cu_seqlens=torch.tensor([0, 7, 5, T]))
    with pytest.raises(ValueError, match="start at 0 and end at T=12"):
        op(**packed, cu_seqlens=torch.tensor([0, 5, T - 1]))
    with pytest.raises(ValueError, match="start at 0"):
        op(**packed, cu_seqlens=torch.tensor([1, 5, T]))
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \[N\+1\]"):
        op(**packed, cu_seqlens=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N=2"):
        op(**packed, cu_seqlens=torch.tensor([0, 5, T]), initial_state=torch.zeros(1, H, K, V))


@pytest.mark.parametrize("op,shape", [(simple_gla, (B, T, H, K)), (gla, (B, T, H)), (gla, (B, T, H, K + 1))])
def test_bad_gate_shape(op, shape):
    with pytest.raises(ValueError, match="g must"):
        op(**inputs(op, g=-torch.rand(*shape)))


@pytest.mark.parametrize("op", [simple_gla, gla])
def test_bad_gate_values(op):
    x = inputs(op)
    g = x["g"].clone()
    g[0, 3, 1] = 0.5
    with pytest.raises(ValueError, match="g is a log-decay and must be <= 0"):
        op(**inputs(op, g=g))
    g[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        op(**inputs(op, g=g))


def test_gate_values_unchecked_off_cpu_without_debug(monkeypatch):
    """Value checks sync the device: off-CPU they follow the debug switch (here simulated)."""
    import linmix
    from linmix.ops.common import checks

    x = torch.ones(3)
    linmix.set_debug(False)
    assert checks.values_checked(x)  # CPU: always
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("meta")))
    assert not checks.values_checked(x)
    linmix.set_debug(True)
    assert checks.values_checked(x)
