"""delta_rule: the Triton backend (in the interpreter on CPU) against the token-loop reference.

Forward output, final state and every gradient (q, k, v, beta, g, initial_state), with and
without the gate, under an incoming final-state gradient. Keys are L2-normalised as the layers
do. The interpreter is selected by TRITON_INTERPRET=1, which Triton reads at ``import triton``:
it is set here before triton or linmix is imported (the root conftest.py sets it too when there
is no CUDA); if our kernel module was imported earlier without it, the module is reloaded.
Shapes are small: the interpreter runs every program of every grid in Python.
"""

import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402

pytest.importorskip("triton", reason="the Triton backend needs the triton package (not installed)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from linmix.ops.delta_rule import delta_rule  # noqa: E402
from linmix.ops.dispatch import available_backends  # noqa: E402
from tests.ops.utils import TOL, assert_close_fwd_bwd, fwd_bwd, log_gate, ragged_cu_seqlens, rel_err  # noqa: E402
from tests.ops.triton_interp import (  # noqa: E402
    bf16_casts_round_to_nearest, block_pointer_lines, interpreted_module, interpreter_problem)

INTERPRETER_PROBLEM = interpreter_problem()

delta_rule_triton = interpreted_module("linmix.ops.delta_rule.triton", "_chunk_solve_kernel")

INTERP_TOL = 1e-4  # DESIGN.md section 4: Triton in the interpreter, float32


@pytest.fixture(autouse=True)
def _interpreter_ready():
    if INTERPRETER_PROBLEM:
        pytest.fail(INTERPRETER_PROBLEM, pytrace=False)


def make_inputs(B=2, T=37, H=1, K=32, V=48, *, gated=True, strength="normal", initial_state=True, num_states=None,
                beta_max=1.0, dtype=torch.float32):
    """Fresh random inputs: L2-normalised keys, beta = beta_max * sigmoid(randn), logsigmoid gates."""
    x = {"q": torch.randn(B, T, H, K), "k": F.normalize(torch.randn(B, T, H, K), dim=-1),
         "v": torch.randn(B, T, H, V), "beta": beta_max * torch.sigmoid(torch.randn(B, T, H)),
         "g": log_gate(B, T, H, strength=strength) if gated else None}
    if initial_state:
        x["initial_state"] = torch.randn(num_states or B, H, K, V)
    return {n: (t if t is None or n == "initial_state" else t.to(dtype)) for n, t in x.items()}


def check(x, tol=INTERP_TOL, **kwargs):
    return assert_close_fwd_bwd(delta_rule, x, backend="triton", tol=tol, **kwargs)


def test_backend_registered():
    assert "triton" in available_backends("delta_rule")


def test_kernels_use_plain_pointers():
    """DESIGN.md section 2: no tl.make_block_ptr (removed in current Triton) in the code (docstrings may name it)."""
    used = block_pointer_lines(delta_rule_triton)
    assert not used, f"make_block_ptr / block pointers used at lines {used}"


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("T", [1, 5, 37, 64])
def test_matches_reference(gated, T):
    """K != V (V not a power of two); T = 1, T < 16, T < C, T = C; states in and out (several chunks: below)."""
    check(make_inputs(T=T, gated=gated), output_final_state=True)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_without_states(gated):
    """No initial state, no final state; three chunks, the last partial."""
    check(make_inputs(B=1, T=150, K=16, V=16, gated=gated, initial_state=False))


def test_final_state_returned_but_unused():
    """The final state is an output but takes no part in the loss: its gradient arrives as None."""
    x = make_inputs(T=40, K=16, V=16)
    grad_o = torch.randn(2, 40, 1, 16)
    _, _, ref = fwd_bwd(delta_rule, x, grad_o, None, output_final_state=True, backend="reference")
    _, _, got = fwd_bwd(delta_rule, x, grad_o, None, output_final_state=True, backend="triton")
    for name, g in ref.items():
        assert rel_err(got[name], g) < INTERP_TOL, name


def test_large_head_dims():
    """K = 128 (two K blocks: dbeta and dg summed over blocks) and V = 80 (several V blocks, masked)."""
    check(make_inputs(B=1, T=20, K=128, V=80), output_final_state=True)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_varlen(gated):
    """Ragged packed sequences, one of them empty, one crossing a chunk boundary."""
    lengths = [70, 0, 5]
    cu = ragged_cu_seqlens(lengths)
    x = make_inputs(B=1, T=sum(lengths), K=16, V=32, gated=gated, num_states=len(lengths))
    check(x, cu_seqlens=cu, output_final_state=True)


def test_strong_gates():
    """Log-decays down to -20 per step: masked before exp2, nothing overflows.

    Every output and gradient within tolerance implies every value finite (a NaN or inf fails the comparison).
    """
    check(make_inputs(B=1, T=130, K=16, V=32, strength="strong"), output_final_state=True)


def test_beta_zero_to_two():
    """beta in [0, 2] (the allowed range), some steps exactly 0 (no write) and some near 2.

    Also passes a chunk_size, which the kernels accept and ignore (their chunks are 64 long).
    """
    x = make_inputs(B=1, T=100, K=16, V=32, beta_max=2.0)
    x["beta"][:, ::7] = 0.0
    x["beta"][:, 3::11] = 1.999
    check(x, output_final_state=True, chunk_size=16)


def bf16_errors(x):
    """Relative errors of the triton backend on bf16 inputs against the float32 reference on the same inputs."""
    x32 = {n: None if t is None else t.float() for n, t in x.items()}
    B, T, H, K = x["q"].shape
    V = x["v"].shape[-1]
    grad_o, grad_s = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    o, s, grads = fwd_bwd(delta_rule, x, grad_o, grad_s, output_final_state=True, backend="triton")
    o_ref, s_ref, grads_ref = fwd_bwd(delta_rule, x32, grad_o, grad_s, output_final_state=True, backend="reference")
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert all(grads[n].dtype == x[n].dtype for n in grads)
    errs = {"o": rel_err(o, o_ref), "final_state": rel_err(s, s_ref)}
    errs.update({"d" + n: rel_err(grads[n], g) for n, g in grads_ref.items()})
    return errs


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_bfloat16(gated):
    """bf16 q, k, v, beta, g: bf16 tl.dot operands with float32 accumulation, A / h / U / dh / dX2 stored in bf16.

    Compared with the float32 reference on the same (bf16-rounded) inputs, at DESIGN's bf16
    tolerance (seen: about 1e-2). In the interpreter the bf16 dot operands are widened to float32
    first -- its own bf16 dot is broken -- which gives the GPU's bf16 products; the scans' float32
    operands are rounded to bf16 before their dots, as on the GPU (``scan_precision="input"``).
    """
    errs = bf16_errors(make_inputs(B=1, T=100, K=32, V=32, gated=gated, dtype=torch.bfloat16))
    assert max(errs.values()) < TOL[torch.bfloat16], errs


def test_scan_precision_settings(monkeypatch):
    """The scans' other precision settings (float32 dots instead of split operands) run and agree; bad ones raise."""
    monkeypatch.setattr(delta_rule_triton, "LAUNCH", delta_rule_triton.LaunchConfig(scan_precision="tf32"))
    errs = bf16_errors(make_inputs(B=1, T=70, K=16, V=16, dtype=torch.bfloat16))
    assert max(errs.values()) < TOL[torch.bfloat16], errs
    monkeypatch.setattr(delta_rule_triton, "LAUNCH", delta_rule_triton.LaunchConfig(scan_precision="fp8"))
    with pytest.raises(ValueError, match="scan_precision"):
        delta_rule(**make_inputs(B=1, T=40, dtype=torch.bfloat16), backend="triton")  # T > the fused-kernel bound


def test_float64_falls_back_to_chunk_form():
    x = {n: None if t is None else t.double() for n, t in make_inputs(T=20, K=16, V=16).items()}
    check(x, tol=1e-10, output_final_state=True)


def test_launch_settings_avoid_the_hopper_miscompilations():
    """The launch settings the H200 verified: at most 4 warps in the scans and the gradient kernel,
    2 warps and no pipelining in the scans at K > 128 (8 warps, or 4 at K = 256, miscompiled there)."""
    for K, warps, stages in ((64, 4, None), (128, 4, None), (256, 2, 1)):
        q = torch.zeros(1, 64, 1, K, dtype=torch.bfloat16)
        s = delta_rule_triton._Sizes(q, q)
        scan = s.consts(s.scan_warps, scan=True)
        assert scan["num_warps"] == warps and scan.get("num_stages") == stages, (K, scan)
        assert s.consts(s.cfg.warps_grads)["num_warps"] <= 4
        assert s.consts(s.cfg.warps_score_grads)["num_warps"] <= 4
        assert s.consts(s.cfg.warps_wy)["num_warps"] <= 4 and s.consts(s.cfg.warps_dx2)["num_warps"] <= 4


def test_scan_tile_shrinks_for_few_heads():
    """Few (batch, head) pairs: the scans' V tile halves until they run ``scan_min_programs`` programs (or reach 16)."""
    cfg = delta_rule_triton.LAUNCH
    for BH, V in ((128, 128), (32, 128), (2, 128), (1, 16)):
        q, v = torch.zeros(1, 64, BH, 128), torch.zeros(1, 64, BH, V)
        s = delta_rule_triton._Sizes(q, v)
        programs = BH * s.scan_NV
        assert s.scan_BV <= cfg.scan_block_v and (programs >= cfg.scan_min_programs or s.scan_BV == 16), (BH, s.scan_BV)
        assert s.scan_BV == cfg.scan_block_v or BH * -(-V // (2 * s.scan_BV)) < cfg.scan_min_programs, (BH, s.scan_BV)


def test_wy_form_when_the_scans_are_latency_bound(monkeypatch):
    """``wy_precompute=None`` picks the WY form exactly when the scans would run fewer than ``scan_min_programs``
    programs at their full V tile (the standard shape, K = V = 128: B * H = 32 at T = 32K -> WY, 128 at T = 8K ->
    residual); True / False force either form."""
    def wy(B, H):
        x = torch.zeros(B, 64, H, 128)
        return delta_rule_triton._Sizes(x, x).wy

    cfg = delta_rule_triton.LAUNCH
    assert cfg.wy_precompute is None and cfg.scan_min_programs == 128 and cfg.scan_block_v == 64
    assert [wy(B, 16) for B in (1, 2, 3, 4, 8, 64)] == [True, True, True, False, False, False]  # 2 V tiles per head
    for forced in (True, False):
        monkeypatch.setattr(delta_rule_triton, "LAUNCH", dataclasses.replace(cfg, wy_precompute=forced))
        assert wy(2, 16) is forced and wy(64, 16) is forced


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_backward_without_the_kept_solve(gated):
    """A forward run without ``keep_solve`` leaves the backward to recompute A and b: the same gradients as the
    reference (the normal path, A and b kept from the forward, is what the other tests run)."""
    x = make_inputs(B=1, T=70, K=16, V=16, gated=gated)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    op_args = dict(g=None, initial_state=None) | leaves
    o, ht = delta_rule_triton.delta_rule_op(**op_args, scale=16 ** -0.5, output_final_state=True, keep_solve=False)
    grad_o, grad_ht = torch.randn_like(o), torch.randn_like(ht)
    got = dict(zip(leaves, torch.autograd.grad((o, ht), list(leaves.values()), (grad_o, grad_ht))))
    _, _, ref = fwd_bwd(delta_rule, x, grad_o, grad_ht, output_final_state=True, backend="reference")
    for name, g in ref.items():
        assert rel_err(got[name], g) < INTERP_TOL, name


def test_wy_backward_reuses_the_kept_w(monkeypatch):
    """In the WY form the forward keeps W for the backward, whose WY launch then forms U~ alone (STORE_W off)."""
    assert delta_rule_triton._Sizes(torch.zeros(1, 70, 1, 16), torch.zeros(1, 70, 1, 16)).wy  # the default here
    kept = []
    launch = delta_rule_triton._chunk_wy

    def recorded(*args, W=None, **kwargs):
        kept.append(W is not None)
        return launch(*args, W=W, **kwargs)

    monkeypatch.setattr(delta_rule_triton, "_chunk_wy", recorded)
    check(make_inputs(B=1, T=70, K=16, V=16), output_final_state=True)
    assert kept == [False, True], kept  # the forward forms W; the backward gets it


# --------------------------------------------------------------------------------------------
# LaunchConfig.wy_precompute=False: U formed in the scan from A and the residual (the other tests run
# the default path, with W and U~ formed before the scans)
# --------------------------------------------------------------------------------------------

def count_launches(monkeypatch, names):
    """Count the calls of the launchers ``names`` of the Triton module: {name: calls}."""
    calls = dict.fromkeys(names, 0)

    def counted(name):
        launch = getattr(delta_rule_triton, name)

        def run(*args, **kwargs):
            calls[name] += 1
            return launch(*args, **kwargs)
        return run

    for name in names:
        monkeypatch.setattr(delta_rule_triton, name, counted(name))
    return calls


@pytest.fixture
def residual_scan(monkeypatch):
    """Run the test with ``wy_precompute=False``, and fail it if the WY kernels (W and U~, dX2) ran."""
    monkeypatch.setattr(delta_rule_triton, "LAUNCH", delta_rule_triton.LaunchConfig(wy_precompute=False))
    calls = count_launches(monkeypatch, ["_chunk_wy", "_chunk_dx2"])
    yield
    assert not any(calls.values()), f"the WY kernels ran: {calls}"


@pytest.fixture
def bf16_rounding_as_on_gpu(monkeypatch):
    """float32 -> bf16 casts rounded to nearest even, as on the GPU (the bf16 dot itself is handled by the
    kernels: see the module docstring)."""
    bf16_casts_round_to_nearest(monkeypatch)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("T", [5, 64, 150])
def test_residual_scan_matches_reference(residual_scan, gated, T):
    """T < 16, T = C, three chunks with a partial last one; initial and final state (and its gradient)."""
    check(make_inputs(B=1, T=T, gated=gated), output_final_state=True)


def test_residual_scan_varlen(residual_scan):
    """Ragged packed sequences (one empty, one crossing a chunk boundary), gated."""
    lengths = [70, 0, 5]
    x = make_inputs(B=1, T=sum(lengths), K=16, V=32, num_states=len(lengths))
    check(x, cu_seqlens=ragged_cu_seqlens(lengths), output_final_state=True)


def test_residual_scan_large_head_dims(residual_scan):
    """K = 128 (KP = 128 in the scans' key tile) and V = 80 (several V blocks), two chunks."""
    check(make_inputs(B=1, T=70, K=128, V=80), output_final_state=True)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_residual_scan_bfloat16(residual_scan, bf16_rounding_as_on_gpu, gated):
    """bf16 inputs against the float32 reference, at DESIGN's bf16 tolerance."""
    errs = bf16_errors(make_inputs(B=1, T=100, K=32, V=32, gated=gated, dtype=torch.bfloat16))
    assert max(errs.values()) < TOL[torch.bfloat16], errs
