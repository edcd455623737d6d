"""Fused recurrent Triton kernels: every recurrence family, token by token, for decoding.

One kernel module for the four families of ``linmix.ops`` (per head, state S in R^{K x V},
a_t the decay, o_t = S_t^T (scale * q_t)):

    linear_attn   S_t = S_{t-1} + k_t v_t^T                                     (no gate)
    simple_gla    S_t = exp(g_t) S_{t-1} + k_t v_t^T                            (g [B, T, H])
    gla           S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_t^T                     (gk [B, T, H, K])
    delta_rule    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T   (beta, optional g)

The delta step is computed as S' = a_t S_{t-1}, u_t = beta_t (v_t - S'^T k_t), S_t = S' + k_t u_t^T.

Each program owns one V block of one (sequence, head): a [K, BV] float32 state in registers (the
whole K, which the delta rule's S^T k needs), read once from ``initial_state``, carried through
the sequence's tokens and written once. Decoding (T = 1) is bound by that state traffic, so the
blocks are narrow (BV = 16 at K = 128, down to 8 for small batches) for many small programs. Gates are log-decays scaled by
log2(e) and applied with ``exp2``; every exponent is <= 0. Constexpr flags select the family, so
each family compiles to a lean kernel. The grid is one-dimensional (no 65,535 limit on N * H).
Packed varlen is native: each program walks its own sequence's tokens (``cu_seqlens``, B = 1),
with no padding copies; zero-length sequences pass their initial state through.

Backward (registered with the forward as a torch.library custom op, see
:mod:`linmix.ops.common.custom_op`), one kernel for every family. The gate gradient needs
the decayed state a_t S_{t-1} and the state gradient G_t at the same step, and neither can be
carried the other way without dividing by a decay (nor can the delta rule's state, whose
transition I - beta k k^T is singular at beta |k|^2 = 1). So the backward re-runs the forward
kernel storing the state entering every token (a float32 workspace of B * T * H * K * V: a few
states for decoding-sized T; train long sequences with the chunked kernels), then one reverse
pass per (sequence, head, V block) carries G_t, the gradient w.r.t. S_t, from the final-state
gradient. With S' = a_t S_{t-1} and du = G_t^T k_t (the gradient w.r.t. u_t):

    dq_t = scale S_t do_t,   G_t += scale q_t do_t^T
    decay families:   dv_t = du,   dk_t = G_t v_t,   dS' = G_t
    delta rule:       dv_t = beta_t du,   dbeta_t = du . (v_t - S'^T k_t),   dS' = G_t - beta_t k_t du^T,
                      dk_t = G_t u_t - beta_t S' du
    dg_t = sum(S' o dS') (over K and V for a scalar gate, over V for gk),   G_{t-1} = Diag(a_t) dS'

and G_0 is the gradient w.r.t. the initial state. Every gradient is formed directly, without
the telescoping identity dg_s = sum_{t >= s} (q dq - k dk) of the chunk kernels, whose
cancellation loses the small gate gradients of strongly decaying gates (a first version of this
kernel used it: up to 2e-3 relative error against float64 at log-decays near -20, where the
direct form stays at 3e-7, as accurate as the float32 reference).

Gradients summed over V (dq, dk, dg, dbeta) are stored per V block and added up in PyTorch
(deterministic; no atomics). Inputs q, k, v may be float16 / bfloat16 / float32 (loaded and
computed in float32); gates and beta any float dtype; states are float32; o has v's dtype.
float64 inputs are delegated to the family's PyTorch chunk form. Plain pointer arithmetic only
(no ``tl.make_block_ptr``): runs on Triton 3.6 and current Triton, and in its interpreter
(``TRITON_INTERPRET=1``) on CPU tensors.
"""

from __future__ import annotations

import functools

import torch

