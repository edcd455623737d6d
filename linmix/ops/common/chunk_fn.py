"""One autograd Function for the causal chunk form of ``linear_attn`` / ``simple_gla`` / ``gla``.

The math is KERNELS.md sections 1-2 (see ``decay_chunk``); this module only organises it for the
CPU:

- layout: chunks are handled time-major, [N, B*H, C, K], so that a run of consecutive chunks of
  all heads is one contiguous [n * B * H, C, K] batch of matrices for ``bmm``;
- slices: forward and backward walk over runs of chunks of about ``SLICE_TOKENS`` positions (all
  heads together), copying the run's inputs into that layout (and the results back) and doing
  everything for it (intra-chunk scores, state contributions, the state scan, outputs) while its
  data is in cache. Temporaries live in a ``Workspace`` whose buffers are bounded by the slice
  size and, on the CPU, kept between calls (fresh multi-MB allocations cost page faults);
- a hand-written backward: the intra-chunk scores A ([C, C] per chunk), the scalar gate's decay
  matrix D and the chunk states are saved; every exp factor is recomputed; the reverse state
  recursion dS_prev = exp(b_C) dS + (Q * exp(b))^T dO runs in the same slices, in reverse;
- the log-gate's gradient from dq and dk (section 1): dg_s = sum_{t >= s} (q_t . dq_t - k_t . dk_t)
  + <dS_T, S_T> (per key dimension for a vector gate), accumulated slice by slice in reverse,
  so the decay factors are never differentiated.

Every exponent is <= 0: no decay is ever divided by.
"""

from __future__ import annotations

import torch

from linmix.ops.common.gla_intra import scores, scores_bwd
from linmix.ops.common.utils import Workspace, chunk_slice, unchunk_slice

SLICE_TOKENS = 4096  # positions (all heads together) per slice of consecutive chunks


