"""Chunkwise-parallel PyTorch form of the decayed linear recurrences (KERNELS.md sections 1-2).

Shared by ``linear_attn`` (no gate), ``simple_gla`` (scalar gate g [B, T, H]) and ``gla``
(vector gate g [B, T, H, K]). Per head, with chunks of C tokens and b_i the cumulative log-gate
inside a chunk (non-increasing), the state S_0 entering the chunk and q already scaled:

    O   = (Q * exp(b)) S_0 + ((Q K^T) o D) V,      D_ij = exp(b_i - b_j)  (i >= j, else 0)
    S_C = exp(b_C) S_0 + (K * exp(b_C - b))^T V

Every exponent is <= 0: no decay is ever divided by. For a vector gate D is per key dimension;
the intra-chunk scores use secondary sub-chunks of 8: between sub-blocks J < I the product
factors through the last position r of J, (q_i * exp(b_i - b_r)) . (k_j * exp(b_r - b_j)), both
exponents <= 0; the 8 x 8 diagonal sub-blocks are computed elementwise, one offset i - j at a
time (``gla_intra``). The vector gate uses chunks of 32 by default (on 2 CPU threads, C in
{16, 32, 64} x sub-chunks in {4, 8, 16} measured within noise of each other at T = 2048 and
8192; 32 x 8 never worse). The causal form is one autograd Function with a hand-written
backward (``chunk_fn.ChunkDecayFn``); the bidirectional form combines two causal scans.
"""

from __future__ import annotations

import torch

from linmix.ops.common.chunk_fn import ChunkDecayFn
from linmix.ops.common.utils import compute_dtype, run_packed, upcast

SUB_CHUNK = 8           # secondary sub-chunk of the vector gate's intra-chunk scores
DEFAULT_CHUNK = {None: 64, "scalar": 64, "vector": 32}


def chunk_decay_fwd(q, k, v, g, *, gate, scale, initial_state, output_final_state, chunk_size):
    """Causal chunked forward on a dense batch. Inputs already in the compute dtype."""
    T = q.shape[1]
    C = min(chunk_size or DEFAULT_CHUNK[gate], -(-T // SUB_CHUNK) * SUB_CHUNK)
    s = SUB_CHUNK if C % SUB_CHUNK == 0 else C
    o, S_final = ChunkDecayFn.apply(q, k, v, g, initial_state, gate, scale, C, s)
    return o, (S_final if output_final_state else None)


def _reverse_gate(g):
    """Gates of the time-reversed scan: step t' of the reversed sequence decays by g_{T-t'}."""
    if g is None:
        return None
    g = g.flip(1)
    return torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)


def _bidirectional_fwd(q, k, v, g, *, gate, scale, initial_state, output_final_state, chunk_size):
    kw = dict(gate=gate, scale=scale, initial_state=None, output_final_state=False, chunk_size=chunk_size)
    o_fwd, _ = chunk_decay_fwd(q, k, v, g, **kw)
    o_bwd, _ = chunk_decay_fwd(q.flip(1), k.flip(1), v.flip(1), _reverse_gate(g), **kw)
    diag = scale * (q * k).sum(-1, keepdim=True) * v  # counted by both scans
    return o_fwd + o_bwd.flip(1) - diag, None


def decay_chunk(q, k, v, g, *, gate, scale, initial_state=None, output_final_state=False,
                cu_seqlens=None, causal=True, chunk_size=None):
    """Chunked implementation behind linear_attn / simple_gla / gla (``gate`` None|scalar|vector)."""
    out_dtype = v.dtype
    q, k, v, g, initial_state = upcast(compute_dtype(q), q, k, v, g, initial_state)
    fn = chunk_decay_fwd if causal else _bidirectional_fwd
    o, S = run_packed(fn, cu_seqlens, (q, k, v, g), gate=gate, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size)
    return o.to(out_dtype), S
