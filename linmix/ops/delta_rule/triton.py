"""Triton backend of ``delta_rule``: DeltaNet, and Gated DeltaNet with the scalar log-decay g.

Chunked WY / UT-transform form of KERNELS.md section 3, per head, chunks of C = 64 tokens, q
scaled by ``scale``, beta the step sizes, b the cumulative log-gate inside a chunk (kept in log2
units, b = log2(e) * cumsum(g), so every decay is one ``exp2``; b = 0 without a gate), h_n the
state entering chunk n:

    L   = strictly_lower(diag(beta) ((K K^T) o Gamma)),  Gamma_ti = exp(b_t - b_i)
    A   = (I + L)^{-1}                    (unit lower triangular, float32)         (chunk_solve)
    U   = A diag(beta) (V - (K * exp(b)) h_n)        (= U~ - W h_n of KERNELS.md)
    h_{n+1} = exp(b_C) h_n + (K * exp(b_C - b))^T U                             (pass_states_fwd)
    O   = (Q * exp(b)) h_n + ((Q K^T) o D) U,   D_ij = exp(b_i - b_j), i >= j   (chunk_outputs)

Two forms of the scans, chosen per call (``LaunchConfig.wy_precompute``, below): the *residual*
form builds U in the scan as A times the residual of the values against the decayed state, so
neither W = A diag(beta exp(b)) K nor U~ = A diag(beta) V is materialised (A is a quarter of their
bytes at K = V = 128) and no two rounded large terms U~ and W h_n cancel; the *WY* form
materialises them, which shortens each scan step.

Backward, with dh_n the gradient of the state *leaving* chunk n (the incoming final-state
gradient for the last one), P = (Q K^T) o D, X1 = diag(beta exp(b)) K and X2 = diag(beta) V
(W = A X1, U~ = A X2):

    dU   = P^T dO + (K * exp(b_C - b)) dh_n,   dX2 = A^T dU     (chunk_du_local, pass_states_bwd)
    dh_{n-1} = exp(b_C) dh_n + (Q * exp(b))^T dO - X1^T dX2     (pass_states_bwd; d initial_state)
    dX1 = -dX2 h_n^T,   dL = -strictly_lower(dX2 U^T)           (the solve's gradient needs no W:
                                                                  dX1 W^T + dX2 U~^T = dX2 U^T)
    dq   = exp(b) * (dO h_n^T) + ((dO U^T) o D) K                               (chunk_grads)
    dk   = ((dO U^T) o D)^T Q + exp(b_C - b) * (U dh_n^T) + diag(beta exp(b)) dX1 + (dM + dM^T) K,
           dM = diag(beta) (dL o Gamma)
    dv   = diag(beta) dX2
    dbeta_t = dX1_t . k_t exp(b_t) + dX2_t . v_t + sum_i dL_ti (k_t . k_i) Gamma_ti

The gate gradient is chunk-local: with db_t the gradient of the in-chunk cumulative gate b_t,
dg_s = sum_{t >= s, t in the chunk} db_t (a reverse cumsum inside the chunk, never across
chunks, so its rounding error does not grow with T), and db collects every place b appears:

    db_t = q_t . dq_t - k_t . dk^{out,state}_t           (exp(b) on Q, D, exp(b_C - b) on K)
         + beta_t dbeta^{X1,L}_t - sum_t' (dM o K K^T)_t't   (exp(b) in X1, Gamma in L)
         + [t = last] R_n,   R_n = <dh_n, h_{n+1}> = exp(b_C) <dh_n, h_n> + <K exp(b_C - b), U dh_n^T>

(dk^{out,state} is dk's output and state paths, dbeta^{X1,L} dbeta's X1 and L terms; R_n comes
from tiles the gradient kernel has loaded anyway). The shorter identity
dg_s = sum_{t >= s} (q_t . dq_t - v_t . dv_t) + R_n is exact too, but in bf16 it amplifies the
small inconsistencies between dq and dv (measured 4x larger errors with strong gates).

Kernels (the math step each computes, and its grid):

* ``_chunk_solve_kernel``       b (stored) and A in 16 x 16 blocks (diagonal blocks by forward
  substitution, the others by block products); (NT, B*H).
* ``_pass_states_fwd_kernel``   the scan over chunks: stores h_n and U, and the final state;
  (NV, B*H), the [K, BV] state in float32 registers (all of K in one tile: U needs K h_n).
* ``_chunk_outputs_kernel``     O; (NV, NT, B*H).
* ``_chunk_du_local_kernel``    P^T dO; (NV, NT, B*H).
* ``_pass_states_bwd_kernel``   the reverse scan: stores dh_n and dX2, and d initial_state; (NV, B*H).
* ``_chunk_score_grads_kernel`` the chunk's [C, C] gradients dP = (dO U^T) o D and dM = diag(beta)
  (dL o Gamma) (stored, input dtype), and the L path's parts of dbeta and db; (NT, B*H).
* ``_chunk_grads_kernel``       dq, dk, dv and each K block's part of dbeta and db, with dP, dM and
  their transposes loaded (a transposed load, not a transposed dot result); (NK, NT, B*H).
* ``_gate_beta_grads_kernel``   sums the parts; dg by the in-chunk reverse cumsum; (NT, B).

In the WY form (two more kernels; the others unchanged):

* ``_chunk_wy_kernel``          W = A diag(beta exp(b)) K and U~ = A diag(beta) V, head-major, input
  dtype (U~ in U's buffer); (NT, B*H). Run after the solve, in the forward and again in the backward
  (U~ alone there when the forward kept W, i.e. when it ran with gradients).
* ``_pass_states_fwd_kernel``   (``WY``) U = U~ - W h_n, then the state update as before.
* ``_pass_states_bwd_kernel``   (``WY``) stores dU (over P^T dO's buffer, in its dtype) and updates
  dh_{n-1} = exp(b_C) dh_n + (Q * exp(b))^T dO - W^T dU, with no A.
* ``_chunk_dx2_kernel``         dX2 = A^T dU after the reverse scan; (NV, NT, B*H).

What the WY form changes: each forward-scan step is two dependent products (W h_n, then the
state update) instead of three (K h_n, A times the residual, the update), and each reverse-scan
step two (K dh_n, then W^T dU) instead of three (A^T dU in between); the A products move to
parallel per-chunk kernels, at the cost of writing and reading W (k's bytes) and U~ per pass.
The residual form avoids the rounding of U~ and W h_n as separate terms (U~ and W are stored in
the input dtype before they are combined); fla uses the WY form. Which is faster depends on how
many programs the scans run (measured on the H200, bf16, K = V = 128, fwd+bwd): with B * H = 32 at
T = 32768 the scans are latency-bound and WY wins (DeltaNet 6.0 against 6.8 ms, gated 6.4 against
7.2); with B * H = 128 at T = 8192 the residual form wins (5.1 against 5.4, gated 5.4 against 5.6).
So by default (``wy_precompute=None``) the WY form runs when the scans would run fewer than
``scan_min_programs`` programs at their full V tile, the same test that halves that tile.
dX2's product rounds dU as the scans do (``scan_precision``), so both forms get dX2 from dU alike.
Tried at T = 32768 and removed (H200, bf16, fwd+bwd, DeltaNet / gated): scans that step two chunks at
a time from a per-pair WY form computed in parallel (two dependent products per two chunks instead
of four; correct, but 7.11 / 7.51 ms with the forward pair scan against 6.01 / 6.45, 6.34 / 7.29 with
the reverse one); and the backward's recomputing forward scan on a side stream beside the reverse
scan, which speeds up simple_gla and gla (:mod:`linmix.ops.common.streams`) but not these scans
(6.09 / 6.47 against 6.00 / 6.44; not profiled: the two scans' pipelined tiles probably do not fit
in one SM's shared memory together, so they cannot run side by side).

The forward keeps A and b for the backward when there is one (A is C = 64 values per token and
head, half of k's bytes at K = 128; recomputing it cost 1.1 ms of 9.2 at the standard shape on the
H200), and in the WY form W (k's bytes), so the backward's WY kernel forms U~ alone; the backward
recomputes h and U (one more forward scan) rather than keeping the [B, H, NT, K, V] states alive
between the passes. The [C, C] gradients are formed once per chunk
(``_chunk_score_grads_kernel``), not once per K block of the gradient kernel, which also keeps
that kernel's live accumulators to three [C, BK] tiles (with seven, it spilled: gated 6.3 ms
against 2.6 ungated, now 1.5 / 1.3 ms). The gate flag ``USE_G`` is a constexpr: DeltaNet (g None)
compiles the gate loads and exps out.

Precision: the per-chunk kernels run ``tl.dot`` on the input dtype (bf16 / fp16 / fp32) with
float32 accumulation; float32 inputs use ``input_precision="ieee"`` (exact, no TF32). L, the
solve and A are float32; for 16-bit inputs the solve's 16 x 16 products are TF32
(``LAUNCH.solve_precision``; exact "ieee" products took twice as long, 1.14 against 0.55 ms at the
standard shape, and A is stored in the input dtype anyway: no change in any measured error).
In the two sequential scans the state, the residual, U and dU feed each other in float32 and
enter each ``tl.dot`` rounded to the input dtype by default (``LAUNCH.scan_precision = "input"``,
as fla does); "split" keeps about 16 mantissa bits instead (each float32 operand split into two
16-bit parts, two products) at twice the products. Measured on the H200 (bf16, K = V = 128, T up
to 32K, against the float32 PyTorch chunk form): "input" 3.3e-3 (gated) / 5.0e-3 (DeltaNet)
worst relative L2 error over o and every gradient, "split" 2.9e-3 / 3.2e-3; fwd+bwd 6.2 / 5.9 ms
against 7.4 / 6.5 (standard shape, "ieee" solve, the other settings the defaults). h, U, dh and
dX2 are stored in the input dtype (the rounding every per-chunk consumer applies before its
``tl.dot`` anyway). The scans' states,
gates, decays, the final state and d initial_state are float32; ``o`` has v's dtype.

Shapes: any K, V >= 1 (masked tiles; the per-chunk kernels loop over K and V in blocks of
``LAUNCH.block_k`` / ``LAUNCH.block_v``; the scans hold a [K_pad, BV] state tile, BV shrinking as
K grows, so head dims up to 256 and beyond work); any T (the last chunk is masked, no host-side
padding). The chunk size is 64 whatever ``chunk_size`` says (the result does not depend on it).
Packed varlen (``cu_seqlens``) runs as a zero-padded [N, T_max] batch
(:class:`linmix.ops.common.varlen.Packing`). float64 inputs are delegated to the PyTorch chunk
form. Launch parameters live in ``LAUNCH`` (:class:`LaunchConfig`).

Transposes: a ``tl.dot`` operand is never ``tl.trans`` of another dot's result (or of a tile
computed from one). (Q K^T)^T in dU is formed by its own dot from loaded tiles and masked with
the transposed mask (:mod:`linmix.ops.common.triton_tiles`); the gradients' dP^T and dM^T are
transposed loads of the tiles ``_chunk_score_grads_kernel`` stored. The transposed-result pattern
passes the interpreter, but it is one of Triton's Hopper miscompilations (3.4 to 3.7.0; fla
guards its gated delta-rule backward against it). An earlier version of these kernels used it and
also launched 8 warps (the other miscompilation, see :class:`LaunchConfig`), and faulted on the
H200; which of the two caused which fault was not isolated, both are avoided. ``tl.trans`` of a
loaded tile is fine and used throughout. On the H200 (bf16, Triton 3.6, K = V = 16 to 256, T up to
32K, the default launch, both scan forms) o and every gradient are within 3.2e-3 to 6.8e-3 relative L2
error of the float32 PyTorch chunk form (the largest at K = 16), the final state within 2.3e-3 to 6.3e-3
(BENCHMARKS.md section 2).

Plain pointer arithmetic only (no ``tl.make_block_ptr``): runs on Triton 3.6 and on current
Triton, including its interpreter (``TRITON_INTERPRET=1``) on CPU tensors. The interpreter's
bfloat16 ``tl.dot`` is wrong (Triton 3.9: it multiplies the raw bits), so under the interpreter
bf16 dot operands are widened to float32 first (the ``DOT`` dtype: exact, the same products; the
roundings to bf16 before each dot are kept, so the interpreter sees the GPU's bf16 arithmetic).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch

from linmix.ops.common.custom_op import TritonOp
from linmix.ops.common.fused_recurrent import fused_recurrent, prefer_fused_recurrent
from linmix.ops.common.triton_import import HAS_TRITON, tl, triton
from linmix.ops.common.triton_tiles import causal_decay, causal_decay_t, last_valid
from linmix.ops.common.utils import run_packed
from linmix.ops.delta_rule.chunk import delta_rule_chunk
from linmix.ops.dispatch import register, triton_interpreted

logger = logging.getLogger(__name__)

__all__ = ["HAS_TRITON", "LAUNCH", "LaunchConfig", "delta_rule_triton"]

CHUNK = 64  # the kernels' chunk length: 4 sub-blocks of 16 in the triangular solve


@dataclasses.dataclass
class LaunchConfig:
    """Launch parameters of every kernel, in one place.

    Attributes:
        block_k, block_v: K / V tile of the per-chunk kernels (powers of two >= 16; a head dim
            smaller than the tile uses the next power of two >= 16).
        grads_block_k: K tile of the gradient kernel (its programs are (K tile, chunk, head);
            32 was slower on the H200: 8.8 against 8.0 ms fwd+bwd, gated, standard shape).
        scan_block_v: V tile of the two scans (more programs when smaller).
        scan_min_programs: the scans' V tile is halved (down to 16) while they would run fewer
            programs than this (B * H * V / BV; one program per SM at least on the H200's 132).
        scan_state_elems: upper bound on K_pad * BV for the scans' register state; BV shrinks
            below ``scan_block_v`` for large K (K = 256 -> 32 at the default).
        scan_precision: the float32 operands (state, residual, U, dU, ...) of the two sequential
            scans' dots for 16-bit inputs: "input" (rounded to the input dtype, fla's choice, the
            default), "split" (each split in two 16-bit parts, two 16-bit products: about 16
            mantissa bits, 16-bit tiles in registers), or "tf32" / "tf32x3" / "ieee" (float32
            dots; the key, query and A tiles widened to float32); see the module docstring.
        solve_precision: ``input_precision`` of the float32 16 x 16 products of the triangular
            solve for 16-bit inputs ("tf32", the default; "tf32x3" took 3x as long on the H200,
            "ieee" 2x); float32 inputs always use "ieee".
        warps_*: ``num_warps`` of each kernel (``warps_scan_wide``: the scans' at K > 128). On
            Hopper, Triton 3.6 miscompiles these kernels with more warps: 8 warps in the scans or
            the gradient kernel, or 4 in the scans at K = 256, gave illegal memory accesses or NaN /
            wrong gradients on the H200 (bisected 2026-11-30 with ``benchmarks/gpu.py check
            --variants``; fla restricts its delta-rule kernels on Hopper the same way). 2 warps in
            the gradient kernel are correct but 7x slower. ``stages``: ``num_stages`` of all of them (None:
            Triton's default, except 1 for the two scans at K > 128, whose pipelined tiles would
            not fit in shared memory); ``scan_stages``, when set, the two scans' instead. On the H200
            at K = 128 (T = 32768, gated) 2 scan stages took 7.3 ms fwd+bwd against 6.4 with the
            default, and 1 stage gave *wrong results* (relative error 1; K = 256 with 1 stage, the
            default there, is right): re-check any change with ``benchmarks/gpu.py check``.
        wy_precompute: form W = A diag(beta exp(b)) K and U~ = A diag(beta) V per chunk in a
            parallel kernel before the forward scan, whose step is then U = U~ - W h_n and the
            state update (two dependent products, not three); the backward scan then stores dU
            and updates its state with W^T dU, and dX2 = A^T dU is formed after it, in parallel
            (see the module docstring). None (the default): only when the scans are latency-bound,
            i.e. would run fewer than ``scan_min_programs`` programs at their full V tile.
    """

    block_k: int = 64
    block_v: int = 64
    grads_block_k: int = 64
    scan_block_v: int = 64
    scan_min_programs: int = 128
    scan_state_elems: int = 128 * 64
    warps_solve: int = 4
    warps_scan: int = 4
    warps_scan_wide: int = 2
    warps_outputs: int = 4
    warps_du_local: int = 4
    warps_score_grads: int = 4
    warps_grads: int = 4
    warps_finish: int = 4
    warps_wy: int = 4
    warps_dx2: int = 4
    solve_precision: str = "tf32"
    scan_precision: str = "input"
    stages: int | None = None
    scan_stages: int | None = None
    wy_precompute: bool | None = None


LAUNCH = LaunchConfig()


# --------------------------------------------------------------------------------------------
# Shared in-kernel pieces
# --------------------------------------------------------------------------------------------
# Conventions: ``dt`` is the input (storage) dtype; ``DOT`` the dtype of ``tl.dot``'s operands:
# ``dt`` itself (``.to(DOT)`` a no-op; computed operands are rounded by ``.to(dt).to(DOT)``),
# except under the interpreter with bf16 inputs, where it is float32 (exact widening), and in
# the scans when ``LAUNCH.scan_precision`` asks for float32 dots.

# --------------------------------------------------------------------------------------------
# Forward, step 1: the triangular solve of each chunk (b, A)
# --------------------------------------------------------------------------------------------

@triton.jit
def _lower_block(m_ij, beta_i, b_i, b_j, valid_i, DIAG: tl.constexpr, USE_G: tl.constexpr):
    """A 16 x 16 block of L: beta_i (k_i . k_j) exp2(b_i - b_j) on valid rows (strictly lower if DIAG)."""
    o = tl.arange(0, 16)
    keep = valid_i[:, None] & (o[None, :] >= 0)
    if DIAG:
        keep = keep & (o[:, None] > o[None, :])
    if USE_G:
        m_ij = m_ij * tl.exp2(tl.where(keep, b_i[:, None] - b_j[None, :], float("-inf")))
    return tl.where(keep, m_ij * beta_i[:, None], 0.0)


@triton.jit
def _invert_unit_lower(L, SOLVE_PREC: tl.constexpr):
    """(I + L)^{-1} of a strictly lower 16 x 16 float32 tile, by forward substitution row by row.

    Row i of the inverse is e_i - sum_{j < i} L_ij inv_j (rows j < i final by then): one masked
    16 x 16 product per row, which changes row i only.
    """
    o = tl.arange(0, 16)
    inv = (o[:, None] == o[None, :]).to(tl.float32)
    for i in tl.static_range(1, 16):
        inv -= tl.dot(tl.where(o[:, None] == i, L, 0.0), inv, input_precision=SOLVE_PREC)
    return inv


@triton.jit
def _chunk_solve_kernel(k, beta, g, b, A, T, NT,
                        H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                        USE_G: tl.constexpr, PREC: tl.constexpr, SOLVE_PREC: tl.constexpr, DOT: tl.constexpr):
    """For one chunk: b (stored when gated) and A = (I + L)^{-1} ([B*H, NT, C, C], input dtype, lower blocks only).

    Everything is done in four row blocks of 16 (register tiles cannot be sliced): L's ten lower
    blocks come from the key blocks' products, the diagonal blocks are inverted by forward
    substitution, and A_ij = -A_ii sum_{j <= m < i} L_im A_mj, all float32. Rows past T have
    beta = 0 and k = 0: their rows of L are 0 (so those of A are the identity's).
    """
    tl.static_assert(C == 64)
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_s = tl.arange(0, 16)
    t0 = i_t * C
    tok = (i_b.to(tl.int64) * T + t0) * H + i_h  # [B, T, H] index of the chunk's first token
    tok0, tok1, tok2, tok3 = tok + o_s * H, tok + (16 + o_s) * H, tok + (32 + o_s) * H, tok + (48 + o_s) * H
    m0, m1, m2, m3 = (t0 + o_s) < T, (t0 + 16 + o_s) < T, (t0 + 32 + o_s) < T, (t0 + 48 + o_s) < T
    beta0 = tl.load(beta + tok0, mask=m0, other=0.0).to(tl.float32)
    beta1 = tl.load(beta + tok1, mask=m1, other=0.0).to(tl.float32)
    beta2 = tl.load(beta + tok2, mask=m2, other=0.0).to(tl.float32)
    beta3 = tl.load(beta + tok3, mask=m3, other=0.0).to(tl.float32)
    if USE_G:
        # log2 units: every decay below is one exp2
        g0 = tl.load(g + tok0, mask=m0, other=0.0).to(tl.float32) * 1.4426950408889634
        g1 = tl.load(g + tok1, mask=m1, other=0.0).to(tl.float32) * 1.4426950408889634
        g2 = tl.load(g + tok2, mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
        g3 = tl.load(g + tok3, mask=m3, other=0.0).to(tl.float32) * 1.4426950408889634
        b0 = tl.cumsum(g0, axis=0)
        b1 = tl.cumsum(g1, axis=0) + tl.sum(g0, axis=0)
        b2 = tl.cumsum(g2, axis=0) + tl.sum(g1, axis=0) + tl.sum(g0, axis=0)
        b3 = tl.cumsum(g3, axis=0) + tl.sum(g2, axis=0) + tl.sum(g1, axis=0) + tl.sum(g0, axis=0)
        tl.store(b + tok0, b0, mask=m0)
        tl.store(b + tok1, b1, mask=m1)
        tl.store(b + tok2, b2, mask=m2)
        tl.store(b + tok3, b3, mask=m3)
    else:
        b0 = tl.zeros([16], dtype=tl.float32)
        b1, b2, b3 = b0, b0, b0

    # M_ij = K_i K_j^T for the ten blocks i >= j, accumulated over K blocks
    M00 = tl.zeros([16, 16], dtype=tl.float32)
    M10, M11, M20, M21, M22, M30, M31, M32, M33 = M00, M00, M00, M00, M00, M00, M00, M00, M00
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        k0 = tl.load(k + tok0[:, None] * K + o_k[None, :], mask=m0[:, None] & m_k[None, :], other=0.0).to(DOT)
        k1 = tl.load(k + tok1[:, None] * K + o_k[None, :], mask=m1[:, None] & m_k[None, :], other=0.0).to(DOT)
        k2 = tl.load(k + tok2[:, None] * K + o_k[None, :], mask=m2[:, None] & m_k[None, :], other=0.0).to(DOT)
        k3 = tl.load(k + tok3[:, None] * K + o_k[None, :], mask=m3[:, None] & m_k[None, :], other=0.0).to(DOT)
        M00 = tl.dot(k0, tl.trans(k0), M00, input_precision=PREC)
        M10 = tl.dot(k1, tl.trans(k0), M10, input_precision=PREC)
        M11 = tl.dot(k1, tl.trans(k1), M11, input_precision=PREC)
        M20 = tl.dot(k2, tl.trans(k0), M20, input_precision=PREC)
        M21 = tl.dot(k2, tl.trans(k1), M21, input_precision=PREC)
        M22 = tl.dot(k2, tl.trans(k2), M22, input_precision=PREC)
        M30 = tl.dot(k3, tl.trans(k0), M30, input_precision=PREC)
        M31 = tl.dot(k3, tl.trans(k1), M31, input_precision=PREC)
        M32 = tl.dot(k3, tl.trans(k2), M32, input_precision=PREC)
        M33 = tl.dot(k3, tl.trans(k3), M33, input_precision=PREC)

    L10 = _lower_block(M10, beta1, b1, b0, m1, False, USE_G)
    L20 = _lower_block(M20, beta2, b2, b0, m2, False, USE_G)
    L21 = _lower_block(M21, beta2, b2, b1, m2, False, USE_G)
    L30 = _lower_block(M30, beta3, b3, b0, m3, False, USE_G)
    L31 = _lower_block(M31, beta3, b3, b1, m3, False, USE_G)
    L32 = _lower_block(M32, beta3, b3, b2, m3, False, USE_G)
    A00 = _invert_unit_lower(_lower_block(M00, beta0, b0, b0, m0, True, USE_G), SOLVE_PREC)
    A11 = _invert_unit_lower(_lower_block(M11, beta1, b1, b1, m1, True, USE_G), SOLVE_PREC)
    A22 = _invert_unit_lower(_lower_block(M22, beta2, b2, b2, m2, True, USE_G), SOLVE_PREC)
    A33 = _invert_unit_lower(_lower_block(M33, beta3, b3, b3, m3, True, USE_G), SOLVE_PREC)
    # A_ij = -A_ii sum_{j <= m < i} L_im A_mj
    A10 = -tl.dot(A11, tl.dot(L10, A00, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    A21 = -tl.dot(A22, tl.dot(L21, A11, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    A32 = -tl.dot(A33, tl.dot(L32, A22, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    A20 = tl.dot(L21, A10, tl.dot(L20, A00, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    A20 = -tl.dot(A22, A20, input_precision=SOLVE_PREC)
    A31 = tl.dot(L32, A21, tl.dot(L31, A11, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    A31 = -tl.dot(A33, A31, input_precision=SOLVE_PREC)
    A30 = tl.dot(L31, A10, tl.dot(L30, A00, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)
    A30 = -tl.dot(A33, tl.dot(L32, A20, A30, input_precision=SOLVE_PREC), input_precision=SOLVE_PREC)

    dt = A.dtype.element_ty
    p_a = A + (i_bh.to(tl.int64) * NT + i_t) * C * C + o_s[:, None] * C + o_s[None, :]
    tl.store(p_a, A00.to(dt))
    tl.store(p_a + 16 * C, A10.to(dt))
    tl.store(p_a + 16 * C + 16, A11.to(dt))
    tl.store(p_a + 32 * C, A20.to(dt))
    tl.store(p_a + 32 * C + 16, A21.to(dt))
    tl.store(p_a + 32 * C + 32, A22.to(dt))
    tl.store(p_a + 48 * C, A30.to(dt))
    tl.store(p_a + 48 * C + 16, A31.to(dt))
    tl.store(p_a + 48 * C + 32, A32.to(dt))
    tl.store(p_a + 48 * C + 48, A33.to(dt))


@triton.jit
def _chunk_wy_kernel(k, v, beta, b, A, w, u, T, NT,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, STORE_W: tl.constexpr,
                     PREC: tl.constexpr, DOT: tl.constexpr):
    """For one chunk (``LaunchConfig.wy_precompute``): W = A diag(beta exp(b)) K and U~ = A diag(beta) V
    (U~ only without STORE_W: the backward's recomputation when the forward kept W).

    Both head-major ([B*H, NT*C, K] and [B*H, NT*C, V], input dtype; U~ goes to the U buffer, which
    the forward scan turns into U), K and V looped in blocks. The scaled key and value tiles are
    rounded to the input dtype before the product, as the scan rounds its residual. Rows past T
    come out zero: k, v and beta are zero there, and A's rows there are the identity's.
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    n_valid = tl.minimum(T - i_t * C, C)
    m_c = o_c < n_valid
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h  # [B, T, H] index of the chunk's first token
    hrow0 = (i_bh.to(tl.int64) * NT + i_t) * C  # its head-major row
    a = tl.load(A + hrow0 * C + o_c[:, None] * C + o_c[None, :], mask=o_c[:, None] >= o_c[None, :],
                other=0.0).to(DOT)
    beta_t = tl.load(beta + row0 + o_c * H, mask=m_c, other=0.0).to(tl.float32)
    if STORE_W:
        key_scale = beta_t
        if USE_G:
            key_scale = beta_t * tl.exp2(tl.load(b + row0 + o_c * H, mask=m_c, other=0.0))
        _store_a_times_scaled(a, k, w, key_scale, row0, hrow0, o_c, m_c, H, K, C, BK, PREC, DOT)  # W
    _store_a_times_scaled(a, v, u, beta_t, row0, hrow0, o_c, m_c, H, V, C, BV, PREC, DOT)  # U~


@triton.jit
def _store_a_times_scaled(a, x, out, row_scale, row0, hrow0, o_c, m_c, H: tl.constexpr, D: tl.constexpr,
                          C: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr):
    """out = a @ diag(row_scale) X for one chunk, in column blocks of BD: X [B, T, H, D] from the chunk's
    first token ``row0``, out head-major [B*H, NT*C, D] from row ``hrow0`` (input dtype; the scaled
    tile rounded to it before the product)."""
    dt = out.dtype.element_ty
    for i_d in range((D + BD - 1) // BD):
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        xt = tl.load(x + row0 * D + o_c[:, None] * (H * D) + o_d[None, :], mask=m_c[:, None] & m_d[None, :],
                     other=0.0).to(tl.float32)
        xs = (xt * row_scale[:, None]).to(dt).to(DOT)
        acc = tl.dot(a, xs, tl.zeros([C, BD], dtype=tl.float32), input_precision=PREC)
        tl.store(out + hrow0 * D + o_c[:, None] * D + o_d[None, :], acc.to(dt), mask=m_d[None, :])

# --------------------------------------------------------------------------------------------
# Forward, steps 2-3: the state scan and the chunk outputs
# --------------------------------------------------------------------------------------------

@triton.jit
def _dot_split(a, x, acc, dt: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """acc + a @ x for a tile ``a`` already in DOT and a float32 tile ``x`` (the scans' dots).

    SPLIT (how x enters, ``_Sizes.scan_split``): 2 (16-bit inputs, "split"): x = hi + lo with hi
    and lo in the 16-bit input dtype ``dt``, two 16-bit products, so x keeps about twice a 16-bit
    mantissa (finer than TF32) while ``a`` stays a 16-bit tile; 1 ("input"): x rounded to ``dt``
    (a no-op cast to DOT on the GPU; under the interpreter DOT is float32 for bf16, and this
    rounding keeps the GPU's arithmetic there); 0: x cast to DOT (float32 dots, float32 inputs).
    """
    if SPLIT == 2:
        hi = x.to(dt)
        lo = (x - hi.to(tl.float32)).to(dt)
        acc = tl.dot(a, hi.to(DOT), acc, input_precision=PREC)
        return tl.dot(a, lo.to(DOT), acc, input_precision=PREC)
    if SPLIT == 1:
        x = x.to(dt)
    return tl.dot(a, x.to(DOT), acc, input_precision=PREC)


@triton.jit
def _pass_states_fwd_kernel(k, v, beta, b, A, w, h0, h, u, ht, T, NT,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                            KP: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                            USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                            WY: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """Scan over chunks: store h_n, then U = A diag(beta) (V - (K exp(b)) h_n) (stored) and
    h_{n+1} = exp(b_C) h_n + (K exp(b_C - b))^T U.

    The decays scale the small [C, BV] tiles (exp(b) * (K h_n), K^T (exp(b_C - b) * U)), so the
    key tile enters both products as loaded. One program per (V block, batch*head); the
    [KP, BV] state (all of K: the residual needs K h_n) stays in float32 registers.
    WY (``LaunchConfig.wy_precompute``): U = U~ - W h_n instead, with W ([B*H, NT*C, K]) and U~
    (in ``u``, overwritten by U) from ``_chunk_wy_kernel``; A, v and beta are not read.
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    dt = u.dtype.element_ty
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_offs = o_k[:, None] * V + o_v[None, :]

    state = tl.zeros([KP, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        state += tl.load(h0 + i_bh.to(tl.int64) * K * V + kv_offs, mask=m_kv, other=0.0).to(tl.float32)

    # Per step: a 64-bit scalar base per tensor plus loop-invariant 32-bit tile offsets.
    row0 = i_b.to(tl.int64) * T * H + i_h  # [B, T, H] index of (batch, token 0, head)
    hrow0 = i_bh.to(tl.int64) * NT * C  # head-major row of token 0
    offs_k = o_c[:, None] * (H * K) + o_k[None, :]  # [C, KP] in [B, T, H, K]
    offs_v = o_c[:, None] * (H * V) + o_v[None, :]  # [C, BV] in [B, T, H, V]
    offs_a = o_c[:, None] * C + o_c[None, :]  # [C, C] of A
    offs_u = o_c[:, None] * V + o_v[None, :]  # [C, BV] head-major
    offs_w = o_c[:, None] * K + o_k[None, :]  # [C, KP] head-major (W)
    for i_t in range(NT):
        tok = row0 + i_t * C * H  # the chunk's first token
        hrow = hrow0 + i_t * C
        tl.store(h + (hrow0 // C + i_t) * K * V + kv_offs, state.to(dt), mask=m_kv)
        m_c = (i_t * C + o_c) < T
        kc = tl.load(k + tok * K + offs_k, mask=m_c[:, None] & m_k[None, :], other=0.0).to(DOT)
        if WY:
            # U = U~ - W h_n (exp(b) and beta are inside W)
            wc = tl.load(w + hrow * K + offs_w, mask=m_k[None, :], other=0.0).to(DOT)
            pred = _dot_split(wc, state, tl.zeros([C, BV], dtype=tl.float32), dt, PREC, DOT, SPLIT)
        else:
            # residual of the values against the decayed state, then U = A diag(beta) residual
            beta_t = tl.load(beta + tok + o_c * H, mask=m_c, other=0.0).to(tl.float32)
            pred = _dot_split(kc, state, tl.zeros([C, BV], dtype=tl.float32), dt, PREC, DOT, SPLIT)
        if USE_G:
            n_valid = tl.minimum(T - i_t * C, C)
            b_t = tl.load(b + tok + o_c * H, mask=m_c, other=0.0)
            b_last = last_valid(b_t, o_c, n_valid)
            if not WY:
                pred *= tl.exp2(b_t)[:, None]
        if WY:
            ut = tl.load(u + hrow * V + offs_u, mask=m_v[None, :], other=0.0).to(tl.float32) - pred
        else:
            vc = tl.load(v + tok * V + offs_v, mask=m_c[:, None] & m_v[None, :], other=0.0)
            resid = (vc.to(tl.float32) - pred) * beta_t[:, None]
            a = tl.load(A + hrow * C + offs_a, mask=o_c[:, None] >= o_c[None, :], other=0.0).to(DOT)
            ut = _dot_split(a, resid, tl.zeros([C, BV], dtype=tl.float32), dt, PREC, DOT, SPLIT)
        tl.store(u + hrow * V + offs_u, ut.to(dt), mask=m_v[None, :])
        if USE_G:
            state *= tl.exp2(b_last)
            ut *= tl.exp2(tl.where(m_c, b_last - b_t, float("-inf")))[:, None]
        state = _dot_split(tl.trans(kc), ut, state, dt, PREC, DOT, SPLIT)
    if STORE_FINAL_STATE:
        tl.store(ht + i_bh.to(tl.int64) * K * V + kv_offs, state, mask=m_kv)


@triton.jit
def _chunk_outputs_kernel(q, k, u, b, h, o, scale, T, NT,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr,
                          DOT: tl.constexpr):
    """O = scale * [exp(b) * (Q h_n) + ((Q K^T) o D) U] for one chunk and one V block (K looped)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    dt = u.dtype.element_ty
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    n_valid = tl.minimum(T - i_t * C, C)
    m_c = o_c < n_valid
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h  # [B, T, H] index of the chunk's first token
    hrow0 = (i_bh.to(tl.int64) * NT + i_t) * C  # its head-major row
    p_h = h + (i_bh.to(tl.int64) * NT + i_t) * K * V

    acc_o = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        qt = tl.load(q + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :],
                     other=0.0).to(DOT)
        kt = tl.load(k + row0 * K + o_c[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_c[None, :],
                     other=0.0).to(DOT)  # K^T
        h_t = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0).to(DOT)
        acc_o = tl.dot(qt, h_t, acc_o, input_precision=PREC)
        scores = tl.dot(qt, kt, scores, input_precision=PREC)
    b_t = tl.zeros([C], dtype=tl.float32)
    if USE_G:
        b_t = tl.load(b + row0 + o_c * H, mask=m_c, other=0.0)
        acc_o *= tl.exp2(b_t)[:, None]
    scores = causal_decay(scores, b_t, o_c, n_valid, USE_G)
    ut = tl.load(u + (hrow0 + o_c[:, None]) * V + o_v[None, :], mask=m_v[None, :], other=0.0).to(DOT)
    acc_o = tl.dot(scores.to(dt).to(DOT), ut, acc_o, input_precision=PREC)
    tl.store(o + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], (acc_o * scale).to(o.dtype.element_ty),
             mask=m_c[:, None] & m_v[None, :])


# --------------------------------------------------------------------------------------------
# Backward: dU's local part, the reverse state scan, the chunk gradients, dbeta and dg
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_du_local_kernel(q, k, b, do, du_local, scale, T, NT,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr,
                           DOT: tl.constexpr):
    """P^T dO = scale * ((Q K^T) o D)^T dO for one chunk and V block (K looped); head-major, in ``du_local``'s
    dtype (``_Sizes.du_dtype``)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    dt = q.dtype.element_ty
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    n_valid = tl.minimum(T - i_t * C, C)
    m_c = o_c < n_valid
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h
    hrow0 = (i_bh.to(tl.int64) * NT + i_t) * C

    scores_t = tl.zeros([C, C], dtype=tl.float32)  # (Q K^T)^T = K Q^T, by its own dot
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        kt = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :],
                     other=0.0).to(DOT)
        qt = tl.load(q + row0 * K + o_c[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_c[None, :],
                     other=0.0).to(DOT)  # Q^T
        scores_t = tl.dot(kt, qt, scores_t, input_precision=PREC)
    b_t = tl.zeros([C], dtype=tl.float32)
    if USE_G:
        b_t = tl.load(b + row0 + o_c * H, mask=m_c, other=0.0)
    scores_t = causal_decay_t(scores_t, b_t, o_c, n_valid, USE_G) * scale
    d_o = tl.load(do + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                  other=0.0).to(DOT)
    acc = tl.dot(scores_t.to(dt).to(DOT), d_o, tl.zeros([C, BV], dtype=tl.float32), input_precision=PREC)
    tl.store(du_local + (hrow0 + o_c[:, None]) * V + o_v[None, :], acc.to(du_local.dtype.element_ty), mask=m_v[None, :])


@triton.jit
def _pass_states_bwd_kernel(q, k, beta, b, A, w, do, du_local, dht, dh, dx2, dh0, scale, T, NT,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                            KP: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                            USE_FINAL_STATE_GRAD: tl.constexpr, STORE_INITIAL_STATE_GRAD: tl.constexpr,
                            WY: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """Reverse scan: store dh_n (gradient of the state leaving chunk n) and dX2 = A^T dU with
    dU = P^T dO + (K exp(b_C - b)) dh_n, then
    dh_{n-1} = exp(b_C) dh_n + scale * (Q exp(b))^T dO - W^T dU,  W^T dU = X1^T dX2, X1 = diag(beta exp(b)) K;
    what is left is d initial_state. As in the forward scan, the decays and beta scale the small
    [C, BV] tiles, and the key and query tiles enter the products as loaded.
    WY (``LaunchConfig.wy_precompute``): dU overwrites ``du_local`` (its dtype) instead of dX2 being
    stored (``_chunk_dx2_kernel`` forms it after the scan), and W^T dU is one product with the
    loaded W tile ([B*H, NT*C, K], from ``_chunk_wy_kernel``); A, beta and dx2 are not used."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    dt = dh.dtype.element_ty
    o_c = tl.arange(0, C)
    o_k = tl.arange(0, KP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_offs = o_k[:, None] * V + o_v[None, :]

    dstate = tl.zeros([KP, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        dstate += tl.load(dht + i_bh.to(tl.int64) * K * V + kv_offs, mask=m_kv, other=0.0).to(tl.float32)

    # Per step: a 64-bit scalar base per tensor plus loop-invariant 32-bit tile offsets.
    row0 = i_b.to(tl.int64) * T * H + i_h  # [B, T, H] index of (batch, token 0, head)
    hrow0 = i_bh.to(tl.int64) * NT * C  # head-major row of token 0
    offs_k = o_c[:, None] * (H * K) + o_k[None, :]  # [C, KP] in [B, T, H, K]
    offs_v = o_c[:, None] * (H * V) + o_v[None, :]  # [C, BV] in [B, T, H, V]
    offs_at = o_c[None, :] * C + o_c[:, None]  # [C, C]: A^T
    offs_u = o_c[:, None] * V + o_v[None, :]  # [C, BV] head-major
    offs_w = o_c[:, None] * K + o_k[None, :]  # [C, KP] head-major (W)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tok = row0 + i_t * C * H  # the chunk's first token
        hrow = hrow0 + i_t * C
        tl.store(dh + (hrow0 // C + i_t) * K * V + kv_offs, dstate.to(dt), mask=m_kv)
        m_c = (i_t * C + o_c) < T
        kc = tl.load(k + tok * K + offs_k, mask=m_c[:, None] & m_k[None, :], other=0.0).to(DOT)
        qc = tl.load(q + tok * K + offs_k, mask=m_c[:, None] & m_k[None, :], other=0.0).to(DOT)
        d_o = tl.load(do + tok * V + offs_v, mask=m_c[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        # dh_{n-1} = exp(b_C) dh_n + Q^T ((scale exp(b)) * dO) + K^T (-(beta exp(b)) * dX2)
        #          = exp(b_C) dh_n + Q^T ((scale exp(b)) * dO) - W^T dU                        (WY)
        # The first two terms do not depend on this step's dU: formed first, beside K dh_n, so a step is a
        # chain of two dependent products (K dh_n, then W^T dU; three with A^T dU in between without WY).
        if USE_G:
            n_valid = tl.minimum(T - i_t * C, C)
            b_t = tl.load(b + tok + o_c * H, mask=m_c, other=0.0)
            b_last = last_valid(b_t, o_c, n_valid)
            e_b = tl.exp2(b_t)
            d_o *= (scale * e_b)[:, None]
            d_next = _dot_split(tl.trans(qc), d_o, dstate * tl.exp2(b_last), dt, PREC, DOT, SPLIT)
        else:
            d_o *= scale
            d_next = _dot_split(tl.trans(qc), d_o, dstate, dt, PREC, DOT, SPLIT)
        # dU = P^T dO + exp(b_C - b) * (K dh_n),  dX2 = A^T dU
        k_dh = _dot_split(kc, dstate, tl.zeros([C, BV], dtype=tl.float32), dt, PREC, DOT, SPLIT)
        if USE_G:
            k_dh *= tl.exp2(tl.where(m_c, b_last - b_t, float("-inf")))[:, None]
        d_u = tl.load(du_local + hrow * V + offs_u, mask=m_v[None, :], other=0.0).to(tl.float32) + k_dh
        if WY:
            # dX2 = A^T dU: after the scan
            tl.store(du_local + hrow * V + offs_u, d_u.to(du_local.dtype.element_ty), mask=m_v[None, :])
            wc = tl.load(w + hrow * K + offs_w, mask=m_k[None, :], other=0.0).to(DOT)
            dstate = _dot_split(tl.trans(wc), -d_u, d_next, dt, PREC, DOT, SPLIT)
        else:
            beta_t = tl.load(beta + tok + o_c * H, mask=m_c, other=0.0).to(tl.float32)
            a_t = tl.load(A + hrow * C + offs_at, mask=o_c[None, :] >= o_c[:, None], other=0.0).to(DOT)
            d_x2 = _dot_split(a_t, d_u, tl.zeros([C, BV], dtype=tl.float32), dt, PREC, DOT, SPLIT)
            tl.store(dx2 + hrow * V + offs_u, d_x2.to(dt), mask=m_v[None, :])
            if USE_G:
                d_x2 *= -(beta_t * e_b)[:, None]
            else:
                d_x2 *= -beta_t[:, None]
            dstate = _dot_split(tl.trans(kc), d_x2, d_next, dt, PREC, DOT, SPLIT)
    if STORE_INITIAL_STATE_GRAD:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + kv_offs, dstate, mask=m_kv)


@triton.jit
def _chunk_dx2_kernel(A, du, dx2, NT, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                      PREC: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr):
    """dX2 = A^T dU for one chunk and V block (``LaunchConfig.wy_precompute``), with dU (head-major,
    ``_Sizes.du_dtype``) from the WY reverse scan; A^T by a transposed load. The product rounds dU as the scans' dots do
    (``LaunchConfig.scan_precision``), as the residual form's reverse scan forms it."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    dt = dx2.dtype.element_ty
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    hrow0 = (i_bh.to(tl.int64) * NT + i_t) * C
    a_t = tl.load(A + hrow0 * C + o_c[None, :] * C + o_c[:, None], mask=o_c[None, :] >= o_c[:, None],
                  other=0.0).to(DOT)
    offs = (hrow0 + o_c[:, None]) * V + o_v[None, :]
    d_u = tl.load(du + offs, mask=m_v[None, :], other=0.0).to(tl.float32)
    d_x2 = _dot_split(a_t, d_u, tl.zeros([C, BV], dtype=tl.float32), dt, PREC, DOT, SPLIT)
    tl.store(dx2 + offs, d_x2.to(dt), mask=m_v[None, :])


@triton.jit
def _chunk_score_grads_kernel(k, beta, b, u, dx2, do, dp, dm, dbeta_part, dg_part, T, NT, slot,
                              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr,
                              DOT: tl.constexpr):
    """The chunk's [C, C] gradients, once per chunk for every K block of the gradient kernel:
    dP = (dO U^T) o D and dM = diag(beta) (dL o Gamma), dL = -strictly_lower(dX2 U^T) (stored in the
    input dtype, [B*H, NT, C, C]), and the L path's parts of dbeta (rows of dL o Gamma o K K^T) and
    db (beta dbeta^L minus the column sums of dM o K K^T), written to the parts' last slot (``slot``: its
    element offset, NK * B * T * H)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    dt = dp.dtype.element_ty
    o_c = tl.arange(0, C)
    n_valid = tl.minimum(T - i_t * C, C)
    m_c = o_c < n_valid
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h
    hrow0 = (i_bh.to(tl.int64) * NT + i_t) * C

    d_p = tl.zeros([C, C], dtype=tl.float32)  # dO U^T
    d_lp = tl.zeros([C, C], dtype=tl.float32)  # dX2 U^T  (dL = -strictly_lower of it)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        d_o = tl.load(do + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                      other=0.0).to(DOT)
        ut = tl.load(u + (hrow0 + o_c[:, None]) * V + o_v[None, :], mask=m_v[None, :], other=0.0).to(DOT)
        dx2c = tl.load(dx2 + (hrow0 + o_c[:, None]) * V + o_v[None, :], mask=m_v[None, :], other=0.0).to(DOT)
        d_p = tl.dot(d_o, tl.trans(ut), d_p, input_precision=PREC)
        d_lp = tl.dot(dx2c, tl.trans(ut), d_lp, input_precision=PREC)
    kk = tl.zeros([C, C], dtype=tl.float32)  # K K^T
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        kt = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & (o_k < K)[None, :],
                     other=0.0).to(DOT)
        kk = tl.dot(kt, tl.trans(kt), kk, input_precision=PREC)

    beta_t = tl.load(beta + row0 + o_c * H, mask=m_c, other=0.0).to(tl.float32)
    b_t = tl.zeros([C], dtype=tl.float32)
    if USE_G:
        b_t = tl.load(b + row0 + o_c * H, mask=m_c, other=0.0)
    p_cc = (i_bh.to(tl.int64) * NT + i_t) * C * C + o_c[:, None] * C + o_c[None, :]
    tl.store(dp + p_cc, causal_decay(d_p, b_t, o_c, n_valid, USE_G).to(dt))
    lower = (o_c[:, None] > o_c[None, :]) & m_c[:, None]
    if USE_G:
        d_lg = -d_lp * tl.exp2(tl.where(lower, b_t[:, None] - b_t[None, :], float("-inf")))
    else:
        d_lg = tl.where(lower, -d_lp, 0.0)
    d_mf = d_lg * beta_t[:, None]
    tl.store(dm + p_cc, d_mf.to(dt))
    d_beta_l = tl.sum(d_lg * kk, axis=1)
    part = row0 + slot + o_c * H  # (int64 through row0: an int argument equal to 1 arrives as a constant)
    tl.store(dbeta_part + part, d_beta_l, mask=m_c)
    if USE_G:
        tl.store(dg_part + part, beta_t * d_beta_l - tl.sum(d_mf * kk, axis=0), mask=m_c)


@triton.jit
def _chunk_grads_kernel(q, k, v, beta, b, h, dh, u, dx2, do, dp, dm, dq, dk, dv, dbeta_part, dg_part, scale, T, NT,
                        part_stride, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr,
                        DOT: tl.constexpr):
    """dq, dk for one chunk and K block (V looped), dv (first K block), and the block's parts of dbeta and db.

    See the module docstring for the formulas; dP and dM come from ``_chunk_score_grads_kernel``
    (their transposes by transposed loads). dbeta_part and dg_part (db, the gradient of the
    in-chunk cumulative gate, before the reverse cumsum) are [NK + 1, B, T, H] float32, slot i_k
    this block's; the chunk's part of R_n is added to db at its last token.
    """
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    dt = dq.dtype.element_ty
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    n_valid = tl.minimum(T - i_t * C, C)
    m_c = o_c < n_valid
    m_ck = m_c[:, None] & m_k[None, :]
    # the V-side terms (dv, dX2 . v) are counted by the first K block only
    first = (i_k == 0).to(tl.float32)
    m_dv = o_c < tl.where(i_k == 0, n_valid, 0)
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h
    hrow0 = (i_bh.to(tl.int64) * NT + i_t) * C
    state_base = (i_bh.to(tl.int64) * NT + i_t) * K * V

    beta_t = tl.load(beta + row0 + o_c * H, mask=m_c, other=0.0).to(tl.float32)

    acc_dq = tl.zeros([C, BK], dtype=tl.float32)  # dO h^T
    acc_dkh = tl.zeros([C, BK], dtype=tl.float32)  # U dh^T
    acc_dx1 = tl.zeros([C, BK], dtype=tl.float32)  # dX2 h^T  (= -dX1)
    xv = tl.zeros([C], dtype=tl.float32)  # dX2 . v
    hdh = tl.zeros([BK], dtype=tl.float32)  # <h, dh> over this K block, per key
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_cv = m_c[:, None] & m_v[None, :]
        m_vk = m_v[:, None] & m_k[None, :]
        d_o = tl.load(do + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0).to(DOT)
        vt = tl.load(v + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0)
        ut = tl.load(u + (hrow0 + o_c[:, None]) * V + o_v[None, :], mask=m_v[None, :], other=0.0).to(DOT)
        dx2c = tl.load(dx2 + (hrow0 + o_c[:, None]) * V + o_v[None, :], mask=m_v[None, :], other=0.0)
        h_t = tl.load(h + state_base + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0)  # [BV, BK]: h^T
        dh_t = tl.load(dh + state_base + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0)  # dh^T
        dx2f = dx2c.to(tl.float32)
        dx2c = dx2c.to(DOT)
        acc_dq = tl.dot(d_o, h_t.to(DOT), acc_dq, input_precision=PREC)
        acc_dkh = tl.dot(ut, dh_t.to(DOT), acc_dkh, input_precision=PREC)
        acc_dx1 = tl.dot(dx2c, h_t.to(DOT), acc_dx1, input_precision=PREC)
        xv += tl.sum(dx2f * vt.to(tl.float32), axis=1)
        hdh += tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32), axis=0)
        tl.store(dv + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], (dx2f * beta_t[:, None]).to(dt),
                 mask=m_dv[:, None] & m_v[None, :])

    qt = tl.load(q + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0)
    kt = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0)
    decay_c = 1.0
    if USE_G:
        b_t = tl.load(b + row0 + o_c * H, mask=m_c, other=0.0)
        b_last = last_valid(b_t, o_c, n_valid)
        decay_c = tl.exp2(b_last)
        e_b = tl.exp2(b_t)
        acc_dq *= e_b[:, None]
        acc_dkh *= tl.exp2(tl.where(m_c, b_last - b_t, float("-inf")))[:, None]
        acc_dx1 *= e_b[:, None]  # now dX2 h^T exp(b): the key path of X1 = diag(beta) K exp(b)
    # output path: dq = scale [exp(b) dO h^T + dP K],  dk = scale dP^T Q
    p_cc = dp + (i_bh.to(tl.int64) * NT + i_t) * C * C
    offs_cc, offs_cc_t = o_c[:, None] * C + o_c[None, :], o_c[None, :] * C + o_c[:, None]
    d_q = scale * tl.dot(tl.load(p_cc + offs_cc).to(DOT), kt.to(DOT), acc_dq, input_precision=PREC)
    d_k = scale * tl.dot(tl.load(p_cc + offs_cc_t).to(DOT), qt.to(DOT), tl.zeros([C, BK], dtype=tl.float32),
                         input_precision=PREC)
    # state path: dk += exp(b_C - b) U dh^T
    d_k += acc_dkh
    kf = kt.to(tl.float32)
    # gate, output and state paths: q . dq - k . dk so far; R_n = exp(b_C) <h_n, dh_n> + <K exp(b_C - b), U dh^T>
    d_b = tl.sum(qt.to(tl.float32) * d_q, axis=1) - tl.sum(kf * d_k, axis=1)
    r_n = decay_c * tl.sum(hdh, axis=0) + tl.sum(tl.sum(kf * acc_dkh, axis=1), axis=0)
    # WY path, X1 = diag(beta exp(b)) K, dX1 = -dX2 h^T:  dk += diag(beta exp(b)) dX1,  dbeta += rows of dX1 . K exp(b)
    d_k -= acc_dx1 * beta_t[:, None]
    d_beta_k = -tl.sum(acc_dx1 * kf, axis=1)  # this K block's X1 part of dbeta (the L part: score kernel)
    # L path: dk += (dM + dM^T) K
    kd = kt.to(DOT)
    p_cc = dm + (i_bh.to(tl.int64) * NT + i_t) * C * C
    d_k = tl.dot(tl.load(p_cc + offs_cc).to(DOT), kd, d_k, input_precision=PREC)
    d_k = tl.dot(tl.load(p_cc + offs_cc_t).to(DOT), kd, d_k, input_precision=PREC)

    offs = row0 * K + o_c[:, None] * (H * K) + o_k[None, :]
    tl.store(dq + offs, d_q.to(dt), mask=m_ck)
    tl.store(dk + offs, d_k.to(dt), mask=m_ck)
    part = i_k.to(tl.int64) * part_stride + row0 + o_c * H  # [NK + 1, B, T, H]
    tl.store(dbeta_part + part, d_beta_k + first * xv, mask=m_c)
    if USE_G:
        # gate, X1 path: exp(b) in X1 gives beta times dbeta's X1 part; R_n enters at the chunk's last token
        d_b += beta_t * d_beta_k
        d_b += tl.where(o_c == n_valid - 1, r_n, 0.0)
        tl.store(dg_part + part, d_b, mask=m_c)


@triton.jit
def _gate_beta_grads_kernel(dbeta_part, dg_part, dbeta, dg, T, NK, part_stride,
                            H: tl.constexpr, C: tl.constexpr, BH: tl.constexpr, USE_G: tl.constexpr):
    """dbeta = sum of the K blocks' parts; dg = in-chunk reverse cumsum of the summed parts (all heads of one chunk)."""
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    o_c = tl.arange(0, C)
    o_h = tl.arange(0, BH)
    mask = ((i_t * C + o_c) < T)[:, None] & (o_h < H)[None, :]
    offs = ((i_b.to(tl.int64) * T + i_t * C) * H) + o_c[:, None] * H + o_h[None, :]
    acc_b = tl.zeros([C, BH], dtype=tl.float32)
    acc_g = tl.zeros([C, BH], dtype=tl.float32)
    for i_k in range(NK):
        acc_b += tl.load(dbeta_part + i_k * part_stride + offs, mask=mask, other=0.0)
        if USE_G:
            acc_g += tl.load(dg_part + i_k * part_stride + offs, mask=mask, other=0.0)
    tl.store(dbeta + offs, acc_b.to(dbeta.dtype.element_ty), mask=mask)
    if USE_G:
        rev = tl.sum(acc_g, axis=0)[None, :] - tl.cumsum(acc_g, axis=0) + acc_g  # sum over t >= s in the chunk
        tl.store(dg + offs, rev.to(dg.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if HAS_TRITON else {}


def _tile(d: int, cap: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (tl.dot), at most ``cap``."""
    return min(cap, max(16, triton.next_power_of_2(d)))


class _Sizes:
    """Sizes and launch constants shared by all launches of one call."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor):
        cfg = LAUNCH
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.C = CHUNK
        self.NT = triton.cdiv(self.T, self.C)
        self.BK, self.BV = _tile(self.K, cfg.block_k), _tile(self.V, cfg.block_v)
        self.NV = triton.cdiv(self.V, self.BV)
        self.grads_BK = _tile(self.K, cfg.grads_block_k)
        self.NK = triton.cdiv(self.K, self.grads_BK)  # the gradient kernel's K tiles
        self.KP = max(16, triton.next_power_of_2(self.K))
        self.scan_BV = _tile(self.V, max(16, min(cfg.scan_block_v, cfg.scan_state_elems // self.KP)))
        def too_few_programs() -> bool:  # the scans' grid at the current V tile is below scan_min_programs
            return self.B * self.H * triton.cdiv(self.V, self.scan_BV) < cfg.scan_min_programs

        self.wy = too_few_programs() if cfg.wy_precompute is None else cfg.wy_precompute  # latency-bound: WY
        while self.scan_BV > 16 and too_few_programs():
            self.scan_BV //= 2
        self.scan_NV = triton.cdiv(self.V, self.scan_BV)
        # Scans at K > 128: fewer warps (Hopper miscompiles 4 there, see LaunchConfig), and no software
        # pipelining unless asked for -- their [C, K] key / query tiles, buffered per pipeline stage,
        # exceed the H200's shared memory at K = 256 (254 KB asked for, 227 KB there).
        wide = self.KP > 128
        self.scan_warps = cfg.warps_scan_wide if wide else cfg.warps_scan
        self.scan_stages = cfg.scan_stages if cfg.scan_stages is not None else (
            1 if wide and cfg.stages is None else cfg.stages)
        exact = q.dtype == torch.float32
        self.prec = "ieee" if exact else "tf32"  # "tf32" is unused for 16-bit inputs
        self.solve_prec = "ieee" if exact else cfg.solve_precision
        # the interpreter's bf16 tl.dot is wrong: widen bf16 operands (exactly) to float32 there
        interpreted_bf16 = q.dtype == torch.bfloat16 and triton_interpreted()
        self.dot_dtype = tl.float32 if interpreted_bf16 else _TL_DTYPES[q.dtype]
        # the scans (see LaunchConfig.scan_precision): split float32 operands into two 16-bit parts,
        # or hand them to TF32 / exact float32 dots, or round them to the input dtype
        mode = "ieee" if exact else cfg.scan_precision
        if mode not in ("split", "input", "tf32", "tf32x3", "ieee"):
            raise ValueError(f"LaunchConfig.scan_precision must be split, input, tf32, tf32x3 or ieee, got {mode!r}")
        self.scan_split = {"split": 2, "input": 1}.get(mode, 0)  # see _dot_split
        self.scan_dot_dtype = self.dot_dtype if mode in ("split", "input") else tl.float32
        self.scan_prec = mode if mode in ("tf32", "tf32x3", "ieee") else "tf32"  # "tf32": unused for 16 bits
        # the scans' dot constants, also for the per-chunk products that take their float32 operands (dU)
        self.scan_dots = dict(PREC=self.scan_prec, DOT=self.scan_dot_dtype, SPLIT=self.scan_split)
        # P^T dO and dU: the scans' dots round dU to the input dtype under "input" precision, so it is stored
        # so (half the bytes; P^T dO is then rounded once more before K dh_n is added); float32 otherwise
        self.du_dtype = q.dtype if self.scan_split == 1 else torch.float32
        self.cfg = cfg

    def consts(self, warps: int, drop: tuple = (), scan: bool = False, **blocks) -> dict:
        dots = self.scan_dots if scan else dict(PREC=self.prec, DOT=self.dot_dtype)
        kw = dict(H=self.H, K=self.K, V=self.V, C=self.C, num_warps=warps, **blocks) | dots
        for name in drop:
            del kw[name]
        stages = self.scan_stages if scan else self.cfg.stages
        if stages is not None:
            kw["num_stages"] = stages
        return kw

    @property
    def scan_consts(self) -> dict:
        """The two scans' launch constants."""
        return self.consts(self.scan_warps, KP=self.KP, BV=self.scan_BV, scan=True)


def _chunk_solve(k, beta, g, s: _Sizes):
    """(b [B, T, H] float32 or None, A [B*H, NT, C, C] lower blocks): see ``_chunk_solve_kernel``."""
    b = None if g is None else torch.empty(g.shape, dtype=torch.float32, device=k.device)
    A = k.new_empty(s.B * s.H, s.NT, s.C, s.C)
    _chunk_solve_kernel[(s.NT, s.B * s.H)](k, beta, g, b, A, s.T, s.NT, USE_G=g is not None, SOLVE_PREC=s.solve_prec,
                                           **s.consts(s.cfg.warps_solve, BK=s.BK, drop=("V",)))
    return b, A


def _chunk_wy(k, v, beta, b, A, s: _Sizes, W=None):
    """(W [B*H, NT*C, K], U~ [B*H, NT*C, V]), input dtype: see ``_chunk_wy_kernel``. A given W (kept by the
    forward) is returned as it is and only U~ is formed."""
    store_w = W is None
    if store_w:
        W = k.new_empty(s.B * s.H, s.NT * s.C, s.K)
    U = k.new_empty(s.B * s.H, s.NT * s.C, s.V)
    _chunk_wy_kernel[(s.NT, s.B * s.H)](k, v, beta, b, A, W, U, s.T, s.NT, USE_G=b is not None, STORE_W=store_w,
                                        **s.consts(s.cfg.warps_wy, BK=s.BK, BV=s.BV))
    return W, U


def _pass_states_fwd(k, v, beta, b, A, h0, s: _Sizes, store_final: bool, W=None):
    """(h, U, final state or None, W or None): W (``LaunchConfig.wy_precompute``) for the reverse scan; a W
    kept by the forward is used as it is."""
    h = k.new_empty(s.B * s.H, s.NT, s.K, s.V)  # input dtype: see the module docstring
    if s.wy:
        W, U = _chunk_wy(k, v, beta, b, A, s, W=W)  # U holds U~ until the scan overwrites it with U
    else:
        W, U = None, k.new_empty(s.B * s.H, s.NT * s.C, s.V)
    ht = k.new_empty(s.B, s.H, s.K, s.V, dtype=torch.float32) if store_final else None
    _pass_states_fwd_kernel[(s.scan_NV, s.B * s.H)](
        k, v, beta, b, A, W, h0, h, U, ht, s.T, s.NT, USE_G=b is not None, USE_INITIAL_STATE=h0 is not None,
        STORE_FINAL_STATE=store_final, WY=W is not None, **s.scan_consts)
    return h, U, ht, W


def _chunk_outputs(q, k, U, b, h, scale, s: _Sizes, out_dtype):
    o = q.new_empty(s.B, s.T, s.H, s.V, dtype=out_dtype)
    _chunk_outputs_kernel[(s.NV, s.NT, s.B * s.H)](
        q, k, U, b, h, o, scale, s.T, s.NT, USE_G=b is not None, **s.consts(s.cfg.warps_outputs, BK=s.BK, BV=s.BV))
    return o


def _chunk_du_local(q, k, b, do, scale, s: _Sizes):
    du_local = q.new_empty(s.B * s.H, s.NT * s.C, s.V, dtype=s.du_dtype)
    _chunk_du_local_kernel[(s.NV, s.NT, s.B * s.H)](
        q, k, b, do, du_local, scale, s.T, s.NT, USE_G=b is not None,
        **s.consts(s.cfg.warps_du_local, BK=s.BK, BV=s.BV))
    return du_local


def _pass_states_bwd(q, k, beta, b, A, W, do, du_local, dht, scale, s: _Sizes, store_initial_grad: bool):
    """(dh, dX2, d initial_state or None). W given (``LaunchConfig.wy_precompute``): the scan leaves dU in
    ``du_local`` (overwritten) and ``_chunk_dx2_kernel`` forms dX2 = A^T dU after it."""
    dh = q.new_empty(s.B * s.H, s.NT, s.K, s.V)
    dx2 = q.new_empty(s.B * s.H, s.NT * s.C, s.V)
    dh0 = q.new_empty(s.B, s.H, s.K, s.V, dtype=torch.float32) if store_initial_grad else None
    _pass_states_bwd_kernel[(s.scan_NV, s.B * s.H)](
        q, k, beta, b, A, W, do, du_local, dht, dh, dx2, dh0, scale, s.T, s.NT, USE_G=b is not None,
        USE_FINAL_STATE_GRAD=dht is not None, STORE_INITIAL_STATE_GRAD=store_initial_grad, WY=W is not None,
        **s.scan_consts)
    if W is not None:
        _chunk_dx2(A, du_local, dx2, s)
    return dh, dx2, dh0


def _chunk_dx2(A, du, dx2, s: _Sizes):
    """dX2 = A^T dU into ``dx2`` (``LaunchConfig.wy_precompute``): see ``_chunk_dx2_kernel``."""
    # dU rounded as the scans round their operands (LaunchConfig.scan_precision), as the residual form does
    _chunk_dx2_kernel[(s.NV, s.NT, s.B * s.H)](A, du, dx2, s.NT,
                                               **(s.consts(s.cfg.warps_dx2, BV=s.BV, drop=("H", "K")) | s.scan_dots))


def _chunk_grads(q, k, v, beta, b, h, dh, U, dx2, do, scale, s: _Sizes):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta_part = q.new_empty(s.NK + 1, s.B, s.T, s.H, dtype=torch.float32)  # NK gradient blocks + the L path
    dg_part = torch.empty_like(dbeta_part) if b is not None else None
    dp, dm = q.new_empty(s.B * s.H, s.NT, s.C, s.C), q.new_empty(s.B * s.H, s.NT, s.C, s.C)
    stride = s.B * s.T * s.H
    _chunk_score_grads_kernel[(s.NT, s.B * s.H)](
        k, beta, b, U, dx2, do, dp, dm, dbeta_part, dg_part, s.T, s.NT, s.NK * stride, USE_G=b is not None,
        **s.consts(s.cfg.warps_score_grads, BK=s.BK, BV=s.BV))
    _chunk_grads_kernel[(s.NK, s.NT, s.B * s.H)](
        q, k, v, beta, b, h, dh, U, dx2, do, dp, dm, dq, dk, dv, dbeta_part, dg_part, scale, s.T, s.NT, stride,
        USE_G=b is not None, **s.consts(s.cfg.warps_grads, BK=s.grads_BK, BV=s.BV))
    return dq, dk, dv, dbeta_part, dg_part


def _gate_beta_grads(dbeta_part, dg_part, beta_dtype, g_dtype, s: _Sizes):
    dbeta = dbeta_part.new_empty(s.B, s.T, s.H, dtype=beta_dtype)
    dg = None if dg_part is None else dbeta_part.new_empty(s.B, s.T, s.H, dtype=g_dtype)
    _gate_beta_grads_kernel[(s.NT, s.B)](dbeta_part, dg_part, dbeta, dg, s.T, s.NK + 1, s.B * s.T * s.H, H=s.H,
                                         C=s.C, BH=triton.next_power_of_2(s.H), USE_G=dg_part is not None,
                                         num_warps=s.cfg.warps_finish)
    return dbeta, dg


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

def _forward(q, k, v, beta, g, initial_state, scale, output_final_state, keep_solve):
    """(o, final state or None, A or None, b or None, W or None) of the chunked (gated) delta rule on a dense
    batch; g None: DeltaNet. With ``keep_solve`` A and b are returned for the backward (which then skips the
    solve), and in the WY form W too (its recomputation is then U~ alone)."""
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    g = None if g is None else g.contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    s = _Sizes(q, v)
    b, A = _chunk_solve(k, beta, g, s)
    h, U, ht, W = _pass_states_fwd(k, v, beta, b, A, h0, s, store_final=output_final_state)
    o = _chunk_outputs(q, k, U, b, h, scale, s, v.dtype)
    return (o, ht, A, b, W) if keep_solve else (o, ht, None, None, None)


def _fake_forward(q, k, v, beta, g, initial_state, scale, output_final_state, keep_solve):
    B, T, H, K = q.shape
    ht = q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else None
    A = b = W = None
    if keep_solve:
        A = k.new_empty(B * H, -(-T // CHUNK), CHUNK, CHUNK)
        b = None if g is None else q.new_empty(B, T, H, dtype=torch.float32)
        if _Sizes(q, v).wy:
            W = k.new_empty(B * H, -(-T // CHUNK) * CHUNK, K)
    return torch.empty_like(v), ht, A, b, W


def _backward(inputs, saved, grads, consts, needs):
    """Gradients of (q, k, v, beta, g, initial_state) given those of (o, final state); saved = [A, b, W]
    from the forward (None when it ran without ``keep_solve``, W also outside the WY form: recomputed)."""
    q, k, v, beta, g, h0 = (inputs[n] for n in ("q", "k", "v", "beta", "g", "initial_state"))
    (A, b, W), (do, dht) = saved, grads
    scale = consts["scale"]
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    g = None if g is None else g.contiguous()
    h0f = None if h0 is None else h0.float().contiguous()
    s = _Sizes(q, v)
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = None if dht is None else dht.float().contiguous()
    if A is None:
        b, A = _chunk_solve(k, beta, g, s)
    # Recompute h and U rather than keeping [B, H, NT, K, V] alive between the passes (on the current stream:
    # beside the reverse scan on a side stream it was no faster, see the module docstring).
    h, U, _, W = _pass_states_fwd(k, v, beta, b, A, h0f, s, store_final=False, W=W)  # W: WY form only
    du_local = _chunk_du_local(q, k, b, do, scale, s)
    dh, dx2, dh0 = _pass_states_bwd(q, k, beta, b, A, W, do, du_local, dht, scale, s, store_initial_grad=needs[5])
    del A, W, du_local
    dq, dk, dv, dbeta_part, dg_part = _chunk_grads(q, k, v, beta, b, h, dh, U, dx2, do, scale, s)
    if not needs[4]:
        dg_part = None
    dbeta, dg = _gate_beta_grads(dbeta_part, dg_part, beta.dtype, None if g is None else g.dtype, s)
    if dh0 is not None:
        dh0 = dh0.to(h0.dtype)
    return dq, dk, dv, dbeta, dg, dh0


if HAS_TRITON:
    # Opaque to torch.compile, a plain autograd.Function in eager mode (linmix.ops.common.custom_op).
    delta_rule_op = TritonOp(
        "delta_rule_chunk",
        "Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, float scale, "
        "bool output_final_state, bool keep_solve", 2, forward=_forward, backward=_backward, fake_forward=_fake_forward)


def _dense(q, k, v, beta, g, *, scale, initial_state, output_final_state):
    # A and b (half of k's bytes at K = 128, and [B, T, H]; in the WY form also W, k's bytes) are kept for the
    # backward when there is one
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta, g, initial_state))
    o, ht = delta_rule_op(q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state, scale=float(scale),
                          output_final_state=output_final_state, keep_solve=keep)
    return o, ht


# On CUDA the chunk kernels can be switched off (LINMIX_DELTA_CHUNK_KERNELS=0 in the environment, or this
# flag): CUDA tensors then take the fused recurrent kernel for short sequences and the PyTorch chunk form
# otherwise. Verified on the H200 (Triton 3.6, bf16, every gradient) at K = V = 16, 32, 64, 128 and 256;
# earlier versions faulted there through two Triton miscompilations on Hopper: tl.trans of dot results
# as dot operands ("Transposes" above) and 8-warp launches (see LaunchConfig).
CHUNK_KERNELS_ON_GPU = os.environ.get("LINMIX_DELTA_CHUNK_KERNELS", "1") != "0"


@functools.lru_cache(maxsize=1)
def _warn_chunk_kernels_disabled() -> None:
    logger.warning("delta_rule: the Triton chunk kernels are switched off on CUDA (LINMIX_DELTA_CHUNK_KERNELS=0 or "
                   "linmix.ops.delta_rule.triton.CHUNK_KERNELS_ON_GPU = False); running the PyTorch chunk form "
                   "for sequences longer than the fused-kernel bound.")


def delta_rule_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                      g: torch.Tensor | None = None, *, scale: float, initial_state: torch.Tensor | None = None,
                      output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                      chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton implementation of :func:`linmix.ops.delta_rule.delta_rule` (backend "triton").

    Inputs are assumed validated by the public op (shapes as there). ``chunk_size`` is accepted
    for the common signature; the kernels always use chunks of 64. See the module docstring for
    the math and limits.
    """
    if prefer_fused_recurrent(q, cu_seqlens, k, v, beta, g, initial_state):
        return fused_recurrent(q, k, v, beta=beta, g=g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens, validate=False)
    on_gpu = q.is_cuda and not triton_interpreted()
    if q.dtype == torch.float64 or (on_gpu and not CHUNK_KERNELS_ON_GPU):
        # float64: no float64 kernels, the PyTorch chunk form is exact there. GPU: see CHUNK_KERNELS_ON_GPU.
        if on_gpu and q.dtype != torch.float64:
            _warn_chunk_kernels_disabled()
        return delta_rule_chunk(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    return run_packed(_dense, cu_seqlens, (q, k, v, beta, g), scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state)


if HAS_TRITON:
    register("delta_rule", "triton")(delta_rule_triton)
