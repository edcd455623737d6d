"""Triton backend of ``gla``: gated linear attention with a vector (per key dimension) decay.

Chunked form of KERNELS.md section 2, per head, chunks of C tokens, q scaled by ``scale``, b_i in
R^K the cumulative log-gate inside a chunk (log2 units, b = log2(e) * cumsum(g), so every decay is
one ``exp2``), h_n the state entering chunk n, products with exp(.) taken per key dimension:

    forward   h_{n+1} = exp(b_C) * h_n + (K * exp(b_C - b))^T V                  (pass_states_fwd)
              O = (Q * exp(b)) h_n + A V,  A_ij = sum_k q_ik k_jk exp(b_ik - b_jk), i >= j  (chunk_outputs)
    backward  dh_{n-1} = exp(b_C) * dh_n + (Q * exp(b))^T dO                      (pass_states_bwd)
              dv = (K * exp(b_C - b)) dh_n + A^T dO                              (chunk_dv)
              dA = (dO V^T) masked to i >= j                                     (chunk_dA)
              dq_i = exp(b_i) * (h_n do_i) + sum_{j <= i} dA_ij k_j * exp(b_i - b_j)
              dk_j = exp(b_C - b_j) * (dh_n v_j) + sum_{i >= j} dA_ij q_i * exp(b_i - b_j)
              dg_s = sum_{t >= s, t in chunk n} (q_t dq_t - k_t dk_t) + R_n       (chunk_dqk, with dq, dk)

where dh_n is the gradient of the state *leaving* chunk n through the later chunks (the incoming
gradient of the final state for the last chunk) and R_n[k] = sum_v dh_n[k, v] h_{n+1}[k, v]: the
gate-gradient identity of KERNELS.md section 1 cut at the chunk boundary (the suffix sum over later
chunks equals the gradient of a virtual gate on the state leaving chunk n). It comes from tiles the
dq/dk kernel already holds, R_n = exp(b_C) * sum_v dh_n h_n + sum_j k_j * dk_j^inter, so dg costs no
extra traffic and its rounding error does not grow with T (a reverse cumsum over the whole sequence
would accumulate every later token's large, mostly cancelling q dq - k dk term). The kernel also
leaves out what cancels exactly inside the chunk: the i = j terms of dq and dk (decay 1: dA_ii k_i
and dA_ii q_i) and, of R_n's sum, the part that the suffix of k dk^inter takes back:

    dg_s = sum_{t >= s} (q_t dq'_t - k_t dk'^intra_t) + sum_{j < s} k_j dk^inter_j + exp(b_C) sum_v dh_n h_n

(primes: without the i = j terms), so float32 never subtracts two large equal numbers; with gates of
-5 to -20 per step, where dg is small next to q dq, this takes its float32 error from ~3e-4 to ~2e-5.

Intra-chunk scores (the part a scalar gate does with one masked matmul): a product
(q_i * exp(b_i)) . (k_j * exp(-b_j)) over a whole chunk would overflow once decays are strong, so
the chunk is cut into sub-blocks of S = 16 positions:

* sub-block pairs J < I go through the first position r = 16 I of block I:
  A_ij = (q_i * exp(b_i - b_r)) . (k_j * exp(b_r - b_j)), both exponents <= 0. In the kernels this
  is one full-size ``tl.dot`` per block I (rows of I, columns before r), so tensor cores do it;
* the diagonal 16 x 16 sub-blocks are computed elementwise in float32, column by column from the
  last to the first: exp(b_i - b_j) = exp(b_i - b_{j+1}) * exp(b_{j+1} - b_j), a running product
  of factors <= 1 (one ``exp2`` per row instead of one per (i, j, k); nothing is ever divided).
  The dq/dk kernel takes dA's rows and columns loaded per position (no reductions) and one ``exp2``
  per element of the exponent masked to <= 0 (running products there, 16x fewer exp2 in two passes,
  took 12.7 against 11.2 ms fwd+bwd on the H200 at the standard shape).

Matmuls run ``tl.dot`` on the input dtype (bf16 / fp16 / fp32) with float32 accumulation; float32
inputs use ``input_precision="ieee"``. Scans, gates, decays and every elementwise product are
float32; ``o`` has v's dtype. The materialised states h, dh, the saved scores A and their gradient dA
are stored in the input dtype, which is the dtype every consumer casts them to before its ``tl.dot``
(the same rounding at the store instead of at the load, half the traffic for 16-bit inputs; the
elementwise diagonal sub-blocks and the i = j terms of dA are read back rounded too, well inside the
16-bit budget); the final state and d initial_state are float32.

Kernels (the math step each computes, and its grid):

* ``_chunk_cumsum_kernel``     b = log2(e) * in-chunk cumsum of g, float32, stored [B*H, NT*C, Kp]:
  padded to whole chunks (constant past the end) and whole K tiles (zeros), so later kernels load b
  without masks; (Kp / tile, NT, B*H).
* ``_pass_states_fwd_kernel``  the sequential scan over chunks; stores h [B*H, NT, K, V] (the
  state entering each chunk) and the final state; (NK, NV, B*H).
* ``_chunk_outputs_kernel``    the intra-chunk scores A = scale * [A_ij] (K looped; kept for the
  backward) and O (V looped); one program per chunk, so A is computed once; (NT, B*H).
* ``_pass_states_bwd_kernel``  the reverse scan; stores dh [B*H, NT, K, V] and d initial_state; (NK, NV, B*H).
* ``_chunk_dv_kernel``         dv from dh and the saved A; (NV, NT, B*H).
* ``_chunk_dA_kernel``         dA = scale * (dO V^T), masked, stored [B*H, NT*C, C] like A (V looped); one
  program per chunk, so dA is computed once, not once per K tile of the next kernel; (NT, B*H).
* ``_chunk_dqk_kernel``        dq, dk and the chunk-local dg from dA (loaded, dA^T by a transposed pointer
  load) and the inter-chunk parts (V looped); (NK, NT, B*H).

Launch parameters (chunk size, tile widths, warps, stages) are in :data:`LAUNCH`.

Shapes: any K, V >= 1 (tiles of at most ``block_k`` / ``block_v`` of :data:`LAUNCH` with masked loads,
K and V looped, so head dims of 256 and beyond work); any T (the last chunk is masked, no host-side
padding of the inputs). Packed varlen (``cu_seqlens``) runs as a zero-padded [N, T_max] batch
through :class:`linmix.ops.common.varlen.Packing`, ``causal=False`` as the causal scan forwards
plus the scan of the time-reversed sequence, float64 in the PyTorch chunk form -- all as the
``simple_gla`` backend does. The kernel chunk size is ``chunk_size`` (None: ``LAUNCH.chunk_size``)
rounded down to a power of two in [16, 128], and shrunk to the next power of two >= T for short
sequences; the result does not depend on it.

The forward and backward are one ``torch.library`` custom op (:class:`linmix.ops.common.custom_op.TritonOp`,
opaque to ``torch.compile``); the forward keeps A (input dtype, [B*H, NT*C, C]) for the backward
when gradients are needed, b and h are recomputed there (h by a forward state pass on a side CUDA
stream beside the reverse pass, dv and dA, which do not read it: :mod:`linmix.ops.common.streams`).
Short sequences (decoding: average length <= 16 tokens without gradients, <= 4 with) take the fused
recurrent kernel of :mod:`linmix.ops.common.fused_recurrent` instead.

Plain pointer arithmetic only (no ``tl.make_block_ptr``): runs on Triton 3.6 and on current
Triton, including its interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
"""

