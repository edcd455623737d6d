"""Chunked PyTorch form of ``gla`` (KERNELS.md section 2: secondary sub-chunks of 16)."""

from linmix.ops.common.decay_chunk import decay_chunk
from linmix.ops.dispatch import register


@register("gla", "torch")
def gla_chunk(q, k, v, g, **kwargs):
    return decay_chunk(q, k, v, g, gate="vector", **kwargs)