def chunk_runs(N: int, BH: int, C: int, device: torch.device) -> list[tuple[int, int]]:
    """Runs [n0, n1) of chunks of about SLICE_TOKENS positions; one run off the CPU (no cache to fit)."""
    step = max(1, SLICE_TOKENS // (BH * C)) if device.type == "cpu" else N
    return [(n, min(n + step, N)) for n in range(0, N, step)]


def inter_factors(gate, b, ws):
    """exp(b), exp(b_C - b) and the chunk decay exp(b_C) shaped for the state [.., K, V]."""
    if gate is None:
        return None, None, None
    b_last = b[:, -1:]
    if gate == "scalar":  # b: [m, C]
        m, C = b.shape
        eb = torch.exp(b, out=ws.get("eb", m, C))[..., None]
        ek = torch.exp(torch.sub(b_last, b, out=ws.get("ek", m, C)), out=ws.get("ek", m, C))[..., None]
        return eb, ek, torch.exp(b_last)[..., None]
    m, C, K = b.shape  # b: [m, C, K]
    eb = torch.exp(b, out=ws.get("eb", m, C, K))
    ek = ws.get("ek", m, C, K)
    torch.exp(torch.sub(b_last, b, out=ek), out=ek)
    return eb, ek, torch.exp(b_last).transpose(-1, -2)


def load_chunks(q, k, v, g, gate, scale, C, n0, n1, ws):
    """The time-major chunks n0..n1 of q (times scale), k, v, and the in-chunk cumulative gate b."""
    K, V = q.shape[-1], v.shape[-1]
    m = (n1 - n0) * q.shape[0] * q.shape[2]
    q_ = chunk_slice(q, C, n0, n1, ws.get("q", m, C, K), scale)
    k_ = chunk_slice(k, C, n0, n1, ws.get("k", m, C, K))
    v_ = chunk_slice(v, C, n0, n1, ws.get("v", m, C, V))
    g_ = b_ = None
    if gate == "scalar":
        g_ = chunk_slice(g, C, n0, n1, ws.get("g", m, C))
        b_ = torch.cumsum(g_, -1, out=ws.get("b", m, C))
    elif gate == "vector":
        g_ = chunk_slice(g, C, n0, n1, ws.get("g", m, C, K))
        b_ = torch.cumsum(g_, -2, out=ws.get("b", m, C, K))
    return q_, k_, v_, g_, b_


class ChunkDecayFn(torch.autograd.Function):
    """(o, S_T) of the causal chunk form on a dense batch; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, gate, scale, C, s):
        ctx.set_materialize_grads(False)
        B, T, H, K = q.shape
        V = v.shape[-1]
        BH, N = B * H, -(-T // C)
        M = N * BH
        ws = Workspace(q)
        A = q.new_zeros(M, C, C) if gate == "vector" else q.new_empty(M, C, C)
        D = q.new_empty(M, C, C) if gate == "scalar" else None
        states = q.new_empty(N + 1, BH, K, V)  # states[n]: entering chunk n; states[N]: final
        if h0 is None:
            states[0].zero_()
        else:
            states[0].copy_(h0.reshape(BH, K, V))
        o = q.new_empty(B, T, H, V)
        for n0, n1 in chunk_runs(N, BH, C, q.device):
            ns = n1 - n0
            m = ns * BH
            sl = slice(n0 * BH, n1 * BH)
            q_, k_, v_, g_, b_ = load_chunks(q, k, v, g, gate, scale, C, n0, n1, ws)
            A_ = A[sl]
            if gate == "vector":
                scores(q_, k_, b_, torch.exp(g_, out=g_), s, A_)
            else:
                torch.bmm(q_, k_.transpose(-1, -2), out=A_)
                if gate is None:
                    A_.tril_()  # (tril_: ~10x faster than masked_fill_ with a broadcast mask)
                else:
                    D_ = D[sl]
                    torch.sub(b_[:, :, None], b_[:, None, :], out=D_)
                    D_.tril_().exp_().tril_()  # exp of <= 0 only (upper part: exp(0), then 0)
                    A_.mul_(D_)
            o_ = torch.bmm(A_, v_, out=ws.get("o", m, C, V))
            eb, ek, dec = inter_factors(gate, b_, ws)
            q_in = q_ if eb is None else q_.mul_(eb)
            k_out = k_ if ek is None else k_.mul_(ek)
            E = torch.bmm(k_out.transpose(-1, -2), v_, out=ws.get("E", m, K, V)).view(ns, BH, K, V)
            st, Es = states[n0:n1 + 1].unbind(0), E.unbind(0)  # unbind: no indexing op per step
            decs = None if dec is None else dec.view(ns, BH, *dec.shape[1:]).unbind(0)
            for i in range(ns):
                if decs is None:
                    torch.add(st[i], Es[i], out=st[i + 1])
                else:
                    torch.addcmul(Es[i], st[i], decs[i], out=st[i + 1])
            o_.baddbmm_(q_in, states[n0:n1].view(-1, K, V))
            unchunk_slice(o_, o, n0)
        ctx.save_for_backward(q, k, v, g, A, D, states)
        ctx.meta = (gate, scale, C, s, h0 is not None)
        return o, states[N].view(B, H, K, V).clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        q, k, v, g, A, D, states = ctx.saved_tensors
        gate, scale, C, s, has_h0 = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        BH, N = B * H, -(-T // C)
        ws = Workspace(q)
        if do is None:
            do = v.new_zeros(v.shape)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        need_g = gate is not None and ctx.needs_input_grad[3]
        if need_g:
            dg = torch.empty_like(g)
            rev = torch.ones(C, C, dtype=q.dtype, device=q.device).triu()  # rev[i, j] = [j >= i]
            if dS_T is None:
                carry = q.new_zeros((BH,) if gate == "scalar" else (BH, K))
            else:  # <dS_T, S_T> enters every step's gate gradient
                carry = (dS_T.reshape(BH, K, V) * states[N]).sum(-1)
                if gate == "scalar":
                    carry = carry.sum(-1)
        G = q.new_zeros(BH, K, V) if dS_T is None else dS_T.reshape(BH, K, V)
        for n0, n1 in reversed(chunk_runs(N, BH, C, q.device)):
            ns = n1 - n0
            m = ns * BH
            sl = slice(n0 * BH, n1 * BH)
            q_, k_, v_, g_, b_ = load_chunks(q, k, v, g, gate, scale, C, n0, n1, ws)
            do_ = chunk_slice(do, C, n0, n1, ws.get("do", m, C, V))
            eb, ek, dec = inter_factors(gate, b_, ws)
            q_in = q_ if eb is None else torch.mul(q_, eb, out=ws.get("q_in", m, C, K))
            k_out = k_ if ek is None else torch.mul(k_, ek, out=ws.get("k_out", m, C, K))
            # reverse state recursion: Gs[i] = gradient of the state leaving chunk n0 + i
            Fq = torch.bmm(q_in.transpose(-1, -2), do_, out=ws.get("F", m, K, V)).view(ns, BH, K, V)
            Gs = ws.get("Gs", ns + 1, BH, K, V)
            Gs[ns] = G
            gs, fs = Gs.unbind(0), Fq.unbind(0)
            decs = None if dec is None else dec.view(ns, BH, *dec.shape[1:]).unbind(0)
            for i in reversed(range(ns)):
                if decs is None:
                    torch.add(gs[i + 1], fs[i], out=gs[i])
                else:
                    torch.addcmul(fs[i], gs[i + 1], decs[i], out=gs[i])
            G = Gs[0].clone()
            dS = Gs[1:].view(m, K, V)
            dq_ = torch.bmm(do_, states[n0:n1].view(-1, K, V).transpose(-1, -2), out=ws.get("dq", m, C, K))
            dk_ = torch.bmm(v_, dS.transpose(-1, -2), out=ws.get("dk", m, C, K))
            dv_ = torch.bmm(k_out, dS, out=ws.get("dv", m, C, V))
            if eb is not None:
                dq_.mul_(eb)
                dk_.mul_(ek)
            # intra-chunk part
            A_ = A[sl]
            dA = torch.bmm(do_, v_.transpose(-1, -2), out=ws.get("dA", m, C, C))
            dv_.baddbmm_(A_.transpose(-1, -2), do_)
            if gate == "vector":
                scores_bwd(dA, q_, k_, b_, torch.exp(g_), s, dq_, dk_)
            else:
                if gate is None:
                    dA.tril_()
                else:
                    dA.mul_(D[sl])
                dq_.baddbmm_(dA, k_)
                dk_.baddbmm_(dA.transpose(-1, -2), q_)
            if need_g:
                d = torch.mul(q_, dq_, out=ws.get("d", m, C, K))
                d.addcmul_(k_, dk_, value=-1.0)
                if gate == "scalar":
                    rc = d.sum(-1) @ rev.T  # [m, C]: reverse cumsum inside each chunk
                    tot = rc[:, 0].view(ns, BH)
                else:
                    rc = torch.matmul(rev, d)  # [m, C, K]
                    tot = rc[:, 0].view(ns, BH, K)
                after = tot.flip(0).cumsum(0).flip(0) - tot + carry  # sum over later chunks
                carry = carry + tot.sum(0)
                if gate == "scalar":
                    rc.view(ns, BH, C).add_(after[..., None])
                else:
                    rc.view(ns, BH, C, K).add_(after[:, :, None, :])
                unchunk_slice(rc, dg, n0)
            unchunk_slice(dq_, dq, n0, scale)
            unchunk_slice(dk_, dk, n0)
            unchunk_slice(dv_, dv, n0)
        dh0 = G.reshape(B, H, K, V) if has_h0 else None
        return dq, dk, dv, (dg if need_g else None), dh0, None, None, None, None