import dataclasses

import torch

from linmix.ops.common.custom_op import TritonOp
from linmix.ops.common.decay_chunk import _reverse_gate, decay_chunk
from linmix.ops.common.fused_recurrent import fused_recurrent, prefer_fused_recurrent
from linmix.ops.common.streams import Fork, on_side
from linmix.ops.common.triton_import import HAS_TRITON, tl, triton
from linmix.ops.common.utils import run_packed
from linmix.ops.common.varlen import max_seqlen
from linmix.ops.dispatch import register


__all__ = ["HAS_TRITON", "LAUNCH", "KernelLaunch", "LaunchConfig", "gla_chunk_triton"]


@dataclasses.dataclass
class KernelLaunch:
    """Launch parameters of one kernel: the widest K / V tile (powers of two >= 16; larger head dims are
    looped), ``num_warps``, and ``num_stages`` (None: Triton's default)."""

    block_k: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int | None = None

    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps} | ({} if self.num_stages is None else {"num_stages": self.num_stages})


@dataclasses.dataclass
class LaunchConfig:
    """Every launch parameter of this backend, in one place; results do not depend on them (beyond rounding).

    Tune on the GPU by changing :data:`LAUNCH` before a call (each call reads it once), e.g.
    ``LAUNCH.kernels["states"].block_v = 32`` for more programs in the sequential state scans:

        >>> from linmix.ops.gla.triton import LAUNCH
        >>> LAUNCH.chunk_size, LAUNCH.kernels["dqk"].num_warps
        (64, 8)

    Attributes:
        chunk_size: tokens per chunk when the caller passes ``chunk_size=None`` (rounded down to a power of
            two in [16, 128]; 64 fits the registers, 128 spills).
        kernels: per kernel: "states" (both state scans), "outputs", "dv", "dA", "dqk"; "cumsum" uses only
            ``num_warps`` (its tile is the widest block_k of the kernels that load b, which sets how far b is
            padded along K); "dA" has no K tile (it uses block_v, num_warps and num_stages).
    """

    # Defaults: timed on the H200 (Triton 3.6, bf16, K = V = 128, C = 64; `benchmarks/gpu.py tune --ops gla`) and
    # checked there at K = V = 16 to 256. Hopper miscompilations decide some of them: 8 warps in "dv" gave NaN dv at
    # K = 32; 4 warps in "dqk" faulted (illegal memory access) at K = 128.
    chunk_size: int = 64
    kernels: dict[str, KernelLaunch] = dataclasses.field(default_factory=lambda: {
        "cumsum": KernelLaunch(num_warps=4),
        "states": KernelLaunch(num_warps=8),
        "outputs": KernelLaunch(block_k=64, num_warps=4, num_stages=1),
        "dv": KernelLaunch(num_warps=4),
        "dA": KernelLaunch(num_warps=4),
        "dqk": KernelLaunch(block_k=64, num_warps=8, num_stages=1),
    })


LAUNCH = LaunchConfig()
SUB_CHUNK = 16  # secondary chunk of the intra-chunk scores (KERNELS.md section 2); also tl.dot's minimum
_READS_B = ("states", "outputs", "dv", "dqk")  # the kernels that load b in K tiles (b is padded to the widest)

# Layouts (row = token): q, k, g [B, T, H, K] and v, o [B, T, H, V] as given; b [B*H, NT*C, Kp] and the
# scores A [B*H, NT*C, C] (one contiguous block per chunk); h, dh [B*H, NT, K, V].


