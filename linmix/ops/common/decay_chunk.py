"""Chunkwise-parallel PyTorch form of the decayed linear recurrences (KERNELS.md sections 1-2).

Shared by ``linear_attn`` (no gate), ``simple_gla`` (scalar gate g [B, T, H]) and ``gla``
(vector gate g [B, T, H, K]). Per head, with chunks of C tokens and b_i the cumulative log-gate
inside a chunk (non-increasing), the state S_0 entering the chunk and q already scaled:

    O   = (Q * exp(b)) S_0 + ((Q K^T) o D) V,      D_ij = exp(b_i - b_j)  (i >= j, else 0)
    S_C = exp(b_C) S_0 + (K * exp(b_C - b))^T V

Every exponent is <= 0: no decay is ever divided by. For a vector gate D is per key dimension;
the intra-chunk scores use secondary sub-chunks of 8: between sub-blocks J < I the product
factors through the last position r of J, (q_i * exp(b_i - b_r)) . (k_j * exp(b_r - b_j)), both
exponents <= 0; the 8 x 8 diagonal sub-blocks are computed elementwise. The elementwise part is
memory-bound on the CPU, so the vector gate uses chunks of 32 by default (measured fastest at
T = 8192 among C in {16, 32, 64} x sub-chunks in {8, 16}). The chunk states are
then scanned (``pass_states``). Everything is differentiable by autograd.
"""

from __future__ import annotations

import torch

from linmix.ops.common.utils import compute_dtype, from_chunks, pass_states, run_packed, to_chunks, upcast

SUB_CHUNK = 8           # secondary sub-chunk of the vector gate's intra-chunk scores
DEFAULT_CHUNK = {None: 64, "scalar": 64, "vector": 32}


