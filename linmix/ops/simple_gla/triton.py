"""Triton backend of the scalar-decay family: ``simple_gla`` and ``linear_attn`` (g = None).

Chunked form of KERNELS.md section 1, per head, chunks of C tokens, q scaled by ``scale``,
b_i the cumulative log-gate inside a chunk (kept in log2 units, b = log2(e) * cumsum(g), so every
decay is one ``exp2``), S_0 = h_n the state entering chunk n:

    forward   h_{n+1} = exp(b_C) h_n + (K * exp(b_C - b))^T V                  (pass_states_fwd)
              O = (Q * exp(b)) h_n + ((Q K^T) o D) V,  D_ij = exp(b_i - b_j), i >= j  (chunk_outputs)
    backward  dh_{n-1} = exp(b_C) dh_n + (Q * exp(b))^T dO                     (pass_states_bwd)
              dv = exp(b_C - b) * (K dh_n) + ((Q K^T) o D)^T dO                 (chunk_dv)
              dq = exp(b) * (dO h_n^T) + ((dO V^T) o D) K                       (chunk_dqk)
              dk = exp(b_C - b) * (V dh_n^T) + ((dO V^T) o D)^T Q
              dg_s = sum_{t >= s, t in chunk n} sum_K (q_t dq_t - k_t dk_t) + <dh_n, h_{n+1}>   (chunk_dqk)

where dh_n is the gradient of the state *leaving* chunk n (dS_T for the last chunk). The gate gradient
is the identity of KERNELS.md section 1 (dg_s = sum_{t >= s} (q dq - k dk) + <dS_T, S_T>) cut at the
chunk boundary: the suffix sum past chunk n equals <dh_n, h_{n+1}> (the gradient of a virtual gate
applied to the state leaving the chunk), computed in-kernel as
exp(b_C) <dh_n, h_n> + sum_j k_j . dk_j^inter from tiles already loaded. A reverse cumsum over the
whole sequence would accumulate the rounding of every later token's (large, mostly cancelling)
q dq - k dk term; the chunk-local form keeps dg's bf16 error independent of T. Every exponent is <= 0: the
intra-chunk decay is masked (i >= j, and i inside the sequence) *before* ``exp2``, so no inf
ever meets a zero. Matmuls run ``tl.dot`` on the input dtype (bf16 / fp16 / fp32) with float32
accumulation; float32 inputs use ``input_precision="ieee"`` (exact, no TF32). The scanned states,
gates and decays are float32; ``o`` has v's dtype.

Kernels (the math step each computes, and its grid):

* ``_chunk_cumsum_kernel``     b = log2(e) * in-chunk cumsum of g, all heads at once; (NT, B).
* ``_pass_states_fwd_kernel``  each chunk's state contribution and the sequential scan over chunks;
  stores h [B*H, NT, K, V] (the state entering each chunk) and the final state; (NK, NV, B*H).
* ``_chunk_outputs_kernel``    O from h and the intra-chunk scores; (NV, NT, B*H).
* ``_pass_states_bwd_kernel``  the reverse scan of dS; stores dh [B*H, NT, K, V] (gradient of the
  state leaving each chunk) and d initial_state; (NK, NV, B*H).
* ``_chunk_dv_kernel``         dv; (NV, NT, B*H).
* ``_chunk_dqk_kernel``        dq, dk and each K block's part of the chunk-local gate gradient; (NK, NT, B*H).

The gate flag ``USE_G`` is a constexpr: ``linear_attn`` compiles the gate loads and exps out.
The backward recomputes h (one forward state pass) instead of keeping it alive from the forward; that
pass runs on a side CUDA stream beside the reverse pass and dv, which do not read h
(:mod:`linmix.ops.common.streams`; H200, T = 32768, B * H = 32, fwd+bwd: 3.58 -> 3.31 ms).

The scans carry their state in float32 registers; the materialised h and dh are stored in the
input dtype, which is the dtype every consumer casts them to before its ``tl.dot``: the same
rounding at the store instead of at the load, so results are identical to float32 storage and the
traffic of h and dh (the largest tensors here) is halved for 16-bit inputs. The final state and
d initial_state are float32.

Shapes: any K, V >= 1 (tiles of BK, BV = min(64, next power of two >= 16) with masked loads,
K and V looped in blocks, so head dims up to 256 and beyond work); any T (the last chunk is
masked, no host-side padding). Packed varlen (``cu_seqlens``) is run as a zero-padded
[N, T_max] batch through :class:`linmix.ops.common.varlen.Packing` and unpadded afterwards: a
known cost (a copy of q, k, v, g in and o out, and wasted work on the padding when lengths are
very uneven). ``causal=False`` runs the causal kernels forwards and on the time-reversed
sequence (as the PyTorch chunk form does). float64 inputs are delegated to the PyTorch chunk
form (Triton's float64 dots are not worth a kernel variant). The kernel chunk size is
``chunk_size`` (None: 64) rounded down to a power of two in [16, 128] (the result does not
depend on it), and shrunk to the next power of two >= T for short sequences.

Short sequences (decoding: average length <= 16 tokens without gradients, <= 4 with) take the fused
recurrent kernel of :mod:`linmix.ops.common.fused_recurrent` instead.

Plain pointer arithmetic only (no ``tl.make_block_ptr``): runs on Triton 3.6 and on current
Triton, including its interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
"""

