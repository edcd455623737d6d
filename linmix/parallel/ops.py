r"""Sequence-parallel recurrent ops: ``sp_linear_attn``, ``sp_simple_gla``, ``sp_gla``, ``sp_delta_rule``.

Each takes this rank's shard of the inputs (the op's arguments with T = T_local) and returns this
rank's shard of the op's output on the whole sequence, exactly (see :mod:`linmix.parallel` for
the math). One call, on rank r:

1. forward summary (no autograd): (M_r, E_r) of the piece of the shard that the next rank
   continues (:func:`~linmix.parallel.transitions.carry_summary`);
2. state passing: S_in(r) = E_{r-1} + M_{r-1} S_in(r-1), by one all-gather of (M, E) and a local
   fold (``"allgather"``) or rank to rank, pipelined over blocks of heads (``"scan"``);
3. the ordinary op on the shard with ``initial_state`` = S_in (and the user's initial states of the
   sequences that start in this shard), ``output_final_state=True``;
4. backward: the gradient G(r) that the shard's outputs send to S_in
   (:func:`~linmix.parallel.transitions.initial_state_grad`) passes back the same way,
   dS_out(r) = G(r+1) + M_{r+1}^T dS_out(r+1), and enters the op's own backward as the gradient of
   its final state (an autograd Function around the op's outputs injects it), so every local
   gradient -- q, k, v, gates, beta, the initial states -- comes from the op's own backward.

Communication per call and rank is one state (plus M for gated families) each way, whatever T.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from linmix import ops as linmix_ops
from linmix.ops import dispatch
from linmix.ops.common.checks import check_scale, check_shape, check_tensor
from linmix.ops.common.utils import compute_dtype
from linmix.parallel.comm import all_gather, all_reduce_sum, irecv, isend
from linmix.parallel.context import SequenceParallel, ShardLayout, current_sequence_parallel
from linmix.parallel.transitions import (TRANSITION_KINDS, apply_transition, carry_summary, initial_state_grad,
                                         transition_shape)

SP_OPS = tuple(TRANSITION_KINDS)


def no_op_hook() -> contextlib.AbstractContextManager:
    """A context in which ops run as themselves (no sequence-parallel hook), for the local calls."""
    wrap_ops = getattr(dispatch, "wrap_ops", None)
    if wrap_ops is None:  # pragma: no cover - depends on the version of linmix.ops.dispatch
        return contextlib.nullcontext()
    return wrap_ops(None)


# -- state passing between ranks -------------------------------------------------------------------

class _Passing:
    """The shapes and flags of one call's state passing (forward S_in, backward dS_out)."""

    def __init__(self, layout: ShardLayout, op: str, rows: int, H: int, K: int, V: int, dtype: torch.dtype,
                 device: torch.device):
        self.layout, self.sp = layout, layout.sp
        self.rows, self.H, self.K, self.V = rows, H, K, V
        self.state_shape = (rows, H, K, V)
        self.m_shape = transition_shape(op, rows, H, K)
        self.dtype, self.device = dtype, device
        self.pt = layout.passes_through
        self.gathered_M: torch.Tensor | None = None  # allgather: every rank's M, kept for backward
        self.M: torch.Tensor | None = None  # scan: this rank's M

    def _zeros(self, shape):
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    # allgather (LASP-2) ----------------------------------------------------------------------------

    def forward_allgather(self, M, E):
        sp, r = self.sp, self.sp.rank
        parts = [(E if E is not None else self._zeros(self.state_shape)).reshape(-1)]
        if self.m_shape is not None:
            parts.append((M if M is not None else self._zeros(self.m_shape)).reshape(-1))
        gathered = all_gather(sp, torch.cat(parts), "state")
        nE = parts[0].numel()
        Es = gathered[:, :nE].view(sp.world_size, *self.state_shape)
        if self.m_shape is not None:
            self.gathered_M = gathered[:, nE:].view(sp.world_size, *self.m_shape)
        if not self.layout.continues_in[r]:
            return None
        S = None
        for j in range(r):  # S_in(j + 1) = E_j + [passes_through(j)] M_j S_in(j)
            S = Es[j] if S is None or not self.pt[j] else Es[j] + apply_transition(self._M(j), S)
        return S

    def _M(self, j):
        return None if self.gathered_M is None else self.gathered_M[j]

    def backward_allgather(self, G):
        sp, r = self.sp, self.sp.rank
        Gs = all_gather(sp, G if G is not None else self._zeros(self.state_shape), "state")
        if not self.layout.continues_out(r):
            return None
        D = None
        for j in range(sp.world_size - 1, r, -1):  # dS_out(j - 1) = G_j + [passes_through(j)] M_j^T dS_out(j)
            D = Gs[j] if D is None or not self.pt[j] else Gs[j] + apply_transition(self._M(j), D, transpose=True)
        return D

    # scan (ZeCO All-Scan) ------------------------------------------------------------------------------

    def _blocks(self):
        n = self.rows * self.H
        return [(int(b[0]), int(b[-1]) + 1) for b in torch.arange(n).tensor_split(min(self.sp.scan_blocks, n))]

    def _flat_M(self):
        return None if self.M is None else self.M.reshape(self.rows * self.H, *self.M.shape[2:])

    def forward_scan(self, M, E):
        sp, layout, r = self.sp, self.layout, self.sp.rank
        self.M = M
        flat = (self.rows * self.H, self.K, self.V)
        cont_in, cont_out, pt = layout.continues_in[r], layout.continues_out(r), self.pt[r]
        S_in = torch.empty(flat, dtype=self.dtype, device=self.device) if cont_in else None
        recvs = [irecv(sp, S_in[a:b], r - 1, "state") for a, b in self._blocks()] if cont_in else []
        Mf, Ef = self._flat_M(), (E.reshape(flat) if cont_out else None)
        sends = []
        if cont_out and not pt:  # the state handed on does not depend on the incoming one
            sends = [isend(sp, Ef[a:b], r + 1, "state") for a, b in self._blocks()]
        for (a, b), work in zip(self._blocks(), recvs):
            work.wait()
            if cont_out and pt:
                sends.append(isend(sp, Ef[a:b] + apply_transition(None if Mf is None else Mf[a:b], S_in[a:b]),
                                   r + 1, "state"))
        for work in sends:
            work.wait()
        return None if S_in is None else S_in.view(self.state_shape)

    def backward_scan(self, G):
        sp, layout, r = self.sp, self.layout, self.sp.rank
        flat = (self.rows * self.H, self.K, self.V)
        cont_in, cont_out, pt = layout.continues_in[r], layout.continues_out(r), self.pt[r]
        D = torch.empty(flat, dtype=self.dtype, device=self.device) if cont_out else None
        recvs = [irecv(sp, D[a:b], r + 1, "state") for a, b in self._blocks()] if cont_out else []
        Mf, Gf = self._flat_M(), (G.reshape(flat) if cont_in else None)
        sends = []
        if cont_in and not (pt and cont_out):  # nothing to add from later ranks
            sends = [isend(sp, Gf[a:b], r - 1, "state") for a, b in self._blocks()]
        for (a, b), work in zip(self._blocks(), recvs):
            work.wait()
            if cont_in and pt:
                Mb = None if Mf is None else Mf[a:b]
                sends.append(isend(sp, Gf[a:b] + apply_transition(Mb, D[a:b], transpose=True), r - 1, "state"))
        for work in sends:
            work.wait()
        return None if D is None else D.view(self.state_shape)

    def forward(self, M, E):
        return (self.forward_scan if self.sp.strategy == "scan" else self.forward_allgather)(M, E)

    def backward(self, G):
        return (self.backward_scan if self.sp.strategy == "scan" else self.backward_allgather)(G)


