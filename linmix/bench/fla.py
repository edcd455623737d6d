"""fla-core (flash-linear-attention) side by side with linmix: timing and cross-checking only.

fla is not a dependency of linmix; install it (``pip install fla-core``) to get its rows in the
benchmark tables. :func:`fla_ops` returns fla's chunked kernels wrapped to linmix's op signatures
(``op(q, k, v, [beta,] [g,] scale=..., initial_state=..., output_final_state=...)``) and
:func:`fla_decode_ops` its fused recurrent kernels, or ``{}`` when fla does not import.

fla-core 0.6.0 refuses its gated chunk kernels on Hopper with Triton < 3.7.1 (a Triton
miscompilation in one backward kernel). ``bypass_hopper_guard=True`` lifts that refusal so that its
*speed* can be measured; its gated results on such a machine must not be trusted, and tables built
with the bypass say so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

Op = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def fla_version() -> str | None:
    """The installed fla-core version, or None."""
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:  # noqa: BLE001 -- not installed
        return None


def _import_fla(bypass_hopper_guard: bool):
    try:
        import fla.ops.common.chunk_o as chunk_o
    except Exception as e:  # noqa: BLE001 -- fla missing or broken: no fla rows
        logger.info("fla not available (%s): no fla rows", e)
        return None
    if bypass_hopper_guard:
        chunk_o.TRITON_ABOVE_3_7_1 = True
    import fla.ops as ops

    return ops


def fla_ops(bypass_hopper_guard: bool = False) -> dict[str, Op]:
    """fla's chunked kernels for linmix's op names (``gated_delta_rule`` = delta_rule with g)."""
    ops = _import_fla(bypass_hopper_guard)
    if ops is None:
        return {}
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla

    def linear_attn(q, k, v, **kw):
        return chunk_linear_attn(q, k, v, normalize=False, **kw)

    def simple_gla(q, k, v, g, **kw):
        return chunk_simple_gla(q, k, v, g=g, **kw)

    def gla(q, k, v, g, **kw):
        return chunk_gla(q, k, v, g, **kw)

    def delta_rule(q, k, v, beta, g=None, **kw):
        if g is None:
            from fla.ops.delta_rule import chunk_delta_rule

            return chunk_delta_rule(q, k, v, beta, **kw)
        return chunk_gated_delta_rule(q, k, v, g, beta, **kw)

    return {"linear_attn": linear_attn, "simple_gla": simple_gla, "gla": gla, "delta_rule": delta_rule,
            "gated_delta_rule": delta_rule}


def fla_decode_ops() -> dict[str, Op]:
    """fla's fused recurrent kernels (decoding) for linmix's op names."""
    ops = _import_fla(False)
    if ops is None:
        return {}
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    from fla.ops.gla import fused_recurrent_gla
    from fla.ops.linear_attn import fused_recurrent_linear_attn
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    def delta_rule(q, k, v, beta, g=None, **kw):
        if g is None:
            from fla.ops.delta_rule import fused_recurrent_delta_rule

            return fused_recurrent_delta_rule(q, k, v, beta, **kw)
        return fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **kw)

    return {
        "linear_attn": lambda q, k, v, **kw: fused_recurrent_linear_attn(q, k, v, normalize=False, **kw),
        "simple_gla": lambda q, k, v, g, **kw: fused_recurrent_simple_gla(q, k, v, g=g, **kw),
        "gla": lambda q, k, v, g, **kw: fused_recurrent_gla(q, k, v, gk=g, **kw),
        "delta_rule": delta_rule,
        "gated_delta_rule": delta_rule,
    }
