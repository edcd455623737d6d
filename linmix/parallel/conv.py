"""Short causal convolutions on a shard: the previous rank's last (kernel_size - 1) inputs as the cache.

A causal depthwise convolution of width W at the first local token needs the W - 1 inputs before
it, which live on the previous rank (or several ranks back when the shards are shorter than
W - 1). :func:`short_conv_cache` fetches them with a point-to-point halo exchange (differentiable:
the gradient of the cache goes back to the ranks that own those inputs) and hands them to
:class:`~linmix.modules.ShortConvolution` as its ``cache``, so the convolution itself is unchanged.
"""

from __future__ import annotations

import torch

from linmix.parallel.comm import halo_exchange
from linmix.parallel.context import ShardLayout


def short_conv_cache(layout: ShardLayout, x: torch.Tensor, cache_len: int) -> torch.Tensor | None:
    """The inputs [N_local, cache_len, C] before each local sequence of x [B, T_local, C].

    Unpacked: the cache_len inputs before this shard (zeros on rank 0). Packed: the first local
    piece, if it continues a sequence from the previous rank, gets that sequence's inputs before
    this shard (zeros before the sequence's start); every other piece starts a sequence (zeros).
    Every rank must call this (it exchanges the boundary tokens with its neighbours).
    """
    if cache_len == 0:
        return None
    halo = halo_exchange(layout.sp, x, cache_len, kind="halo")  # [B, cache_len, C]
    if not layout.packed:
        return halo
    first = layout.segments[0]
    keep = 0 if first.fresh else min(cache_len, first.offset)  # inputs of the same sequence
    mask = torch.arange(cache_len, device=x.device) >= cache_len - keep
    first_row = halo * mask[None, :, None].to(halo.dtype)
    rest = halo.new_zeros(layout.num_local_sequences - 1, cache_len, halo.shape[-1])
    return torch.cat([first_row, rest], 0)


__all__ = ["short_conv_cache"]
