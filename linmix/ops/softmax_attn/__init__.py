"""``softmax_attn``: softmax attention (full or sliding-window) with grouped KV heads and a KV cache."""

from __future__ import annotations

import torch

from linmix.ops.common.checks import (
    _fmt,
    check_cu_seqlens,
    check_qkv,
    check_same_device,
    check_scale,
    check_tensor,
)
from linmix.ops.dispatch import resolve
from linmix.ops.softmax_attn import reference, sdpa  # noqa: F401  (register the backends)

KVCache = tuple[torch.Tensor, torch.Tensor]

_OP = "softmax_attn"


def check_softmax_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
                       scale: float | None, initial_state: KVCache | None, output_final_state: bool,
                       cu_seqlens: torch.Tensor | None, attention_mask: torch.Tensor | None = None) -> float:
    """Validate the arguments of :func:`softmax_attn`; return the scale to use."""
    B, T, H, K, V = check_qkv(_OP, q, k, v, kv_heads_divide=True)
    Hkv = k.shape[2]
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"{_OP}: output_final_state must be a bool, got {type(output_final_state).__name__}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise TypeError(f"{_OP}: window must be None or a positive int, got {type(window).__name__} {window!r}")
    if window is not None and window < 1:
        raise ValueError(f"{_OP}: window must be None or a positive int (the number of keys a query sees, "
                         f"itself included), got {window}")
    k_past = v_past = None
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError(f"{_OP}: initial_state must be a KV cache: a tuple (k_past, v_past) of two tensors "
                            f"of shapes [N, P, Hkv, K] and [N, P, Hkv, V], got {type(initial_state).__name__}"
                            + (f" of length {len(initial_state)}" if isinstance(initial_state, (tuple, list))
                               else ""))
        k_past, v_past = initial_state
        check_tensor(_OP, "initial_state[0] (k_past)", k_past, "NPHK")
        check_tensor(_OP, "initial_state[1] (v_past)", v_past, "NPHV")
    check_same_device(_OP, q=q, k=k, v=v, k_past=k_past, v_past=v_past, cu_seqlens=cu_seqlens)
    N = check_cu_seqlens(_OP, cu_seqlens, B, T)
    if initial_state is not None:
        if not causal:
            raise ValueError(f"{_OP}: initial_state (a KV cache) needs causal=True; bidirectional attention "
                             "(causal=False) has no past to continue from")
        P = k_past.shape[1]
        dims_k, dims_v = "N P Hkv K".split(), "N P Hkv V".split()
        if list(k_past.shape) != [N, P, Hkv, K]:
            raise ValueError(f"{_OP}: initial_state[0] (k_past) must have shape {_fmt(dims_k, [N, None, Hkv, K])}"
                             f", got {list(k_past.shape)}")
        if list(v_past.shape) != [N, P, Hkv, V]:
            raise ValueError(f"{_OP}: initial_state[1] (v_past) must have shape {_fmt(dims_v, [N, P, Hkv, V])} "
                             f"(the same N, P, Hkv as k_past), got {list(v_past.shape)}")
        if not (k_past.dtype == v_past.dtype == k.dtype):
            raise TypeError(f"{_OP}: the KV cache initial_state must have k's dtype {k.dtype}, got "
                            f"k_past {k_past.dtype}, v_past {v_past.dtype}")
    if attention_mask is not None:
        P = 0 if k_past is None else k_past.shape[1]
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.is_floating_point():
            raise TypeError(f"{_OP}: attention_mask must be a bool or integer tensor of shape [B, P + T] "
                            f"(1 = real key, 0 = padding), got {getattr(attention_mask, 'dtype', type(attention_mask))}")
        if list(attention_mask.shape) != [B, P + T]:
            raise ValueError(f"{_OP}: attention_mask must have shape {_fmt(['B', 'P + T'], [B, P + T])} (past and new "
                             f"keys), got {list(attention_mask.shape)}")
        if cu_seqlens is not None:
            raise ValueError(f"{_OP}: attention_mask and cu_seqlens are two ways to mark sequences; pass one")
        check_same_device(_OP, q=q, attention_mask=attention_mask)
    if output_final_state:
        if cu_seqlens is not None:
            raise ValueError(f"{_OP}: output_final_state=True is not supported with cu_seqlens: the caches of "
                             "ragged sequences have different lengths and no dense [N, P, Hkv, K] form; run the "
                             "sequences as a padded batch, or slice the packed k/v yourself")
        if not causal:
            raise ValueError(f"{_OP}: output_final_state=True needs causal=True; bidirectional attention "
                             "(causal=False) has no KV cache to continue from")
    return check_scale(_OP, scale, K)


