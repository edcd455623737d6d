"""Chunked PyTorch form of ``delta_rule`` in the WY / UT-transform form (KERNELS.md section 3).

Per head, with chunks of C tokens, b_t the cumulative log-gate inside a chunk (zeros without a
gate; non-increasing), q already scaled and S_0 the state entering the chunk, the pseudo-values
U solve the unit lower-triangular system

    (I + L) U = diag(beta) V - diag(beta) (K * exp(b)) S_0,
    L = strictly_lower(diag(beta) ((K K^T) o Gamma)),   Gamma_ti = exp(b_t - b_i),

so with T = (I + L)^{-1} (one batched triangular solve against the identity, for every chunk at
once), W = T diag(beta) (K * exp(b)) and U~ = T diag(beta) V:

    U   = U~ - W S_0
    S_C = exp(b_C) S_0 + (K * exp(b_C - b))^T U
    O   = (Q * exp(b)) S_0 + ((Q K^T) o D) U,      D_ij = exp(b_i - b_j)  (i >= j, else 0)

Everything except the state recursion is batched over chunks and heads; the recursion (two small
matmuls per chunk) runs over slices of consecutive chunks, handled time-major ([N, B*H, C, K]) so
that a slice is one contiguous batch, with scratch buffers reused across slices and calls (see
``linmix.ops.common.chunk_fn``). Every exponent is <= 0: no decay is ever divided by, and the
masked upper parts are set to -inf before the exp. T is zero-padded to whole chunks: a padded step
has beta = 0, k = 0 and g = 0, i.e. an identity transition, so the final state is exact.

The backward is written by hand (``DeltaRuleFn``), differentiating the steps above in reverse:

    dU  = D'^T dO + K_out dS_C              (D' = (Q K^T) o D, K_out = K * exp(b_C - b))
    dS_0 = (Q * exp(b))^T dO + exp(b_C) dS_C - W^T dU           (the reverse recursion)
    dX2 = T^T dU,   dX1 = T^T dW = -dX2 S_0^T,   dL = -strictly_lower(dX1 W^T + dX2 U~^T) = -strictly_lower(dX2 U^T)

with X1 = diag(beta) K exp(b), X2 = diag(beta) V, plus the direct terms. The gate's gradient comes
from an identity like the one of ``simple_gla`` (raising g_s by eps equals scaling q_t by e^eps and
v_t by e^-eps for t >= s, and the final state by e^eps):

    dg_s = sum_{t >= s} (q_t . dq_t - v_t . dv_t) + <dS_T, S_T>,

so the decay factors are constants and are never differentiated.
"""

from __future__ import annotations

import torch

from linmix.ops.common.chunk_fn import chunk_runs, inter_factors, load_chunks
from linmix.ops.common.utils import Workspace, chunk_slice, compute_dtype, run_packed, unchunk_slice, upcast
from linmix.ops.dispatch import register

SUB_CHUNK = 16
DEFAULT_CHUNK = 64


def _gate_factors(b, ws):
    """For b [m, C]: D (exp(b_i - b_j), i >= j, else 0), exp(b), exp(b_C - b) [m, C, 1], exp(b_C) [m, 1, 1]."""
    m, C = b.shape
    D = torch.sub(b[:, :, None], b[:, None, :], out=ws.get("D", m, C, C))
    D.tril_().exp_().tril_()  # exp of <= 0 only (upper part: exp(0), then 0); tril_ beats masked_fill_
    return (D, *inter_factors("scalar", b, ws))


def _load(q, k, v, beta, g, scale, C, n0, n1, ws):
    """The time-major chunks n0..n1 of q (times scale), k, v, beta [m, C, 1] and the in-chunk cumsum of g."""
    q_, k_, v_, _, b_ = load_chunks(q, k, v, g, None if g is None else "scalar", scale, C, n0, n1, ws)
    be = chunk_slice(beta, C, n0, n1, ws.get("beta", q_.shape[0], C))[..., None]
    return q_, k_, v_, be, b_


