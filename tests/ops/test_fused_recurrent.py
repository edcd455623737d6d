"""fused_recurrent (every family) against each op's reference backend, float32 (and bf16 inputs).

Without CUDA the kernels run in the Triton interpreter on CPU tensors: TRITON_INTERPRET=1 is set
before triton or linmix is imported (tests/ops/triton_interp.py says why), and the kernel module
is reloaded if it was imported earlier without it. With CUDA the same tests run the compiled
kernels on the GPU. Shapes are small: the interpreter runs every program of the grid in Python,
token by token.
"""

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import functools  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="the fused recurrent kernels need the triton package (not installed)")

import torch.nn.functional as F  # noqa: E402

from linmix.ops import delta_rule, gla, linear_attn, simple_gla  # noqa: E402
from tests.ops.utils import assert_close_fwd_bwd, fwd_bwd, log_gate, ragged_cu_seqlens, rel_err  # noqa: E402
from tests.ops.triton_interp import block_pointer_lines, interpreted_module, interpreter_problem  # noqa: E402

INTERPRETER_PROBLEM = interpreter_problem(ON_GPU)

fr = interpreted_module("linmix.ops.common.fused_recurrent", "_fused_recurrent_fwd_kernel", ON_GPU)

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = 1e-4  # DESIGN.md section 4: Triton in the interpreter, float32
FAMILIES = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")


@pytest.fixture(autouse=True)
def _interpreter_ready():
    if INTERPRETER_PROBLEM:
        pytest.fail(INTERPRETER_PROBLEM, pytrace=False)


def run(q, k, v, g=None, gk=None, beta=None, *, backend, **kwargs):
    """One signature for both sides: backend "fused" is fused_recurrent, else the family's op."""
    if backend == "fused":
        return fr.fused_recurrent(q, k, v, g=g, gk=gk, beta=beta, **kwargs)
    if beta is not None:
        return delta_rule(q, k, v, beta, g, backend=backend, **kwargs)
    if gk is not None:
        return gla(q, k, v, gk, backend=backend, **kwargs)
    if g is not None:
        return simple_gla(q, k, v, g, backend=backend, **kwargs)
    return linear_attn(q, k, v, backend=backend, **kwargs)


def make_inputs(family, B=2, T=7, H=2, K=32, V=24, N=None, initial_state=True, strength="normal"):
    """Random inputs on DEVICE: q, k, v, the family's gates (delta rule: normalised keys), initial state."""
    x = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V)}
    if family == "simple_gla":
        x["g"] = log_gate(B, T, H, strength=strength)
    elif family == "gla":
        x["gk"] = log_gate(B, T, H, K, strength=strength)
    elif family in ("delta_rule", "gated_delta_rule"):
        x["k"] = F.normalize(x["k"], dim=-1)
        x["beta"] = torch.sigmoid(torch.randn(B, T, H))
        if family == "gated_delta_rule":
            x["g"] = log_gate(B, T, H, strength=strength)
    if initial_state:
        x["initial_state"] = torch.randn(N or B, H, K, V)
    return {n: t.to(DEVICE) for n, t in x.items()}


def test_kernels_use_plain_pointers():
    """DESIGN.md section 2: no tl.make_block_ptr (removed in current Triton) in the code."""
    used = block_pointer_lines(fr)
    assert not used, f"make_block_ptr / block pointers used at lines {used}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T", [1, 2, 7])
def test_matches_reference(family, T):
    """Output, final state and the gradient of every input (gates, beta, initial_state), K != V;
    T = 2 without states in or out."""
    with_states = T != 2
    x = make_inputs(family, T=T, initial_state=with_states)
    assert_close_fwd_bwd(run, x, backend="fused", tol=TOL, output_final_state=with_states)


@pytest.mark.parametrize("family", FAMILIES)
def test_varlen(family):
    """Ragged packed sequences, lengths 0 and 1 included; one initial/final state per sequence."""
    lengths = [3, 0, 1, 6]
    x = make_inputs(family, B=1, T=sum(lengths), N=len(lengths))
    assert_close_fwd_bwd(run, x, backend="fused", tol=TOL, output_final_state=True,
                         cu_seqlens=ragged_cu_seqlens(lengths).to(DEVICE))


@pytest.mark.parametrize("family", FAMILIES)
def test_several_v_blocks(family):
    """K = 100 (masked inside a 128-wide block) gives V blocks of 16 (8 on a GPU) < V = 40, the last
    one partial: the per-block partial gradients are summed."""
    x = make_inputs(family, B=1, T=3, H=1, K=100, V=40)
    assert fr._Launch(x["q"], x["v"], None, 0, False).NV >= 3
    assert_close_fwd_bwd(run, x, backend="fused", tol=TOL, output_final_state=True)


@pytest.mark.parametrize("family", ["simple_gla", "gla", "gated_delta_rule"])
def test_strong_gates(family):
    """Log-decays down to -20 per step: exp2 of non-positive exponents only, nothing overflows."""
    x = make_inputs(family, B=1, T=6, strength="strong")
    assert_close_fwd_bwd(run, x, backend="fused", tol=TOL, output_final_state=True)


