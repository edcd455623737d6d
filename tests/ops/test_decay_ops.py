"""linear_attn, simple_gla, gla: the chunked PyTorch form against the token-loop reference."""

from __future__ import annotations

import pytest
import torch

from linmix.ops import gla, linear_attn, simple_gla
from tests.ops.utils import TOL, assert_close_fwd_bwd, fwd_bwd, log_gate, ragged_cu_seqlens, rel_err

OPS = {
    "linear_attn": (linear_attn, None),
    "simple_gla": (simple_gla, "scalar"),
    "gla": (gla, "vector"),
}


def make_inputs(op: str, B=2, T=37, H=3, K=16, V=24, dtype=torch.float64, strength="normal",
                initial_state=False, N=None):
    fn, gate = OPS[op]
    x = {
        "q": torch.randn(B, T, H, K, dtype=dtype),
        "k": torch.randn(B, T, H, K, dtype=dtype),
        "v": torch.randn(B, T, H, V, dtype=dtype),
    }
    if gate == "scalar":
        x["g"] = log_gate(B, T, H, dtype=dtype, strength=strength)
    elif gate == "vector":
        x["g"] = log_gate(B, T, H, K, dtype=dtype, strength=strength)
    if initial_state:
        sdtype = torch.float64 if dtype == torch.float64 else torch.float32
        x["initial_state"] = torch.randn(N or B, H, K, V, dtype=sdtype)
    return fn, x


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [1, 5, 64, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunk_matches_reference(op, T, dtype):
    fn, x = make_inputs(op, T=T, dtype=dtype, initial_state=True)
    assert_close_fwd_bwd(fn, x, output_final_state=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("chunk_size", [16, 32, 48])
def test_chunk_sizes_and_no_state(op, chunk_size):
    fn, x = make_inputs(op, T=150, H=2, K=32, V=8)
    assert_close_fwd_bwd(fn, x, chunk_size=chunk_size)


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
@pytest.mark.parametrize("strength", ["strong", "weak"])
def test_extreme_gates(op, strength):
    fn, x = make_inputs(op, T=130, dtype=torch.float64, strength=strength, initial_state=True)
    assert_close_fwd_bwd(fn, x, output_final_state=True)


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
def test_strong_gates_float32_finite(op):
    """Log-decays down to -20 per step: the float32 chunk form stays finite and accurate."""
    fn, x = make_inputs(op, T=200, dtype=torch.float32, strength="strong", initial_state=True)
    errs = assert_close_fwd_bwd(fn, x, output_final_state=True, tol=1e-4)
    _, _, grads = fwd_bwd(fn, x, torch.randn(2, 200, 3, 24), torch.randn(2, 3, 16, 24),
                          output_final_state=True, backend="torch")
    assert all(torch.isfinite(g).all() for g in grads.values()), errs


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_reference(op, causal):
    lengths = [3, 17, 1, 40, 0, 9]
    T = sum(lengths)
    cu = ragged_cu_seqlens(lengths)
    fn, x = make_inputs(op, B=1, T=T, initial_state=causal, N=len(lengths))
    assert_close_fwd_bwd(fn, x, cu_seqlens=cu, output_final_state=causal, causal=causal)


@pytest.mark.parametrize("op", OPS)
def test_varlen_equals_separate_sequences(op):
    lengths = [20, 1, 70, 33]
    cu = ragged_cu_seqlens(lengths)
    fn, x = make_inputs(op, B=1, T=sum(lengths), dtype=torch.float32, initial_state=True, N=len(lengths))
    o, s = fn(**x, cu_seqlens=cu, output_final_state=True, backend="torch")
    offs = cu.tolist()
    for n, (a, b) in enumerate(zip(offs, offs[1:])):
        part = {name: (t[:, a:b] if name != "initial_state" else t[n:n + 1]) for name, t in x.items()}
        o_n, s_n = fn(**part, output_final_state=True, backend="torch")
        assert rel_err(o[:, a:b], o_n) < 1e-5
        assert rel_err(s[n:n + 1], s_n) < 1e-5


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("T", [1, 30, 100])
def test_bidirectional_matches_reference(op, T):
    fn, x = make_inputs(op, T=T)
    assert_close_fwd_bwd(fn, x, causal=False)


def test_bidirectional_is_symmetric_in_time():
    """Reversing the sequence (and the gates' steps) reverses a bidirectional output."""
    fn, x = make_inputs("gla", T=50)
    o, _ = fn(**x, causal=False, backend="torch")
    g = x["g"]
    # w_ij uses g over (min, max]; reversed, step t' decays by g_{T-t'}: shift the flipped gate by one.
    g_rev = torch.cat([torch.zeros_like(g[:, :1]), g.flip(1)[:, :-1]], 1)
    o_rev, _ = fn(x["q"].flip(1), x["k"].flip(1), x["v"].flip(1), g_rev, causal=False, backend="torch")
    assert rel_err(o_rev.flip(1), o) < 1e-12


def test_simple_gla_equals_gla_with_broadcast_gate():
    _, x = make_inputs("simple_gla", T=70, initial_state=True)
    o1, s1 = simple_gla(**x, output_final_state=True)
    x["g"] = x["g"][..., None].expand(*x["q"].shape).contiguous()
    o2, s2 = gla(**x, output_final_state=True)
    assert rel_err(o1, o2) < 1e-12 and rel_err(s1, s2) < 1e-12


def test_linear_attn_equals_simple_gla_without_decay():
    _, x = make_inputs("linear_attn", T=70, initial_state=True)
    o1, s1 = linear_attn(**x, output_final_state=True)
    o2, s2 = simple_gla(**x, g=torch.zeros(2, 70, 3, dtype=torch.float64), output_final_state=True)
    assert rel_err(o1, o2) < 1e-12 and rel_err(s1, s2) < 1e-12


def test_state_carries_across_calls():
    """Running a sequence in two pieces with the state carried equals one call."""
    fn, x = make_inputs("gla", T=90, dtype=torch.float32)
    o, s = fn(**x, output_final_state=True)
    first = {n: t[:, :41] for n, t in x.items()}
    rest = {n: t[:, 41:] for n, t in x.items()}
    o1, s1 = fn(**first, output_final_state=True)
    o2, s2 = fn(**rest, initial_state=s1, output_final_state=True)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-5 and rel_err(s2, s) < 1e-5


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(op, dtype):
    fn, x = make_inputs(op, T=80, dtype=torch.float32, initial_state=True)
    o_ref, s_ref = fn(**x, output_final_state=True, backend="reference")
    half = {n: (t.to(dtype) if n in ("q", "k", "v") else t) for n, t in x.items()}
    o, s = fn(**half, output_final_state=True)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rel_err(o, o_ref) < TOL[dtype] and rel_err(s, s_ref) < TOL[dtype]
    _, _, grads = fwd_bwd(fn, half, torch.randn_like(o_ref), None)
    assert all(grads[n].dtype == dtype for n in ("q", "k", "v"))


def test_default_scale():
    fn, x = make_inputs("simple_gla", T=10)
    o1, _ = fn(**x)
    o2, _ = fn(**x, scale=16 ** -0.5)
    o3, _ = fn(**x, scale=1.0)
    assert rel_err(o1, o2) < 1e-14 and rel_err(o3 * 16 ** -0.5, o1) < 1e-12
