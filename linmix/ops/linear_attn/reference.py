"""Reference form of ``linear_attn``: the token loop S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T q_t."""

from linmix.ops.common.decay_reference import decay_reference
from linmix.ops.dispatch import register


@register("linear_attn", "reference")
def linear_attn_reference(q, k, v, **kwargs):
    return decay_reference(q, k, v, None, gate=None, **kwargs)
