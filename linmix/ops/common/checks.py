"""Input validation shared by every public op.

Every public op validates its inputs here before dispatching, so each backend can assume
well-formed tensors. Errors name the op, the argument, what was expected and what was given.
Shape/dtype/device checks are always on; value checks (gate signs, ``cu_seqlens`` order, beta
range) sync the device, so they run on CPU tensors always and elsewhere only in debug mode
(:func:`linmix.set_debug`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from linmix.debug import is_debug

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(x: torch.Tensor) -> list[int]:
    return list(x.shape)


def _fmt(names: Sequence[str], sizes: Sequence[int | None]) -> str:
    parts = [n if s is None else f"{n}={s}" for n, s in zip(names, sizes)]
    return "[" + ", ".join(parts) + "]"


def values_checked(x: torch.Tensor) -> bool:
    """Whether value checks (which sync the device) run for tensors on ``x``'s device."""
    return x.device.type == "cpu" or is_debug()


def check_tensor(op: str, name: str, x: object, dims: Sequence[str]) -> torch.Tensor:
    """Check that ``x`` is a floating tensor with ``len(dims)`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {_fmt(dims, [None] * len(dims))}, "
                        f"got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != len(dims):
        raise ValueError(f"{op}: {name} must have {len(dims)} dimensions {_fmt(dims, [None] * len(dims))}, "
                         f"got shape {_shape(x)}")
    return x


def check_shape(op: str, name: str, x: torch.Tensor, dims: Sequence[str], sizes: Sequence[int | None]) -> None:
    """Check ``x``'s shape against ``sizes`` (``None`` = any size)."""
    check_tensor(op, name, x, dims)
    for size, want in zip(x.shape, sizes):
        if want is not None and size != want:
            raise ValueError(f"{op}: {name} must have shape {_fmt(dims, sizes)}, got {_shape(x)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    present = {n: t for n, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              *, kv_heads_divide: bool = False) -> tuple[int, int, int, int, int]:
    """Check q [B, T, H, K], k [B, T, H(kv), K], v [B, T, H(kv), V]; return (B, T, H, K, V).

    With ``kv_heads_divide`` k and v may have fewer heads than q (grouped KV heads) as long as
    their head count divides q's.
    """
    check_tensor(op, "q", q, "BTHK")
    check_tensor(op, "k", k, "BTHK")
    check_tensor(op, "v", v, "BTHV")
    B, T, H, K = q.shape
    if kv_heads_divide:
        Hk = k.shape[2]
        check_shape(op, "k", k, "BTHK", [B, T, Hk, K])
        check_shape(op, "v", v, "BTHV", [B, T, Hk, None])
        if Hk == 0 or H % Hk:
            raise ValueError(f"{op}: the number of query heads ({H}) must be a multiple of the number of "
                             f"key/value heads ({Hk})")
    else:
        check_shape(op, "k", k, "BTHK", [B, T, H, K])
        check_shape(op, "v", v, "BTHV", [B, T, H, None])
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if T == 0 or K == 0 or v.shape[-1] == 0:
        raise ValueError(f"{op}: q, k, v must be non-empty, got q {_shape(q)}, v {_shape(v)}")
    return B, T, H, K, v.shape[-1]


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor | None, B: int, T: int) -> int:
    """Check packed-varlen offsets; return the number of sequences N (B when cu_seqlens is None)."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"{op}: cu_seqlens must be an int32 or int64 tensor of shape [N+1], got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must have shape [N+1] with N >= 1, got {_shape(cu_seqlens)}")
    if B != 1:
        raise ValueError(f"{op}: with cu_seqlens the sequences are packed along T, so B must be 1, got B={B}")
    if values_checked(cu_seqlens):
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != T:
            raise ValueError(f"{op}: cu_seqlens must start at 0 and end at T={T}, got {c[0]} ... {c[-1]}")
        if any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {c}")
    return cu_seqlens.numel() - 1


def check_log_gate(op: str, name: str, g: torch.Tensor, dims: Sequence[str], sizes: Sequence[int]) -> None:
    """Check a log-space decay gate: shape, and (values) finite and <= 0."""
    check_shape(op, name, g, dims, sizes)
    if values_checked(g):
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"{op}: {name} (log-decay) must be finite")
        if bool((g > 0).any()):
            raise ValueError(f"{op}: {name} is a log-decay and must be <= 0 everywhere, "
                             f"got max {g.max().item():.4g} (pass e.g. logsigmoid(x), not sigmoid(x))")


def check_beta(op: str, beta: torch.Tensor, sizes: Sequence[int]) -> None:
    """Check the delta-rule step size beta [B, T, H]: finite and in [0, 2]."""
    check_shape(op, "beta", beta, "BTH", sizes)
    if values_checked(beta):
        if not bool(torch.isfinite(beta).all()) or bool(((beta < 0) | (beta > 2)).any()):
            raise ValueError(f"{op}: beta must lie in [0, 2] (DeltaNet uses (0, 1)), got values in "
                             f"[{beta.min().item():.4g}, {beta.max().item():.4g}]")


def check_initial_state(op: str, h0: torch.Tensor | None, N: int, H: int, K: int, V: int) -> None:
    if h0 is None:
        return
    check_shape(op, "initial_state", h0, "NHKV", [N, H, K, V])


def check_scale(op: str, scale: float | None, K: int) -> float:
    if scale is None:
        return K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def check_chunk_size(op: str, chunk_size: int | None) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be None or a positive int, got {chunk_size!r}")
    return chunk_size


def check_non_causal(op: str, causal: bool, initial_state: torch.Tensor | None, output_final_state: bool) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    if not causal and (initial_state is not None or output_final_state):
        raise ValueError(f"{op}: causal=False (bidirectional) has no recurrent state; "
                         "initial_state must be None and output_final_state False")


def check_recurrent_op(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       scale: float | None, initial_state: torch.Tensor | None, output_final_state: bool,
                       cu_seqlens: torch.Tensor | None, chunk_size: int | None, causal: bool = True,
                       **extra: torch.Tensor | None) -> tuple[int, int, int, int, int, float]:
    """The checks every recurrent op shares; returns (B, T, H, K, V, scale)."""
    B, T, H, K, V = check_qkv(op, q, k, v)
    check_same_device(op, q=q, k=k, v=v, initial_state=initial_state, cu_seqlens=cu_seqlens, **extra)
    N = check_cu_seqlens(op, cu_seqlens, B, T)
    check_initial_state(op, initial_state, N, H, K, V)
    check_non_causal(op, causal, initial_state, output_final_state)
    check_chunk_size(op, chunk_size)
    return B, T, H, K, V, check_scale(op, scale, K)