@pytest.mark.parametrize("family", ["gla", "delta_rule"])
def test_only_final_state_in_loss(family):
    """The output takes no part in the loss (its gradient arrives as None); only the final state does."""
    x = make_inputs(family, T=4)
    grads = {}
    for backend in ("reference", "fused"):
        leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
        torch.manual_seed(0)
        _, state = run(**leaves, backend=backend, output_final_state=True)
        (state * torch.randn_like(state)).sum().backward()
        grads[backend] = {n: t.grad for n, t in leaves.items()}
    for name, ref in grads["reference"].items():
        got = grads["fused"][name]
        if ref is None:  # q takes no part in the final state
            assert got is None or not got.any(), name
        else:
            assert rel_err(got, ref) < TOL, name


@pytest.mark.parametrize("family", ["simple_gla", "gated_delta_rule"])
def test_bfloat16_inputs(family):
    """bf16 q, k, v (no tl.dot here, so the interpreter computes them right): float32 state, bf16 o and grads."""
    x = make_inputs(family, T=3)
    x = {n: (t.bfloat16() if n in ("q", "k", "v") else t) for n, t in x.items()}
    assert_close_fwd_bwd(run, x, backend="fused", tol=1e-2, output_final_state=True)


def test_gates_in_other_dtypes():
    """Gates, beta and the initial state may have their own float dtypes; their gradients keep them."""
    x = make_inputs("gated_delta_rule", T=3)
    x["g"], x["beta"], x["initial_state"] = x["g"].bfloat16(), x["beta"].half(), x["initial_state"].bfloat16()
    grad_o, grad_s = torch.randn(2, 3, 2, 24, device=DEVICE), torch.randn(2, 2, 32, 24, device=DEVICE)
    o_ref, s_ref, ref = fwd_bwd(functools.partial(run, backend="reference"), x, grad_o, grad_s, output_final_state=True)
    o, s, got = fwd_bwd(functools.partial(run, backend="fused"), x, grad_o, grad_s, output_final_state=True)
    assert {n: got[n].dtype for n in ("g", "beta", "initial_state")} == {
        "g": torch.bfloat16, "beta": torch.float16, "initial_state": torch.bfloat16}
    errs = {"o": rel_err(o, o_ref), "final_state": rel_err(s, s_ref), **{n: rel_err(got[n], ref[n]) for n in ref}}
    assert max(errs.values()) < 1e-2, errs


@pytest.mark.parametrize("family", ["gla", "gated_delta_rule"])
def test_out_state_in_place(family):
    """out_state = initial_state: the cache is updated in place, and equals the reference final state."""
    x = make_inputs(family, T=2)
    o_ref, s_ref = run(**x, backend="reference", output_final_state=True)
    cache = x["initial_state"].clone()
    with torch.no_grad():
        o, s = run(**{**x, "initial_state": cache}, backend="fused", out_state=cache)
    assert s is cache
    assert rel_err(o, o_ref) < TOL and rel_err(cache, s_ref) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_runs_the_chunk_form(family):
    x = {n: t.double() for n, t in make_inputs(family, T=4).items()}
    assert_close_fwd_bwd(run, x, backend="fused", output_final_state=True)


def test_decode_loop_matches_full_sequence():
    """Decoding token by token with the carried state gives the full sequence's outputs."""
    x = make_inputs("gla", T=4)
    o_full, s_full = run(**x, backend="reference", output_final_state=True)
    state, outs = x["initial_state"], []
    for t in range(4):
        step = {n: (v[:, t:t + 1] if n != "initial_state" else state) for n, v in x.items()}
        o, state = run(**step, backend="fused", output_final_state=True, validate=False)  # as the ops' backends
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), o_full) < TOL and rel_err(state, s_full) < TOL


def test_bad_arguments():
    x = make_inputs("simple_gla", T=2)
    q, k, v = x["q"], x["k"], x["v"]

    def on_device(*tensors):
        return [t.to(DEVICE) for t in tensors]

    gk, gk_short = on_device(log_gate(2, 2, 2, 32), log_gate(2, 2, 2, 16))
    beta, beta_big, h0_transposed, cu = on_device(torch.rand(2, 2, 2), torch.rand(2, 2, 2) + 3,
                                                  torch.randn(2, 2, 24, 32), torch.tensor([0, 1, 2]))
    state_f64, state = on_device(torch.zeros(2, 2, 32, 24, dtype=torch.float64), torch.zeros(2, 2, 32, 24))
    with pytest.raises(ValueError, match="at most one of g .* and gk"):
        fr.fused_recurrent(q, k, v, g=x["g"], gk=gk)
    with pytest.raises(ValueError, match="delta rule .* gk"):
        fr.fused_recurrent(q, k, v, gk=gk, beta=beta)
    with pytest.raises(ValueError, match="gk must have shape"):
        fr.fused_recurrent(q, k, v, gk=gk_short)
    with pytest.raises(ValueError, match="g is a log-decay"):
        fr.fused_recurrent(q, k, v, g=-x["g"] + 0.1)
    with pytest.raises(ValueError, match="beta must lie"):
        fr.fused_recurrent(q, k, v, beta=beta_big)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        fr.fused_recurrent(q, k, v, initial_state=h0_transposed)
    with pytest.raises(ValueError, match="B must be 1"):
        fr.fused_recurrent(q, k, v, cu_seqlens=cu)
    with pytest.raises(ValueError, match="out_state must be a contiguous float32"):
        fr.fused_recurrent(q, k, v, out_state=state_f64)
    with pytest.raises(ValueError, match="out_state .* is for inference"):
        fr.fused_recurrent(q.requires_grad_(), k, v, out_state=state)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(fr, "triton_interpreted", lambda: False)
    x = make_inputs("linear_attn", T=1)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        fr.fused_recurrent(x["q"].cpu(), x["k"].cpu(), x["v"].cpu())