class _StateGradient(torch.autograd.Function):
    """Identity on (o, final states); its backward adds the gradient that later ranks send to the
    carried state (dS_out) to the final state's gradient, before the op's own backward runs."""

    @staticmethod
    def forward(ctx, o, final, call, *saved):
        ctx.call = call
        ctx.save_for_backward(*saved)
        return o.view_as(o), final.view_as(final)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dfinal):
        call = ctx.call
        q, k, v, *gates = ctx.saved_tensors
        gates = tuple(None if none else g for g, none in zip(gates, call.none_gates))
        D = call.passing.backward(call.entering_grad(q, k, v, gates, do, dfinal))
        if D is not None:
            dfinal = torch.zeros(call.final_shape, dtype=D.dtype, device=D.device) if dfinal is None else dfinal.clone()
            dfinal[call.carry_rows] += D.to(dfinal.dtype)
        return (do, dfinal, None) + (None,) * (3 + len(gates))


class _Call:
    """One sequence-parallel op call on one rank."""

    def __init__(self, op: str, layout: ShardLayout, q: torch.Tensor, v: torch.Tensor, scale: float,
                 chunk_size: int | None):
        self.op, self.layout, self.scale, self.chunk_size = op, layout, scale, chunk_size
        B, _, H, K = q.shape
        V = v.shape[-1]
        self.rows = B if not layout.packed else 1
        self.passing = _Passing(layout, op, self.rows, H, K, V, compute_dtype(q), q.device)
        N_local = layout.num_local_sequences
        self.final_shape = (N_local, H, K, V)
        if layout.packed:
            first, carry = layout.segments[0], layout.segments[-1]
            self.first = slice(first.begin, first.end)
            self.carry = slice(carry.begin, carry.end)
            self.carry_rows = slice(N_local - 1, N_local)
            self.first_ends_here = first.ends_here
        else:
            self.first = self.carry = slice(None)
            self.carry_rows = slice(None)
            self.first_ends_here = not layout.continues_out()

    @staticmethod
    def _cut(x, sl):
        return None if x is None else x[:, sl]

    def carry_state(self, k, v, gates, initial_state):
        """(M, E) of the piece the next rank continues (None, None when it continues nothing)."""
        layout, r = self.layout, self.layout.rank
        if not layout.continues_out(r):
            return None, None
        h0 = None
        if not layout.passes_through[r] and initial_state is not None:  # a fresh sequence with a given state
            h0 = initial_state[layout.segments[-1].seq:][:1] if layout.packed else initial_state
        M, E = carry_summary(self.op, self._cut(k, self.carry), self._cut(v, self.carry),
                             tuple(self._cut(g, self.carry) for g in gates), chunk_size=self.chunk_size,
                             initial_state=h0)
        return (M if layout.passes_through[r] else None), E

    def entering_grad(self, q, k, v, gates, do, dfinal):
        """G: the gradient this shard's outputs (and final states ending here) send to S_in."""
        if not self.layout.continues_in[self.layout.rank]:
            return None
        if do is None:
            do = v.new_zeros(v.shape)
        fsg = None
        if dfinal is not None and self.first_ends_here:
            fsg = dfinal[:1] if self.layout.packed else dfinal
        _, G = initial_state_grad(self.op, self._cut(q, self.first), self._cut(k, self.first),
                                  tuple(self._cut(g, self.first) for g in gates), self._cut(do, self.first),
                                  scale=self.scale, chunk_size=self.chunk_size, final_state_grad=fsg)
        return G

    def local_initial_state(self, S_in, initial_state, dtype):
        """The initial states [N_local, H, K, V] of the local op (None when all are zero)."""
        layout = self.layout
        if not layout.packed:
            if S_in is not None:
                return S_in
            return initial_state  # rank 0 holds the start of every row
        if S_in is None and initial_state is None:
            return None
        rows = []
        for seg in layout.segments:
            if not seg.fresh:
                rows.append(S_in)
            elif initial_state is not None:
                rows.append(initial_state[seg.seq:seg.seq + 1].to(dtype))
            else:
                rows.append(torch.zeros(1, *self.final_shape[1:], dtype=dtype, device=self.passing.device))
        return torch.cat(rows, 0)

    def final_rows(self) -> tuple[list[int], list[int]]:
        """(local rows, global sequences) of the sequences whose final state is computed on this rank."""
        layout = self.layout
        if layout.packed:
            mine = [i for i, seg in enumerate(layout.segments) if seg.ends_here]
            return mine, [layout.segments[i].seq for i in mine]
        rows = list(range(layout.batch_size)) if not layout.continues_out() else []
        return rows, rows


