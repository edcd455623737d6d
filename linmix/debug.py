"""The debug switch: value checks that cost a device synchronisation.

Shape, dtype and device checks are free and always on. Checks of *values* (gate signs,
``cu_seqlens`` order, beta range) read tensors back to the host; on CPU tensors they are always
on, on accelerators only while debug mode is on. Turn it on with ``linmix.set_debug(True)`` or the
environment variable ``LINMIX_DEBUG=1``; the test suite turns it on.
"""

from __future__ import annotations

import os

_debug: bool = os.environ.get("LINMIX_DEBUG", "0").lower() in {"1", "true", "yes", "on"}


def set_debug(enabled: bool = True) -> None:
    """Turn value checks on accelerator tensors on or off (CPU tensors are always checked)."""
    global _debug
    _debug = bool(enabled)


def is_debug() -> bool:
    """Whether value checks run on accelerator tensors."""
    return _debug