import torch

from linmix.ops.common.custom_op import TritonOp
from linmix.ops.common.decay_chunk import _reverse_gate, decay_chunk
from linmix.ops.common.fused_recurrent import fused_recurrent, prefer_fused_recurrent
from linmix.ops.common.streams import Fork, on_side
from linmix.ops.common.triton_import import HAS_TRITON, tl, triton
from linmix.ops.common.triton_tiles import causal_decay, causal_decay_t, last_valid
from linmix.ops.common.utils import run_packed
from linmix.ops.common.varlen import max_seqlen
from linmix.ops.dispatch import register

__all__ = ["HAS_TRITON", "scalar_decay_chunk"]

# --------------------------------------------------------------------------------------------
# Gates: in-chunk cumulative sums (computed once, used by every kernel)
# --------------------------------------------------------------------------------------------

@triton.jit
def _chunk_cumsum_kernel(g, b, T, H: tl.constexpr, C: tl.constexpr, BH: tl.constexpr):
    """b[t] = log2(e) * sum_{s in t's chunk, s <= t} g[s], float32, for all heads of one chunk."""
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    o_c = tl.arange(0, C)
    o_h = tl.arange(0, BH)
    mask = ((i_t * C + o_c) < T)[:, None] & (o_h < H)[None, :]
    offs = ((i_b.to(tl.int64) * T + i_t * C) * H) + o_c[:, None] * H + o_h[None, :]
    x = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(b + offs, tl.cumsum(x, axis=0) * 1.4426950408889634, mask=mask)


# --------------------------------------------------------------------------------------------
# Forward: state pass and chunk outputs
# --------------------------------------------------------------------------------------------

