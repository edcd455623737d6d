"""gla: the Triton backend (in the interpreter, float32, CPU) against the reference, and the chunk-local gate gradient.

TRITON_INTERPRET=1 must be set before triton is imported (tests/ops/triton_interp.py says
why); if our kernel module was imported earlier without it, it is reloaded so that its kernels are
interpreted. Shapes are tiny: the interpreter runs every program of every grid in Python.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton", reason="the Triton backend needs the triton package (not installed)")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from linmix.ops import gla  # noqa: E402
from linmix.ops.dispatch import available_backends, resolve  # noqa: E402
from tests.ops.utils import assert_close_fwd_bwd, fwd_bwd, log_gate, ragged_cu_seqlens, rel_err  # noqa: E402
from tests.ops.triton_interp import (  # noqa: E402
    bf16_casts_round_to_nearest, bf16_dots_upcast, block_pointer_lines, interpreted_module, interpreter_problem)

INTERPRETER_PROBLEM = interpreter_problem()

gla_triton = interpreted_module("linmix.ops.gla.triton", "_chunk_outputs_kernel")
fused = importlib.import_module("linmix.ops.common.fused_recurrent")
FUSED_BOUNDS = {n: getattr(fused, n) for n in ("FUSED_MAX_TOKENS_TRAINING", "FUSED_MAX_TOKENS_INFERENCE")}

TOL = 1e-4  # DESIGN.md section 4: Triton in the interpreter, float32


@pytest.fixture(autouse=True)
def _interpreter_ready():
    if INTERPRETER_PROBLEM:
        pytest.fail(INTERPRETER_PROBLEM, pytrace=False)


@pytest.fixture(autouse=True)
def _chunk_kernels_only(monkeypatch):
    """Short sequences normally take the fused recurrent kernel: force the chunk kernels (except where a
    test restores the bounds)."""
    for name in FUSED_BOUNDS:
        monkeypatch.setattr(fused, name, 0)


def make_inputs(B=1, T=37, H=1, K=32, V=48, strength="normal", initial_state=True, N=None):
    x = {"q": torch.randn(B, T, H, K), "k": torch.randn(B, T, H, K), "v": torch.randn(B, T, H, V),
         "g": log_gate(B, T, H, K, strength=strength)}
    if initial_state:
        x["initial_state"] = torch.randn(N or B, H, K, V)
    return x


def test_backend_registered():
    assert "triton" in available_backends("gla")


def test_auto_on_cpu_is_the_torch_chunk_form():
    chunk = importlib.import_module("linmix.ops.gla.chunk")
    assert resolve("gla", "auto", torch.device("cpu")) is chunk.gla_chunk


def test_kernels_use_plain_pointers():
    """DESIGN.md section 2: no tl.make_block_ptr (removed in current Triton) in the code (docstrings may name it)."""
    used = block_pointer_lines(gla_triton)
    assert not used, f"make_block_ptr / block pointers used at lines {used}"


@pytest.mark.parametrize("T, B, H", [(1, 2, 1), (5, 1, 2), (64, 1, 1), (100, 1, 1)])
def test_matches_reference(T, B, H):
    """K != V, T = 1, T < C, T = C, T not a multiple of C (two chunks); initial state in, final state out
    with an incoming gradient."""
    x = make_inputs(B=B, T=T, H=H)
    assert_close_fwd_bwd(gla, x, backend="triton", tol=TOL, output_final_state=True)


@pytest.mark.parametrize("T", [1, 3])
def test_short_sequences_take_the_fused_kernel(T, monkeypatch):
    """The backend's short-sequence route (the fused recurrent kernel) against the reference."""
    for name, bound in FUSED_BOUNDS.items():
        monkeypatch.setattr(fused, name, bound)
    calls = []
    real = fused._fused_forward
    monkeypatch.setattr(fused, "_fused_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert_close_fwd_bwd(gla, make_inputs(T=T, K=16, V=16), backend="triton", tol=TOL, output_final_state=True)
    assert calls, "the fused recurrent kernel was not used"


def test_backward_recomputes_scores_not_kept():
    """A forward run without store_scores (no gradient expected) still has a backward: it recomputes A."""
    x = make_inputs(T=20, K=16, V=16)
    inputs = {n: x[n] for n in ("q", "k", "v", "g", "initial_state")}
    consts = dict(scale=0.25, output_final_state=True, chunk_size=32)
    o, ht, A = gla_triton._forward(**inputs, **consts, store_scores=True)
    assert gla_triton._forward(**inputs, **consts, store_scores=False)[2] is None
    cotangents = [torch.randn_like(o), torch.randn_like(ht)]
    kept = gla_triton._backward(inputs, [A], cotangents, consts, [True] * 5)
    recomputed = gla_triton._backward(inputs, [None], cotangents, consts, [True] * 5)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


def test_head_dims_above_one_tile():
    """K = V = 80: two 64-wide tiles each way (the K and V loops, masked second tiles, b padded along K)."""
    x = make_inputs(T=5, K=80, V=80)
    assert_close_fwd_bwd(gla, x, backend="triton", tol=TOL, output_final_state=True)


def test_without_initial_state_and_unused_final_state():
    """No initial state; the final state is an output but takes no part in the loss (its gradient is None)."""
    x = make_inputs(T=40, K=16, V=32, initial_state=False)
    grad_o = torch.randn(1, 40, 1, 32)
    o_ref, s_ref, ref = fwd_bwd(gla, x, grad_o, None, output_final_state=True, backend="reference")
    o, s, got = fwd_bwd(gla, x, grad_o, None, output_final_state=True, backend="triton")
    assert rel_err(o, o_ref) < TOL and rel_err(s, s_ref) < TOL
    for name, g in ref.items():
        assert rel_err(got[name], g) < TOL, name


def test_other_tile_widths(monkeypatch):
    """Results do not depend on the launch parameters: narrower tiles per kernel (more K / V loop steps, b padded
    to the widest K tile of the kernels that load it, head dims not a multiple of any tile)."""
    tiles = {"states": (16, 16), "outputs": (32, 16), "dv": (16, 32), "dA": (64, 16), "dqk": (16, 64)}
    for name, (block_k, block_v) in tiles.items():
        monkeypatch.setattr(gla_triton.LAUNCH.kernels[name], "block_k", block_k)
        monkeypatch.setattr(gla_triton.LAUNCH.kernels[name], "block_v", block_v)
    x = make_inputs(T=20, K=40, V=24)
    assert_close_fwd_bwd(gla, x, backend="triton", tol=TOL, output_final_state=True)


def test_chunk_size_128():
    x = make_inputs(T=100, K=16, V=16)
    assert_close_fwd_bwd(gla, x, backend="triton", tol=TOL, output_final_state=True, chunk_size=128)


def test_strong_gates():
    """Log-decays of -5 to -20 per step: every exponent is <= 0, nothing overflows, results stay exact."""
    x = make_inputs(T=70, K=16, V=32)
    x["g"] = -5.0 - 15.0 * torch.rand_like(x["g"])
    errs = assert_close_fwd_bwd(gla, x, backend="triton", tol=TOL, output_final_state=True)
    assert all(np.isfinite(e) for e in errs.values())


def test_varlen():
    """Ragged packed sequences, one of them empty (its final state is its initial state)."""
    lengths = [5, 0, 11, 1]
    x = make_inputs(T=sum(lengths), K=16, V=32, N=len(lengths))
    assert_close_fwd_bwd(gla, x, backend="triton", tol=TOL, cu_seqlens=ragged_cu_seqlens(lengths),
                         output_final_state=True)


def test_bidirectional():
    x = make_inputs(T=20, K=16, V=16, initial_state=False)
    assert_close_fwd_bwd(gla, x, backend="triton", tol=TOL, causal=False)


def test_float64_falls_back_to_chunk_form():
    x = {n: t.double() for n, t in make_inputs(T=20, K=16, V=16).items()}
    assert_close_fwd_bwd(gla, x, backend="triton", output_final_state=True)


@pytest.fixture
def interpreter_bf16_as_on_gpu(monkeypatch):
    """The interpreter's two bfloat16 shortcuts (Triton 3.9) replaced by what the GPU does: bf16 dots on
    upcast operands, float32 -> bf16 casts rounded to nearest even (tests/ops/triton_interp.py)."""
    bf16_dots_upcast(monkeypatch)
    bf16_casts_round_to_nearest(monkeypatch)


def test_bfloat16_inputs(interpreter_bf16_as_on_gpu):
    """bf16 q, k, v, g (h, dh, A and the dot operands rounded to bf16; float32 states and accumulation) against
    the reference on the same bf16 values computed in float32. DESIGN's bf16 bound is 1e-2."""
    x = {n: (t.bfloat16() if n != "initial_state" else t) for n, t in make_inputs(T=70, H=2).items()}
    errs = assert_close_fwd_bwd(gla, x, backend="triton", tol=1e-2, output_final_state=True)
    assert all(np.isfinite(e) for e in errs.values())


def test_chunk_local_gate_gradient_identity():
    """The identity behind the kernel's dg, in float64 on the reference: per chunk n (state h_n entering,
    h_{n+1} leaving, dh_n the gradient of h_{n+1}, b the in-chunk cumulative log-gate, b_C its last row)

        dg_s = sum_{t >= s in chunk n} (q_t dq_t - k_t dk_t) + R_n,   R_n = sum_v dh_n * h_{n+1}
             = ... + exp(b_C) sum_v dh_n * h_n + sum_j k_j * exp(b_C - b_j) (dh_n v_j)
    """
    B, T, H, K, V, C = 2, 21, 2, 5, 3, 8
    x = {n: t.double() for n, t in make_inputs(B=B, T=T, H=H, K=K, V=V).items()}
    x["g"] = x["g"] * 0.5
    grad_o, grad_s = torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(B, H, K, V, dtype=torch.float64)
    _, _, ref = fwd_bwd(gla, x, grad_o, grad_s, output_final_state=True, backend="reference")

    # The same recurrence chunk by chunk, keeping the states between chunks and their gradients. The state
    # passed on is a copy: its gradient is that of the later chunks and the final-state loss only (the token
    # loop also uses the returned tensor for the chunk's own last output; the chunk form uses h_n there).
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    states, loss = [leaves["initial_state"]], 0.0
    for t0 in range(0, T, C):
        sl = slice(t0, t0 + C)
        o, h_next = gla(leaves["q"][:, sl], leaves["k"][:, sl], leaves["v"][:, sl], leaves["g"][:, sl],
                        initial_state=states[-1], output_final_state=True, backend="reference")
        h_next = h_next.clone()
        h_next.retain_grad()
        states.append(h_next)
        loss = loss + (o * grad_o[:, sl]).sum()
    (loss + (states[-1] * grad_s).sum()).backward()

    q, k, v, g = (leaves[n].detach() for n in "qkvg")
    dq, dk = leaves["q"].grad, leaves["k"].grad
    assert rel_err(dq, ref["q"]) < 1e-12 and rel_err(dk, ref["k"]) < 1e-12
    dg = torch.empty_like(g)
    for n, t0 in enumerate(range(0, T, C)):
        sl = slice(t0, t0 + C)
        h_n, h_next, dh_n = states[n].detach(), states[n + 1].detach(), states[n + 1].grad
        part = q[:, sl] * dq[:, sl] - k[:, sl] * dk[:, sl]  # [B, c, H, K]
        in_chunk = part.flip(1).cumsum(1).flip(1)
        boundary = (dh_n * h_next).sum(-1)  # [B, H, K]
        b = g[:, sl].cumsum(1)  # [B, c, H, K]
        b_C = b[:, -1]
        dk_inter = torch.exp(b_C[:, None] - b) * torch.einsum("bhkv,bthv->bthk", dh_n, v[:, sl])
        from_tiles = torch.exp(b_C) * (dh_n * h_n).sum(-1) + (k[:, sl] * dk_inter).sum(1)
        assert rel_err(from_tiles, boundary) < 1e-12
        dg[:, sl] = in_chunk + boundary[:, None]
    assert rel_err(dg, ref["g"]) < 1e-10
