"""Shared set-up of the Triton kernel tests: the interpreter check, interpreted kernel modules, plain pointers.

A test module sets ``TRITON_INTERPRET=1`` first (Triton reads it when ``triton.jit`` decorates a
function -- its own library functions included, at ``import triton``), then imports this module. If
triton itself was imported earlier without the variable (``tests/conftest.py`` imports linmix, and
e.g. transformers -> torch._dynamo imports triton), that cannot be undone: :func:`interpreter_problem`
says so and the tests fail with that message. A kernel module imported earlier without it is
reloaded by :func:`interpreted_module` so that its kernels are decorated again, interpreted.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import types

import triton.language as tl


def interpreter_problem(on_gpu: bool = False) -> str | None:
    """Why the CPU kernel tests cannot run (None when the interpreter is active or the kernels run on a GPU)."""
    if on_gpu or type(tl.cumsum).__name__ == "InterpretedFunction":
        return None
    return ("triton was imported before TRITON_INTERPRET=1 was set, so its library functions (tl.sum, tl.cumsum) "
            "are not interpreted and these CPU tests cannot run; set os.environ.setdefault('TRITON_INTERPRET', '1') "
            "in tests/conftest.py before it imports linmix (when CUDA is unavailable)")


def interpreted_module(name: str, kernel: str, on_gpu: bool = False) -> types.ModuleType:
    """The kernel module ``name``, reloaded if its ``kernel`` was decorated without the interpreter.

    (``importlib`` because e.g. ``linmix.ops.simple_gla`` is also the name of the op function.)
    """
    module = importlib.import_module(name)
    if not on_gpu and type(getattr(module, kernel)).__name__ != "InterpretedFunction":
        module = importlib.reload(module)  # decorate the kernels again, interpreted
    return module


def block_pointer_lines(module: types.ModuleType) -> list[int]:
    """Lines of ``module``'s code (not its docstrings) that use block pointers (``tl.make_block_ptr``)."""
    tree = ast.parse(inspect.getsource(module))
    return [node.lineno for node in ast.walk(tree)
            if (isinstance(node, ast.Attribute) and "block_ptr" in node.attr)
            or (isinstance(node, ast.Name) and "block_ptr" in node.id)]


def bf16_dots_upcast(monkeypatch) -> None:
    """The interpreter's tl.dot on bfloat16 operands (Triton 3.9) multiplies their raw uint16 storage:
    upcast the operands to float32 first (exact), as the GPU's bf16 products are."""
    import numpy as np
    from triton.runtime import interpreter

    def as_float32(x):
        if x.get_element_ty() != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *rest: create_dot(self, as_float32(a), as_float32(b), *rest))


def bf16_casts_round_to_nearest(monkeypatch) -> None:
    """The interpreter's float32 -> bfloat16 casts truncate (Triton 3.9): round to nearest even instead (the
    GPU's cvt.rn), so that the kernels' bf16 roundings are neither biased nor twice as large as on the GPU."""
    import numpy as np
    from triton.runtime import interpreter

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def cast_rounding(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # finite inputs only
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return cast_impl(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_rounding)
