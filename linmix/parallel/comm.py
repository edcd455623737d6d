"""Communication of sequence parallelism: collectives and point-to-point exchanges, autograd-aware
where activations cross ranks.

Every function here is called by *all* ranks of the group in the same order (point-to-point
exchanges included: each rank posts the sends and receives that the shared shard layout implies).
Each records the bytes this rank sends and receives in ``sp.stats`` (see
:class:`~linmix.parallel.context.CommStats`): the algorithm-independent payload (an all-gather
counts the own buffer as sent and the W - 1 others as received).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from linmix.parallel.context import SequenceParallel

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def all_gather(sp: SequenceParallel, x: torch.Tensor, kind: str) -> torch.Tensor:
    """[W, *x.shape]: every rank's ``x`` (same shape and dtype on every rank). Not differentiable."""
    W = sp.world_size
    x = x.contiguous()
    out = x.new_empty(W, *x.shape)
    if W == 1:
        out[0] = x
    else:
        _all_gather_single(out.view(-1), x.view(-1), group=sp.group)
    sp.stats.record(kind, sent=_nbytes(x), received=(W - 1) * _nbytes(x))
    return out


def all_reduce_sum(sp: SequenceParallel, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The sum of ``x`` over the ranks (a new tensor). Not differentiable."""
    out = x.clone()
    if sp.world_size > 1:
        dist.all_reduce(out, group=sp.group)
    sp.stats.record(kind, sent=_nbytes(x), received=_nbytes(x) * (sp.world_size - 1))
    return out


def exchange(sp: SequenceParallel, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
             kind: str) -> None:
    """Point-to-point: send each (tensor, group rank) and receive into each (buffer, group rank); wait."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), sp.global_rank(r), sp.group) for t, r in sends]
    ops += [dist.P2POp(dist.irecv, t, sp.global_rank(r), sp.group) for t, r in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    sp.stats.record(kind, sent=sum(_nbytes(t) for t, _ in sends), received=sum(_nbytes(t) for t, _ in recvs))


def isend(sp: SequenceParallel, x: torch.Tensor, rank: int, kind: str):
    """Start sending ``x`` to group rank ``rank``; returns the work handle."""
    sp.stats.record(kind, sent=_nbytes(x), received=0)
    return dist.isend(x.contiguous(), sp.global_rank(rank), group=sp.group)


def irecv(sp: SequenceParallel, buf: torch.Tensor, rank: int, kind: str):
    """Start receiving into ``buf`` from group rank ``rank``; returns the work handle."""
    sp.stats.record(kind, sent=0, received=_nbytes(buf))
    return dist.irecv(buf, sp.global_rank(rank), group=sp.group)


class AllGatherSequence(torch.autograd.Function):
    """x [B, T_local, ...] -> [B, W * T_local, ...], the shards in rank order; backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, sp, kind):
        ctx.sp, ctx.kind = sp, kind
        gathered = all_gather(sp, x, kind)  # [W, B, T, ...]
        return gathered.movedim(0, 1).flatten(1, 2)

    @staticmethod
    def backward(ctx, grad):
        sp = ctx.sp
        W = sp.world_size
        B, WT = grad.shape[:2]
        parts = grad.unflatten(1, (W, WT // W)).movedim(1, 0).contiguous()  # [W, B, T, ...]
        out = parts.new_empty(parts.shape[1:])
        if W == 1:
            out.copy_(parts[0])
        else:
            _reduce_scatter_single(out.view(-1), parts.view(-1), group=sp.group)
        sp.stats.record(ctx.kind, sent=_nbytes(parts) - _nbytes(out), received=(W - 1) * _nbytes(out))
        return out, None, None


def all_gather_sequence(sp: SequenceParallel, x: torch.Tensor, kind: str = "kv") -> torch.Tensor:
    """The whole sequence [B, W * T_local, ...] from every rank's shard x [B, T_local, ...] (differentiable)."""
    return AllGatherSequence.apply(x, sp, kind)


def _halo_pieces(n: int, T: int) -> list[int]:
    """Lengths of the pieces that ranks r - 1, r - 2, ... contribute to the n tokens before rank r."""
    pieces = []
    while n > 0:
        pieces.append(min(T, n))
        n -= T
    return pieces


class HaloExchange(torch.autograd.Function):
    """x [B, T_local, ...] -> the n tokens [B, n, ...] that precede this shard in the sequence.

    Positions before the start of the sequence (rank 0, or n larger than everything before) are
    zeros. Rank r sends its last min(T_local, n - (d - 1) T_local) tokens to rank r + d for each hop
    d that n needs; the backward sends the gradients back the same way.
    """

    @staticmethod
    def forward(ctx, x, n, sp, kind):
        ctx.sp, ctx.kind, ctx.n = sp, kind, n
        r, W = sp.rank, sp.world_size
        T = x.shape[1]
        pieces = _halo_pieces(n, T)
        halo = x.new_zeros(x.shape[0], n, *x.shape[2:])
        sends, recvs, places = [], [], []
        end = n  # the piece of hop d fills halo[:, end - length:end], walking back from the end
        for d, length in enumerate(pieces, start=1):
            if r + d < W:
                sends.append((x[:, T - length:], r + d))
            if r - d >= 0:
                recvs.append((x.new_empty(x.shape[0], length, *x.shape[2:]), r - d))
                places.append(end - length)
            end -= length
        exchange(sp, sends, recvs, kind)
        for (buf, _), a in zip(recvs, places):
            halo[:, a:a + buf.shape[1]] = buf
        ctx.T = T
        return halo

    @staticmethod
    def backward(ctx, grad):
        sp, n, T = ctx.sp, ctx.n, ctx.T
        r, W = sp.rank, sp.world_size
        grad = grad.contiguous()
        dx = grad.new_zeros(grad.shape[0], T, *grad.shape[2:])
        sends, recvs = [], []
        end = n
        for d, length in enumerate(_halo_pieces(n, T), start=1):
            if r - d >= 0:
                sends.append((grad[:, end - length:end], r - d))
            if r + d < W:
                recvs.append((grad.new_empty(grad.shape[0], length, *grad.shape[2:]), r + d))
            end -= length
        exchange(sp, sends, recvs, ctx.kind)
        for buf, _ in recvs:
            dx[:, T - buf.shape[1]:] += buf
        return dx, None, None, None


def halo_exchange(sp: SequenceParallel, x: torch.Tensor, n: int, kind: str = "halo") -> torch.Tensor:
    """The n tokens [B, n, ...] before this shard x [B, T_local, ...] (zeros before position 0); differentiable."""
    return HaloExchange.apply(x, n, sp, kind)


class _Tie(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, *tensors):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + tuple(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes)


def tie(out: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """``out``, with ``tensors`` attached to its graph: whenever ``out``'s backward runs, theirs runs too.

    A rank that does not use an exchanged tensor (rank 0 has no past keys) must still take part in
    the collective of its backward; tying it to the output guarantees that on every rank.
    """
    return _Tie.apply(out, *tensors)


class AllReduceSum(torch.autograd.Function):
    """The sum over ranks, replicated; the gradient of each rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, x, sp, kind):
        ctx.sp, ctx.kind = sp, kind
        return all_reduce_sum(sp, x, kind)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(ctx.sp, grad.contiguous(), ctx.kind), None, None


__all__ = ["AllGatherSequence", "AllReduceSum", "HaloExchange", "all_gather", "all_gather_sequence", "all_reduce_sum",
           "exchange", "halo_exchange", "irecv", "isend", "tie"]
