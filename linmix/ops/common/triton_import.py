"""``triton`` and ``triton.language`` for the kernel modules, or stand-ins when Triton is not installed.

linmix imports without Triton (CPU-only installs); the kernel modules then still parse (their
``@triton.jit`` decorators and ``tl.constexpr`` annotations resolve to the stand-ins) and register
nothing, because ``HAS_TRITON`` is False.
"""

import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)

__all__ = ["HAS_TRITON", "tl", "triton"]
