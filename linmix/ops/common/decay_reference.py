"""Reference (token-by-token) form of the decayed linear recurrences.

Shared by ``linear_attn`` (no gate), ``simple_gla`` (scalar gate) and ``gla`` (vector gate):

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * q_t)

written as a plain loop over t for clarity; float64 capable. The bidirectional form
(``causal=False``) is written from its definition, as an explicit T x T weighting:

    o_i = sum_j w_ij (scale * q_i . k_j) v_j,   w_ij = exp(sum_{s = min(i,j)+1}^{max(i,j)} g_s)

(per key dimension for a vector gate), i.e. the decay accumulated over the steps that separate
i and j, whichever comes first.
"""

from __future__ import annotations

import torch

from linmix.ops.common.utils import compute_dtype, run_per_sequence, upcast


def _recurrent(q, k, v, g, *, gate, scale, initial_state, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = initial_state if initial_state is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if gate == "scalar":
            S = S * torch.exp(g[:, t])[..., None, None]
        elif gate == "vector":
            S = S * torch.exp(g[:, t])[..., None]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)
    return o, (S if output_final_state else None)


def _bidirectional(q, k, v, g, *, gate, scale, initial_state, output_final_state):
    # b_t = sum_{s<=t} g_s is non-increasing, so the decay between i and j is exp(-|b_i - b_j|).
    if gate is None:
        scores = torch.einsum("bihk,bjhk->bhij", q * scale, k)
    elif gate == "scalar":
        b = g.cumsum(1).transpose(1, 2)  # [B, H, T]
        w = torch.exp(-(b[..., :, None] - b[..., None, :]).abs())
        scores = torch.einsum("bihk,bjhk->bhij", q * scale, k) * w
    else:
        b = g.cumsum(1)  # [B, T, H, K]
        w = torch.exp(-(b[:, :, None] - b[:, None, :]).abs())  # [B, Ti, Tj, H, K]
        scores = torch.einsum("bihk,bjhk,bijhk->bhij", q * scale, k, w)
    return torch.einsum("bhij,bjhv->bihv", scores, v), None


def decay_reference(q, k, v, g, *, gate, scale, initial_state=None, output_final_state=False,
                    cu_seqlens=None, causal=True, chunk_size=None):
    """Reference implementation behind linear_attn / simple_gla / gla (``gate`` None|scalar|vector)."""
    out_dtype = v.dtype
    q, k, v, g, initial_state = upcast(compute_dtype(q), q, k, v, g, initial_state)
    fn = _recurrent if causal else _bidirectional
    o, S = run_per_sequence(fn, cu_seqlens, (q, k, v, g), initial_state, gate=gate, scale=scale,
                            output_final_state=output_final_state)
    return o.to(out_dtype), S