@triton.jit
def _pass_states_fwd_kernel(k, v, b, h0, h, ht, T, NT,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                            USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
                            PREC: tl.constexpr):
    """Scan over chunks: store h_n (state entering chunk n), then h_{n+1} = exp(b_C) h_n + (K exp(b_C - b))^T V.

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

    # Pointers to the first chunk's tiles, advanced by one chunk per step (64-bit pointer arithmetic).
    row0 = i_b.to(tl.int64) * T * H + i_h  # (batch, token 0, head)
    p_kt = k + row0 * K + o_c[None, :] * (H * K) + o_k[:, None]  # [BK, C]: K^T
    p_v = v + row0 * V + o_c[:, None] * (H * V) + o_v[None, :]  # [C, BV]
    p_h = h + i_bh.to(tl.int64) * NT * K * V + kv_offs
    for i_t in range(NT):
        tl.store(p_h, state.to(p_h.dtype.element_ty), mask=m_kv)
        m_c = (i_t * C + o_c) < T
        kt = tl.load(p_kt, mask=m_k[:, None] & m_c[None, :], other=0.0)
        vt = tl.load(p_v, mask=m_c[:, None] & m_v[None, :], other=0.0)
        if USE_G:
            n_valid = tl.minimum(T - i_t * C, C)
            p_b = b + row0 + (i_t * C + o_c) * H
            b_t = tl.load(p_b, mask=m_c, other=0.0)
            b_last = last_valid(b_t, o_c, n_valid)  # b at the chunk's last token
            state *= tl.exp2(b_last)
            kt = (kt.to(tl.float32) * tl.exp2(b_last - b_t)[None, :]).to(vt.dtype)
        state = tl.dot(kt, vt, state, input_precision=PREC)
        p_kt += C * H * K
        p_v += C * H * V
        p_h += K * V
    if STORE_FINAL_STATE:
        tl.store(ht + i_bh.to(tl.int64) * K * V + kv_offs, state, mask=m_kv)


@triton.jit
def _chunk_outputs_kernel(q, k, v, b, h, o, scale, T, NT,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr):
    """O = scale * [exp(b) * (Q h_n) + ((Q K^T) o D) V] for one chunk and one V block (K looped)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    n_valid = tl.minimum(T - i_t * C, C)
    m_c = o_c < n_valid
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h  # (batch, first token of the chunk, head)
    p_h = h + (i_bh.to(tl.int64) * NT + i_t) * K * V

    acc_o = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        qt = tl.load(q + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
        kt = tl.load(k + row0 * K + o_c[None, :] * (H * K) + o_k[:, None], mask=m_k[:, None] & m_c[None, :], other=0.0)
        h_t = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        acc_o = tl.dot(qt, h_t.to(qt.dtype), acc_o, input_precision=PREC)
        scores = tl.dot(qt, kt, scores, input_precision=PREC)
    b_t = tl.zeros([C], dtype=tl.float32)
    if USE_G:
        b_t = tl.load(b + row0 + o_c * H, mask=m_c, other=0.0)
        acc_o *= tl.exp2(b_t)[:, None]
    scores = causal_decay(scores, b_t, o_c, n_valid, USE_G)
    vt = tl.load(v + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0)
    acc_o = tl.dot(scores.to(vt.dtype), vt, acc_o, input_precision=PREC)
    tl.store(o + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], (acc_o * scale).to(o.dtype.element_ty),
             mask=m_c[:, None] & m_v[None, :])


# --------------------------------------------------------------------------------------------
# Backward: reverse state pass and chunk gradients
# --------------------------------------------------------------------------------------------

@triton.jit
def _pass_states_bwd_kernel(q, b, do, dht, dh, dh0, scale, T, NT,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                            USE_FINAL_STATE_GRAD: tl.constexpr, STORE_INITIAL_STATE_GRAD: tl.constexpr,
                            PREC: tl.constexpr):
    """Reverse scan: store dh_n (gradient of the state leaving chunk n), then
    dh_{n-1} = exp(b_C) dh_n + scale * (Q exp(b))^T dO; what is left is d initial_state."""
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

    # Pointers to the last chunk's tiles, moved back by one chunk per step.
    row_last = (i_b.to(tl.int64) * T + (NT - 1) * C) * H + i_h
    p_qt = q + row_last * K + o_c[None, :] * (H * K) + o_k[:, None]  # [BK, C]: Q^T
    p_do = do + row_last * V + o_c[:, None] * (H * V) + o_v[None, :]  # [C, BV]
    p_dh = dh + (i_bh.to(tl.int64) * NT + NT - 1) * K * V + kv_offs
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tl.store(p_dh, dstate.to(p_dh.dtype.element_ty), mask=m_kv)
        m_c = (i_t * C + o_c) < T
        qt = tl.load(p_qt, mask=m_k[:, None] & m_c[None, :], other=0.0)
        d_o = tl.load(p_do, mask=m_c[:, None] & m_v[None, :], other=0.0)
        if USE_G:
            n_valid = tl.minimum(T - i_t * C, C)
            p_b = b + (i_b.to(tl.int64) * T + i_t * C + o_c) * H + i_h
            b_t = tl.load(p_b, mask=m_c, other=0.0)
            b_last = last_valid(b_t, o_c, n_valid)  # b at the chunk's last token
            dstate *= tl.exp2(b_last)
            qt = (qt.to(tl.float32) * tl.exp2(b_t)[None, :]).to(d_o.dtype)
        dstate += scale * tl.dot(qt, d_o, input_precision=PREC)
        p_qt -= C * H * K
        p_do -= C * H * V
        p_dh -= K * V
    if STORE_INITIAL_STATE_GRAD:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + kv_offs, dstate, mask=m_kv)


