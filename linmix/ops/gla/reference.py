"""Reference form of ``gla``: the token loop S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T."""

from linmix.ops.common.decay_reference import decay_reference
from linmix.ops.dispatch import register


@register("gla", "reference")
def gla_reference(q, k, v, g, **kwargs):
    return decay_reference(q, k, v, g, gate="vector", **kwargs)
