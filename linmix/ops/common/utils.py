"""Small helpers shared by the PyTorch backends: compute dtype, time-major chunk slices, scratch buffers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from linmix.ops.common.varlen import Packing


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 inputs, float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def upcast(dtype: torch.dtype, *xs: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if x is None else x.to(dtype) for x in xs]


def chunk_slice(x: torch.Tensor, C: int, n0: int, n1: int, out: torch.Tensor | None = None,
                scale: float | None = None) -> torch.Tensor:
    """Chunks n0..n1 of x [B, T, H, *r] in the time-major layout [(n1 - n0) * B * H, C, *r].

    Positions past T are zero. Written into ``out`` (any contiguous tensor with enough elements)
    when given; multiplied by ``scale`` when given.
    """
    B, T, H = x.shape[:3]
    r = tuple(x.shape[3:])
    ns = n1 - n0
    shape = (ns, B, H, C, *r)
    if out is None:
        buf = x.new_empty(shape)
    else:
        numel = ns * B * H * C * (x[0, 0, 0].numel() if r else 1)
        buf = out.view(-1)[:numel].view(shape)
    dst = buf.permute(1, 0, 3, 2, *range(4, 4 + len(r)))  # [B, ns, C, H, *r] view of buf
    t0 = n0 * C
    full = min(ns, max(0, (T - t0) // C))
    if full:
        src = x[:, t0:t0 + full * C].reshape(B, full, C, H, *r)
        if scale is None:
            dst[:, :full].copy_(src)
        else:
            torch.mul(src, scale, out=dst[:, :full])
    if full < ns:  # the last chunk, partial
        tail = T - t0 - full * C
        dst[:, full, tail:].zero_()
        if scale is None:
            dst[:, full, :tail].copy_(x[:, t0 + full * C:])
        else:
            torch.mul(x[:, t0 + full * C:], scale, out=dst[:, full, :tail])
    return buf.view(ns * B * H, C, *r)


def unchunk_slice(xc: torch.Tensor, out: torch.Tensor, n0: int, scale: float | None = None) -> None:
    """Write chunks n0.. given time-major (xc [ns * B * H, C, *r]) into out [B, T, H, *r], past T dropped."""
    B, T, H = out.shape[:3]
    r = tuple(out.shape[3:])
    C = xc.shape[1]
    ns = xc.shape[0] // (B * H)
    src = xc.view(ns, B, H, C, *r).permute(1, 0, 3, 2, *range(4, 4 + len(r)))  # [B, ns, C, H, *r]
    t0 = n0 * C
    full = min(ns, max(0, (T - t0) // C))
    if full:
        dst = out[:, t0:t0 + full * C].view(B, full, C, H, *r)
        if scale is None:
            dst.copy_(src[:, :full])
        else:
            torch.mul(src[:, :full], scale, out=dst)
    if full < ns:
        tail = T - t0 - full * C
        if scale is None:
            out[:, t0 + full * C:].copy_(src[:, full, :tail])
        else:
            torch.mul(src[:, full, :tail], scale, out=out[:, t0 + full * C:])


_scratch = threading.local()
SCRATCH_MAX_BYTES = 4 << 20  # CPU scratch buffers up to this size are kept between calls


class Workspace:
    """Scratch buffers of one forward or backward call, reused across its slices.

    ``get(name, *shape)`` views a buffer that is allocated on first use. On the CPU, buffers of up
    to ``SCRATCH_MAX_BYTES`` are also kept between calls (per thread and dtype): a fresh
    allocation of a few MB is handed out by the C allocator as untouched pages, so every call
    would pay page faults on its first writes; the slices bound these sizes. A buffer's contents
    never outlive the call that wrote them.
    """

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.local: dict[str, torch.Tensor] = {}
        self.kept: dict[str, torch.Tensor] = {}
        if like.device.type == "cpu":
            caches = getattr(_scratch, "caches", None)
            if caches is None:
                caches = _scratch.caches = {}
            self.kept = caches.setdefault(like.dtype, {})

    @staticmethod
    def release() -> None:
        """Drop this thread's kept CPU scratch buffers (at most a few tens of MB per dtype)."""
        _scratch.caches = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        keep = self.like.device.type == "cpu" and numel * self.like.element_size() <= SCRATCH_MAX_BYTES
        bufs = self.kept if keep else self.local
        buf = bufs.get(name)
        if buf is None or buf.numel() < numel:
            # Kept buffers outlive the call: never make them inference tensors, which could not be written
            # by a later call outside torch.inference_mode() (writing normal tensors inside it is allowed).
            with torch.inference_mode(False):
                buf = bufs[name] = self.like.new_empty(numel)
        return buf[:numel].view(shape)


def run_packed(fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]], cu_seqlens: torch.Tensor | None,
               seq_inputs: Sequence[torch.Tensor | None], **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``fn(*seq_inputs, **kwargs)`` on a padded batch when ``cu_seqlens`` packs sequences."""
    if cu_seqlens is None:
        return fn(*seq_inputs, **kwargs)
    packing = Packing(cu_seqlens)
    o, state = fn(*[packing.pad(x) for x in seq_inputs], **kwargs)
    return packing.unpad(o), state


def run_per_sequence(fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
                     cu_seqlens: torch.Tensor | None, seq_inputs: Sequence[torch.Tensor | None],
                     initial_state: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``fn`` on each packed sequence alone (the reference forms' varlen path)."""
    if cu_seqlens is None:
        return fn(*seq_inputs, initial_state=initial_state, **kwargs)
    offsets = cu_seqlens.tolist()
    outs, states = [], []
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, s = fn(*[None if x is None else x[:, a:b] for x in seq_inputs], initial_state=h0, **kwargs)
        outs.append(o)
        states.append(s)
    final = None if states[0] is None else torch.cat(states, 0)
    return torch.cat(outs, 1), final
