"""Packed variable-length sequences <-> a padded batch.

The PyTorch backends run packed sequences (``cu_seqlens``, B == 1) as a right-padded batch
[N, T_max, ...]. Padding is zeros: zero keys/values/gates/beta leave a recurrent state unchanged
(the transition is the identity and nothing is written), so a sequence's final state is read at
the end of the padded row. Both directions are differentiable (index_put / boolean indexing).
"""

from __future__ import annotations

import torch


def max_seqlen(T: int, cu_seqlens: torch.Tensor | None) -> int:
    """Length of the longest sequence (at least 1): T for a dense batch, else from ``cu_seqlens``."""
    if cu_seqlens is None:
        return T
    offsets = cu_seqlens.tolist()
    return max(max(b - a for a, b in zip(offsets, offsets[1:])), 1)


class Packing:
    """Index bookkeeping for one ``cu_seqlens``; ``pad``/``unpad`` move tensors between layouts."""

    def __init__(self, cu_seqlens: torch.Tensor):
        offsets = cu_seqlens.tolist()
        self.lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        self.num_seqs = len(self.lengths)
        self.max_len = max(max(self.lengths), 1)
        lengths = torch.tensor(self.lengths, device=cu_seqlens.device)
        self.mask = torch.arange(self.max_len, device=cu_seqlens.device)[None, :] < lengths[:, None]

    def pad(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """[1, T, ...] packed -> [N, T_max, ...] zero-padded."""
        if x is None:
            return None
        out = x.new_zeros(self.num_seqs, self.max_len, *x.shape[2:])
        return out.index_put((self.mask,), x[0])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T_max, ...] padded -> [1, T, ...] packed."""
        return x[self.mask].unsqueeze(0)