@triton.jit
def _chunk_dv_kernel(q, k, b, do, dh, dv, scale, T, NT,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr):
    """dv = exp(b_C - b) * (K dh_n) + scale * ((Q K^T) o D)^T dO for one chunk and V block (K looped)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    n_valid = tl.minimum(T - i_t * C, C)
    m_c = o_c < n_valid
    m_cv = m_c[:, None] & m_v[None, :]
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h
    p_dh = dh + (i_bh.to(tl.int64) * NT + i_t) * K * V

    acc_dv = tl.zeros([C, BV], dtype=tl.float32)
    scores_t = tl.zeros([C, C], dtype=tl.float32)  # (Q K^T)^T = K Q^T, by its own dot (triton_tiles: transposes)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        qt = tl.load(q + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
        kt = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_c[:, None] & m_k[None, :], other=0.0)
        dht = tl.load(p_dh + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        acc_dv = tl.dot(kt, dht.to(kt.dtype), acc_dv, input_precision=PREC)
        scores_t = tl.dot(kt, tl.trans(qt), scores_t, input_precision=PREC)
    b_t = tl.zeros([C], dtype=tl.float32)
    if USE_G:
        b_t = tl.load(b + row0 + o_c * H, mask=m_c, other=0.0)
        b_last = last_valid(b_t, o_c, n_valid)
        acc_dv *= tl.exp2(b_last - b_t)[:, None]
    scores_t = causal_decay_t(scores_t, b_t, o_c, n_valid, USE_G) * scale
    d_o = tl.load(do + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], mask=m_cv, other=0.0)
    acc_dv = tl.dot(scores_t.to(d_o.dtype), d_o, acc_dv, input_precision=PREC)
    tl.store(dv + row0 * V + o_c[:, None] * (H * V) + o_v[None, :], acc_dv.to(dv.dtype.element_ty), mask=m_cv)


@triton.jit
def _chunk_dqk_kernel(q, k, v, b, h, do, dh, dq, dk, dg_part, scale, T, NT,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr):
    """dq, dk for one chunk and K block (V looped), and sum over the block of q dq - k dk:

        dq = scale * [exp(b) * (dO h_n^T) + ((dO V^T) o D) K]
        dk = exp(b_C - b) * (V dh_n^T) + scale * ((dO V^T) o D)^T Q
    """
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_c = tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    n_valid = tl.minimum(T - i_t * C, C)
    m_c = o_c < n_valid
    m_ck = m_c[:, None] & m_k[None, :]
    row0 = (i_b.to(tl.int64) * T + i_t * C) * H + i_h
    state_base = (i_bh.to(tl.int64) * NT + i_t) * K * V

    acc_dq = tl.zeros([C, BK], dtype=tl.float32)
    acc_dk = tl.zeros([C, BK], dtype=tl.float32)
    dscores = tl.zeros([C, C], dtype=tl.float32)
    dh_dot_h = tl.zeros([BK], dtype=tl.float32)  # sum_V dh_n * h_n, for the gate gradient's boundary term
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
        dscores = tl.dot(d_o, tl.trans(vt), dscores, input_precision=PREC)
        if USE_G:
            dh_dot_h += tl.sum(dh_t.to(tl.float32) * h_t.to(tl.float32), axis=0)
    b_t = tl.zeros([C], dtype=tl.float32)
    if USE_G:
        b_t = tl.load(b + row0 + o_c * H, mask=m_c, other=0.0)
        b_last = last_valid(b_t, o_c, n_valid)
        acc_dq *= tl.exp2(b_t)[:, None]
        acc_dk *= tl.exp2(b_last - b_t)[:, None]
    dscores = causal_decay(dscores, b_t, o_c, n_valid, USE_G) * scale
    qt = tl.load(q + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0)
    kt = tl.load(k + row0 * K + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0)
    if USE_G:
        # This K block's part of <dh_n, h_{n+1}> (h_{n+1} = exp(b_C) h_n + (K exp(b_C - b))^T V), from data at hand:
        # exp(b_C) <dh_n, h_n> + sum_j k_j . dk_j^inter, with dk^inter = exp(b_C - b) (V dh_n^T) (acc_dk here).
        boundary = tl.exp2(b_last) * tl.sum(dh_dot_h) + tl.sum(kt.to(tl.float32) * acc_dk)
    acc_dq = tl.dot(dscores.to(kt.dtype), kt, acc_dq * scale, input_precision=PREC)
    acc_dk = tl.dot(tl.trans(dscores).to(qt.dtype), qt, acc_dk, input_precision=PREC)
    offs = row0 * K + o_c[:, None] * (H * K) + o_k[None, :]
    tl.store(dq + offs, acc_dq.to(dq.dtype.element_ty), mask=m_ck)
    tl.store(dk + offs, acc_dk.to(dk.dtype.element_ty), mask=m_ck)
    if USE_G:
        # Chunk-local gate gradient (this K block's part): dg_s = sum_{t >= s in chunk} (q dq - k dk) + boundary.
        part = tl.sum(qt.to(tl.float32) * acc_dq - kt.to(tl.float32) * acc_dk, axis=1)
        part = tl.where(m_c, part, 0.0)
        dg_c = tl.sum(part) - tl.cumsum(part, axis=0) + part + boundary
        tl.store(dg_part + (i_k.to(tl.int64) * tl.num_programs(2) + i_bh) * T + i_t * C + o_c, dg_c, mask=m_c)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _block(d: int) -> int:
    """Tile width for a head dim: the next power of two, at least 16 (tl.dot), at most 64."""
    return min(64, max(16, triton.next_power_of_2(d)))


DEFAULT_CHUNK_SIZE = 64


def _kernel_chunk_size(chunk_size: int | None, T: int) -> int:
    """``chunk_size`` (None: 64) rounded down to a power of two in [16, 128], no larger than T needs."""
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    c = min(128, max(16, 1 << (int(chunk_size).bit_length() - 1)))
    return min(c, max(16, triton.next_power_of_2(T)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is the default and unused for 16-bit inputs


class _Sizes:
    """Sizes and launch constants shared by all launches of one call."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, chunk_size: int):
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.C = chunk_size
        self.NT = triton.cdiv(self.T, self.C)
        self.BK, self.BV = _block(self.K), _block(self.V)
        self.NK, self.NV = triton.cdiv(self.K, self.BK), triton.cdiv(self.V, self.BV)
        self.prec = _precision(q.dtype)
        self.num_warps = 4

    def consts(self) -> dict:
        return dict(H=self.H, K=self.K, V=self.V, C=self.C, BK=self.BK, BV=self.BV, PREC=self.prec,
                    num_warps=self.num_warps)


