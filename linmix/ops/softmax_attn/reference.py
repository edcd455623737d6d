"""Reference form of ``softmax_attn``: explicit scores, an explicit mask, a softmax; one sequence at a time.

Written for clarity, not speed: every sequence is run alone, its (past + new) keys laid out at
absolute positions, the visibility mask built from those positions, and the softmax taken in the
compute dtype (float32 for half / float32 inputs, float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from linmix.ops.common.utils import compute_dtype
from linmix.ops.dispatch import register


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk]: whether the query at absolute position q_pos[i] may see the key at k_pos[j]."""
    i, j = q_pos[:, None], k_pos[None, :]
    if causal:
        mask = j <= i
        if window is not None:
            mask = mask & (j > i - window)
    else:
        mask = torch.ones_like(i == j)
        if window is not None:
            mask = (i - j).abs() < window
    return mask


def _attend_one(q, k, v, k_past, v_past, *, causal, window, scale, key_mask=None):
    """One sequence: q [T, Hq, K], k [T, Hkv, K], v [T, Hkv, V], past [P, Hkv, *] or None -> o [T, Hq, V].

    ``key_mask`` [P + T] (bool) drops padded keys; a query left with no key at all (a padded query)
    sees only itself, so its (discarded) output stays finite.
    """
    T, Hq, K = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    dtype = compute_dtype(v)
    if k_past is not None:
        k = torch.cat([k_past, k], dim=0)
        v = torch.cat([v_past, v], dim=0)
    P = k.shape[0] - T
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # query head h = g * group + r uses kv head g
    q = q.reshape(T, Hkv, group, K)
    scores = scale * torch.einsum("igrk,jgk->grij", q, k)          # [Hkv, group, T, P + T]
    q_pos = torch.arange(P, P + T, device=q.device)
    k_pos = torch.arange(P + T, device=q.device)
    mask = visible(q_pos, k_pos, causal, window)                   # [T, P + T]
    if key_mask is not None:
        mask = mask & key_mask[None, :]
        mask = mask | ((q_pos[:, None] == k_pos[None, :]) & ~mask.any(-1, keepdim=True))
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("grij,jgv->igrv", probs, v)                   # [T, Hkv, group, V]
    return o.reshape(T, Hq, v.shape[-1])


def kv_cache(k_past, v_past, k, v, window):
    """The cache after this call: past + new along time, cut to the last ``window`` tokens."""
    if k_past is not None:
        k = torch.cat([k_past, k], dim=1)
        v = torch.cat([v_past, v], dim=1)
    if window is not None and k.shape[1] > window:
        k, v = k[:, -window:], v[:, -window:]
    return k, v


@register("softmax_attn", "reference")
def softmax_attn_reference(q, k, v, *, causal=True, window=None, scale, initial_state=None,
                           output_final_state=False, cu_seqlens=None, attention_mask=None):
    k_past, v_past = initial_state if initial_state is not None else (None, None)
    B, T = q.shape[:2]
    if cu_seqlens is None:
        spans = [(b, b, 0, T) for b in range(B)]                   # (cache row, batch row, start, end)
    else:
        offsets = cu_seqlens.tolist()
        spans = [(n, 0, a, e) for n, (a, e) in enumerate(zip(offsets, offsets[1:]))]
    outs = []
    for n, b, a, e in spans:
        o = _attend_one(q[b, a:e], k[b, a:e], v[b, a:e],
                        None if k_past is None else k_past[n], None if v_past is None else v_past[n],
                        causal=causal, window=window, scale=scale,
                        key_mask=None if attention_mask is None else attention_mask[b].bool())
        outs.append(o)
    if cu_seqlens is None:
        o = torch.stack(outs, dim=0)
    else:
        o = torch.cat(outs, dim=0).unsqueeze(0)
    final = kv_cache(k_past, v_past, k, v, window) if output_final_state else None
    return o.to(v.dtype), final
