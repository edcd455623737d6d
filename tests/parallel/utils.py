"""Shared pieces of the sequence-parallel tests (run inside the worker processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

TOL = 1e-10  # float64: relative L2 error


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def check_close(what: str, x: torch.Tensor | None, ref: torch.Tensor, tol: float = TOL) -> None:
    """Raise AssertionError unless x equals ref to ``tol`` relative L2 error (and both are finite)."""
    assert x is not None, f"{what}: missing (None), expected a tensor of shape {list(ref.shape)}"
    assert x.shape == ref.shape, f"{what}: shape {list(x.shape)} != {list(ref.shape)}"
    assert bool(torch.isfinite(x).all()), f"{what}: not finite"
    assert ref.norm() > 0, f"{what}: the reference is all zeros (a test that cannot fail)"
    err = rel_err(x, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e} (rank {dist.get_rank()})"


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x


def shard(x: torch.Tensor, dim: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's contiguous shard of a full-sequence tensor (equal shards over ``group``)."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    n = x.shape[dim] // W
    return x.narrow(dim, r * n, n)