def _chunk_cumsum(g: torch.Tensor, s: _Sizes) -> torch.Tensor:
    b = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    _chunk_cumsum_kernel[(s.NT, s.B)](g, b, s.T, H=s.H, C=s.C, BH=triton.next_power_of_2(s.H))
    return b


def _pass_states_fwd(k, v, b, initial_state, s: _Sizes, store_final: bool, fork: Fork | None = None):
    """(h, final state or None); with ``fork`` the scan runs on its side stream (the caller joins before
    reading h)."""
    h = k.new_empty(s.B * s.H, s.NT, s.K, s.V)  # input dtype: see the module docstring
    ht = k.new_empty(s.B, s.H, s.K, s.V, dtype=torch.float32) if store_final else None
    with on_side(fork):
        _pass_states_fwd_kernel[(s.NK, s.NV, s.B * s.H)](
            k, v, b, initial_state, h, ht, s.T, s.NT, USE_G=b is not None,
            USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=store_final, **s.consts())
    return h, ht


def _chunk_outputs(q, k, v, b, h, scale, s: _Sizes):
    o = torch.empty_like(v)
    _chunk_outputs_kernel[(s.NV, s.NT, s.B * s.H)](
        q, k, v, b, h, o, scale, s.T, s.NT, USE_G=b is not None, **s.consts())
    return o


