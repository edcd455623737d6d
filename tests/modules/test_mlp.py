"""SwiGLU / MLP against direct formulas, default widths, factory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linmix.modules import MLP, MLPS, SwiGLU, get_mlp, swiglu_intermediate_size


@pytest.mark.parametrize("hidden, multiple_of, want", [(512, 32, 1376), (4096, 256, 11008), (96, 32, 256),
                                                        (128, 32, 352)])
def test_default_intermediate_size(hidden, multiple_of, want):
    assert swiglu_intermediate_size(hidden, multiple_of) == want
    if hidden <= 512:  # building the 4096-wide module would only cost time
        assert SwiGLU(hidden, multiple_of=multiple_of).intermediate_size == want
    assert want % multiple_of == 0 and want >= 8 * hidden / 3 > want - multiple_of


@pytest.mark.parametrize("activation, act", [("silu", F.silu), ("gelu", F.gelu)])
def test_swiglu_formula(activation, act):
    mlp = SwiGLU(24, 40, bias=True, activation=activation).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    g = x @ mlp.gate_proj.weight.T + mlp.gate_proj.bias
    u = x @ mlp.up_proj.weight.T + mlp.up_proj.bias
    want = (act(g) * u) @ mlp.down_proj.weight.T + mlp.down_proj.bias
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)


def test_mlp_formula():
    mlp = MLP(16, activation="relu2").double()
    assert mlp.intermediate_size == 64
    x = torch.randn(3, 16, dtype=torch.float64)
    want = F.relu(x @ mlp.fc1.weight.T + mlp.fc1.bias).square() @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)


def test_factory():
    for name in MLPS:
        m = get_mlp(name, 32)
        assert m(torch.randn(2, 3, 32)).shape == (2, 3, 32)
    assert isinstance(get_mlp("geglu", 32), SwiGLU) and get_mlp("geglu", 32).activation == "gelu"
    assert get_mlp("swiglu", 32, 48).intermediate_size == 48
    with pytest.raises(ValueError, match="valid names: .*swiglu"):
        get_mlp("swishglu", 32)
    with pytest.raises(ValueError, match="hidden_size=32"):
        SwiGLU(32)(torch.randn(2, 31))
    with pytest.raises(ValueError, match="activation"):
        SwiGLU(32, activation="tanh")
