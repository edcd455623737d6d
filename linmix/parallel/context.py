"""The sequence-parallel context: a process group, a strategy, and the layout of one sharded input.

* :class:`SequenceParallel` -- built once from a process group; picks the communication strategy
  of the recurrent layers (``"allgather"`` or ``"scan"``) and counts the bytes communicated.
  Usable as a context manager (``with sp: model(...)``) or passed explicitly
  (``model(..., sequence_parallel=sp)``, ``sp_gla(..., sp=sp)``).
* :class:`ShardLayout` -- what one rank holds of one input: contiguous shards of equal length
  T_local (rank r holds global positions [r T_local, (r + 1) T_local)), and, for packed sequences,
  which local pieces continue a sequence from the previous rank or into the next one. It is what
  the layers see while a model runs sharded (:meth:`ShardLayout.activate`): global positions for
  rotary embeddings, the short convolutions' boundary tokens, and the ops' shard-aware forms.

Shards must have equal length: the global length T must be a multiple of the world size W
(:meth:`SequenceParallel.shard` checks it; with ``cu_seqlens`` the layout checks
``cu_seqlens[-1] == W * T_local``). Pad or pack the data to a multiple of W.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from linmix.layers.base import use_sequence_shard
from linmix.ops import dispatch
from linmix.ops.common.checks import check_cu_seqlens

STRATEGIES = ("allgather", "scan")

_CURRENT: ContextVar[SequenceParallel | None] = ContextVar("linmix_sequence_parallel", default=None)


@dataclass
class CommStats:
    """Bytes this rank sent and received, by kind of exchange (``"state"``: the recurrent layers'
    state passing; ``"kv"``: attention keys/values; ``"halo"``: boundary tokens of convolutions and
    sliding windows; ``"final_state"``, ``"loss"``: small replicated results)."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)

    def record(self, kind: str, sent: int, received: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(sent)
        self.received[kind] = self.received.get(kind, 0) + int(received)

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()

    def total(self) -> tuple[int, int]:
        """(bytes sent, bytes received) over all kinds."""
        return sum(self.sent.values()), sum(self.received.values())


def current_sequence_parallel() -> SequenceParallel | None:
    """The :class:`SequenceParallel` of the innermost ``with sp:`` block, or None."""
    return _CURRENT.get()


class SequenceParallel:
    r"""Sequence parallelism over a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU).

    Each rank of ``group`` holds one contiguous shard of every sequence (rank r: positions
    [r T_local, (r + 1) T_local)). Recurrent layers exchange a fixed-size state per rank (never
    activations); attention layers gather keys/values; short convolutions and sliding windows
    exchange boundary tokens. Results and gradients equal the single-process run.

    Args:
        group: the process group of the ranks that share one sequence; None = the default
            (world) group. ``torch.distributed`` must be initialised.
        strategy: how recurrent layers pass the state from rank to rank:
            ``"allgather"`` (LASP-2: one all-gather of every rank's (M, E), then a local fold) or
            ``"scan"`` (ZeCO All-Scan: the state passes rank to rank, pipelined over blocks of the
            state). Both give the same results.
        scan_blocks: number of blocks (of heads) the ``"scan"`` strategy pipelines the state in.

    Example (in every process of ``torchrun --nproc_per_node 2``)::

        dist.init_process_group("gloo")
        sp = SequenceParallel(strategy="scan")
        q, k, v, g = (sp.shard(t) for t in (q_full, k_full, v_full, g_full))
        o, _ = sp_gla(q, k, v, g, sp=sp)               # this rank's part of gla(q_full, ...)
        with sp:                                        # or model(..., sequence_parallel=sp)
            loss = model(sp.shard(ids), labels=sp.shard(ids)).loss
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, strategy: str = "allgather", scan_blocks: int = 4):
        if strategy not in STRATEGIES:
            raise ValueError(f"SequenceParallel: unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        if isinstance(scan_blocks, bool) or not isinstance(scan_blocks, int) or scan_blocks < 1:
            raise ValueError(f"SequenceParallel: scan_blocks must be a positive int, got {scan_blocks!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("SequenceParallel: torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group(...) (e.g. under torchrun) before building it, "
                             "and pass group= for a subgroup of the ranks")
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"SequenceParallel: group must be a torch.distributed.ProcessGroup or None, "
                            f"got {type(group).__name__}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("SequenceParallel: this process is not a member of group")
        self.world_size = dist.get_world_size(self.group)
        self.strategy = strategy
        self.scan_blocks = scan_blocks
        self.stats = CommStats()
        self._global_ranks = [r if self.group is dist.group.WORLD else dist.get_global_rank(self.group, r)
                              for r in range(self.world_size)]
        self._tokens: list[Any] = []

    def __repr__(self) -> str:
        return (f"SequenceParallel(rank={self.rank}, world_size={self.world_size}, strategy={self.strategy!r}, "
                f"scan_blocks={self.scan_blocks})")

    def __enter__(self) -> SequenceParallel:
        self._tokens.append(_CURRENT.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _CURRENT.reset(self._tokens.pop())

    def global_rank(self, rank: int) -> int:
        """The global rank of group rank ``rank`` (what point-to-point calls address)."""
        return self._global_ranks[rank]

    # -- full sequence <-> this rank's shard ----------------------------------------------------

    def _check_length(self, T: int, what: str) -> int:
        if T % self.world_size:
            raise ValueError(f"{what}: the sequence length T={T} is not divisible by the sequence-parallel world "
                             f"size W={self.world_size}; pad the sequence (or pack sequences) to a multiple of W")
        return T // self.world_size

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous shard of a full-sequence tensor along ``dim`` (a view).

        Example: ``ids_local = sp.shard(ids)`` for ids [B, T] gives [B, T / W].
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SequenceParallel.shard: x must be a tensor, got {type(x).__name__}")
        Tl = self._check_length(x.shape[dim], "SequenceParallel.shard")
        return x.narrow(dim, self.rank * Tl, Tl)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full sequence from every rank's shard along ``dim`` (not differentiable; for checks and logging)."""
        from linmix.parallel.comm import all_gather

        parts = all_gather(self, x.detach().movedim(dim, 0), "gather")  # [W, T_local, ...]
        return parts.flatten(0, 1).movedim(0, dim)

    def layout(self, batch_size: int, shard_len: int,
               cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> ShardLayout:
        """The :class:`ShardLayout` of an input of ``batch_size`` rows of ``shard_len`` local tokens.

        Args:
            batch_size: B (1 with ``cu_seqlens``).
            shard_len: T_local, the tokens per rank (equal on every rank).
            cu_seqlens: global offsets [N + 1] of the sequences packed along the whole sequence
                (the same on every rank; ends at W * T_local), or None.
        """
        return ShardLayout(self, batch_size, shard_len, cu_seqlens)


@dataclass(frozen=True)
class Segment:
    """A packed sequence's part in this rank's shard: local positions [begin, end) of sequence ``seq``.

    ``fresh``: the sequence starts in this shard (else it continues from the previous rank);
    ``ends_here``: it ends in this shard (else it continues into the next rank).
    """

    seq: int
    begin: int
    end: int
    fresh: bool
    ends_here: bool
    offset: int  # tokens of the sequence before this shard (its first local token's position)


class ShardLayout:
    """What this rank holds of one input; see the module docstring. Built by :meth:`SequenceParallel.layout`.

    Attributes:
        sp: the :class:`SequenceParallel`.
        batch_size, shard_len: B and T_local; ``start`` = rank * T_local is the global position
            of the first local token.
        offsets: the global ``cu_seqlens`` as a tuple of ints (None: B independent sequences,
            each split over all ranks).
        continues_in: per rank j, whether rank j's first local token continues a sequence from rank j - 1.
        passes_through: per rank j, whether one sequence covers rank j's whole shard and continues
            from rank j - 1 (so rank j's state transition matters to later ranks).
        segments: the local pieces of the packed sequences (packed inputs only), in order.
    """

    def __init__(self, sp: SequenceParallel, batch_size: int, shard_len: int,
                 cu_seqlens: torch.Tensor | Sequence[int] | None = None):
        for name, value in (("batch_size", batch_size), ("shard_len", shard_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ShardLayout: {name} must be a positive int, got {value!r}")
        self.sp = sp
        self.batch_size, self.shard_len = batch_size, shard_len
        W, r = sp.world_size, sp.rank
        self.start = r * shard_len
        T = W * shard_len
        self._tensors: dict[tuple[str, torch.device], torch.Tensor] = {}
        if cu_seqlens is None:
            self.offsets = None
            self.continues_in = tuple(j > 0 for j in range(W))
            self.passes_through = self.continues_in
            self.segments: tuple[Segment, ...] = ()
            return
        if not isinstance(cu_seqlens, torch.Tensor):
            cu_seqlens = torch.tensor(list(cu_seqlens), dtype=torch.long)
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2 \
                and not cu_seqlens.is_floating_point() and int(cu_seqlens[-1]) != T:
            raise ValueError(f"sequence parallelism: cu_seqlens holds the global offsets of the packed sequences "
                             f"and must end at W * T_local = {W} * {shard_len} = {T}, got {int(cu_seqlens[-1])} "
                             "(every rank passes the same global cu_seqlens and its T_local-token shard)")
        check_cu_seqlens("sequence parallelism", cu_seqlens, batch_size, T)
        offsets = tuple(int(o) for o in cu_seqlens.tolist())
        self.offsets = offsets
        bounds = set(offsets)
        self.continues_in = tuple(j > 0 and j * shard_len not in bounds for j in range(W))
        self.passes_through = tuple(
            self.continues_in[j] and not any(j * shard_len < o < (j + 1) * shard_len for o in offsets)
            for j in range(W))
        start, end = self.start, self.start + shard_len
        segments = []
        for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
            if a == b:
                mine = min(a // shard_len, W - 1) == r  # an empty sequence belongs to the shard holding its offset
            else:
                mine = a < end and b > start
            if mine:
                segments.append(Segment(seq=n, begin=max(a, start) - start, end=min(b, end) - start,
                                        fresh=a >= start, ends_here=b <= end, offset=max(0, start - a)))
        self.segments = tuple(segments)

    # -- properties ---------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.sp.rank

    @property
    def world_size(self) -> int:
        return self.sp.world_size

    @property
    def packed(self) -> bool:
        """Whether the input packs sequences (``cu_seqlens``)."""
        return self.offsets is not None

    def continues_out(self, rank: int | None = None) -> bool:
        """Whether rank ``rank`` (default: this one) hands a sequence over to the next rank."""
        rank = self.rank if rank is None else rank
        return rank + 1 < self.world_size and self.continues_in[rank + 1]

    @property
    def num_sequences(self) -> int:
        """N: sequences in the global input (B, or the packed sequences)."""
        return self.batch_size if self.offsets is None else len(self.offsets) - 1

    @property
    def num_local_sequences(self) -> int:
        """Rows of the local states: B, or the local pieces of packed sequences."""
        return self.batch_size if self.offsets is None else len(self.segments)

    @property
    def first_sequence_start(self) -> int:
        """Global position where the sequence of this rank's first local token starts (0 unpacked)."""
        if self.offsets is None:
            return 0
        return self.start - self.segments[0].offset

    def cu_seqlens(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """The local offsets [N_local + 1] (int32) of the packed pieces in this shard; None unpacked."""
        if self.offsets is None:
            return None
        return self._tensor("cu", device, lambda: [self.segments[0].begin] + [s.end for s in self.segments],
                            torch.int32)

    def position_offsets(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Global position of each local sequence's first local token, [N_local] int64 (RoPE offsets)."""
        if self.offsets is None:
            return self._tensor("pos", device, lambda: [self.start] * self.batch_size, torch.long)
        return self._tensor("pos", device, lambda: [s.offset for s in self.segments], torch.long)

    def _tensor(self, key: str, device, values: Callable[[], list[int]], dtype: torch.dtype) -> torch.Tensor:
        device = torch.device("cpu" if device is None else device)
        t = self._tensors.get((key, device))
        if t is None:
            t = self._tensors[(key, device)] = torch.tensor(values(), dtype=dtype, device=device)
        return t

    # -- what the layers ask for (linmix.layers.base.SequenceShard) ------------------------------------

    def short_conv_cache(self, x: torch.Tensor, cache_len: int) -> torch.Tensor | None:
        """The [N_local, cache_len, C] inputs before each local sequence (for a causal short convolution)."""
        from linmix.parallel.conv import short_conv_cache

        return short_conv_cache(self, x, cache_len)

    # -- running layers and models on this shard ---------------------------------------------------

    @contextlib.contextmanager
    def activate(self) -> Iterator[ShardLayout]:
        """Within the block, layers and ops run on this shard: the ops linear_attn / simple_gla /
        gla / delta_rule / softmax_attn (as the layers call them, with this layout's local
        ``cu_seqlens``) become their sequence-parallel forms, positions are global, and short
        convolutions see the previous rank's boundary tokens."""
        wrap_ops = getattr(dispatch, "wrap_ops", None)
        if wrap_ops is None:  # pragma: no cover - depends on the version of linmix.ops.dispatch
            raise RuntimeError("sequence parallelism of layers needs linmix.ops.dispatch.wrap_ops (the op hook)")
        with wrap_ops(functools.partial(_shard_op, self)), use_sequence_shard(self):
            yield self

    def bind(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` run under :meth:`activate` (also when activation checkpointing re-runs it in backward)."""

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self.activate():
                return fn(*args, **kwargs)

        return run


def _shard_op(layout: ShardLayout, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The op hook: the sequence-parallel form of ``op`` on ``layout`` around the backend ``fn``."""
    if op == "softmax_attn":
        from linmix.parallel.attention import shard_softmax_attn

        return functools.partial(shard_softmax_attn, layout, fn)
    from linmix.parallel.ops import SP_OPS, shard_recurrent_op

    if op in SP_OPS:
        return functools.partial(shard_recurrent_op, layout, op, fn)
    raise ValueError(f"sequence parallelism: op {op!r} has no sequence-parallel form")


def resolve_shard(sequence_parallel: SequenceParallel | ShardLayout | None, batch_size: int, shard_len: int,
                  cu_seqlens: torch.Tensor | None) -> ShardLayout | None:
    """The layout for an input: from an explicit ``sequence_parallel`` (a :class:`SequenceParallel` or a
    ready :class:`ShardLayout`), else from the innermost ``with sp:`` block; None without either."""
    if sequence_parallel is None:
        sequence_parallel = current_sequence_parallel()
        if sequence_parallel is None:
            return None
    if isinstance(sequence_parallel, ShardLayout):
        if (sequence_parallel.batch_size, sequence_parallel.shard_len) != (batch_size, shard_len):
            raise ValueError(f"sequence_parallel: the layout is for [B, T_local] = "
                             f"[{sequence_parallel.batch_size}, {sequence_parallel.shard_len}], the input is "
                             f"[{batch_size}, {shard_len}]")
        return sequence_parallel
    if not isinstance(sequence_parallel, SequenceParallel):
        raise TypeError(f"sequence_parallel must be a SequenceParallel (or a ShardLayout) or None, "
                        f"got {type(sequence_parallel).__name__}")
    return sequence_parallel.layout(batch_size, shard_len, cu_seqlens)


__all__ = ["STRATEGIES", "CommStats", "Segment", "SequenceParallel", "ShardLayout", "current_sequence_parallel",
           "resolve_shard"]
