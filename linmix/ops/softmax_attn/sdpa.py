"""``softmax_attn`` over ``torch.nn.functional.scaled_dot_product_attention`` (the "torch" backend).

SDPA picks its fused kernel (FlashAttention / cuDNN / memory-efficient on GPU, the fused CPU kernel
elsewhere) and accumulates half-precision inputs in float32 internally, so q/k/v go in as they are.
Full causal attention without a past uses ``is_causal=True``; everything else (a window, a KV
cache, a bidirectional band, packed sequences) is an explicit boolean mask built vectorised from
position indices. Grouped KV heads use ``enable_gqa=True``.

Packed sequences (``cu_seqlens``) run as a right-padded batch [N, T_max] with a key-padding mask.
Padded queries would see no key at all (a NaN row), so every query is always allowed its own key;
the outputs of padded queries are dropped by ``unpad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmix.ops.common.varlen import Packing
from linmix.ops.dispatch import register


def position_mask(T: int, P: int, causal: bool, window: int | None, device: torch.device) -> torch.Tensor:
    """[T, P + T] boolean: query at position P + i may see the key at position j."""
    i = torch.arange(P, P + T, device=device)[:, None]
    j = torch.arange(P + T, device=device)[None, :]
    if causal:
        mask = j <= i
        if window is not None:
            mask &= j > i - window
        return mask
    if window is not None:
        return (i - j).abs() < window
    return torch.ones(T, P + T, dtype=torch.bool, device=device)


def _sdpa(q, k, v, *, mask, is_causal, scale):
    """q [B, Tq, Hq, K], k [B, Tk, Hkv, K], v [B, Tk, Hkv, V] -> o [B, Tq, Hq, V]."""
    gqa = q.shape[2] != k.shape[2]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


@register("softmax_attn", "torch")
def softmax_attn_sdpa(q, k, v, *, causal=True, window=None, scale, initial_state=None,
                      output_final_state=False, cu_seqlens=None, attention_mask=None):
    k_past, v_past = initial_state if initial_state is not None else (None, None)
    P = 0 if k_past is None else k_past.shape[1]

    if cu_seqlens is None:
        T = q.shape[1]
        k_all = k if k_past is None else torch.cat([k_past, k], dim=1)
        v_all = v if v_past is None else torch.cat([v_past, v], dim=1)
        if P == 0 and window is None and attention_mask is None:
            o = _sdpa(q, k_all, v_all, mask=None, is_causal=causal, scale=scale)
        else:
            mask = position_mask(T, P, causal, window, q.device)
            if attention_mask is not None:
                # Padded keys dropped; a query left with no key (a padded query) sees only itself.
                mask = mask & attention_mask.bool()[:, None, :]                    # [B, T, P + T]
                self_key = torch.arange(P, P + T, device=q.device)[:, None] == torch.arange(P + T, device=q.device)
                mask = (mask | (self_key & ~mask.any(-1, keepdim=True)))[:, None]
            o = _sdpa(q, k_all, v_all, mask=mask, is_causal=False, scale=scale)
    else:
        packing = Packing(cu_seqlens)
        qp, kp, vp = packing.pad(q), packing.pad(k), packing.pad(v)          # [N, T_max, H, D]
        T = packing.max_len
        k_all = kp if k_past is None else torch.cat([k_past, kp], dim=1)
        v_all = vp if v_past is None else torch.cat([v_past, vp], dim=1)
        key_valid = torch.cat([packing.mask.new_ones(packing.num_seqs, P), packing.mask], dim=1)  # [N, P + T]
        self_key = torch.arange(T, device=q.device)[:, None] + P == torch.arange(P + T, device=q.device)
        mask = (position_mask(T, P, causal, window, q.device) & key_valid[:, None, :]) | self_key
        o = _sdpa(qp, k_all, v_all, mask=mask[:, None], is_causal=False, scale=scale)
        o = packing.unpad(o)

    final = None
    if output_final_state:                                                    # never with cu_seqlens
        if window is not None and k_all.shape[1] > window:
            k_all, v_all = k_all[:, -window:], v_all[:, -window:]
        final = (k_all, v_all)
    return o.to(v.dtype), final
