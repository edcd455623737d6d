"""Reference form of ``simple_gla``: the token loop S_t = exp(g_t) S_{t-1} + k_t v_t^T."""

from linmix.ops.common.decay_reference import decay_reference
from linmix.ops.dispatch import register


@register("simple_gla", "reference")
def simple_gla_reference(q, k, v, g, **kwargs):
    return decay_reference(q, k, v, g, gate="scalar", **kwargs)
