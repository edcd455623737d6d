"""``delta_rule``: DeltaNet and Gated DeltaNet (the delta rule with an optional scalar decay)."""

from __future__ import annotations

import torch

from linmix.ops.common.checks import check_beta, check_log_gate, check_recurrent_op
from linmix.ops.delta_rule import chunk, reference  # noqa: F401  (register the backends)
from linmix.ops.delta_rule import triton as _triton  # noqa: F401  (registers nothing without triton)
from linmix.ops.dispatch import resolve


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               g: torch.Tensor | None = None, *, scale: float | None = None,
               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: torch.Tensor | None = None, chunk_size: int | None = None,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""The delta rule (DeltaNet) and, with a decay ``g``, the gated delta rule (Gated DeltaNet).

    Per head, with state S in R^{K x V}, step size beta_t and optional log-decay g_t <= 0
    (g_t = 0 when ``g`` is None):

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale * q_t)

    i.e. the state is decayed, then takes one step of online regression of v_t on k_t with
    learning rate beta_t: S_t = S' + beta_t k_t (v_t - S'^T k_t)^T with S' = exp(g_t) S_{t-1}.

    Keys are expected to be L2-normalised over K (the transition I - beta k k^T is then a
    contraction for beta in [0, 2]); this op does not normalise them -- the layer does. The
    delta rule is causal only (there is no ``causal`` argument).

    Args:
        q, k: [B, T, H, K] queries and keys (keys L2-normalised).
        v: [B, T, H, V] values.
        beta: [B, T, H] step sizes in [0, 2] (DeltaNet uses sigmoid(x), in (0, 1)); any float dtype.
        g: None (DeltaNet) or [B, T, H] log-decay, <= 0 (e.g. ``F.logsigmoid(x)``); any float dtype.
        scale: multiplies q; default K ** -0.5.
        initial_state: [N, H, K, V] state before the first token (N = B, or the number of
            sequences with ``cu_seqlens``).
        output_final_state: also return the [N, H, K, V] state after the last token.
        cu_seqlens: int32/int64 [N + 1] offsets of sequences packed along T (then B must be 1).
        chunk_size: chunk length of the chunked backends; None = the backend's own default.
        backend: "auto" | "reference" | "torch" | "triton".

    Returns:
        (o [B, T, H, V] in v's dtype, final state [N, H, K, V] (float32, float64 for float64
        inputs) or None).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from linmix.ops.delta_rule import delta_rule
        >>> q, v = torch.randn(2, 100, 4, 32), torch.randn(2, 100, 4, 48)
        >>> k = F.normalize(torch.randn(2, 100, 4, 32), dim=-1)
        >>> beta = torch.sigmoid(torch.randn(2, 100, 4))
        >>> g = F.logsigmoid(torch.randn(2, 100, 4))
        >>> o, state = delta_rule(q, k, v, beta, g, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([2, 100, 4, 48]), torch.Size([2, 4, 32, 48]))
    """
    B, T, H, _, _, scale = check_recurrent_op(
        "delta_rule", q, k, v, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, chunk_size=chunk_size, beta=beta, g=g)
    check_beta("delta_rule", beta, [B, T, H])
    if g is not None:
        check_log_gate("delta_rule", "g", g, "BTH", [B, T, H])
    fn = resolve("delta_rule", backend, q.device)
    return fn(q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, chunk_size=chunk_size)
