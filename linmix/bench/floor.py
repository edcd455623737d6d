"""The floor of an op: the time its FLOPs and its unavoidable bytes take at the measured machine rates.

floor = max(FLOPs / matmul rate, bytes / copy bandwidth), with both rates measured on the machine
that runs the benchmark (:func:`measure_rates`), so every timing table can say how far each op is
from what the hardware allows.

FLOPs per token per head of the chunked algorithm (chunk C, head dims K, V; KERNELS.md), counting
the matmuls (2 FLOPs per multiply-add) and nothing elementwise:

* ``linear_attn``, ``simple_gla``, ``gla``: Q K^T (2CK) + scores V (2CV) + Q h (2KV) + K^T V (2KV).
* ``delta_rule`` (gated or not): K K^T (2CK) + W = A (beta K) (2CK) + U~ = A (beta V) (2CV)
  + W h (2KV) + Q K^T (2CK) + scores U (2CV) + Q h (2KV) + K^T U (2KV); the 16 x 16 blockwise
  triangular solve is left out.
* Backward: twice the forward's FLOPs (each forward matmul has two gradient matmuls), so
  fwd+bwd = 3 x fwd.

Bytes: only what must cross HBM -- q, k, v (and gates, beta) read and o written once in the
forward; the backward reads q, k, v, gates, dO and writes dq, dk, dv, dg. Chunk states h are not
counted (avoiding them is possible: that is the point of the floor). A decode step must read and
write the float32 state: 2 x B x H x K x V x 4 bytes (plus the token's q, k, v, o).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rates:
    """Measured machine rates: dense matmul FLOP/s (in the benchmark dtype) and copy bytes/s."""

    flops: float
    bytes: float


def measure_rates(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16) -> Rates:
    """Median rate of an 8192^3 matmul and of a 1 GiB device-to-device copy (read + write counted)."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = triton.testing.do_bench(lambda: a @ b, quantiles=[0.5]) / 1e3
    x = torch.empty(2**28, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    t_cp = triton.testing.do_bench(lambda: y.copy_(x), quantiles=[0.5]) / 1e3
    return Rates(flops=2 * n**3 / t_mm, bytes=2 * x.numel() * 4 / t_cp)


def _flops_per_token(op: str, K: int, V: int, C: int) -> int:
    if op in ("linear_attn", "simple_gla", "gla"):
        return 2 * C * (K + V) + 4 * K * V
    if op in ("delta_rule", "gated_delta_rule"):
        return 6 * C * K + 4 * C * V + 6 * K * V
    if op == "sdpa_causal":
        raise ValueError("sdpa_causal: use attention_flops()")
    raise ValueError(f"no FLOP model for op {op!r}")


def _gate_elems(op: str, K: int) -> int:
    return {"simple_gla": 1, "gla": K, "delta_rule": 1, "gated_delta_rule": 2}.get(op, 0)


def op_floor(op: str, B: int, T: int, H: int, K: int, V: int, rates: Rates, *, backward: bool,
             elem_bytes: int = 2, gate_bytes: int = 4, chunk_size: int = 64) -> float:
    """Seconds: the floor of one chunked op call (forward, or forward + backward)."""
    tokens = B * T * H
    flops = tokens * _flops_per_token(op, K, V, chunk_size) * (3 if backward else 1)
    gates = _gate_elems(op, K)
    if backward:  # forward + backward traffic
        elems, gate_elems = (2 * K + 2 * V) + (2 * K + 2 * V) + (2 * K + V), 3 * gates
    else:
        elems, gate_elems = 2 * K + 2 * V, gates
    nbytes = tokens * (elems * elem_bytes + gate_elems * gate_bytes)
    return max(flops / rates.flops, nbytes / rates.bytes)


def attention_floor(B: int, T: int, H: int, K: int, V: int, rates: Rates, *, backward: bool,
                    elem_bytes: int = 2) -> float:
    """Seconds: causal softmax attention (half of the T x T scores; fwd 2 matmuls, bwd 2.5x fwd as flash)."""
    flops = B * H * T * T * (K + V)  # 2 * (K + V) * T^2 / 2
    flops *= 3.5 if backward else 1.0
    nbytes = B * T * H * ((2 * K + 2 * V) + ((2 * K + 2 * V) + (2 * K + V) if backward else 0)) * elem_bytes
    return max(flops / rates.flops, nbytes / rates.bytes)


def decode_floor(B: int, H: int, K: int, V: int, rates: Rates, *, elem_bytes: int = 2) -> float:
    """Seconds: one decode step reads and writes the float32 state, reads q, k, v and writes o."""
    return (2 * B * H * K * V * 4 + B * H * (2 * K + 2 * V) * elem_bytes) / rates.bytes