class DeltaRuleFn(torch.autograd.Function):
    """(o, S_T) of the chunked delta rule on a dense batch; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, h0, scale, C):
        ctx.set_materialize_grads(False)
        B, T, H, K = q.shape
        V = v.shape[-1]
        BH, N = B * H, -(-T // C)
        M = N * BH
        ws = Workspace(q)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        Ts = []  # per slice: T = (I + L)^{-1} [m, C, C] (column-major, as LAPACK returns it)
        Aqk = q.new_empty(M, C, C)   # (Q K^T) o D
        KKD = q.new_empty(M, C, C)   # (K K^T) o Gamma (its strictly lower part is L / beta)
        W = q.new_empty(M, C, K)
        U = q.new_empty(M, C, V)
        o = q.new_empty(B, T, H, V)
        states = q.new_empty(N + 1, BH, K, V)  # states[n]: entering chunk n; states[N]: final
        if h0 is None:
            states[0].zero_()
        else:
            states[0].copy_(h0.reshape(BH, K, V))
        for n0, n1 in chunk_runs(N, BH, C, q.device):
            ns = n1 - n0
            m = ns * BH
            sl = slice(n0 * BH, n1 * BH)
            q_, k_, v_, be, b_ = _load(q, k, v, beta, g, scale, C, n0, n1, ws)
            kk, A_ = KKD[sl], Aqk[sl]
            torch.bmm(k_, k_.transpose(-1, -2), out=kk)
            torch.bmm(q_, k_.transpose(-1, -2), out=A_)
            X1 = ws.get("X1", m, C, K)  # diag(beta) K exp(b)
            if b_ is None:
                A_.tril_()
                torch.mul(k_, be, out=X1)
                q_in, k_out, dec = q_, k_, None
            else:
                D, eb, ek, dec = _gate_factors(b_, ws)
                kk.mul_(D)
                A_.mul_(D)
                torch.mul(k_, eb, out=X1).mul_(be)
                q_in, k_out = q_.mul_(eb), k_.mul_(ek)
            # T = (I + L)^{-1}; with unitriangular=True the diagonal of L is ignored (taken as 1)
            # (no out=: the solver works column-major and would transpose into a row-major out)
            Lb = torch.mul(kk, be, out=ws.get("L", m, C, C))
            T_ = torch.linalg.solve_triangular(Lb, eye.expand_as(kk), upper=False, unitriangular=True)
            Ts.append(T_)
            W_, U_ = W[sl], U[sl]
            torch.bmm(T_, X1, out=W_)
            torch.bmm(T_, v_.mul_(be), out=U_)  # U~, turned into U = U~ - W S_0 in the loop
            W4, U4 = W_.view(ns, BH, C, K), U_.view(ns, BH, C, V)
            # unbind once: no indexing op per step
            st, Ws, Us = states[n0:n1 + 1].unbind(0), W4.unbind(0), U4.unbind(0)
            koT = k_out.view(ns, BH, C, K).transpose(-1, -2).unbind(0)
            decs = None if dec is None else dec.view(ns, BH, 1, 1).unbind(0)
            for i in range(ns):
                Us[i].baddbmm_(Ws[i], st[i], alpha=-1.0)  # U~ - W S
                if decs is None:
                    torch.baddbmm(st[i], koT[i], Us[i], out=st[i + 1])
                else:
                    torch.mul(st[i], decs[i], out=st[i + 1]).baddbmm_(koT[i], Us[i])
            o_ = torch.bmm(A_, U_, out=ws.get("o", m, C, V))
            o_.baddbmm_(q_in, states[n0:n1].view(-1, K, V))
            unchunk_slice(o_, o, n0)
        ctx.save_for_backward(q, k, v, beta, g, Aqk, KKD, W, U, states, *Ts)
        ctx.meta = (scale, C, h0 is not None)
        return o, states[N].view(B, H, K, V).clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        q, k, v, beta, g, Aqk, KKD, W, U, states, *Ts = ctx.saved_tensors
        scale, C, has_h0 = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        BH, N = B * H, -(-T // C)
        ws = Workspace(q)
        if do is None:
            do = v.new_zeros(v.shape)
        dq, dk, dv, dbeta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
        need_g = g is not None and ctx.needs_input_grad[4]
        if need_g:
            dg = torch.empty_like(g)
            rev = torch.ones(C, C, dtype=q.dtype, device=q.device).tril()  # d @ rev: reverse cumsum
            if dS_T is None:
                carry = q.new_zeros(BH)
            else:  # <dS_T, S_T> enters every step's gate gradient
                carry = (dS_T.reshape(BH, K, V) * states[N]).sum((-1, -2))
        G = q.new_zeros(BH, K, V) if dS_T is None else dS_T.reshape(BH, K, V).clone()
        for (n0, n1), T_ in reversed(list(zip(chunk_runs(N, BH, C, q.device), Ts))):
            ns = n1 - n0
            m = ns * BH
            sl = slice(n0 * BH, n1 * BH)
            q_, k_, v_, be, b_ = _load(q, k, v, beta, g, scale, C, n0, n1, ws)
            do_ = chunk_slice(do, C, n0, n1, ws.get("do", m, C, V))
            A_, kk, W_, U_ = Aqk[sl], KKD[sl], W[sl], U[sl]
            if b_ is None:
                D = dec = None
                q_in, k_out = q_, k_
            else:
                D, eb, ek, dec = _gate_factors(b_, ws)
                q_in = torch.mul(q_, eb, out=ws.get("q_in", m, C, K))
                k_out = torch.mul(k_, ek, out=ws.get("k_out", m, C, K))
            # reverse recursion over the slice's chunks
            dU = torch.bmm(A_.transpose(-1, -2), do_, out=ws.get("dU", m, C, V))  # + K_out dS_C in the loop
            Fq = torch.bmm(q_in.transpose(-1, -2), do_, out=ws.get("F", m, K, V)).view(ns, BH, K, V)
            Gs = ws.get("Gs", ns + 1, BH, K, V)  # Gs[i + 1]: gradient of the state leaving chunk n0 + i
            Gs[ns] = G
            gs, fs, dUs = Gs.unbind(0), Fq.unbind(0), dU.view(ns, BH, C, V).unbind(0)
            WT = W_.view(ns, BH, C, K).transpose(-1, -2).unbind(0)
            ko = k_out.view(ns, BH, C, K).unbind(0)
            decs = None if dec is None else dec.view(ns, BH, 1, 1).unbind(0)
            for i in reversed(range(ns)):
                dUs[i].baddbmm_(ko[i], gs[i + 1])
                if decs is None:
                    torch.add(fs[i], gs[i + 1], out=gs[i])
                else:
                    torch.addcmul(fs[i], gs[i + 1], decs[i], out=gs[i])
                gs[i].baddbmm_(WT[i], dUs[i], alpha=-1.0)
            G = Gs[0].clone()
            dSC = Gs[1:].view(m, K, V)
            S_in = states[n0:n1].view(m, K, V)
            # direct terms
            dq_ = torch.bmm(do_, S_in.transpose(-1, -2), out=ws.get("dq", m, C, K))  # d(q_in)
            dk_out = torch.bmm(U_, dSC.transpose(-1, -2), out=ws.get("dk_out", m, C, K))
            dA = torch.bmm(do_, U_.transpose(-1, -2), out=ws.get("dA", m, C, C))
            dA.tril_() if D is None else dA.mul_(D)
            # through T = (I + L)^{-1}: [W, U~] = T [X1, X2], and dW = -dU S_0^T, so
            # dX2 = T^T dU, dX1 = T^T dW = -dX2 S_0^T, dL = -(dX1 W^T + dX2 U~^T) = -dX2 U^T
            dX2 = torch.bmm(T_.transpose(-1, -2), dU, out=ws.get("dX2", m, C, V))
            dX1 = torch.bmm(dX2, S_in.transpose(-1, -2), out=ws.get("dX1", m, C, K)).neg_()
            dL = torch.bmm(dX2, U_.transpose(-1, -2), out=ws.get("dL", m, C, C)).neg_().tril_(-1)
            k_w = k_ if b_ is None else torch.mul(k_, eb, out=ws.get("k_w", m, C, K))
            db = torch.linalg.vecdot(dX1, k_w, out=ws.get("db", m, C))
            db.add_(torch.linalg.vecdot(dX2, v_)).add_(torch.linalg.vecdot(dL, kk))
            unchunk_slice(db, dbeta, n0)
            dP = dL.mul_(be)
            if D is not None:
                dP.mul_(D)
            dP = torch.add(dP, dP.transpose(-1, -2), out=ws.get("dP", m, C, C))
            # assemble
            dk_ = torch.bmm(dP, k_, out=ws.get("dk", m, C, K))
            dk_.baddbmm_(dA.transpose(-1, -2), q_)
            dv_ = torch.mul(dX2, be, out=ws.get("dv", m, C, V))
            if D is not None:
                dq_.mul_(eb)
                dk_out.mul_(ek)
                be = be * eb
            dq_.baddbmm_(dA, k_)
            dk_.add_(dk_out).addcmul_(dX1, be)
            if need_g:
                d = torch.linalg.vecdot(q_, dq_, out=ws.get("d", m, C))
                d.sub_(torch.linalg.vecdot(v_, dv_))
                rc = d @ rev  # [m, C]: reverse cumsum inside each chunk
                tot = rc[:, 0].view(ns, BH)
                after = tot.flip(0).cumsum(0).flip(0) - tot + carry  # sum over later chunks
                carry = carry + tot.sum(0)
                rc.view(ns, BH, C).add_(after[..., None])
                unchunk_slice(rc, dg, n0)
            unchunk_slice(dq_, dq, n0, scale)
            unchunk_slice(dk_, dk, n0)
            unchunk_slice(dv_, dv, n0)
        dh0 = G.reshape(B, H, K, V) if has_h0 else None
        return dq, dk, dv, dbeta, (dg if need_g else None), dh0, None, None


def chunk_delta_rule_fwd(q, k, v, beta, g, *, scale, initial_state, output_final_state, chunk_size):
    """Causal chunked forward on a dense batch. Inputs already in the compute dtype."""
    T = q.shape[1]
    C = min(chunk_size or DEFAULT_CHUNK, -(-T // SUB_CHUNK) * SUB_CHUNK)
    o, S = DeltaRuleFn.apply(q, k, v, beta, g, initial_state, scale, C)
    return o, (S if output_final_state else None)


@register("delta_rule", "torch")
def delta_rule_chunk(q, k, v, beta, g=None, *, scale, initial_state=None, output_final_state=False,
                     cu_seqlens=None, chunk_size=None):
    """Chunked implementation of :func:`linmix.ops.delta_rule.delta_rule`."""
    out_dtype = v.dtype
    q, k, v, beta, g, initial_state = upcast(compute_dtype(q), q, k, v, beta, g, initial_state)
    o, S = run_packed(chunk_delta_rule_fwd, cu_seqlens, (q, k, v, beta, g), scale=scale,
                      initial_state=initial_state, output_final_state=output_final_state, chunk_size=chunk_size)
    return o.to(out_dtype), S
