"""Small shared pieces of the GPU benchmark scripts (``benchmarks/gpu.py``, ``benchmarks/sp.py``)."""

from __future__ import annotations

import torch


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||x - ref|| / ||ref||, computed in float32 (ref's norm floored at 1e-30).

    Example:
        >>> rel_l2(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))  # doctest: +ELLIPSIS
        0.7071...
    """
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def markdown_table(rows: list[dict]) -> str:
    """A markdown table of dict rows: the union of their keys in first-seen order, floats to 3 digits, '-' if absent.

    Example:
        >>> print(markdown_table([{"op": "gla", "ms": 1.23456}, {"op": "sdpa", "ok": "yes"}]))
        | op | ms | ok |
        |---|---|---|
        | gla | 1.23 | - |
        | sdpa | - | yes |
    """
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "-"))
                                     for k in keys) + " |")
    return "\n".join(out)
