"""Reference (token-by-token) form of ``delta_rule``.

Per head, with state S in R^{K x V}, step size beta_t and optional log-decay g_t <= 0:

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale * q_t)

written as a plain loop over t for clarity; float64 capable; varlen runs each sequence alone.
"""

from __future__ import annotations

import torch

from linmix.ops.common.utils import compute_dtype, run_per_sequence, upcast
from linmix.ops.dispatch import register


def _recurrent(q, k, v, beta, g, *, scale, initial_state, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = initial_state if initial_state is not None else q.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * torch.exp(g[:, t])[..., None, None]
        k_t, b_t = k[:, t], beta[:, t][..., None]  # [B, H, K], [B, H, 1]
        # (I - b k k^T) S + b k v^T  =  S + b k (v - S^T k)^T
        delta = b_t * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, V)
    return o, (S if output_final_state else None)


@register("delta_rule", "reference")
def delta_rule_reference(q, k, v, beta, g=None, *, scale, initial_state=None, output_final_state=False,
                         cu_seqlens=None, chunk_size=None):
    """Reference implementation of :func:`linmix.ops.delta_rule.delta_rule`."""
    out_dtype = v.dtype
    q, k, v, beta, g, initial_state = upcast(compute_dtype(q), q, k, v, beta, g, initial_state)
    o, S = run_per_sequence(_recurrent, cu_seqlens, (q, k, v, beta, g), initial_state, scale=scale,
                            output_final_state=output_final_state)
    return o.to(out_dtype), S
