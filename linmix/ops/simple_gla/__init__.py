"""``simple_gla``: linear attention with a scalar, data-dependent decay per head and step."""

from __future__ import annotations

import torch

from linmix.ops.common.checks import check_log_gate, check_recurrent_op
from linmix.ops.dispatch import resolve
from linmix.ops.simple_gla import chunk, reference  # noqa: F401  (register the backends)
from linmix.ops.simple_gla import triton as _triton  # noqa: F401  (simple_gla + linear_attn; nothing without triton)


def simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
               scale: float | None = None, initial_state: torch.Tensor | None = None,
               output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
               causal: bool = True, chunk_size: int | None = None,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Scalar-gated linear attention (RetNet, Lightning Attention / TransNormerLLM, Mamba-2 SSD).

    Per head, with a log-space decay g_t <= 0 and state S in R^{K x V}:

        S_t = exp(g_t) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * q_t)

    RetNet is a constant g per head; Mamba-2's SSD is g_t = dt_t * A with v scaled by dt_t.

    With ``causal=False`` (bidirectional) every position attends to every other with the decay
    taken over the steps between them, whichever comes first:

        o_i = sum_j exp(sum_{s=min(i,j)+1}^{max(i,j)} g_s) (scale * q_i . k_j) v_j

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        g: [B, T, H] log-decay, <= 0 (e.g. ``F.logsigmoid(x)``); any float dtype.
        scale, initial_state, output_final_state, cu_seqlens, causal, chunk_size, backend: as in
            :func:`linmix.ops.linear_attn`.

    Returns:
        (o [B, T, H, V] in v's dtype, final state [N, H, K, V] or None).

    Example:
        >>> import torch, torch.nn.functional as F, linmix
        >>> q, k, v = (torch.randn(2, 100, 4, 32) for _ in range(3))
        >>> g = F.logsigmoid(torch.randn(2, 100, 4))
        >>> o, state = linmix.ops.simple_gla(q, k, v, g, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([2, 100, 4, 32]), torch.Size([2, 4, 32, 32]))
    """
    B, T, H, _, _, scale = check_recurrent_op(
        "simple_gla", q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, causal=causal, g=g)
    check_log_gate("simple_gla", "g", g, "BTH", [B, T, H])
    fn = resolve("simple_gla", backend, q.device)
    return fn(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, causal=causal, chunk_size=chunk_size)
