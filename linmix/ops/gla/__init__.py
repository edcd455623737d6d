"""``gla``: gated linear attention with a vector (per key dimension) data-dependent decay."""

from __future__ import annotations

import torch

from linmix.ops.common.checks import check_log_gate, check_recurrent_op
from linmix.ops.dispatch import resolve
from linmix.ops.gla import chunk, reference  # noqa: F401  (register the backends)
from linmix.ops.gla import triton as _triton  # noqa: F401  (nothing registered without triton)


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
        scale: float | None = None, initial_state: torch.Tensor | None = None,
        output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
        causal: bool = True, chunk_size: int | None = None,
        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated linear attention (GLA; HGRN-2 with k = 1 - f; RWKV-6 style decays).

    Per head, with a log-space decay vector g_t <= 0 over the key dimension:

        S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * q_t)

    With ``causal=False`` (bidirectional) every position attends to every other with the decay,
    per key dimension, taken over the steps between them, whichever comes first:

        o_i = sum_j sum_k scale q_ik k_jk exp(sum_{s=min(i,j)+1}^{max(i,j)} g_sk) v_j

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V].
        g: [B, T, H, K] log-decay, <= 0 (e.g. ``F.logsigmoid(x) / 16`` as in GLA); any float dtype.
        scale, initial_state, output_final_state, cu_seqlens, causal, chunk_size, backend: as in
            :func:`linmix.ops.linear_attn`.

    Returns:
        (o [B, T, H, V] in v's dtype, final state [N, H, K, V] or None).

    Example:
        >>> import torch, torch.nn.functional as F, linmix
        >>> q, k, v = (torch.randn(2, 100, 4, 32) for _ in range(3))
        >>> g = F.logsigmoid(torch.randn(2, 100, 4, 32))
        >>> o, _ = linmix.ops.gla(q, k, v, g)
        >>> o.shape
        torch.Size([2, 100, 4, 32])
    """
    B, T, H, K, _, scale = check_recurrent_op(
        "gla", q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, causal=causal, g=g)
    check_log_gate("gla", "g", g, "BTHK", [B, T, H, K])
    fn = resolve("gla", backend, q.device)
    return fn(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, causal=causal, chunk_size=chunk_size)
