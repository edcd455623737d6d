"""Helpers for op tests: random inputs, relative errors, forward+backward comparison."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are zero)."""
    x, ref = x.double(), ref.double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom


def log_gate(*shape, dtype=torch.float32, strength: str = "normal") -> torch.Tensor:
    """Realistic log-decays: logsigmoid of a normal; 'strong' reaches about -20 per step."""
    x = torch.randn(*shape, dtype=dtype)
    if strength == "strong":
        return -torch.rand(*shape, dtype=dtype) * 20
    if strength == "weak":
        return F.logsigmoid(x + 4) / 16
    return F.logsigmoid(x)


def ragged_cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def fwd_bwd(fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]], inputs: dict[str, torch.Tensor | None],
            grad_o: torch.Tensor, grad_state: torch.Tensor | None, **kwargs):
    """Run ``fn(**inputs, **kwargs)`` and backprop random cotangents.

    Returns (o, final_state, {name: grad}) for every floating input that is not None.
    """
    leaves = {n: (x.detach().clone().requires_grad_(True) if x is not None and x.is_floating_point() else x)
              for n, x in inputs.items()}
    o, s = fn(**leaves, **kwargs)
    loss = (o.float() * grad_o.float()).sum() if o.dtype != torch.float64 else (o * grad_o).sum()
    if s is not None and grad_state is not None:
        loss = loss + (s * grad_state.to(s.dtype)).sum()
    names = [n for n, x in leaves.items() if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return o.detach(), None if s is None else s.detach(), dict(zip(names, grads))


def assert_close_fwd_bwd(fn, inputs, *, ref_backend="reference", backend="torch", tol=None, **kwargs):
    """Compare ``backend`` against ``ref_backend``: output, final state and every gradient."""
    first = next(x for x in inputs.values() if isinstance(x, torch.Tensor))
    dtype = inputs.get("v", first).dtype
    tol = TOL[dtype] if tol is None else tol
    # cotangents drawn once, used for both backends
    with torch.no_grad():
        o0, s0 = fn(**inputs, backend=ref_backend, **kwargs)
    grad_o = torch.randn_like(o0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    grad_s = None if s0 is None else torch.randn_like(s0)
    o_ref, s_ref, g_ref = fwd_bwd(fn, inputs, grad_o, grad_s, backend=ref_backend, **kwargs)
    o, s, g = fwd_bwd(fn, inputs, grad_o, grad_s, backend=backend, **kwargs)
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    errs = {"o": rel_err(o, o_ref)}
    if s_ref is not None:
        assert s is not None and s.shape == s_ref.shape
        errs["final_state"] = rel_err(s, s_ref)
    for n, gr in g_ref.items():
        assert gr is not None, f"no reference gradient for {n}"
        assert g[n] is not None, f"backend {backend} gives no gradient for {n}"
        errs["d" + n] = rel_err(g[n], gr)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{backend} vs {ref_backend}: relative errors above {tol:g}: {bad} (all: {errs})"
    return errs