def _tril(C: int, device: torch.device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(diagonal)


def _vector_gate_intra(q, k, v, b):
    """Intra-chunk output sum_{j<=i} (sum_k q_ik k_jk exp(b_ik - b_jk)) v_j.

    q, k, b: [B, H, N, C, K]; v: [B, H, N, C, V]. Returns [B, H, N, C, V].
    """
    C, K = q.shape[-2:]
    s = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    nb = C // s
    lead = q.shape[:-2]
    qb, kb, bb, vb = (x.reshape(*lead, nb, s, x.shape[-1]) for x in (q, k, b, v))
    # Diagonal sub-blocks, elementwise: [.., nb, s, s, K]; mask before exp (upper part would overflow).
    diff = bb[..., :, None, :] - bb[..., None, :, :]
    diff = diff.masked_fill(~_tril(s, q.device)[..., None], float("-inf"))
    A_diag = (qb[..., :, None, :] * kb[..., None, :, :] * torch.exp(diff)).sum(-1)
    o = (A_diag @ vb).reshape(*lead, C, v.shape[-1])
    if nb == 1:
        return o
    # Off-diagonal sub-blocks through the last position r of block J: [.., nb(J), C, K].
    b_r = bb[..., -1, :]  # [.., nb, K]
    q_r = q[..., None, :, :] * torch.exp((b[..., None, :, :] - b_r[..., :, None, :]).clamp(max=0))
    k_r = kb * torch.exp(b_r[..., :, None, :] - bb)  # [.., nb, s, K]
    A_off = (q_r @ k_r.transpose(-1, -2)).movedim(-3, -2).reshape(*lead, C, C)  # rows i, cols (J, j)
    blocks = torch.arange(C, device=q.device) // s
    A_off = A_off.masked_fill(~(blocks[:, None] > blocks[None, :]), 0.0)
    return o + A_off @ v


class _GateGradFromQK(torch.autograd.Function):
    """Identity on (q, k) whose backward gives the log-gate its gradient from dq and dk.

    Raising g_s by eps scales every contribution that crosses step s by e^eps, which is the same
    as scaling q_t (t >= s) by e^eps, k_j (j >= s) by e^-eps and the final state by e^eps. Hence
    (KERNELS.md section 1) dg_s = sum_{t >= s} (q_t . dq_t - k_t . dk_t) + <dS_T, S_T>, per key
    dimension for a vector gate. The intra-chunk decay factors are then constants for autograd,
    which skips differentiating the [C, C(, K)] decay tensors.
    """

    @staticmethod
    def forward(ctx, q, k, g):
        ctx.save_for_backward(q, k)
        ctx.scalar = g.dim() == 3
        return q.view_as(q), k.view_as(k)

    @staticmethod
    def backward(ctx, dq, dk):
        q, k = ctx.saved_tensors
        dq = torch.zeros_like(q) if dq is None else dq
        dk = torch.zeros_like(k) if dk is None else dk
        d = q * dq - k * dk
        if ctx.scalar:
            d = d.sum(-1)
        return dq, dk, d.flip(1).cumsum(1).flip(1)


class _GateGradFromState(torch.autograd.Function):
    """Identity on the final state whose backward adds <dS_T, S_T> to every step's gate gradient."""

    @staticmethod
    def forward(ctx, S, g):
        ctx.save_for_backward(S)
        ctx.g_shape = g.shape
        return S.view_as(S)

    @staticmethod
    def backward(ctx, dS):
        (S,) = ctx.saved_tensors
        term = (dS * S).sum(-1)  # [B, H, K]
        if len(ctx.g_shape) == 3:
            term = term.sum(-1)
        return dS, term.unsqueeze(1).expand(ctx.g_shape)


def chunk_decay_fwd(q, k, v, g, *, gate, scale, initial_state, output_final_state, chunk_size):
    """Causal chunked forward on a dense batch. Inputs already in the compute dtype."""
    T = q.shape[1]
    g_in = g
    if g is not None and g.requires_grad and torch.is_grad_enabled():
        q, k = _GateGradFromQK.apply(q, k, g)
        g = g.detach()
    C = min(chunk_size or DEFAULT_CHUNK[gate], -(-T // SUB_CHUNK) * SUB_CHUNK)
    qc, kc, vc = to_chunks(q * scale, C), to_chunks(k, C), to_chunks(v, C)
    tril = _tril(C, q.device)
    if gate is None:
        o = ((qc @ kc.transpose(-1, -2)).masked_fill(~tril, 0.0)) @ vc
        q_in, k_out, decay = qc, kc, None
    elif gate == "scalar":
        b = to_chunks(g, C).cumsum(-1)  # [B, H, N, C]
        D = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~tril, float("-inf")))
        o = ((qc @ kc.transpose(-1, -2)) * D) @ vc
        b_last = b[..., -1:]
        q_in = qc * torch.exp(b)[..., None]
        k_out = kc * torch.exp(b_last - b)[..., None]
        decay = torch.exp(b_last)[..., None]  # [B, H, N, 1, 1]
    else:
        b = to_chunks(g, C).cumsum(-2)  # [B, H, N, C, K]
        o = _vector_gate_intra(qc, kc, vc, b)
        b_last = b[..., -1:, :]
        q_in = qc * torch.exp(b)
        k_out = kc * torch.exp(b_last - b)
        decay = torch.exp(b_last).transpose(-1, -2)  # [B, H, N, K, 1]
    S_in, S_final = pass_states(k_out.transpose(-1, -2) @ vc, decay, initial_state)
    o = o + q_in @ S_in
    if not output_final_state:
        return from_chunks(o, T), None
    if g is not g_in:
        S_final = _GateGradFromState.apply(S_final, g_in)
    return from_chunks(o, T), S_final


def _reverse_gate(g):
    """Gates of the time-reversed scan: step t' of the reversed sequence decays by g_{T-t'}."""
    if g is None:
        return None
    g = g.flip(1)
    return torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)


def _bidirectional_fwd(q, k, v, g, *, gate, scale, initial_state, output_final_state, chunk_size):
    kw = dict(gate=gate, scale=scale, initial_state=None, output_final_state=False, chunk_size=chunk_size)
    o_fwd, _ = chunk_decay_fwd(q, k, v, g, **kw)
    o_bwd, _ = chunk_decay_fwd(q.flip(1), k.flip(1), v.flip(1), _reverse_gate(g), **kw)
    diag = scale * (q * k).sum(-1, keepdim=True) * v  # counted by both scans
    return o_fwd + o_bwd.flip(1) - diag, None


def decay_chunk(q, k, v, g, *, gate, scale, initial_state=None, output_final_state=False,
                cu_seqlens=None, causal=True, chunk_size=None):
    """Chunked implementation behind linear_attn / simple_gla / gla (``gate`` None|scalar|vector)."""
    out_dtype = v.dtype
    q, k, v, g, initial_state = upcast(compute_dtype(q), q, k, v, g, initial_state)
    fn = chunk_decay_fwd if causal else _bidirectional_fwd
    o, S = run_packed(fn, cu_seqlens, (q, k, v, g), gate=gate, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size)
    return o.to(out_dtype), S
