"""``linear_attn``: linear attention with an identity state transition."""

from __future__ import annotations

import torch

from linmix.ops.common.checks import check_recurrent_op
from linmix.ops.dispatch import resolve
from linmix.ops.linear_attn import chunk, reference  # noqa: F401  (register the backends)


def linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                cu_seqlens: torch.Tensor | None = None, causal: bool = True, chunk_size: int | None = None,
                backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Linear attention (Katharopoulos et al.; feature-map attention after the map is applied).

    Per head, with state S in R^{K x V}:

        S_t = S_{t-1} + k_t v_t^T,        o_t = S_t^T (scale * q_t)

    i.e. o_t = sum_{s <= t} (scale * q_t . k_s) v_s. There is no normaliser: a layer that wants
    one divides by the same op applied to a column of ones.

    With ``causal=False`` (bidirectional, encoders / vision) every position attends to every
    other: o_t = sum_s (scale * q_t . k_s) v_s.

    Args:
        q, k: [B, T, H, K] queries and keys (after any feature map).
        v: [B, T, H, V] values.
        scale: multiplies q; default K ** -0.5.
        initial_state: [N, H, K, V] state before the first token (N = B, or the number of
            sequences with ``cu_seqlens``).
        output_final_state: also return the [N, H, K, V] state after the last token.
        cu_seqlens: int32/int64 [N + 1] offsets of sequences packed along T (then B must be 1).
        causal: False for the bidirectional form (no states then).
        chunk_size: chunk length of the chunked backends; None = the backend's own default.
        backend: "auto" | "reference" | "torch" | "triton".

    Returns:
        (o [B, T, H, V] in v's dtype, final state [N, H, K, V] (float32, float64 for float64
        inputs) or None).

    Example:
        >>> import torch, linmix
        >>> q, k = torch.randn(2, 100, 4, 32), torch.randn(2, 100, 4, 32)
        >>> v = torch.randn(2, 100, 4, 48)
        >>> o, state = linmix.ops.linear_attn(q, k, v, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([2, 100, 4, 48]), torch.Size([2, 4, 32, 48]))
    """
    _, _, _, _, _, scale = check_recurrent_op(
        "linear_attn", q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, causal=causal)
    fn = resolve("linear_attn", backend, q.device)
    return fn(q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, causal=causal, chunk_size=chunk_size)
