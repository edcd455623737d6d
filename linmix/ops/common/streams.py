"""Independent kernel launches on a second CUDA stream, so that latency-bound kernels overlap.

Every chunked backward of linmix recomputes the forward state scan (h_n, one program per state
tile) and runs the reverse scan (dh_n); neither reads the other's result. With few (batch, head)
pairs -- long sequences -- each scan runs about one program per SM and waits on its own chain of
dependent products, leaving most of every SM idle; run one after the other, the backward pays for
both chains. :class:`Fork` runs the forward scan on a side stream while the current stream runs the
reverse one (and whatever else does not need h), and joins before h is read.

    fork = Fork(q)
    h = q.new_empty(...)           # allocate on the current stream, before the side launch
    with fork.side():              # the side stream first waits for the current stream's work so far
        launch_forward_scan(h)     # then runs this
    launch_reverse_scan(...)       # the current stream, concurrently
    fork.join()                    # the current stream waits for the side's launches; h may be read

Off the GPU (CPU tensors, Triton's interpreter) and when switched off, ``side()`` runs the block on
the current stream and ``join()`` does nothing: the results are the same launches in program order.

Memory: results of the side launches are allocated on the current stream before the fork, and the
tensors the side launches read stay referenced by the caller until ``join()``; after it, freeing
any of them on the current stream is ordered after the side's work. The side stream is linmix's
own (one per device), so nothing else enqueues on it between a fork and its join. Capture into a
CUDA graph works: the fork and the join are event waits, which capture records as dependencies.

Switch: ``OVERLAP`` below, initialised from the environment (``LINMIX_OVERLAP_SCANS=0`` turns it
off), read at every fork.
"""

from __future__ import annotations

import contextlib
import os

import torch

OVERLAP = os.environ.get("LINMIX_OVERLAP_SCANS", "1") != "0"

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


class Fork:
    """A fork of the current CUDA stream for ``like``'s device (see the module docstring).

    Args:
        like: a tensor on the device of the launches; a CPU tensor makes the fork a no-op.
        enabled: False makes it a no-op too (default: the module's ``OVERLAP`` switch).
    """

    def __init__(self, like: torch.Tensor, enabled: bool | None = None):
        on = OVERLAP if enabled is None else enabled
        self.main = self.stream = None
        if on and like.is_cuda:
            self.main = torch.cuda.current_stream(like.device)
            self.stream = _side_stream(like.device)

    @property
    def active(self) -> bool:
        return self.stream is not None

    @contextlib.contextmanager
    def side(self):
        """Launches in this block go to the side stream, after everything the current stream has been given so
        far (its inputs are ready there); inactive: the block runs on the current stream."""
        if not self.active:
            yield
            return
        self.stream.wait_stream(self.main)
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        """Make the current stream wait for everything launched on the side stream so far."""
        if self.active:
            self.main.wait_stream(self.stream)


def on_side(fork: Fork | None):
    """``fork.side()``, or a block on the current stream when ``fork`` is None (launchers that take an optional
    fork)."""
    return fork.side() if fork is not None else contextlib.nullcontext()