def softmax_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                 window: int | None = None, scale: float | None = None, initial_state: KVCache | None = None,
                 output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, KVCache | None]:
    r"""Softmax attention, full or sliding-window, with grouped KV heads and a KV cache.

    For query head h (using kv head g = h // (Hq // Hkv)) at absolute position i:

        o_i = sum_{j in M(i)} softmax_j(scale * q_i . k_j) v_j,     softmax over j in M(i)

    where the set of visible keys M(i) is

    * ``causal=True, window=None``: j <= i (full causal attention);
    * ``causal=True, window=w``: i - w < j <= i, the last w keys including itself (sliding-window
      attention; w = 1 attends only to itself);
    * ``causal=False, window=None``: every j of the sequence (bidirectional);
    * ``causal=False, window=w``: |i - j| < w, a symmetric band of 2w - 1 keys.

    **KV cache.** The "state" of softmax attention is its cache of past keys and values.
    ``initial_state=(k_past, v_past)`` holds P past tokens per sequence at absolute positions
    0..P-1; the T new tokens sit at positions P..P+T-1 and attend to the past as well (under the
    same causal/window rule). ``output_final_state=True`` returns the cache for the next call:
    ``(cat([k_past, k]), cat([v_past, v]))`` along the time axis, cut to its last ``window`` tokens
    when a window is set (enough for every later query). Running a sequence in one call equals
    running it in pieces, each fed the previous piece's cache. Caches keep the dtype of k/v.
    Caches need ``causal=True``; with ``cu_seqlens`` an initial cache (a common length P for every
    sequence) is allowed but ``output_final_state=True`` raises, as ragged caches have no dense form.

    Args:
        q: [B, T, Hq, K] queries.
        k: [B, T, Hkv, K] keys; Hq must be a multiple of Hkv (grouped-query / multi-query attention).
        v: [B, T, Hkv, V] values.
        causal: True (default) for causal attention; False for bidirectional.
        window: None (full attention) or a positive int, see above.
        scale: multiplies the scores; default K ** -0.5.
        initial_state: None or a KV cache ``(k_past [N, P, Hkv, K], v_past [N, P, Hkv, V])`` in k's
            dtype, N = B or the number of sequences with ``cu_seqlens``; P >= 0. Gradients flow to it.
        output_final_state: also return the new cache ``(k_cache [N, L, Hkv, K], v_cache [N, L, Hkv, V])``
            with L = P + T, or min(window, P + T) with a window.
        cu_seqlens: int32/int64 [N + 1] offsets of sequences packed along T (then B must be 1); no
            token attends across sequences.
        attention_mask: None or bool/int [B, P + T] marking the real keys (1) among the past and new
            ones, as in a left- or right-padded batch (the Hugging Face convention); padded keys are
            never attended to. Queries at padded positions get finite outputs of no meaning.
            A window counts positions, padded ones included: pad before the first token of a
            sequence (left padding of a prompt) or after its last (right padding).
        backend: "auto" | "reference" | "torch" (``scaled_dot_product_attention``; "auto" picks it).

    Returns:
        (o [B, T, Hq, V] in v's dtype, the new KV cache or None).

    Example:
        >>> import torch
        >>> from linmix.ops.softmax_attn import softmax_attn
        >>> q = torch.randn(2, 10, 8, 32)                          # 8 query heads
        >>> k, v = torch.randn(2, 10, 2, 32), torch.randn(2, 10, 2, 48)   # 2 kv heads
        >>> o, cache = softmax_attn(q, k, v, window=4, output_final_state=True)
        >>> o.shape, cache[0].shape, cache[1].shape
        (torch.Size([2, 10, 8, 48]), torch.Size([2, 4, 2, 32]), torch.Size([2, 4, 2, 48]))
        >>> q1, k1, v1 = torch.randn(2, 1, 8, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 48)
        >>> o1, cache = softmax_attn(q1, k1, v1, window=4, initial_state=cache, output_final_state=True)
        >>> o1.shape, cache[0].shape
        (torch.Size([2, 1, 8, 48]), torch.Size([2, 4, 2, 32]))
    """
    scale = check_softmax_attn(q, k, v, causal=causal, window=window, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                               attention_mask=attention_mask)
    if initial_state is not None:
        initial_state = tuple(initial_state)
    fn = resolve(_OP, backend, q.device)
    return fn(q, k, v, causal=causal, window=window, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens, attention_mask=attention_mask)


__all__ = ["softmax_attn", "check_softmax_attn"]
