"""delta_rule: the chunked (WY / UT form) backend against the token-loop reference, and validation."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F

from linmix.ops.delta_rule import delta_rule
from tests.ops.utils import TOL, assert_close_fwd_bwd, fwd_bwd, log_gate, ragged_cu_seqlens, rel_err


def make_inputs(B, T, H, K, V, *, dtype=torch.float32, gated=True, strength="normal", initial_state=False,
                num_states=None, beta_max=1.0):
    """Fresh random inputs: L2-normalised keys, beta = beta_max * sigmoid(randn), logsigmoid gates."""
    return dict(
        q=torch.randn(B, T, H, K, dtype=dtype),
        k=F.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1).to(dtype),
        v=torch.randn(B, T, H, V, dtype=dtype),
        beta=(beta_max * torch.sigmoid(torch.randn(B, T, H, dtype=torch.float64))).to(dtype),
        g=log_gate(B, T, H, dtype=torch.float64, strength=strength).to(dtype) if gated else None,
        initial_state=torch.randn(num_states or B, H, K, V, dtype=dtype) if initial_state else None,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("T", [1, 5, 64, 100])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_torch_matches_reference(dtype, gated, T, with_state):
    inputs = make_inputs(2, T, 3, 16, 24, dtype=dtype, gated=gated, initial_state=with_state)
    assert_close_fwd_bwd(delta_rule, inputs, output_final_state=with_state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_small_chunks_many_chunks(dtype, gated):
    # chunk_size 16, T = 150: 10 chunks, the last one partial
    inputs = make_inputs(2, 150, 2, 16, 24, dtype=dtype, gated=gated, initial_state=True)
    assert_close_fwd_bwd(delta_rule, inputs, output_final_state=True, chunk_size=16)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_beta_up_to_two(gated):
    inputs = make_inputs(2, 80, 2, 16, 24, dtype=torch.float64, gated=gated, initial_state=True, beta_max=2.0)
    assert_close_fwd_bwd(delta_rule, inputs, output_final_state=True, chunk_size=32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_varlen_matches_reference(dtype, gated):
    cu = ragged_cu_seqlens([3, 17, 1, 40])
    inputs = make_inputs(1, 61, 2, 16, 24, dtype=dtype, gated=gated, initial_state=True, num_states=4)
    assert_close_fwd_bwd(delta_rule, inputs, output_final_state=True, cu_seqlens=cu, chunk_size=16)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_varlen_equals_separate_sequences(gated):
    lengths = [3, 17, 1, 40]
    cu = ragged_cu_seqlens(lengths)
    inp = make_inputs(1, sum(lengths), 2, 16, 24, dtype=torch.float64, gated=gated, initial_state=True,
                      num_states=len(lengths))
    o, state = delta_rule(**inp, cu_seqlens=cu, output_final_state=True, backend="torch", chunk_size=16)
    offsets = cu.tolist()
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        seq = {name: (None if x is None else x[:, a:b]) for name, x in inp.items() if name != "initial_state"}
        o_n, s_n = delta_rule(**seq, initial_state=inp["initial_state"][n:n + 1], output_final_state=True,
                              backend="torch", chunk_size=16)
        assert rel_err(o[:, a:b], o_n) < 1e-12
        assert rel_err(state[n:n + 1], s_n) < 1e-12


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_strong_gates(chunk_size):
    # log-decays down to -20 per step: cumulative in-chunk decays reach exp(-1000s), which must
    # underflow to 0 cleanly (never divided by)
    inputs = make_inputs(2, 100, 2, 16, 24, dtype=torch.float64, strength="strong", initial_state=True)
    assert_close_fwd_bwd(delta_rule, inputs, output_final_state=True, chunk_size=chunk_size)
    inputs32 = {n: None if x is None else x.float() for n, x in inputs.items()}
    grad_o = torch.randn(2, 100, 2, 24)
    o, s, grads = fwd_bwd(delta_rule, inputs32, grad_o, torch.randn(2, 2, 16, 24), output_final_state=True,
                          chunk_size=chunk_size, backend="torch")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    for name, gr in grads.items():
        assert gr is not None and torch.isfinite(gr).all(), name


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_bfloat16(gated):
    inputs = make_inputs(2, 100, 2, 32, 32, dtype=torch.bfloat16, gated=gated, initial_state=True)
    inputs32 = {n: None if x is None else x.float() for n, x in inputs.items()}
    grad_o, grad_s = torch.randn(2, 100, 2, 32), torch.randn(2, 2, 32, 32)
    o, s, grads = fwd_bwd(delta_rule, inputs, grad_o, grad_s, output_final_state=True, backend="torch")
    o_ref, s_ref, grads_ref = fwd_bwd(delta_rule, inputs32, grad_o, grad_s, output_final_state=True,
                                      backend="reference")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    errs = {"o": rel_err(o, o_ref), "final_state": rel_err(s, s_ref)}
    errs.update({"d" + n: rel_err(grads[n], gr) for n, gr in grads_ref.items()})
    assert max(errs.values()) < TOL[torch.bfloat16], errs


def test_no_final_state_and_auto_backend():
    inputs = make_inputs(2, 20, 2, 16, 24)
    o, s = delta_rule(**inputs)
    assert s is None and o.shape == (2, 20, 2, 24) and o.dtype == torch.float32
    o_ref, _ = delta_rule(**inputs, backend="reference")
    assert rel_err(o, o_ref) < TOL[torch.float32]


def test_docstring_example():
    module = importlib.import_module("linmix.ops.delta_rule")
    result = doctest.testmod(module, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


# --- validation ------------------------------------------------------------------------------------


def _valid():
    return make_inputs(2, 10, 2, 8, 8)


@pytest.mark.parametrize("case, exc, match", [
    ("beta_shape", ValueError, "beta must have shape"),
    ("beta_above_2", ValueError, "beta must lie in"),
    ("beta_negative", ValueError, "beta must lie in"),
    ("g_positive", ValueError, "g is a log-decay"),
    ("g_shape", ValueError, "g must have shape"),
    ("g_vector", ValueError, "g must have 3 dimensions"),
    ("k_shape", ValueError, "k must have shape"),
    ("dtype_mismatch", TypeError, "must share one dtype"),
    ("initial_state_shape", ValueError, "initial_state must have shape"),
    ("cu_seqlens_batch", ValueError, "cu_seqlens.*B must be 1"),
    ("cu_seqlens_order", ValueError, "cu_seqlens must be non-decreasing"),
    ("cu_seqlens_end", ValueError, "cu_seqlens must start at 0 and end at T"),
    ("backend", ValueError, "backend must be one of"),
])
def test_validation(case, exc, match):
    inp, kw = _valid(), {}
    if case == "beta_shape":
        inp["beta"] = inp["beta"][:, :, :1]
    elif case == "beta_above_2":
        inp["beta"][0, 3, 1] = 2.5
    elif case == "beta_negative":
        inp["beta"][1, 0, 0] = -0.1
    elif case == "g_positive":
        inp["g"][0, 5, 0] = 0.5
    elif case == "g_shape":
        inp["g"] = inp["g"][:, :9]
    elif case == "g_vector":
        inp["g"] = inp["g"][..., None].expand(2, 10, 2, 8)
    elif case == "k_shape":
        inp["k"] = inp["k"][:, :, :, :4]
    elif case == "dtype_mismatch":
        inp["v"] = inp["v"].double()
    elif case == "initial_state_shape":
        inp["initial_state"] = torch.randn(2, 2, 8, 9)
    elif case == "cu_seqlens_batch":
        kw["cu_seqlens"] = torch.tensor([0, 4, 10])
    elif case in ("cu_seqlens_order", "cu_seqlens_end"):
        inp = {n: None if x is None else x[:1] for n, x in inp.items()}
        kw["cu_seqlens"] = torch.tensor([0, 6, 4, 10] if case == "cu_seqlens_order" else [0, 4, 9])
    elif case == "backend":
        kw["backend"] = "fast"
    with pytest.raises(exc, match=match):
        delta_rule(**inp, **kw)
