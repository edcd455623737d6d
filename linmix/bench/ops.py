"""Kernel benchmark harness: forward and forward+backward time of every op and backend.

Used by ``benchmarks/ops.py`` and the ``linmix bench ops`` command, which share their command line
(:func:`add_arguments`, :func:`run_from_args`). Times are medians of
repeated runs: ``triton.testing.do_bench`` on CUDA, wall clock with warm-up on the CPU. Each row is
shown next to causal ``scaled_dot_product_attention`` of the same shape.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

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


# -- the shared command line (benchmarks/ops.py and `linmix bench ops`) ----------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the op benchmark's options to ``parser`` (returned for chaining)."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="shorter CPU run: T in {512, 2048}")
    parser.add_argument("--seq-lens", type=int, nargs="+", metavar="T", help="sequence lengths T")
    parser.add_argument("--ops", nargs="+", metavar="OP", help="ops to time (default: all)")
    parser.add_argument("--backends", nargs="+", metavar="BACKEND",
                        help="backends (default: torch reference on CPU, triton torch on CUDA)")
    parser.add_argument("--reference-max-len", type=int, default=2048, metavar="T",
                        help="skip the reference loop above this T (default: 2048)")
    return parser


def run_from_args(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> str:
    """Run the benchmark that ``args`` (parsed with :func:`add_arguments`) describe; return the report.

    The report is a title line and the markdown table. ``progress`` receives one line per timed case
    (default: lines on stderr). Raises ``ValueError`` on a bad option (unknown op, no CUDA).
    """
    if progress is None:
        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    if not cuda and args.device != "cpu":
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.seq_lens and any(t < 1 for t in args.seq_lens):
        raise ValueError(f"--seq-lens must be positive, got {args.seq_lens}")
    cases = default_cases()
    if args.ops:
        unknown = set(args.ops) - {c.name for c in cases}
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}; choose from {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in args.ops]
    if args.backends:
        from linmix.ops.dispatch import BACKENDS

        unknown = set(args.backends) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)}; choose from {sorted(BACKENDS)}")
    if cuda:
        seq_lens = args.seq_lens or [2048, 8192, 32768]
        rows = run(cases, args.backends or ["triton", "torch"], seq_lens, tokens=65536, heads=16, head_dim=128,
                   device=args.device, dtype=torch.bfloat16, reference_max_len=0, progress=progress)
        where = torch.cuda.get_device_name()
    else:
        seq_lens = args.seq_lens or ([512, 2048] if args.quick else [512, 2048, 8192])
        rows = run(cases, args.backends or ["torch", "reference"], seq_lens, batch=1, heads=4, head_dim=64,
                   reference_max_len=args.reference_max_len, progress=progress)
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"# linmix op benchmark, {date.today()}, {where}, torch {torch.__version__}\n\n{format_table(rows)}"
