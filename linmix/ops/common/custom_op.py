"""Triton kernels as ``torch.library`` custom ops: opaque to ``torch.compile``, with autograd and fake forms.

``torch.compile`` must not trace into a Triton launcher (Dynamo's handling of hand-written
launchers -- host-side math, ``.tolist()``, autotuning, in-place scratch buffers -- is a known way
for this field's kernels to fail or, worse, to compute wrong values when compiled). Each Triton
backend therefore exposes its forward and backward as two custom ops, ``linmix::<name>_fwd`` and
``linmix::<name>_bwd``, with fake (meta) implementations giving output shapes and dtypes, and the
autograd formula linking them. A compiled model then sees each op as one opaque node.

One mechanism for every family (:class:`TritonOp`): a family supplies

* the argument list as a schema string, e.g.
  ``"Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? h0, float scale, bool output_final_state, int chunk_size"``,
* ``forward(**args) -> (outputs..., saved...)``: ``num_outputs`` differentiable outputs followed by
  any tensors the backward needs beyond the inputs (``None`` allowed: it travels as an empty tensor),
* ``backward(inputs, saved, grads, needs) -> grads of the tensor inputs`` (``None`` where not needed;
  ``grads`` holds ``None`` for outputs that got no gradient),
* ``fake_forward(**args)``: the same outputs as ``forward`` with the right shapes and dtypes, no
  computation.

The gradient of each tensor input has that input's shape and dtype, so the backward's fake form is
generic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor
_EMPTY = (0,)

TRITON_OPS: dict[str, "TritonOp"] = {}
"""Every :class:`TritonOp` defined so far, by name (the Triton modules define theirs at import)."""


def _empty_like_device(ref: Tensor) -> Tensor:
    return ref.new_empty(_EMPTY)


def _none_to_empty(ts: Sequence[Tensor | None], ref: Tensor) -> list[Tensor]:
    return [_empty_like_device(ref) if t is None else t for t in ts]


def _unaliased(outs: Sequence[Tensor], inputs: Sequence) -> list[Tensor]:
    """Custom ops may not return their inputs (or views of them): copy any output that would."""
    ptrs = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, Tensor) and x.numel() > 0}
    return [t.clone() if (t.numel() > 0 and t.untyped_storage().data_ptr() in ptrs) else t for t in outs]


def _empty_to_none(ts: Sequence[Tensor]) -> list[Tensor | None]:
    return [None if (t is None or t.numel() == 0) else t for t in ts]


def _parse(schema_args: str) -> list[tuple[str, str]]:
    """[(type, name)] of a schema argument list."""
    out = []
    for part in schema_args.split(","):
        typ, name = part.strip().rsplit(" ", 1)
        out.append((typ, name))
    return out



class TritonOp:
    """A forward/backward pair of Triton launchers registered as ``linmix::<name>_fwd`` / ``_bwd``.

    Calling the object runs the forward op (autograd attached). The ops also work on CPU tensors
    (the Triton interpreter, ``TRITON_INTERPRET=1``), which is how CI tests them.

    Args:
        name: op name in the ``linmix`` namespace (unique).
        schema_args: the forward's arguments in ``torch.library`` schema syntax.
        num_outputs: differentiable outputs (the rest of ``forward``'s results are saved tensors).
        forward, backward, fake_forward: see the module docstring.
    """

    def __init__(self, name: str, schema_args: str, num_outputs: int, *, forward: Callable[..., Sequence],
                 backward: Callable[..., Sequence], fake_forward: Callable[..., Sequence]):
        self.name = name
        self.args = _parse(schema_args)
        self.names = [n for _, n in self.args]
        self.tensor_names = [n for t, n in self.args if t.startswith("Tensor")]
        self.const_names = [n for t, n in self.args if not t.startswith("Tensor")]
        self.num_outputs = num_outputs
        self._forward, self._backward, self._fake_forward = forward, backward, fake_forward
        self._num_results: int | None = None  # outputs + saved, learned from the first (fake or real) call

        fwd_schema = f"({schema_args}) -> Tensor[]"
        tensor_args = ", ".join(f"Tensor? {n}" for n in self.tensor_names)
        const_args = ", ".join(f"{t} {n}" for t, n in self.args if not t.startswith("Tensor"))
        bwd_schema = f"({tensor_args}, Tensor[] saved, Tensor[] grads, {const_args}, bool[] needs) -> Tensor[]"

        self.fwd_op = torch.library.custom_op(f"linmix::{name}_fwd", self._fwd_impl, mutates_args=(),
                                              schema=fwd_schema)
        self.fwd_op.register_fake(self._fwd_fake)
        self.bwd_op = torch.library.custom_op(f"linmix::{name}_bwd", self._bwd_impl, mutates_args=(),
                                              schema=bwd_schema)
        self.bwd_op.register_fake(self._bwd_fake)
        self.fwd_op.register_autograd(self._autograd_backward, setup_context=self._setup_context)
        TRITON_OPS[name] = self

    # -- forward -----------------------------------------------------------------------------------
    def _ref(self, args: Sequence) -> Tensor:
        return next(a for a in args if isinstance(a, Tensor))

    def _fwd_impl(self, *args) -> list[Tensor]:
        kwargs = dict(zip(self.names, args))
        return _unaliased(_none_to_empty(self._forward(**kwargs), self._ref(args)), args)

    def _fwd_fake(self, *args) -> list[Tensor]:
        kwargs = dict(zip(self.names, args))
        return _none_to_empty(self._fake_forward(**kwargs), self._ref(args))

    # -- backward ----------------------------------------------------------------------------------
    def _split(self, args: Sequence) -> tuple[list, list, list, dict, list[bool]]:
        n = len(self.tensor_names)
        inputs, saved, grads = list(args[:n]), list(args[n]), list(args[n + 1])
        consts = dict(zip(self.const_names, args[n + 2:n + 2 + len(self.const_names)]))
        return inputs, saved, grads, consts, list(args[-1])

    def _bwd_impl(self, *args) -> list[Tensor]:
        inputs, saved, grads, consts, needs = self._split(args)
        out = self._backward(dict(zip(self.tensor_names, inputs)), _empty_to_none(saved), _empty_to_none(grads),
                             consts, needs)
        ref = self._ref(inputs)
        out = [ref.new_empty(_EMPTY) if (g is None or not need) else g for g, need in zip(out, needs)]
        return _unaliased(out, [*inputs, *saved, *grads])

    def _bwd_fake(self, *args) -> list[Tensor]:
        inputs, _, _, _, needs = self._split(args)
        ref = self._ref(inputs)
        return [torch.empty_like(x) if (need and x is not None) else ref.new_empty(_EMPTY)
                for x, need in zip(inputs, needs)]

    # -- autograd ------------------------------------------------------------------------------------
    def _setup_context(self, ctx, inputs, output) -> None:
        kwargs = dict(zip(self.names, inputs))
        ctx.consts = {n: kwargs[n] for n in self.const_names}
        ctx.tensor_index = [self.names.index(n) for n in self.tensor_names]
        ctx.save_for_backward(*[kwargs[n] for n in self.tensor_names], *output[self.num_outputs:])

    def _autograd_backward(self, ctx, grads) -> tuple:
        saved = list(ctx.saved_tensors)
        n = len(self.tensor_names)
        inputs, extra = saved[:n], saved[n:]
        needs = [bool(ctx.needs_input_grad[i]) for i in ctx.tensor_index]
        ref = self._ref(inputs)
        grads = [ref.new_empty(_EMPTY) if g is None else g for g in list(grads)[:self.num_outputs]]
        out = self.bwd_op(*inputs, extra, grads, *ctx.consts.values(), needs)
        result: list[Tensor | None] = [None] * len(self.names)
        for i, g, need in zip(ctx.tensor_index, out, needs):
            result[i] = g if (need and g.numel() > 0) else None
        return tuple(result)

    # -- call ------------------------------------------------------------------------------------------
    def __call__(self, **kwargs) -> list[Tensor | None]:
        """Run the forward with autograd attached; returns the ``num_outputs`` outputs (or None).

        Under ``torch.compile`` this is the opaque custom op. In eager mode the same forward and
        backward run through a plain ``torch.autograd.Function``: the custom-op dispatcher costs
        about 0.1-1 ms of Python per call, which a decode step (tens of microseconds) cannot afford.
        """
        args = [kwargs[n] for n in self.names]
        if torch.compiler.is_compiling():
            return _empty_to_none(self.fwd_op(*args)[:self.num_outputs])
        if not (torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return list(self._forward(**kwargs))[:self.num_outputs]  # inference: no autograd bookkeeping
        return list(_EagerFunction.apply(self, *args))


class _EagerFunction(torch.autograd.Function):
    """The eager path of a :class:`TritonOp`: same forward/backward, no dispatcher."""

    @staticmethod
    def forward(ctx, op: TritonOp, *args):
        ctx.set_materialize_grads(False)
        kwargs = dict(zip(op.names, args))
        results = list(op._forward(**kwargs))
        ctx.op = op
        ctx.consts = {n: kwargs[n] for n in op.const_names}
        ctx.save_for_backward(*[kwargs[n] for n in op.tensor_names], *results[op.num_outputs:])
        return tuple(results[:op.num_outputs])

    @staticmethod
    def backward(ctx, *grads):
        op: TritonOp = ctx.op
        saved = list(ctx.saved_tensors)
        n = len(op.tensor_names)
        index = [op.names.index(name) for name in op.tensor_names]
        needs = [bool(ctx.needs_input_grad[1 + i]) for i in index]
        out = op._backward(dict(zip(op.tensor_names, saved[:n])), saved[n:], list(grads), ctx.consts, needs)
        result: list[Tensor | None] = [None] * len(op.names)
        for i, g, need in zip(index, out, needs):
            result[i] = g if need else None
        return (None, *result)