def _pass_states_bwd(q, b, do, dht, scale, s: _Sizes, store_initial_grad: bool):
    dh = q.new_empty(s.B * s.H, s.NT, s.K, s.V)
    dh0 = q.new_empty(s.B, s.H, s.K, s.V, dtype=torch.float32) if store_initial_grad else None
    _pass_states_bwd_kernel[(s.NK, s.NV, s.B * s.H)](
        q, b, do, dht, dh, dh0, scale, s.T, s.NT, USE_G=b is not None, USE_FINAL_STATE_GRAD=dht is not None,
        STORE_INITIAL_STATE_GRAD=store_initial_grad, **s.consts())
    return dh, dh0


def _chunk_dv(q, k, b, do, dh, scale, s: _Sizes):
    dv = torch.empty_like(do)
    _chunk_dv_kernel[(s.NV, s.NT, s.B * s.H)](q, k, b, do, dh, dv, scale, s.T, s.NT, USE_G=b is not None,
                                              **s.consts())
    return dv


def _chunk_dqk(q, k, v, b, h, do, dh, scale, s: _Sizes):
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg_part = q.new_empty(s.NK, s.B, s.H, s.T, dtype=torch.float32) if b is not None else None
    _chunk_dqk_kernel[(s.NK, s.NT, s.B * s.H)](q, k, v, b, h, do, dh, dq, dk, dg_part, scale, s.T, s.NT,
                                               USE_G=b is not None, **s.consts())
    return dq, dk, dg_part


# --------------------------------------------------------------------------------------------
# Forward / backward, registered as torch.library custom ops (opaque to torch.compile)
# --------------------------------------------------------------------------------------------

