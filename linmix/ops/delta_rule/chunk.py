"""Chunked PyTorch form of ``delta_rule`` in the WY / UT-transform form (KERNELS.md section 3).

Per head, with chunks of C tokens, b_t the cumulative log-gate inside a chunk (zeros without a
gate; non-increasing), q already scaled and S_0 the state entering the chunk, the pseudo-values
U solve the unit lower-triangular system

    (I + L) U = diag(beta) V - diag(beta) (K * exp(b)) S_0,
    L = strictly_lower(diag(beta) ((K K^T) o Gamma)),   Gamma_ti = exp(b_t - b_i),

so with W = (I + L)^{-1} diag(beta) (K * exp(b)) and U~ = (I + L)^{-1} diag(beta) V (one
triangular solve for every chunk at once, before any state is known):

    U   = U~ - W S_0
    S_C = exp(b_C) S_0 + (K * exp(b_C - b))^T U
    O   = (Q * exp(b)) S_0 + ((Q K^T) o D) U,      D_ij = exp(b_i - b_j)  (i >= j, else 0)

Everything except the state recursion is vectorised over batch, heads and chunks; the recursion
is one Python loop over chunks (two small matmuls each). Every exponent is <= 0: no decay is ever
divided by, and the masked upper parts are set to -inf before the exp. T is zero-padded to whole
chunks: a padded step has beta = 0, k = 0 and g = 0, i.e. an identity transition, so the final
state is exact. Differentiable by autograd (through ``torch.linalg.solve_triangular``).
"""

from __future__ import annotations

import torch

from linmix.ops.common.utils import compute_dtype, from_chunks, run_packed, to_chunks, upcast
from linmix.ops.dispatch import register

SUB_CHUNK = 16


def chunk_delta_rule_fwd(q, k, v, beta, g, *, scale, initial_state, output_final_state, chunk_size):
    """Causal chunked forward on a dense batch. Inputs already in the compute dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size or 64, -(-T // SUB_CHUNK) * SUB_CHUNK)
    qc, kc, vc = to_chunks(q * scale, C), to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, K|V]
    bc = to_chunks(beta, C)[..., None]  # [B, H, N, C, 1]
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    incl, strict = ones.tril(), ones.tril(-1)

    kk = kc @ kc.transpose(-1, -2)  # [B, H, N, C, C]
    qk = qc @ kc.transpose(-1, -2)
    if g is None:
        L = (bc * kk).masked_fill(~strict, 0.0)
        A_qk = qk.masked_fill(~incl, 0.0)
        k_w, q_in, k_out, decay = kc, qc, kc, None
    else:
        b = to_chunks(g, C).cumsum(-1)  # [B, H, N, C]
        diff = b[..., :, None] - b[..., None, :]
        L = bc * kk * torch.exp(diff.masked_fill(~strict, float("-inf")))
        A_qk = qk * torch.exp(diff.masked_fill(~incl, float("-inf")))
        b_last = b[..., -1:]
        k_w = kc * torch.exp(b)[..., None]
        q_in = qc * torch.exp(b)[..., None]
        k_out = kc * torch.exp(b_last - b)[..., None]
        decay = torch.exp(b_last)[..., None]  # [B, H, N, 1, 1]

    # One unit-lower-triangular solve for all chunks: (I + L) [W, U~] = diag(beta) [K exp(b), V].
    # With unitriangular=True the (zero) diagonal of L is ignored and taken as 1.
    X = torch.linalg.solve_triangular(L, torch.cat([bc * k_w, bc * vc], -1), upper=False, unitriangular=True)
    W, U_tilde = X[..., :K], X[..., K:]

    # The state recursion: the only loop, over chunks, on [B * H, ...] matrices. unbind (not
    # indexing) keeps the backward linear in the number of chunks (one stack, not a zero-filled
    # full-size gradient per chunk).
    N = qc.shape[2]
    S = initial_state if initial_state is not None else q.new_zeros(B, H, K, V)
    S = S.reshape(B * H, K, V)
    W_, U_tilde_ = W.reshape(B * H, N, C, K), U_tilde.reshape(B * H, N, C, V)
    k_out_ = k_out.reshape(B * H, N, C, K).transpose(-1, -2)
    decays = [None] * N if decay is None else decay.reshape(B * H, N, 1, 1).unbind(1)
    S_in, U = [], []
    for W_n, U_tilde_n, k_out_n, decay_n in zip(W_.unbind(1), U_tilde_.unbind(1), k_out_.unbind(1), decays):
        U_n = torch.baddbmm(U_tilde_n, W_n, S, alpha=-1)  # U~ - W S
        S_in.append(S)
        U.append(U_n)
        S = torch.baddbmm(S if decay_n is None else decay_n * S, k_out_n, U_n)
    S_in = torch.stack(S_in, 1).reshape(B, H, N, K, V)
    U = torch.stack(U, 1).reshape(B, H, N, C, V)
    S = S.reshape(B, H, K, V)
    o = q_in @ S_in + A_qk @ U
    return from_chunks(o, T), (S if output_final_state else None)


@register("delta_rule", "torch")
def delta_rule_chunk(q, k, v, beta, g=None, *, scale, initial_state=None, output_final_state=False,
                     cu_seqlens=None, chunk_size=None):
    """Chunked implementation of :func:`linmix.ops.delta_rule.delta_rule`."""
    out_dtype = v.dtype
    q, k, v, beta, g, initial_state = upcast(compute_dtype(q), q, k, v, beta, g, initial_state)
    o, S = run_packed(chunk_delta_rule_fwd, cu_seqlens, (q, k, v, beta, g), scale=scale,
                      initial_state=initial_state, output_final_state=output_final_state, chunk_size=chunk_size)
    return o.to(out_dtype), S
