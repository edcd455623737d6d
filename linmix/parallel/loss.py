"""The next-token loss of a language model whose sequence is sharded over ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linmix.parallel.comm import all_gather, all_reduce_sum
from linmix.parallel.context import ShardLayout


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, layout: ShardLayout,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the whole sharded sequence (as ``LinmixForCausalLM.loss``).

    The target of a rank's last position is the next rank's first label; with packed sequences
    the last token of a sequence predicts nothing; -100 labels are ignored. The loss is the mean
    over all target tokens of all ranks (or their sum over ``num_items_in_batch``).

    Its *value* is that global loss on every rank; its *gradient* is this rank's share (the sum of
    the targets in this shard over the global count), so the parameter gradients summed over the
    ranks of the group are the gradients of the global loss.

    Args:
        logits: [B, T_local, vocab]; labels: [B, T_local] (this rank's shard, not shifted).
        layout: the input's :class:`~linmix.parallel.ShardLayout`.
        num_items_in_batch: divide the global sum by this instead of the number of targets.
    """
    sp = layout.sp
    B, T = labels.shape if labels.dim() == 2 else (None, None)
    if labels.dim() != 2 or list(labels.shape) != list(logits.shape[:2]) or (B, T) != (layout.batch_size,
                                                                                      layout.shard_len):
        raise ValueError(f"causal_lm_loss: labels must have shape [B, T_local] = "
                         f"[{layout.batch_size}, {layout.shard_len}] like the logits, got {list(labels.shape)}")
    labels = labels.to(logits.device)
    firsts = all_gather(sp, labels[:, :1].contiguous(), "loss")  # [W, B, 1]: each rank's first label
    if sp.rank + 1 < sp.world_size:
        nxt = firsts[sp.rank + 1]
    else:
        nxt = torch.full_like(labels[:, :1], -100)
    targets = torch.cat([labels[:, 1:], nxt], dim=1)
    if layout.packed:  # a sequence's last token is not followed by the next sequence's first
        ends = [o - 1 - layout.start for o in layout.offsets[1:-1] if 0 <= o - 1 - layout.start < T]
        if ends:
            targets[:, ends] = -100
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    local_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    if num_items_in_batch is None:
        count = all_reduce_sum(sp, (targets != -100).sum(), "loss")
        denominator = count.to(local_sum.dtype)
    else:
        denominator = num_items_in_batch
    share = local_sum / denominator
    total = all_reduce_sum(sp, share.detach(), "loss")
    return share + (total - share).detach()


__all__ = ["causal_lm_loss"]