def _forward(q, k, v, g, initial_state, scale, output_final_state, chunk_size):
    """(o, final state or None) of the causal chunked scalar-decay attention on a dense batch; g None: no decay."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    s = _Sizes(q, v, chunk_size)
    b = None if g is None else _chunk_cumsum(g.contiguous(), s)
    h, ht = _pass_states_fwd(k, v, b, h0, s, store_final=output_final_state)
    return _chunk_outputs(q, k, v, b, h, scale, s), ht


def _fake_forward(q, k, v, g, initial_state, scale, output_final_state, chunk_size):
    B, _, H, K = q.shape
    ht = q.new_empty(B, H, K, v.shape[-1], dtype=torch.float32) if output_final_state else None
    return torch.empty_like(v), ht


def _backward(inputs, saved, grads, consts, needs):
    """Gradients of (q, k, v, g, initial_state) given those of (o, final state)."""
    q, k, v, g, h0 = (inputs[n] for n in ("q", "k", "v", "g", "initial_state"))
    do, dht = grads
    scale = consts["scale"]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    s = _Sizes(q, v, consts["chunk_size"])
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = None if dht is None else dht.float().contiguous()
    h0f = None if h0 is None else h0.float().contiguous()
    b = None if g is None else _chunk_cumsum(g.contiguous(), s)
    # Recompute the chunk states rather than keeping [B, H, NT, K, V] alive between passes, on a side stream
    # beside the reverse scan and dv, which do not read them (linmix.ops.common.streams); joined before dq / dk.
    fork = Fork(q)
    h, _ = _pass_states_fwd(k, v, b, h0f, s, store_final=False, fork=fork)
    dh, dh0 = _pass_states_bwd(q, b, do, dht, scale, s, store_initial_grad=needs[4])
    dv = _chunk_dv(q, k, b, do, dh, scale, s)
    fork.join()
    dq, dk, dg_part = _chunk_dqk(q, k, v, b, h, do, dh, scale, s)
    dg = None
    if b is not None and needs[3]:
        # Chunk-local (see the module docstring), summed over the K blocks: [NK, B, H, T] -> [B, T, H].
        dg = dg_part.sum(0).transpose(1, 2).to(g.dtype).contiguous()
    if dh0 is not None:
        dh0 = dh0.to(h0.dtype)
    return dq, dk, dv, dg, dh0


if HAS_TRITON:
    # One opaque op for torch.compile (see linmix.ops.common.custom_op), used in eager mode too.
    scalar_decay_op = TritonOp(
        "scalar_decay_chunk",
        "Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? initial_state, float scale, bool output_final_state, "
        "int chunk_size", 2, forward=_forward, backward=_backward, fake_forward=_fake_forward)


def _causal(q, k, v, g, *, scale, initial_state, output_final_state, chunk_size):
    o, ht = scalar_decay_op(q=q, k=k, v=v, g=g, initial_state=initial_state, scale=float(scale),
                            output_final_state=output_final_state, chunk_size=chunk_size)
    return o, ht


def _bidirectional(q, k, v, g, *, scale, initial_state, output_final_state, chunk_size):
    """causal=False: the forward scan plus the scan of the reversed sequence, minus the diagonal both count."""
    kw = dict(scale=scale, initial_state=None, output_final_state=False, chunk_size=chunk_size)
    o_fwd, _ = _causal(q, k, v, g, **kw)
    o_bwd, _ = _causal(q.flip(1), k.flip(1), v.flip(1), _reverse_gate(g), **kw)
    diag = scale * (q.float() * k.float()).sum(-1, keepdim=True) * v.float()
    return (o_fwd.float() + o_bwd.flip(1).float() - diag).to(v.dtype), None


def scalar_decay_chunk(q, k, v, g, *, scale, initial_state=None, output_final_state=False, cu_seqlens=None,
                       causal=True, chunk_size=None):
    """The Triton implementation behind ``simple_gla`` (g [B, T, H]) and ``linear_attn`` (g None).

    Inputs are assumed validated by the public op. See the module docstring for the math and limits.
    """
    if prefer_fused_recurrent(q, cu_seqlens, k, v, g, initial_state, causal=causal):
        return fused_recurrent(q, k, v, g=g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens, validate=False)
    if q.dtype == torch.float64:  # no float64 kernels: the PyTorch chunk form is exact there
        return decay_chunk(q, k, v, g, gate=None if g is None else "scalar", scale=scale,
                           initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens, causal=causal, chunk_size=chunk_size)
    T_max = max_seqlen(q.shape[1], cu_seqlens)
    fn = _causal if causal else _bidirectional
    return run_packed(fn, cu_seqlens, (q, k, v, g), scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=_kernel_chunk_size(chunk_size, T_max))


if HAS_TRITON:
    @register("simple_gla", "triton")
    def simple_gla_triton(q, k, v, g, **kwargs):
        return scalar_decay_chunk(q, k, v, g, **kwargs)

    @register("linear_attn", "triton")
    def linear_attn_triton(q, k, v, **kwargs):
        return scalar_decay_chunk(q, k, v, None, **kwargs)