class _FinalStates(torch.autograd.Function):
    """The final states [N, H, K, V] of every sequence on every rank, from the ranks where they end
    (an all-reduce); the backward sums the gradients over the ranks and keeps the owned rows.
    It always depends on the local final states, so every rank runs its backward (a collective)."""

    @staticmethod
    def forward(ctx, final, call):
        ctx.call = call
        rows, seqs = call.final_rows()
        ctx.rows, ctx.seqs, ctx.local_shape = rows, seqs, final.shape
        out = final.new_zeros(call.layout.num_sequences, *final.shape[1:])
        out[seqs] = final[rows]
        return all_reduce_sum(call.layout.sp, out, "final_state")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad = all_reduce_sum(ctx.call.layout.sp, grad.contiguous(), "final_state")
        dfinal = grad.new_zeros(ctx.local_shape)
        dfinal[ctx.rows] = grad[ctx.seqs]
        return dfinal, None


def run_recurrent(op: str, local_op: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  gates: tuple, *, scale: float, initial_state: torch.Tensor | None, output_final_state: bool,
                  layout: ShardLayout, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sequence-parallel form of ``op`` on ``layout`` (see the module docstring).

    ``local_op(q, k, v, *gates, initial_state=, output_final_state=, cu_seqlens=)`` runs the op on
    the local shard; ``initial_state`` is the user's [N, H, K, V] (global sequences) or None.
    """
    call = _Call(op, layout, q, v, scale, chunk_size)
    with torch.no_grad():
        M, E = call.carry_state(k, v, gates, None if initial_state is None else initial_state.detach())
        S_in = call.passing.forward(M, E)
    h0_local = call.local_initial_state(S_in, initial_state, call.passing.dtype)
    o, final = local_op(q, k, v, *gates, initial_state=h0_local, output_final_state=True,
                        cu_seqlens=layout.cu_seqlens(q.device))
    call.none_gates = tuple(g is None for g in gates)  # saved as empty tensors, restored in backward
    saved = (q, k, v) + tuple(q.new_zeros(0) if g is None else g for g in gates)
    o, final = _StateGradient.apply(o, final, call, *(t.detach() for t in saved))
    return o, (_FinalStates.apply(final, call) if output_final_state else None)


# -- the layers' path: the op hook of ShardLayout.activate() ---------------------------------------

def shard_recurrent_op(layout: ShardLayout, op: str, fn: Callable[..., Any], q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, *gates: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The backend ``fn`` of ``op`` as called by the public op, run sequence-parallel on ``layout``."""
    if not kwargs.get("causal", True):
        raise ValueError(f"sequence parallelism: {op} with causal=False (bidirectional) cannot be split along "
                         "the sequence")
    if kwargs.get("initial_state") is not None or kwargs.get("output_final_state"):
        raise ValueError(f"sequence parallelism: {op} runs without a decoding state under a shard "
                         "(no initial_state, output_final_state=False); use the layers with use_cache=False")
    B, T = q.shape[:2]
    if (B, T) != (layout.batch_size, layout.shard_len):
        raise ValueError(f"sequence parallelism: {op} got [B, T] = [{B}, {T}] but the shard layout is "
                         f"[{layout.batch_size}, {layout.shard_len}]")
    check_local_cu_seqlens(layout, kwargs.get("cu_seqlens"), op)

    def local_op(q, k, v, *gates, initial_state, output_final_state, cu_seqlens):
        return fn(q, k, v, *gates, **{**kwargs, "initial_state": initial_state,
                                      "output_final_state": output_final_state, "cu_seqlens": cu_seqlens})

    o, _ = run_recurrent(op, local_op, q, k, v, gates, scale=kwargs["scale"], initial_state=None,
                         output_final_state=False, layout=layout, chunk_size=kwargs.get("chunk_size"))
    return o, None


def check_local_cu_seqlens(layout: ShardLayout, cu_seqlens: torch.Tensor | None, op: str) -> None:
    """A layer under a shard must pass the layout's local offsets (``layout.cu_seqlens()``)."""
    if not layout.packed:
        if cu_seqlens is not None:
            raise ValueError(f"sequence parallelism: {op} got cu_seqlens but the shard layout has no packed "
                             "sequences (build the layout with the global cu_seqlens)")
        return
    if cu_seqlens is None:
        raise ValueError(f"sequence parallelism: {op} got no cu_seqlens but the shard holds packed sequences; "
                         "pass the layout's local offsets layout.cu_seqlens()")
    if cu_seqlens is layout.cu_seqlens(cu_seqlens.device):
        return
    want = [layout.segments[0].begin] + [s.end for s in layout.segments]
    if cu_seqlens.tolist() != want:
        raise ValueError(f"sequence parallelism: {op} got cu_seqlens {cu_seqlens.tolist()} but this rank's local "
                         f"offsets are {want} (pass layout.cu_seqlens(), not the global offsets)")


# -- the public sequence-parallel ops ----------------------------------------------------------------

def _resolve_sp(sp: SequenceParallel | None, op: str) -> SequenceParallel:
    sp = sp if sp is not None else current_sequence_parallel()
    if sp is None:
        raise ValueError(f"sp_{op}: no sequence-parallel context; pass sp=SequenceParallel(group) or call it "
                         "inside `with sp:`")
    if not isinstance(sp, SequenceParallel):
        raise TypeError(f"sp_{op}: sp must be a SequenceParallel, got {type(sp).__name__}")
    return sp


def _sp_op(op: str, q, k, v, gates: tuple, *, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
           backend, sp):
    name = f"sp_{op}"
    sp = _resolve_sp(sp, op)
    check_tensor(name, "q", q, "BTHK")
    check_tensor(name, "v", v, "BTHV")
    B, T, H, K = q.shape
    V = v.shape[-1]
    layout = sp.layout(B, T, cu_seqlens)
    if initial_state is not None:
        check_shape(name, "initial_state", initial_state, "NHKV", [layout.num_sequences, H, K, V])
    scale = check_scale(name, scale, K)
    public = getattr(linmix_ops, op)

    def local_op(q, k, v, *gates, initial_state, output_final_state, cu_seqlens):
        with no_op_hook():
            return public(q, k, v, *gates, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                          backend=backend)

    return run_recurrent(op, local_op, q, k, v, gates, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, layout=layout, chunk_size=chunk_size)


_SP_DOC = """
    Args:
        q, k, v{gates}: this rank's shard of the op's inputs, T = T_local (contiguous shards of equal
            length in rank order: rank r holds global positions [r T_local, (r + 1) T_local)).
        scale: multiplies q; default K ** -0.5.
        initial_state: [N, H, K, V] states before the first token of each sequence (N = B, or the
            number of packed sequences), the same tensor on every rank; a sequence's state is used by
            the rank where it starts, and its gradient is returned there (zeros on other ranks: the
            sum over ranks is the full gradient).
        output_final_state: also return the [N, H, K, V] states after the last token of every
            sequence, on every rank (replicated: use them in the loss of every rank or of none,
            as their backward is a collective).
        cu_seqlens: the global int [N + 1] offsets of sequences packed along the whole sequence (the
            same on every rank; B == 1; ends at W * T_local). Sequences may start and end anywhere,
            also exactly at a shard boundary.
        chunk_size, backend: as in the op (for the local computation).
        sp: the :class:`~linmix.parallel.SequenceParallel`; default: the one of the innermost
            ``with sp:`` block.

    Returns:
        (o: this rank's shard [B, T_local, H, V] of the op's output on the whole sequence,
        final states [N, H, K, V] or None). Gradients of every input equal the single-process ones.
"""


def sp_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                   initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                   cu_seqlens: torch.Tensor | None = None, chunk_size: int | None = None, backend: str = "auto",
                   sp: SequenceParallel | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _sp_op("linear_attn", q, k, v, (), scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                  backend=backend, sp=sp)


def sp_simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, scale: float | None = None,
                  initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: torch.Tensor | None = None, chunk_size: int | None = None, backend: str = "auto",
                  sp: SequenceParallel | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _sp_op("simple_gla", q, k, v, (g,), scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                  backend=backend, sp=sp)


def sp_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, scale: float | None = None,
           initial_state: torch.Tensor | None = None, output_final_state: bool = False,
           cu_seqlens: torch.Tensor | None = None, chunk_size: int | None = None, backend: str = "auto",
           sp: SequenceParallel | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _sp_op("gla", q, k, v, (g,), scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                  backend=backend, sp=sp)


def sp_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None = None,
                  *, scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                  chunk_size: int | None = None, backend: str = "auto",
                  sp: SequenceParallel | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _sp_op("delta_rule", q, k, v, (beta, g), scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                  backend=backend, sp=sp)


sp_linear_attn.__doc__ = ("Sequence-parallel :func:`linmix.ops.linear_attn` (identity transition: only E is "
                          "passed).\n" + _SP_DOC.format(gates=""))
sp_simple_gla.__doc__ = ("Sequence-parallel :func:`linmix.ops.simple_gla` (scalar transition exp(sum g) per "
                         "head).\n" + _SP_DOC.format(gates=", g"))
sp_gla.__doc__ = ("Sequence-parallel :func:`linmix.ops.gla` (vector transition exp(sum g) per head and key "
                  "dimension).\n" + _SP_DOC.format(gates=", g"))
sp_delta_rule.__doc__ = ("Sequence-parallel :func:`linmix.ops.delta_rule` (K x K transition per head, float32).\n"
                         + _SP_DOC.format(gates=", beta, g"))

__all__ = ["SP_OPS", "run_recurrent", "shard_recurrent_op", "sp_delta_rule", "sp_gla", "sp_linear_attn",
           "sp_simple_gla"]
