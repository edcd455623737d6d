"""Kernel benchmark harness: forward and forward+backward time of every op and backend.

Used by ``benchmarks/ops.py`` (and later the ``linmix bench ops`` command). Times are medians of
repeated runs: ``triton.testing.do_bench`` on CUDA, wall clock with warm-up on the CPU. Each row is
shown next to causal ``scaled_dot_product_attention`` of the same shape.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import linmix


@dataclass
class Case:
    """One op under test: how to build its inputs and call it."""

    name: str
    call: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    extra: Callable[[int, int, int, int, torch.device, torch.dtype], dict[str, torch.Tensor]] = field(
        default=lambda B, T, H, K, device, dtype: {})
    normalize_k: bool = False


def _scalar_gate(B, T, H, K, device, dtype):
    return {"g": F.logsigmoid(torch.randn(B, T, H, device=device))}


def _vector_gate(B, T, H, K, device, dtype):
    return {"g": F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16}


def _beta(B, T, H, K, device, dtype):
    return {"beta": torch.rand(B, T, H, device=device, dtype=dtype).sigmoid()}


def _beta_gate(B, T, H, K, device, dtype):
    return {**_beta(B, T, H, K, device, dtype), **_scalar_gate(B, T, H, K, device, dtype)}


def default_cases() -> list[Case]:
    ops = linmix.ops
    cases = [
        Case("linear_attn", ops.linear_attn),
        Case("simple_gla", ops.simple_gla, _scalar_gate),
        Case("gla", ops.gla, _vector_gate),
    ]
    if hasattr(ops, "delta_rule"):
        cases += [Case("delta_rule", ops.delta_rule, _beta, normalize_k=True),
                  Case("gated_delta_rule", ops.delta_rule, _beta_gate, normalize_k=True)]
    return cases


def _sdpa(q, k, v, **_):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2), None


SDPA = Case("sdpa_causal", _sdpa)


def time_fn(fn: Callable[[], object], device: torch.device, *, min_time: float = 0.2, max_reps: int = 50) -> float:
    """Median seconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=[0.5]) / 1e3
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(case: Case, backend: str, B: int, T: int, H: int, K: int, V: int,
               device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of one op/backend at one shape."""
    q = torch.randn(B, T, H, K, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, H, K, device=device, dtype=dtype)
    if case.normalize_k:
        k = F.normalize(k.float(), dim=-1).to(dtype)
    k.requires_grad_(True)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype, requires_grad=True)
    extra = {n: t.requires_grad_(True) for n, t in case.extra(B, T, H, K, device, dtype).items()}
    kwargs = {} if case is SDPA else {"backend": backend}
    do = torch.randn(B, T, H, V, device=device, dtype=dtype)
    leaves = [q, k, v, *extra.values()]

    def fwd():
        with torch.no_grad():
            return case.call(q, k, v, **extra, **kwargs)

    def fwd_bwd():
        o, _ = case.call(q, k, v, **extra, **kwargs)
        torch.autograd.grad(o, leaves, do)

    return time_fn(fwd, device), time_fn(fwd_bwd, device)


def run(cases: list[Case], backends: list[str], seq_lens: list[int], *, batch: int | None = None,
        tokens: int | None = None, heads: int = 4, head_dim: int = 64, device: str = "cpu",
        dtype: torch.dtype = torch.float32, reference_max_len: int = 2048,
        progress: Callable[[str], None] | None = None) -> list[dict[str, object]]:
    """Time every case x backend x T; return rows with ms and speed-ups over SDPA and reference."""
    dev = torch.device(device)
    rows: list[dict[str, object]] = []
    for T in seq_lens:
        B = batch if batch is not None else max(1, (tokens or T) // T)
        shape = dict(B=B, T=T, H=heads, K=head_dim, V=head_dim, device=dev, dtype=dtype)
        if progress:
            progress(f"T={T}: sdpa")
        sdpa = bench_case(SDPA, "torch", **shape)
        rows.append({"op": "sdpa_causal", "backend": "torch", "T": T, "B": B,
                     "fwd_ms": sdpa[0] * 1e3, "fwdbwd_ms": sdpa[1] * 1e3})
        for case in cases:
            ref_time = None
            for backend in backends:
                if backend == "reference" and T > reference_max_len:
                    continue
                if progress:
                    progress(f"T={T}: {case.name} [{backend}]")
                fwd, fwdbwd = bench_case(case, backend, **shape)
                if backend == "reference":
                    ref_time = fwdbwd
                rows.append({"op": case.name, "backend": backend, "T": T, "B": B,
                             "fwd_ms": fwd * 1e3, "fwdbwd_ms": fwdbwd * 1e3,
                             "vs_sdpa": sdpa[1] / fwdbwd})
            if ref_time is not None:
                for row in rows:
                    if row["op"] == case.name and row["T"] == T and row["backend"] != "reference":
                        row["vs_reference"] = ref_time / row["fwdbwd_ms"] * 1e3
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """A markdown table of benchmark rows."""
    head = "| op | backend | T | B | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs SDPA | vs reference |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        vs_sdpa = f"{r['vs_sdpa']:.1f}x" if "vs_sdpa" in r else "-"
        vs_ref = f"{r['vs_reference']:.0f}x" if "vs_reference" in r else "-"
        lines.append(f"| {r['op']} | {r['backend']} | {r['T']} | {r['B']} | {r['fwd_ms']:.2f} | "
                     f"{r['fwdbwd_ms']:.2f} | {vs_sdpa} | {vs_ref} |")
    return "\n".join(lines)
