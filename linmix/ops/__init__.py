"""Functional token mixers: ``(q, k, v, gates) -> (o, final_state)``.

Each op validates its inputs and dispatches to a backend (``backend="auto" | "reference" |
"torch" | "triton"``); see :mod:`linmix.ops.dispatch`.
"""

from linmix.ops.delta_rule import delta_rule
from linmix.ops.gla import gla
from linmix.ops.linear_attn import linear_attn
from linmix.ops.simple_gla import simple_gla
from linmix.ops.softmax_attn import softmax_attn

__all__ = ["delta_rule", "gla", "linear_attn", "simple_gla", "softmax_attn"]
