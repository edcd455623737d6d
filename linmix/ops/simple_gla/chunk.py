"""Chunked PyTorch form of ``simple_gla`` (KERNELS.md section 1)."""

from linmix.ops.common.decay_chunk import decay_chunk
from linmix.ops.dispatch import register


@register("simple_gla", "torch")
def simple_gla_chunk(q, k, v, g, **kwargs):
    return decay_chunk(q, k, v, g, gate="scalar", **kwargs)
