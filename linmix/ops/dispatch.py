"""Backend registry and choice.

Each op family registers its implementations under a backend name:

* ``"reference"`` -- the token-by-token recurrence (exact, slow; the test oracle),
* ``"torch"`` -- the chunkwise-parallel PyTorch form (the CPU default),
* ``"triton"`` -- Triton kernels (the CUDA default, once registered).

``backend="auto"`` picks ``"triton"`` for CUDA tensors when the op has a Triton implementation and
Triton imports, and ``"torch"`` otherwise.

Inside :func:`wrap_ops` (how :mod:`linmix.parallel` runs the layers' op calls on a shard of the
sequence without the layers knowing), ``resolve`` returns ``wrapper(op, fn)`` instead of ``fn``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

BACKENDS = ("auto", "reference", "torch", "triton")

_REGISTRY: dict[tuple[str, str], Callable[..., Any]] = {}

OpWrapper = Callable[[str, Callable[..., Any]], Callable[..., Any]]
_OP_WRAPPER: ContextVar[OpWrapper | None] = ContextVar("linmix_op_wrapper", default=None)


@contextlib.contextmanager
def wrap_ops(wrapper: OpWrapper | None) -> Iterator[None]:
    """Within the block, :func:`resolve` returns ``wrapper(op, fn)`` for the backend ``fn`` of ``op``.

    ``None`` switches an outer wrapper off. The setting is local to the thread / asyncio task.
    """
    token = _OP_WRAPPER.set(wrapper)
    try:
        yield
    finally:
        _OP_WRAPPER.reset(token)


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the interpreter on the CPU (``TRITON_INTERPRET=1``, as in CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def register(op: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[1:]}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[(op, backend)] = fn
        return fn

    return wrap


def available_backends(op: str) -> list[str]:
    """The backends registered for ``op``."""
    return [b for (o, b) in _REGISTRY if o == op]


def resolve(op: str, backend: str, device: torch.device) -> Callable[..., Any]:
    """Return the implementation of ``op`` for ``backend`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and (op, "triton") in _REGISTRY:
            backend = "triton"
        else:
            backend = "torch"
    fn = _REGISTRY.get((op, backend))
    if fn is None:
        raise ValueError(f"{op}: backend {backend!r} is not available; available: {available_backends(op)}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                         f"interpreter), got tensors on {device}")
    wrapper = _OP_WRAPPER.get()
    return fn if wrapper is None else wrapper(op, fn)