# --------------------------------------------------------------------------------------------
# Gates: in-chunk cumulative sums (once per forward / backward, read by every other kernel)
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_cumsum_kernel(g, b, T, Tp, H: tl.constexpr, K: tl.constexpr, Kp: tl.constexpr, C: tl.constexpr,
                         BK: tl.constexpr):
    """b = log2(e) * sum_{s in t's chunk, s <= t} g[s] for one chunk and K block.

    b is [B*H, NT*C, Kp]: rows past T repeat the chunk's last value (the gates there count as 0) and
    columns past K are 0, so every later load of b needs no mask.
    """
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m = ((i_t * C + o_c) < T)[:, None] & (o_k < K)[None, :]
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h
    x = tl.load(g + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m, other=0.0)
    bt = tl.cumsum(x.to(tl.float32), axis=0) * 1.4426950408889634  # log2(e)
    tl.store(b + (i_bh.to(tl.int64) * Tp + i_t * C) * Kp + o_c[:, None] * Kp + o_k[None, :], bt)


# --------------------------------------------------------------------------------------------
# State passes (forward scan of h, reverse scan of dh)
# --------------------------------------------------------------------------------------------

@triton.jit
def _pass_states_fwd_kernel(k, v, b, h0, h, ht, T, Tp, NT,
                            H: tl.constexpr, K: tl.constexpr, Kp: tl.constexpr, V: tl.constexpr,
                            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, PREC: tl.constexpr):
    """Scan over chunks: store h_n, then h_{n+1} = exp(b_C) * h_n + (K * exp(b_C - b))^T V.

    One program per (K block, V block, batch*head); the [BK, BV] state stays in registers.
    """
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_offs = o_k[:, None] * V + o_v[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        state += tl.load(h0 + i_bh.to(tl.int64) * K * V + kv_offs, mask=m_kv, other=0.0).to(tl.float32)

    # Scalar base pointers advanced by one chunk per step, int32 tile offsets (a loop-carried tensor of
    # 64-bit pointers per tile would cost twice the registers).
    p_k = k + (i_b.to(tl.int64) * T * H + i_h) * K  # (batch, token 0, head)
    p_v = v + (i_b.to(tl.int64) * T * H + i_h) * V
    p_b = b + i_bh.to(tl.int64) * Tp * Kp
    p_h = h + i_bh.to(tl.int64) * NT * K * V
    for i_t in range(NT):
        tl.store(p_h + kv_offs, state.to(p_h.dtype.element_ty), mask=m_kv)
        m_c = (i_t * C + o_c) < T
        kt = tl.load(p_k + o_c[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_c[None, :], other=0.0)
        vt = tl.load(p_v + o_c[:, None] * (H * V) + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        b_last = tl.load(p_b + (C - 1) * Kp + o_k)  # b at the chunk's last row
        state *= tl.exp2(b_last)[:, None]
        kt = (kt.to(tl.float32) * tl.exp2(b_last[:, None] - tl.load(p_b + o_c[None, :] * Kp + o_k[:, None])))
        state = tl.dot(kt.to(vt.dtype), vt, state, input_precision=PREC)
        p_k += C * H * K
        p_v += C * H * V
        p_b += C * Kp
        p_h += K * V
    if STORE_FINAL_STATE:
        tl.store(ht + i_bh.to(tl.int64) * K * V + kv_offs, state, mask=m_kv)


@triton.jit
def _pass_states_bwd_kernel(q, b, do, dht, dh, dh0, scale, T, Tp, NT,
                            H: tl.constexpr, K: tl.constexpr, Kp: tl.constexpr, V: tl.constexpr,
                            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            USE_FINAL_STATE_GRAD: tl.constexpr, STORE_INITIAL_STATE_GRAD: tl.constexpr,
                            PREC: tl.constexpr):
    """Reverse scan: store dh_n (gradient of the state leaving chunk n), then
    dh_{n-1} = exp(b_C) * dh_n + scale * (Q * exp(b))^T dO; what is left is d initial_state."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_offs = o_k[:, None] * V + o_v[None, :]

    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        dstate += tl.load(dht + i_bh.to(tl.int64) * K * V + kv_offs, mask=m_kv, other=0.0).to(tl.float32)

    # Scalar base pointers at the last chunk, moved back by one chunk per step.
    p_q = q + ((i_b.to(tl.int64) * T + (NT - 1) * C) * H + i_h) * K
    p_do = do + ((i_b.to(tl.int64) * T + (NT - 1) * C) * H + i_h) * V
    p_b = b + (i_bh.to(tl.int64) * Tp + (NT - 1) * C) * Kp
    p_dh = dh + (i_bh.to(tl.int64) * NT + NT - 1) * K * V
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tl.store(p_dh + kv_offs, dstate.to(p_dh.dtype.element_ty), mask=m_kv)
        m_c = (i_t * C + o_c) < T
        qt = tl.load(p_q + o_c[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_c[None, :], other=0.0)
        d_o = tl.load(p_do + o_c[:, None] * (H * V) + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
        dstate *= tl.exp2(tl.load(p_b + (C - 1) * Kp + o_k))[:, None]
        qt = qt.to(tl.float32) * tl.exp2(tl.load(p_b + o_c[None, :] * Kp + o_k[:, None]))  # [BK, C]: (Q exp(b))^T
        dstate += scale * tl.dot(qt.to(d_o.dtype), d_o, input_precision=PREC)
        p_q -= C * H * K
        p_do -= C * H * V
        p_b -= C * Kp
        p_dh -= K * V
    if STORE_INITIAL_STATE_GRAD:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + kv_offs, dstate, mask=m_kv)


# --------------------------------------------------------------------------------------------
# Forward: intra-chunk scores and outputs
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_outputs_kernel(q, k, v, b, h, o, A, scale, T, Tp, NT,
                          H: tl.constexpr, K: tl.constexpr, Kp: tl.constexpr, V: tl.constexpr,
                          C: tl.constexpr, S: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, STORE_SCORES: tl.constexpr, STORE_OUTPUT: tl.constexpr,
                          PREC: tl.constexpr):
    """A = scale * intra-chunk scores (K looped; stored when the backward needs it), then
    O = scale * (Q * exp(b)) h_n + A V (V looped; skipped without STORE_OUTPUT), for one chunk."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    dt = k.dtype.element_ty
    o_c = tl.arange(0, C)
    m_c = (i_t * C + o_c) < T
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h  # (batch, first token of the chunk, head)
    p_b = b + (i_bh.to(tl.int64) * Tp + i_t * C) * Kp  # this chunk's [C, Kp] block of b
    ref = (o_c // S) * S  # first row of each row's sub-block: the reference point for the pairs J < I
    # The chunk seen as sub-blocks [NC, S, .]: row s of sub-block n is chunk row n * S + s.
    o_n3 = tl.arange(0, NC)[:, None, None]
    o_s3 = tl.arange(0, S)[None, :, None]  # row inside a sub-block
    o_sc = tl.arange(0, S)[None, None, :]  # column inside a sub-block
    rows_left3 = T - i_t * C - o_n3 * S  # rows of each sub-block inside the sequence (may be <= 0 or > S)

    scores = tl.zeros([C, C], dtype=tl.float32)
    diag = tl.zeros([NC, S, S], dtype=tl.float32)  # the diagonal sub-blocks: [block, row i, column j]
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_ck = m_c[:, None] & (o_k < K)[None, :]
        qt = tl.load(q + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
        kt = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
        bt = tl.load(p_b + o_c[:, None] * Kp + o_k[None, :])
        q_ref = qt * tl.exp2(bt - tl.load(p_b + ref[:, None] * Kp + o_k[None, :]))  # q_i exp(b_i - b_r(i)), <= 0
        # Sub-block pairs J < I: rows of block I against the columns before its first row r = I * S.
        for I in tl.static_range(1, NC):
            b_r = tl.load(p_b + I * S * Kp + o_k)
            k_r = kt * tl.exp2(tl.where(o_c[:, None] < I * S, b_r[None, :] - bt, float("-inf")))
            q_I = tl.where((o_c // S == I)[:, None], q_ref, 0.0)
            scores = tl.dot(q_I.to(dt), tl.trans(k_r.to(dt)), scores, input_precision=PREC)
        # Diagonal sub-blocks, elementwise; columns j from the last to the first with the running decay
        # E[i] = exp(b_i - b_j) = E_{j+1}[i] * exp(b_{j+1} - b_j) for i >= j (0 above the diagonal).
        o_k3 = o_k[None, None, :]
        m_k3 = o_k3 < K
        q3 = tl.load(q + row0 * K + (o_n3 * S + o_s3) * (H * K) + o_k3, mask=(o_s3 < rows_left3) & m_k3, other=0.0)
        q3 = q3.to(tl.float32)
        p_kj = k + row0 * K + o_n3 * S * (H * K) + o_k3  # [NC, 1, BK]: the first row of each sub-block
        p_bj = p_b + o_n3 * S * Kp + o_k3
        decay = tl.zeros([NC, S, BK], dtype=tl.float32)
        b_next = tl.load(p_bj + (S - 1) * Kp)
        for r in range(S):
            j = S - 1 - r
            k_j = tl.load(p_kj + j * (H * K), mask=(j < rows_left3) & m_k3, other=0.0).to(tl.float32)
            b_j = tl.load(p_bj + j * Kp)
            decay = tl.where(o_s3 == j, 1.0, decay * tl.exp2(b_next - b_j))
            col = tl.sum(q3 * k_j * decay, axis=2, keep_dims=True)  # [NC, S, 1]: A_ij for column j
            diag = tl.where(o_sc == j, diag + col, diag)
            b_next = b_j
    # Place the diagonal sub-blocks into the [C, C] scores.
    diag4 = tl.where(o_n3[:, :, :, None] == tl.arange(0, NC)[None, None, :, None], diag[:, :, None, :], 0.0)
    scores = (scores + tl.reshape(diag4, [C, C])) * scale
    if STORE_SCORES:
        p_A = A + (i_bh.to(tl.int64) * Tp + i_t * C) * C
        tl.store(p_A + o_c[:, None] * C + o_c[None, :], scores.to(A.dtype.element_ty))

    if STORE_OUTPUT:
        p_h = h + (i_bh.to(tl.int64) * NT + i_t) * K * V
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            acc = tl.zeros([C, BV], dtype=tl.float32)
            for i_k in range(tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_k = o_k < K
                qt = tl.load(q + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :],
                             other=0.0)
                q_in = (qt.to(tl.float32) * tl.exp2(tl.load(p_b + o_c[:, None] * Kp + o_k[None, :]))).to(dt)
                h_t = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
                acc = tl.dot(q_in, h_t.to(dt), acc, input_precision=PREC)
            m_cv = m_c[:, None] & m_v[None, :]
            vt = tl.load(v + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0)
            acc = tl.dot(scores.to(vt.dtype), vt, acc * scale, input_precision=PREC)
            tl.store(o + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], acc.to(o.dtype.element_ty), mask=m_cv)


# --------------------------------------------------------------------------------------------
# Backward: dv, and dq / dk / dg
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_dv_kernel(k, b, A, do, dh, dv, T, Tp, NT,
                     H: tl.constexpr, K: tl.constexpr, Kp: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dv = (K * exp(b_C - b)) dh_n + A^T dO for one chunk and V block (K looped); A saved by the forward."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_c = (i_t * C + o_c) < T
    m_cv = m_c[:, None] & m_v[None, :]
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h
    p_b = b + (i_bh.to(tl.int64) * Tp + i_t * C) * Kp
    p_dh = dh + (i_bh.to(tl.int64) * NT + i_t) * K * V

    acc = tl.zeros([C, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        kt = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :],
                     other=0.0)
        b_last = tl.load(p_b + (C - 1) * Kp + o_k)
        k_out = kt.to(tl.float32) * tl.exp2(b_last[None, :] - tl.load(p_b + o_c[:, None] * Kp + o_k[None, :]))
        dh_t = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        acc = tl.dot(k_out.to(kt.dtype), dh_t.to(kt.dtype), acc, input_precision=PREC)
    scores = tl.load(A + (i_bh.to(tl.int64) * Tp + i_t * C) * C + o_c[:, None] * C + o_c[None, :])
    d_o = tl.load(do + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0)
    acc = tl.dot(tl.trans(scores).to(d_o.dtype), d_o, acc, input_precision=PREC)
    tl.store(dv + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], acc.to(dv.dtype.element_ty), mask=m_cv)


@triton.jit
def _chunk_dA_kernel(v, do, dA, scale, T, Tp, H: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     BV: tl.constexpr, PREC: tl.constexpr):
    """dA = scale * (dO V^T) for one chunk (V looped), lower triangle with the diagonal (zero above),
    stored in the input dtype like the forward's A: [B*H, NT*C, C], rows past T zero."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    m_c = (i_t * C + o_c) < T
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h

    acc = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_cv = m_c[:, None] & (o_v < V)[None, :]
        vt = tl.load(v + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0)
        d_o = tl.load(do + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0)
        acc = tl.dot(d_o, tl.trans(vt), acc, input_precision=PREC)
    acc = tl.where(o_c[:, None] >= o_c[None, :], acc, 0.0) * scale
    p_dA = dA + (i_bh.to(tl.int64) * Tp + i_t * C) * C
    tl.store(p_dA + o_c[:, None] * C + o_c[None, :], acc.to(dA.dtype.element_ty))


@triton.jit
def _chunk_dqk_kernel(q, k, v, b, h, do, dh, dA, dq, dk, dg, scale, T, Tp, NT,
                      H: tl.constexpr, K: tl.constexpr, Kp: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                      S: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STORE_DG: tl.constexpr,
                      PREC: tl.constexpr):
    """dq, dk and the chunk-local dg for one chunk and K block (V looped for the inter-chunk parts), from the
    chunk's dA of :func:`_chunk_dA_kernel`."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    dt = k.dtype.element_ty
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_c = (i_t * C + o_c) < T
    m_ck = m_c[:, None] & m_k[None, :]
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h
    p_b = b + (i_bh.to(tl.int64) * Tp + i_t * C) * Kp
    p_dA = dA + (i_bh.to(tl.int64) * Tp + i_t * C) * C  # this chunk's [C, C] block of dA (scaled, zero above)
    state_base = (i_bh.to(tl.int64) * NT + i_t) * K * V

    # Inter-chunk parts, V looped; sum_v dh_n * h_n for the gate gradient's boundary term.
    acc_dq = tl.zeros([C, BK], dtype=tl.float32)
    acc_dk = tl.zeros([C, BK], dtype=tl.float32)
    dh_dot_h = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_cv = m_c[:, None] & m_v[None, :]
        vt = tl.load(v + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0)
        d_o = tl.load(do + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0)
        m_vk = m_v[:, None] & m_k[None, :]
        h_t = tl.load(h + state_base + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0)  # [BV, BK]: h^T
        dh_t = tl.load(dh + state_base + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0.0)  # dh^T
        acc_dq = tl.dot(d_o, h_t.to(d_o.dtype), acc_dq, input_precision=PREC)
        acc_dk = tl.dot(vt, dh_t.to(vt.dtype), acc_dk, input_precision=PREC)
        dh_dot_h += tl.sum(dh_t.to(tl.float32) * h_t.to(tl.float32), axis=0)

    # The i = j terms (decay 1) are kept apart: they cancel exactly in the gate gradient (module docstring).
    ds_self = tl.load(p_dA + o_c * (C + 1)).to(tl.float32)  # dA_ii

    # Diagonal sub-blocks, elementwise, all NC of them at once, one position r of the sub-block per step:
    #   dq_i += dA_ir exp(b_i - b_r) k_r  (rows i > r),   dk_j += dA_rj exp(b_r - b_j) q_r  (columns j < r),
    # with dA's column r and row r loaded rather than extracted from a register tile (no reductions). Rows
    # past T: k, q and dA are zero there. One exp2 per element and step, its exponent masked to -inf where it
    # would be positive.
    o_n3 = tl.arange(0, NC)[:, None, None]
    o_s3 = tl.arange(0, S)[None, :, None]
    rows3 = o_n3 * S + o_s3  # [NC, S, 1]: the chunk rows of the sub-blocks
    rows_left3 = T - i_t * C - o_n3 * S  # rows of each sub-block inside the sequence (may be <= 0 or > S)
    o_k3 = o_k[None, None, :]
    m_k3 = o_k3 < K
    dq3 = tl.zeros([NC, S, BK], dtype=tl.float32)
    dk3 = tl.zeros([NC, S, BK], dtype=tl.float32)
    b3 = tl.load(p_b + rows3 * Kp + o_k3)  # [NC, S, BK] (b is padded: no mask)
    for r in range(S):
        row_r = o_n3 * S + r  # [NC, 1, 1]
        m_r = (r < rows_left3) & m_k3
        k_r = tl.load(k + row0 * K + row_r * (H * K) + o_k3, mask=m_r, other=0.0).to(tl.float32)  # [NC, 1, BK]
        q_r = tl.load(q + row0 * K + row_r * (H * K) + o_k3, mask=m_r, other=0.0).to(tl.float32)
        b_r = tl.load(p_b + row_r * Kp + o_k3)
        below, above = o_s3 > r, o_s3 < r
        dA_col = tl.load(p_dA + rows3 * C + row_r, mask=below, other=0.0).to(tl.float32)  # [NC, S, 1]: dA_ir
        dA_row = tl.load(p_dA + row_r * C + rows3, mask=above, other=0.0).to(tl.float32)  # [NC, S, 1]: dA_rj
        dq3 += dA_col * tl.exp2(tl.where(below, b3 - b_r, float("-inf"))) * k_r
        dk3 += dA_row * tl.exp2(tl.where(above, b_r - b3, float("-inf"))) * q_r

    qt = tl.load(q + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
    kt = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
    bt = tl.load(p_b + o_c[:, None] * Kp + o_k[None, :])
    b_last = tl.load(p_b + (C - 1) * Kp + o_k)
    d_q = acc_dq * (scale * tl.exp2(bt)) + tl.reshape(dq3, [C, BK])
    dk_inter = acc_dk * tl.exp2(b_last[None, :] - bt)
    d_k = tl.reshape(dk3, [C, BK])  # the intra-chunk part of dk, i != j
    # Sub-block pairs J < I through the first row r = I * S of block I (both exponents <= 0):
    #   dq_i += exp(b_i - b_r) sum_j dA_ij k_j exp(b_r - b_j),   dk_j += exp(b_r - b_j) sum_i dA_ij q_i exp(b_i - b_r).
    q_factor = tl.exp2(bt - tl.load(p_b + ((o_c // S) * S)[:, None] * Kp + o_k[None, :]))
    q_ref = (qt * q_factor).to(dt)
    dq_ref = tl.zeros([C, BK], dtype=tl.float32)
    # dA^T is a transposed pointer load of the stored dA: never a tl.dot operand that is tl.trans of another
    # dot's result, which Triton 3.4-3.7.0 miscompiles on Hopper (seen as an illegal memory access at K = 128;
    # fla's gated backward is refused on these versions for the same bug).
    for I in tl.static_range(1, NC):
        b_r = tl.load(p_b + I * S * Kp + o_k)
        k_factor = tl.exp2(tl.where(o_c[:, None] < I * S, b_r[None, :] - bt, float("-inf")))
        m_IJ = (o_c // S == I)[:, None] & (o_c < I * S)[None, :]  # rows of block I, columns before it
        dA_I = tl.load(p_dA + o_c[:, None] * C + o_c[None, :], mask=m_IJ, other=0.0).to(dt)
        m_JI = (o_c < I * S)[:, None] & (o_c // S == I)[None, :]  # the same entries, transposed
        dA_I_t = tl.load(p_dA + o_c[None, :] * C + o_c[:, None], mask=m_JI, other=0.0).to(dt)  # dA_I^T
        dq_ref = tl.dot(dA_I, (kt * k_factor).to(dt), dq_ref, input_precision=PREC)
        d_k += k_factor * tl.dot(dA_I_t, q_ref, input_precision=PREC)
    d_q += q_factor * dq_ref

    offs = row0 * K + o_c[:, None] * (H * K) + o_k[None, :]
    if STORE_DG:
        # The chunk-local gate gradient, regrouped (module docstring): no i = j terms, and the suffix of
        # k dk^inter cancelled against R_n's sum over the chunk, leaving its prefix. Rows past T are zero.
        part = qt * d_q - kt * d_k
        k_dk_inter = kt * dk_inter
        dg_c = tl.cumsum(part, axis=0, reverse=True) + (tl.cumsum(k_dk_inter, axis=0) - k_dk_inter)
        dg_c += (tl.exp2(b_last) * dh_dot_h)[None, :]
        tl.store(dg + offs, dg_c.to(dg.dtype.element_ty), mask=m_ck)
    tl.store(dq + offs, (d_q + ds_self[:, None] * kt).to(dq.dtype.element_ty), mask=m_ck)
    tl.store(dk + offs, (dk_inter + d_k + ds_self[:, None] * qt).to(dk.dtype.element_ty), mask=m_ck)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _block(d: int, widest: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (tl.dot), at most ``widest``."""
    return min(widest, max(16, triton.next_power_of_2(d)))


def _kernel_chunk_size(chunk_size: int | None, T: int) -> int:
    """``chunk_size`` (None: LAUNCH.chunk_size) rounded down to a power of two in [16, 128], no larger than T needs."""
    chunk_size = LAUNCH.chunk_size if chunk_size is None else chunk_size
    c = min(128, max(SUB_CHUNK, 1 << (int(chunk_size).bit_length() - 1)))
    return min(c, max(SUB_CHUNK, triton.next_power_of_2(T)))


class _Sizes:
    """Sizes of one call, and each kernel's tiles and launch options (from LAUNCH, read once per call)."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, chunk_size: int):
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.C = chunk_size
        self.NT = triton.cdiv(self.T, self.C)
        self.Tp = self.NT * self.C
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is unused for 16-bit inputs
        self.launch = {name: dataclasses.replace(kl) for name, kl in LAUNCH.kernels.items()}
        self.BKp = max(_block(self.K, self.launch[name].block_k) for name in _READS_B)
        self.Kp = triton.cdiv(self.K, self.BKp) * self.BKp  # b padded along K to whole tiles of every kernel

    def tiles(self, kernel: str) -> tuple[int, int]:
        """(number of K tiles, number of V tiles) of ``kernel``."""
        kl = self.launch[kernel]
        return triton.cdiv(self.K, _block(self.K, kl.block_k)), triton.cdiv(self.V, _block(self.V, kl.block_v))

    def consts(self, kernel: str) -> dict:
        kl = self.launch[kernel]
        return dict(H=self.H, K=self.K, Kp=self.Kp, V=self.V, C=self.C, BK=_block(self.K, kl.block_k),
                    BV=_block(self.V, kl.block_v), PREC=self.prec, **kl.options())


def _chunk_cumsum(g: torch.Tensor, s: _Sizes) -> torch.Tensor:
    b = g.new_empty(s.B * s.H, s.Tp, s.Kp, dtype=torch.float32)
    _chunk_cumsum_kernel[(s.Kp // s.BKp, s.NT, s.B * s.H)](
        g, b, s.T, s.Tp, H=s.H, K=s.K, Kp=s.Kp, C=s.C, BK=s.BKp, **s.launch["cumsum"].options())
    return b


def _pass_states_fwd(k, v, b, initial_state, s: _Sizes, store_final: bool, fork: Fork | None = None):
    """(h, final state or None); with ``fork`` the scan runs on its side stream (the caller joins before
    reading h)."""
    h = k.new_empty(s.B * s.H, s.NT, s.K, s.V)  # input dtype: see the module docstring
    ht = k.new_empty(s.B, s.H, s.K, s.V, dtype=torch.float32) if store_final else None
    with on_side(fork):
        _pass_states_fwd_kernel[(*s.tiles("states"), s.B * s.H)](
            k, v, b, initial_state, h, ht, s.T, s.Tp, s.NT, USE_INITIAL_STATE=initial_state is not None,
            STORE_FINAL_STATE=store_final, **s.consts("states"))
    return h, ht


def _chunk_outputs(q, k, v, b, h, scale, s: _Sizes, store_scores: bool, store_output: bool = True):
    o = torch.empty_like(v) if store_output else None
    A = q.new_empty(s.B * s.H, s.Tp, s.C) if store_scores else None
    _chunk_outputs_kernel[(s.NT, s.B * s.H)](
        q, k, v, b, h, o, A, scale, s.T, s.Tp, s.NT, S=SUB_CHUNK, NC=s.C // SUB_CHUNK, STORE_SCORES=store_scores,
        STORE_OUTPUT=store_output, **s.consts("outputs"))
    return o, A


def _pass_states_bwd(q, b, do, dht, scale, s: _Sizes, store_initial_grad: bool):
    dh = q.new_empty(s.B * s.H, s.NT, s.K, s.V)
    dh0 = q.new_empty(s.B, s.H, s.K, s.V, dtype=torch.float32) if store_initial_grad else None
    _pass_states_bwd_kernel[(*s.tiles("states"), s.B * s.H)](
        q, b, do, dht, dh, dh0, scale, s.T, s.Tp, s.NT, USE_FINAL_STATE_GRAD=dht is not None,
        STORE_INITIAL_STATE_GRAD=store_initial_grad, **s.consts("states"))
    return dh, dh0


def _chunk_dv(k, b, A, do, dh, s: _Sizes):
    dv = torch.empty_like(do)
    _chunk_dv_kernel[(s.tiles("dv")[1], s.NT, s.B * s.H)](k, b, A, do, dh, dv, s.T, s.Tp, s.NT, **s.consts("dv"))
    return dv


def _chunk_dA(v, do, scale, s: _Sizes):
    dA = v.new_empty(s.B * s.H, s.Tp, s.C)  # input dtype, like the forward's A
    kl = s.launch["dA"]
    _chunk_dA_kernel[(s.NT, s.B * s.H)](v, do, dA, scale, s.T, s.Tp, H=s.H, V=s.V, C=s.C, BV=_block(s.V, kl.block_v),
                                        PREC=s.prec, **kl.options())
    return dA


def _chunk_dqk(q, k, v, b, h, do, dh, dA, scale, s: _Sizes, g_dtype: torch.dtype | None):
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg = q.new_empty(q.shape, dtype=g_dtype) if g_dtype is not None else None
    _chunk_dqk_kernel[(s.tiles("dqk")[0], s.NT, s.B * s.H)](
        q, k, v, b, h, do, dh, dA, dq, dk, dg, scale, s.T, s.Tp, s.NT, S=SUB_CHUNK, NC=s.C // SUB_CHUNK,
        STORE_DG=dg is not None, **s.consts("dqk"))
    return dq, dk, dg


# --------------------------------------------------------------------------------------------
# Forward / backward, registered as a torch.library custom op (opaque to torch.compile)
# --------------------------------------------------------------------------------------------

def _forward(q, k, v, g, initial_state, scale, output_final_state, chunk_size, store_scores):
    """(o, final state or None, A or None) of the causal chunked gla on a dense batch; A is kept for the backward."""
    q, k, v, g = q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    s = _Sizes(q, v, chunk_size)
    b = _chunk_cumsum(g, s)
    h, ht = _pass_states_fwd(k, v, b, h0, s, store_final=output_final_state)
    o, A = _chunk_outputs(q, k, v, b, h, scale, s, store_scores=store_scores)
    return o, ht, A


def _fake_forward(q, k, v, g, initial_state, scale, output_final_state, chunk_size, store_scores):
    B, T, H, K = q.shape
    ht = q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else None
    NT = -(-T // chunk_size)
    A = q.new_empty(B * H, NT * chunk_size, chunk_size) if store_scores else None
    return torch.empty_like(v), ht, A


def _backward(inputs, saved, grads, consts, needs):
    """Gradients of (q, k, v, g, initial_state) given those of (o, final state); saved = [A]."""
    q, k, v, g, h0 = (inputs[n] for n in ("q", "k", "v", "g", "initial_state"))
    (A,), (do, dht) = saved, grads
    scale = consts["scale"]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    s = _Sizes(q, v, consts["chunk_size"])
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = None if dht is None else dht.float().contiguous()
    h0f = None if h0 is None else h0.float().contiguous()
    b = _chunk_cumsum(g.contiguous(), s)  # recomputed: cheaper than keeping a float32 [B, T, H, K] alive
    if A is None:  # (a forward run without store_scores)
        A = _chunk_outputs(q, k, v, b, None, scale, s, store_scores=True, store_output=False)[1]
    # Recompute the chunk states rather than keeping [B, H, NT, K, V] alive between passes, on a side stream
    # beside the reverse scan and dv, which do not read them (linmix.ops.common.streams); joined before dq / dk.
    fork = Fork(q)
    h, _ = _pass_states_fwd(k, v, b, h0f, s, store_final=False, fork=fork)
    dh, dh0 = _pass_states_bwd(q, b, do, dht, scale, s, store_initial_grad=needs[4])
    dv = _chunk_dv(k, b, A, do, dh, s)
    dA = _chunk_dA(v, do, scale, s)  # once per chunk, read by every K tile of the dq / dk kernel
    fork.join()
    dq, dk, dg = _chunk_dqk(q, k, v, b, h, do, dh, dA, scale, s, g.dtype if needs[3] else None)
    del dA  # [B*H, NT*C, C]: not kept past the kernel that reads it
    if dh0 is not None:
        dh0 = dh0.to(h0.dtype)
    return dq, dk, dv, dg, dh0


if HAS_TRITON:
    # One opaque op for torch.compile (see linmix.ops.common.custom_op), used in eager mode too.
    vector_decay_op = TritonOp(
        "vector_decay_chunk",
        "Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, float scale, bool output_final_state, "
        "int chunk_size, bool store_scores", 2, forward=_forward, backward=_backward, fake_forward=_fake_forward)


def _causal(q, k, v, g, *, scale, initial_state, output_final_state, chunk_size):
    # The scores A are kept for the backward only when there will be one.
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, g, initial_state))
    o, ht = vector_decay_op(q=q, k=k, v=v, g=g, initial_state=initial_state, scale=float(scale),
                            output_final_state=output_final_state, chunk_size=chunk_size, store_scores=needs_grad)
    return o, ht


def _bidirectional(q, k, v, g, *, scale, initial_state, output_final_state, chunk_size):
    """causal=False: the forward scan plus the scan of the reversed sequence, minus the diagonal both count."""
    kw = dict(scale=scale, initial_state=None, output_final_state=False, chunk_size=chunk_size)
    o_fwd, _ = _causal(q, k, v, g, **kw)
    o_bwd, _ = _causal(q.flip(1), k.flip(1), v.flip(1), _reverse_gate(g), **kw)
    diag = scale * (q.float() * k.float()).sum(-1, keepdim=True) * v.float()
    return (o_fwd.float() + o_bwd.flip(1).float() - diag).to(v.dtype), None


# On the H200 (Triton 3.6) the kernels are verified at K = V = 16, 32, 64, 128 and 256, K = 96 / 64 with
# V = 128, K = 128 with V = 64, and K = 16 / 32 with V = 32 / 64 (`benchmarks/gpu.py check --isolate --ops gla
# --head-dims 16:32 32:64 16`, 2026-11-30). With an earlier launch table (8 warps in the dv kernel) dv came out
# NaN at K = V = 32 and a training run at K = 16, V = 32 failed; 4 warps there fixed both.


def gla_chunk_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, scale: float,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                     cu_seqlens: torch.Tensor | None = None, causal: bool = True,
                     chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton implementation behind ``gla(..., backend="triton")``.

    Inputs are assumed validated by the public op (:func:`linmix.ops.gla`): q, k, g [B, T, H, K],
    v [B, T, H, V], initial_state [N, H, K, V]. Returns (o [B, T, H, V] in v's dtype, the final
    state [N, H, K, V] float32 or None). See the module docstring for the math and limits.
    """
    if prefer_fused_recurrent(q, cu_seqlens, k, v, g, initial_state, causal=causal):
        return fused_recurrent(q, k, v, gk=g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens, validate=False)
    if q.dtype == torch.float64:  # the PyTorch chunk form is exact there
        return decay_chunk(q, k, v, g, gate="vector", scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens, causal=causal,
                           chunk_size=chunk_size)
    T_max = max_seqlen(q.shape[1], cu_seqlens)
    fn = _causal if causal else _bidirectional
    return run_packed(fn, cu_seqlens, (q, k, v, g), scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=_kernel_chunk_size(chunk_size, T_max))


if HAS_TRITON:
    @register("gla", "triton")
    def gla_triton(q, k, v, g, **kwargs):
        return gla_chunk_triton(q, k, v, g, **kwargs)