from linmix.ops.common.checks import check_beta, check_log_gate, check_recurrent_op, check_shape
from linmix.ops.common.custom_op import TritonOp
from linmix.ops.common.triton_import import HAS_TRITON, tl, triton
from linmix.ops.dispatch import resolve, triton_interpreted

__all__ = ["HAS_TRITON", "decode_benchmark", "fused_recurrent"]

NO_GATE, SCALAR_GATE, VECTOR_GATE = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Shared in-kernel pieces
# --------------------------------------------------------------------------------------------

@triton.jit
def _sequence_bounds(cu_seqlens, i_n, T, VARLEN: tl.constexpr):
    """First and one-past-last token row of sequence i_n in the flattened [B * T] token axis (int64)."""
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _log2_decay(gate, t, i_h, o_k, m_k, H: tl.constexpr, K: tl.constexpr, GATE: tl.constexpr):
    """log2 of the decay of token row t: a scalar (GATE 1) or a [BK] vector (GATE 2)."""
    if GATE == 1:
        log_a = tl.load(gate + t * H + i_h).to(tl.float32)
    else:
        log_a = tl.load(gate + (t * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    return log_a * 1.4426950408889634


@triton.jit
def _apply_decay(x, log2_a, GATE: tl.constexpr):
    """Diag(a) x for a [BK, BV] block and a scalar (GATE 1) or per-row (GATE 2) decay given as log2(a)."""
    if GATE == 1:
        x = x * tl.exp2(log2_a)
    else:
        x = x * tl.exp2(log2_a)[:, None]
    return x


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fused_recurrent_fwd_kernel(q, k, v, gate, beta, h0, o, ht, states, cu_seqlens, scale, T,
                                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                                GATE: tl.constexpr, DELTA: tl.constexpr, VARLEN: tl.constexpr,
                                USE_INITIAL_STATE: tl.constexpr, STORE_OUTPUT: tl.constexpr,
                                STORE_FINAL_STATE: tl.constexpr, STORE_STATES: tl.constexpr):
    """One (sequence, head, V block): S_t = a_t S_{t-1} + k_t u_t^T token by token, o_t = scale S_t^T q_t.

    u_t = v_t, or beta_t (v_t - (a_t S_{t-1})^T k_t) for the delta rule. STORE_STATES (for the
    backward) also stores S_{t-1}, the state entering token t, at row t of ``states`` [B * T, H, K, V].
    """
    pid = tl.program_id(0)
    i_nh, i_v = pid // NV, pid % NV
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_offs = o_k[:, None] * V + o_v[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        state += tl.load(h0 + i_nh.to(tl.int64) * K * V + kv_offs, mask=m_kv, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        row = t * H + i_h
        if STORE_STATES:
            tl.store(states + row * K * V + kv_offs, state, mask=m_kv)
        k_t = tl.load(k + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        u_t = tl.load(v + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if GATE != 0:
            state = _apply_decay(state, _log2_decay(gate, t, i_h, o_k, m_k, H, K, GATE), GATE)
        if DELTA:
            beta_t = tl.load(beta + row).to(tl.float32)
            u_t = beta_t * (u_t - tl.sum(state * k_t[:, None], axis=0))
        state += k_t[:, None] * u_t[None, :]
        if STORE_OUTPUT:
            q_t = tl.load(q + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
            o_t = tl.sum(state * q_t[:, None], axis=0) * scale
            tl.store(o + row * V + o_v, o_t.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + kv_offs, state, mask=m_kv)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fused_recurrent_bwd_kernel(q, k, v, gate, beta, states, ht, do, dht, dq_part, dk_part, dv, dg_part, dbeta_part,
                                dh0, cu_seqlens, scale, T, NTOK, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
                                GATE: tl.constexpr, DELTA: tl.constexpr, VARLEN: tl.constexpr,
                                USE_FINAL_STATE_GRAD: tl.constexpr, STORE_INITIAL_STATE_GRAD: tl.constexpr):
    """Gradients for one (sequence, head, V block): a reverse pass over the stored states.

    ``states`` row t holds S_{t-1} (the state entering token t), ``ht`` the final state; dstate
    carries G_t. The gradients summed over V are stored per V block i_v: dq_part[i_v],
    dk_part[i_v] ([NV, NTOK, H, K], NTOK = B * T), dg_part[i_v] ([NV, NTOK, H] or
    [NV, NTOK, H, K]), dbeta_part[i_v] ([NV, NTOK, H]); dv and d initial_state are complete.
    """
    pid = tl.program_id(0)
    i_nh, i_v = pid // NV, pid % NV
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _sequence_bounds(cu_seqlens, i_n, T, VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_offs = o_k[:, None] * V + o_v[None, :]
    part_k = i_v.to(tl.int64) * NTOK * H * K  # this V block's [NTOK, H, K] slice of the partials
    part_h = i_v.to(tl.int64) * NTOK * H  # and of the [NTOK, H] ones

    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRAD:
        dstate += tl.load(dht + i_nh.to(tl.int64) * K * V + kv_offs, mask=m_kv, other=0.0).to(tl.float32)
    state_after = tl.load(ht + i_nh.to(tl.int64) * K * V + kv_offs, mask=m_kv, other=0.0)  # S_t
    for i_r in range(0, eos - bos):
        t = eos - 1 - i_r
        row = t * H + i_h
        q_t = tl.load(q + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        k_t = tl.load(k + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        v_t = tl.load(v + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        do_t = tl.load(do + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        state_before = tl.load(states + row * K * V + kv_offs, mask=m_kv, other=0.0)  # S_{t-1}
        tl.store(dq_part + part_k + row * K + o_k, tl.sum(state_after * do_t[None, :], axis=1) * scale, mask=m_k)
        dstate += (q_t * scale)[:, None] * do_t[None, :]  # G_t
        if GATE != 0:
            log2_a = _log2_decay(gate, t, i_h, o_k, m_k, H, K, GATE)
            decayed = _apply_decay(state_before, log2_a, GATE)  # S' = a_t S_{t-1}
        else:
            decayed = state_before
        du = tl.sum(dstate * k_t[:, None], axis=0)  # G_t^T k_t: the gradient w.r.t. u_t
        if DELTA:
            beta_t = tl.load(beta + row).to(tl.float32)
            residual = v_t - tl.sum(decayed * k_t[:, None], axis=0)  # v_t - S'^T k_t
            tl.store(dv + row * V + o_v, (beta_t * du).to(dv.dtype.element_ty), mask=m_v)
            tl.store(dbeta_part + part_h + row, tl.sum(du * residual))
            dw = -beta_t * du  # the gradient w.r.t. S'^T k_t
            dk_t = tl.sum(dstate * (beta_t * residual)[None, :], axis=1) + tl.sum(decayed * dw[None, :], axis=1)
            dstate += k_t[:, None] * dw[None, :]  # dS'
        else:
            tl.store(dv + row * V + o_v, du.to(dv.dtype.element_ty), mask=m_v)
            dk_t = tl.sum(dstate * v_t[None, :], axis=1)
        tl.store(dk_part + part_k + row * K + o_k, dk_t, mask=m_k)
        if GATE == 1:
            tl.store(dg_part + part_h + row, tl.sum(decayed * dstate))
        elif GATE == 2:
            tl.store(dg_part + part_k + row * K + o_k, tl.sum(decayed * dstate, axis=1), mask=m_k)
        if GATE != 0:
            dstate = _apply_decay(dstate, log2_a, GATE)  # dS_{t-1} = a_t dS'
        state_after = state_before
    if STORE_INITIAL_STATE_GRAD:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + kv_offs, dstate, mask=m_kv)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


STATE_BLOCK_FLOATS = 2048  # the [BK, BV] state block: one warp's registers at 64 per thread
MIN_BLOCK_V = 8


@functools.lru_cache(maxsize=1024)
def _launch_shape(K: int, V: int, NH: int, sms: int, backward: bool) -> tuple[int, int, int, int]:
    """(BK, BV, NV, num_warps) for head dims K, V and NH (sequence, head) pairs on ``sms`` SMs (0: unknown).

    Decoding is bound by the state's traffic: narrow V blocks give many small programs whose
    [BK, BV] block fits a warp's registers (BV = 16 at K = 128). Where that still gives too few
    programs to fill the GPU (small batches), the blocks get narrower, down to 8.
    """
    BK = _next_power_of_2(K)
    bv = max(MIN_BLOCK_V, STATE_BLOCK_FLOATS // BK)
    while bv > MIN_BLOCK_V and -(-V // bv) * NH < 4 * sms:
        bv //= 2
    BV = min(_next_power_of_2(V), _next_power_of_2(bv))
    floats_per_warp = 1024 if backward else 2048  # the backward keeps about four [BK, BV] blocks alive
    return BK, BV, -(-V // BV), max(1, min(4, BK * BV // floats_per_warp))


class _Launch:
    """Sizes, block widths and flags shared by the launches of one call."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, gate_kind: int,
                 delta: bool, block_v: int | None = None, num_warps: int | None = None, backward: bool = False):
        B, T, H, K = q.shape
        V = v.shape[-1]
        self.T, self.H, self.K, self.V = T, H, K, V
        self.N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        self.NTOK = B * T
        sms = _num_sms(q.device.index or 0) if q.is_cuda else 0
        self.BK, self.BV, self.NV, self.num_warps = _launch_shape(K, V, self.N * H, sms, backward)
        if block_v is not None:  # tuning overrides
            self.BV = min(_next_power_of_2(V), _next_power_of_2(block_v))
            self.NV = -(-V // self.BV)
        self.num_warps = num_warps or self.num_warps
        self.grid = (self.N * H * self.NV,)
        self.gate_kind, self.delta = gate_kind, delta
        self.varlen = cu_seqlens is not None

    def consts(self) -> dict:
        return dict(H=self.H, K=self.K, V=self.V, BK=self.BK, BV=self.BV, NV=self.NV, GATE=self.gate_kind,
                    VARLEN=self.varlen, num_warps=self.num_warps)


def _forward(q, k, v, gate, beta, h0, cu_seqlens, scale, lc: _Launch, *, store_output=True,
             final_state=None, states=None):
    """Launch the forward kernel; o (or None), written into ``final_state`` / ``states`` when given."""
    o = torch.empty_like(v) if store_output else None
    _fused_recurrent_fwd_kernel[lc.grid](
        q, k, v, gate, beta, h0, o, final_state, states, cu_seqlens, scale, lc.T, DELTA=lc.delta,
        USE_INITIAL_STATE=h0 is not None, STORE_OUTPUT=store_output, STORE_FINAL_STATE=final_state is not None,
        STORE_STATES=states is not None, **lc.consts())
    return o


def _sum_parts(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (part[0] if part.shape[0] == 1 else part.sum(0)).to(dtype)


def _backward(q, k, v, gate, beta, h0, cu_seqlens, scale, gate_kind, do, dht, need_dh0):
    """All gradients: (dq, dk, dv, d gate, dbeta, d initial_state); None where there is no such input."""
    lc = _Launch(q, v, cu_seqlens, gate_kind, beta is not None, backward=True)
    f32 = dict(dtype=torch.float32, device=q.device)
    # Re-run the forward, storing the state entering every token and the final state.
    states = torch.empty(lc.NTOK, lc.H, lc.K, lc.V, **f32)
    ht = torch.empty(lc.N, lc.H, lc.K, lc.V, **f32)
    _forward(q, k, v, gate, beta, h0, cu_seqlens, scale, lc, store_output=False, final_state=ht, states=states)
    dq_part = torch.empty(lc.NV, *q.shape, **f32)
    dk_part = torch.empty(lc.NV, *k.shape, **f32)
    dg_part = None if gate is None else torch.empty(lc.NV, *gate.shape, **f32)
    dbeta_part = None if beta is None else torch.empty(lc.NV, *beta.shape, **f32)
    dv = torch.empty_like(v)
    dh0 = torch.empty(lc.N, lc.H, lc.K, lc.V, **f32) if need_dh0 else None
    _fused_recurrent_bwd_kernel[lc.grid](
        q, k, v, gate, beta, states, ht, do, dht, dq_part, dk_part, dv, dg_part, dbeta_part, dh0, cu_seqlens, scale,
        lc.T, lc.NTOK, DELTA=lc.delta, USE_FINAL_STATE_GRAD=dht is not None, STORE_INITIAL_STATE_GRAD=need_dh0,
        **lc.consts())
    dq, dk = _sum_parts(dq_part, q.dtype), _sum_parts(dk_part, k.dtype)
    dg = None if gate is None else _sum_parts(dg_part, gate.dtype)
    dbeta = None if beta is None else _sum_parts(dbeta_part, beta.dtype)
    return dq, dk, dv, dg, dbeta, dh0


# --------------------------------------------------------------------------------------------
# Autograd and the public function
# --------------------------------------------------------------------------------------------

def _op_forward(q, k, v, gate, beta, initial_state, cu_seqlens, scale, gate_kind, output_final_state):
    h0 = None if initial_state is None else initial_state.float().contiguous()
    return _fused_forward(q, k, v, gate, beta, h0, cu_seqlens, scale, gate_kind,
                          output_final_state=output_final_state)


def _op_fake_forward(q, k, v, gate, beta, initial_state, cu_seqlens, scale, gate_kind, output_final_state):
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    ht = q.new_empty(N, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32) if output_final_state else None
    return torch.empty_like(v), ht


def _op_backward(inputs, saved, grads, consts, needs):
    q, k, v, gate, beta, h0, cu_seqlens = (inputs[n] for n in ("q", "k", "v", "gate", "beta", "initial_state",
                                                                "cu_seqlens"))
    do, dht = grads
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dht = None if dht is None else dht.float().contiguous()
    h0f = None if h0 is None else h0.float().contiguous()
    need_dh0 = h0 is not None and needs[5]
    dq, dk, dv, dg, dbeta, dh0 = _backward(q, k, v, gate, beta, h0f, cu_seqlens, consts["scale"],
                                           consts["gate_kind"], do, dht, need_dh0)
    if dh0 is not None:
        dh0 = dh0.to(h0.dtype)
    return dq, dk, dv, dg, dbeta, dh0, None


if HAS_TRITON:
    # Opaque to torch.compile, a plain autograd.Function in eager mode (linmix.ops.common.custom_op).
    fused_recurrent_op = TritonOp(
        "fused_recurrent",
        "Tensor q, Tensor k, Tensor v, Tensor? gate, Tensor? beta, Tensor? initial_state, Tensor? cu_seqlens, "
        "float scale, int gate_kind, bool output_final_state", 2,
        forward=_op_forward, backward=_op_backward, fake_forward=_op_fake_forward)


def _fused_forward(q, k, v, gate, beta, h0, cu_seqlens, scale, gate_kind, *, output_final_state=False,
                   out_state=None, block_v=None, num_warps=None):
    """The forward launch on contiguous inputs (h0 float32 or None): (o, final state or None)."""
    lc = _Launch(q, v, cu_seqlens, gate_kind, beta is not None, block_v=block_v, num_warps=num_warps)
    final_state = out_state
    if final_state is None and output_final_state:
        final_state = q.new_empty(lc.N, lc.H, lc.K, lc.V, dtype=torch.float32)
    o = _forward(q, k, v, gate, beta, h0, cu_seqlens, scale, lc, final_state=final_state)
    return o, final_state


def _family(g, gk, beta) -> tuple[str, int]:
    """The op family selected by the gate arguments, and its gate kind."""
    if g is not None and gk is not None:
        raise ValueError("fused_recurrent: pass at most one of g (scalar log-decay [B, T, H]) and gk (vector "
                         "log-decay [B, T, H, K]), got both")
    if beta is not None:
        if gk is not None:
            raise ValueError("fused_recurrent: the delta rule (beta given) takes a scalar log-decay g [B, T, H]; "
                             "a vector log-decay gk [B, T, H, K] is not supported with beta")
        return "delta_rule", SCALAR_GATE if g is not None else NO_GATE
    if gk is not None:
        return "gla", VECTOR_GATE
    if g is not None:
        return "simple_gla", SCALAR_GATE
    return "linear_attn", NO_GATE


def _validate(q, k, v, g, gk, beta, scale, initial_state, output_final_state, cu_seqlens, out_state) -> float:
    """The op contract's checks (see linmix.ops.common.checks); returns the scale."""
    B, T, H, K, V, scale = check_recurrent_op(
        "fused_recurrent", q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=None, g=g, gk=gk, beta=beta, out_state=out_state)
    if g is not None:
        check_log_gate("fused_recurrent", "g", g, "BTH", [B, T, H])
    if gk is not None:
        check_log_gate("fused_recurrent", "gk", gk, "BTHK", [B, T, H, K])
    if beta is not None:
        check_beta("fused_recurrent", beta, [B, T, H])
    if out_state is not None:
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        check_shape("fused_recurrent", "out_state", out_state, "NHKV", [N, H, K, V])
        if out_state.dtype != torch.float32 or not out_state.is_contiguous():
            raise ValueError(f"fused_recurrent: out_state must be a contiguous float32 tensor [N={N}, H={H}, K={K}, "
                             f"V={V}], got dtype {out_state.dtype}, contiguous={out_state.is_contiguous()}")
    return scale


def fused_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                    gk: torch.Tensor | None = None, beta: torch.Tensor | None = None, scale: float | None = None,
                    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                    cu_seqlens: torch.Tensor | None = None, out_state: torch.Tensor | None = None,
                    validate: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Token-by-token recurrence of any linmix family in one fused Triton kernel (decoding, small T).

    The arguments select the family (per head, S in R^{K x V}, o_t = S_t^T (scale * q_t)):

    ========================  ================================================================
    (no gate)                 ``linear_attn``: S_t = S_{t-1} + k_t v_t^T
    ``g``                     ``simple_gla``: S_t = exp(g_t) S_{t-1} + k_t v_t^T
    ``gk``                    ``gla``: S_t = Diag(exp(gk_t)) S_{t-1} + k_t v_t^T
    ``beta`` (and ``g``)      ``delta_rule``: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    ========================  ================================================================

    Cost: one read and one write of the float32 state plus the tokens' q, k, v, o; the tokens of
    a sequence are processed one after another, so it is the fast path for decoding and short
    chunks (the chunked kernels win for long sequences). Differentiable: the decay families have
    a recurrent backward without extra memory; the delta rule's backward re-runs the forward and
    stores the state before every token (a float32 workspace of T x H x K x V per sequence), so
    train on long sequences with the chunked backends.

    Args:
        q, k: [B, T, H, K] (delta rule: keys L2-normalised over K); v: [B, T, H, V]. One dtype,
            float16 / bfloat16 / float32 (float64 runs the family's PyTorch chunk form).
        g: None or [B, T, H] log-decay <= 0 (simple_gla; the delta rule's optional decay).
        gk: None or [B, T, H, K] log-decay <= 0 (gla). Not together with ``g`` or ``beta``.
        beta: None or [B, T, H] delta-rule step sizes in [0, 2]; selects the delta rule.
        scale: multiplies q; default K ** -0.5.
        initial_state: [N, H, K, V] state before the first token (N = B, or the number of
            sequences with ``cu_seqlens``); any float dtype, used as float32.
        output_final_state: also return the [N, H, K, V] float32 state after the last token.
        cu_seqlens: int32/int64 [N + 1] offsets of sequences packed along T (then B must be 1);
            each sequence is run on its own, without padding.
        out_state: optional contiguous float32 [N, H, K, V] tensor the final state is written into
            (it may be ``initial_state`` itself: an in-place update of a decoding cache); it is
            returned as the final state. Inference only: not with inputs that require grad.
        validate: check shapes, dtypes, devices (and, on CPU or in debug mode, gate and
            ``cu_seqlens`` values). ``False`` skips them, for callers that validated already (the
            ops' backends: a decode step is short enough for the checks' host time to matter).

    Returns:
        (o [B, T, H, V] in v's dtype, final state [N, H, K, V] float32 or None).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from linmix.ops.common.fused_recurrent import fused_recurrent
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1
        >>> q, v = torch.randn(3, 1, 2, 16, device=dev), torch.randn(3, 1, 2, 8, device=dev)
        >>> k = F.normalize(torch.randn(3, 1, 2, 16, device=dev), dim=-1)
        >>> beta, state = torch.rand(3, 1, 2, device=dev), torch.randn(3, 2, 16, 8, device=dev)
        >>> o, state = fused_recurrent(q, k, v, beta=beta, initial_state=state, out_state=state)
        >>> o.shape, state.shape
        (torch.Size([3, 1, 2, 8]), torch.Size([3, 2, 16, 8]))
    """
    op, gate_kind = _family(g, gk, beta)
    if validate:
        scale = _validate(q, k, v, g, gk, beta, scale, initial_state, output_final_state, cu_seqlens, out_state)
    elif scale is None:
        scale = q.shape[-1] ** -0.5
    inputs = (q, k, v, g, gk, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if out_state is not None:
        if needs_grad:
            raise ValueError("fused_recurrent: out_state (writing the final state in place) is for inference; "
                             "inputs require grad here: use output_final_state=True instead")
    gate = g if gk is None else gk
    if q.dtype == torch.float64:  # no float64 kernels: the family's PyTorch chunk form is exact there
        gates = (beta, g) if beta is not None else (() if gate is None else (gate,))
        o, final_state = resolve(op, "torch", q.device)(
            q, k, v, *gates, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state or out_state is not None, cu_seqlens=cu_seqlens)
        if out_state is not None:
            final_state = out_state.copy_(final_state)
        return o, final_state
    if not HAS_TRITON:
        raise RuntimeError("fused_recurrent needs the triton package")
    if not q.is_cuda and not triton_interpreted():
        raise ValueError(f"fused_recurrent: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                         f"interpreter), got tensors on {q.device}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gate = None if gate is None else gate.contiguous()
    beta = None if beta is None else beta.contiguous()
    if needs_grad or torch.compiler.is_compiling():
        o, ht = fused_recurrent_op(q=q, k=k, v=v, gate=gate, beta=beta, initial_state=initial_state,
                                   cu_seqlens=cu_seqlens, scale=float(scale), gate_kind=gate_kind,
                                   output_final_state=output_final_state)
        return o, ht
    h0 = None if initial_state is None else initial_state.float().contiguous()
    return _fused_forward(q, k, v, gate, beta, h0, cu_seqlens, scale, gate_kind,
                          output_final_state=output_final_state, out_state=out_state)


# Average tokens per sequence up to which the "triton" backends run the fused recurrence instead of
# the chunk kernels. Measured on the H200 (B = 64, H = 16, K = V = 128, bf16; `benchmarks/gpu.py
# crossover`, BENCHMARKS.md): without gradients the fused kernel wins up to T = 16 (simple_gla 91 vs
# 93 us at 16, 159 vs 75 us at 32; gla 112 vs 136 us at 16); with gradients (fwd+bwd) up to T = 4
# (simple_gla 615 vs 755 us; at 16: 1300 vs 826 us) -- its backward stores a float32 state per token.
FUSED_MAX_TOKENS_INFERENCE = 16
FUSED_MAX_TOKENS_TRAINING = 4


def prefer_fused_recurrent(q: torch.Tensor, cu_seqlens: torch.Tensor | None, *tensors: torch.Tensor | None,
                           causal: bool = True) -> bool:
    """Whether a call of a "triton" backend should take the fused recurrent path (short sequences).

    ``tensors``: the call's other differentiable inputs (whether any requires grad picks the bound).
    No device synchronisation: the average length is T * B / N.
    """
    if not causal:
        return False
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    avg = q.shape[0] * q.shape[1] / max(N, 1)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, *tensors))
    return avg <= (FUSED_MAX_TOKENS_TRAINING if needs_grad else FUSED_MAX_TOKENS_INFERENCE)


# --------------------------------------------------------------------------------------------
# Decode microbenchmark (run on a GPU; the lead's benchmark scripts call it)
# --------------------------------------------------------------------------------------------

FAMILIES = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")


def decode_benchmark(batch_size: int = 64, num_heads: int = 16, head_dim: int = 128, num_tokens: int = 1,
                     dtype: torch.dtype = torch.bfloat16, families: tuple[str, ...] = FAMILIES,
                     block_v: int | None = None, num_warps: int | None = None, in_place: bool = False,
                     through_api: bool = False) -> dict[str, float]:
    """Median microseconds of one decode step per family (``triton.testing.do_bench``), and the floor.

    q, k, v in ``dtype`` [B, num_tokens, H, head_dim], a float32 initial state [B, H, K, V] in and
    the final state out (a new tensor, or written in place with ``in_place``). ``floor`` is the
    time to read and write the state and move q, k, v, o once at 4.2 TB/s (H200). ``block_v`` and
    ``num_warps`` override the launch heuristic (for tuning sweeps). ``through_api`` times the
    public :func:`fused_recurrent` (``validate=False``, as the ops' backends call it) instead of
    the bare launch, so the host's per-call time shows where it exceeds the kernel's. Needs CUDA.

    Example (on a GPU; ~1 s per family):
        python -c "from linmix.ops.common.fused_recurrent import decode_benchmark; print(decode_benchmark())"
    """
    B, T, H, D = batch_size, num_tokens, num_heads, head_dim
    dev = "cuda"
    q = torch.randn(B, T, H, D, device=dev, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=dev, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=dev))
    gk = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D, device=dev))
    beta = torch.rand(B, T, H, device=dev)
    state = torch.randn(B, H, D, D, device=dev)
    gates = {"linear_attn": (None, NO_GATE, None), "simple_gla": (g, SCALAR_GATE, None),
             "gla": (gk, VECTOR_GATE, None), "delta_rule": (None, NO_GATE, beta),
             "gated_delta_rule": (g, SCALAR_GATE, beta)}
    scale = D ** -0.5
    times = {}
    for family in families:
        gate, gate_kind, b = gates[family]

        def step():
            out_state = state if in_place else None
            if through_api:
                kw = {"gk" if gate_kind == VECTOR_GATE else "g": gate}
                return fused_recurrent(q, k, v, beta=b, scale=scale, initial_state=state, output_final_state=True,
                                       out_state=out_state, validate=False, **kw)
            return _fused_forward(q, k, v, gate, b, state, None, scale, gate_kind, output_final_state=True,
                                  out_state=out_state, block_v=block_v, num_warps=num_warps)

        times[family] = 1e3 * triton.testing.do_bench(step, return_mode="median")
    state_bytes = 2 * B * H * D * D * 4
    io_bytes = 4 * B * T * H * D * q.element_size()
    times["floor"] = (state_bytes + io_bytes) / 4.2e12 * 1e6
    return times
