"""Chunked PyTorch form of ``linear_attn`` (KERNELS.md section 1 with g = 0)."""

from linmix.ops.common.decay_chunk import decay_chunk
from linmix.ops.dispatch import register


@register("linear_attn", "torch")
def linear_attn_chunk(q, k, v, **kwargs):
    return decay_chunk(q, k, v, None, gate=None, **kwargs)
