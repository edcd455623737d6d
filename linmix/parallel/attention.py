"""Softmax attention on a shard of the sequence: the past keys/values come from the other ranks.

Rank r's queries sit at global positions [r T_local, (r + 1) T_local); they attend to every key of
their sequence before them (full attention) or to the last ``window`` keys (sliding window), so:

* full attention: one all-gather of the key/value heads (only the H_kv KV heads, keys and values
  in one buffer) along the sequence; this rank keeps the keys of its sequence before its shard as
  a KV cache ``initial_state`` of :func:`linmix.ops.softmax_attn`, which places them at positions
  before the local queries -- the causal mask is aligned to the shard's global offset. The
  backward of the all-gather reduce-scatters dK/dV back to their owners;
* sliding window: only the ``window - 1`` keys before the shard are needed: a point-to-point halo
  exchange with the previous rank (several ranks back if the window is longer than a shard).

Packed sequences: only the first local piece can continue a sequence from earlier ranks; it
attends with the gathered past, the other pieces run as ordinary packed sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from linmix.ops.common.checks import check_tensor
from linmix.ops.softmax_attn import softmax_attn
from linmix.parallel.comm import all_gather_sequence, halo_exchange, tie
from linmix.parallel.context import SequenceParallel, ShardLayout, current_sequence_parallel
from linmix.parallel.ops import check_local_cu_seqlens, no_op_hook


def run_attention(local_attn: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None, layout: ShardLayout) -> torch.Tensor:
    """This rank's output of causal softmax attention over the whole (sharded) sequence.

    ``local_attn(q, k, v, initial_state=None | (k_past, v_past), cu_seqlens=None | local)`` runs the
    op on local queries with a past of keys/values before them.
    """
    sp = layout.sp
    Kd = k.shape[-1]
    kv = torch.cat([k, v], dim=-1)  # one buffer for keys and values (KV heads only)
    before = layout.start - layout.first_sequence_start  # tokens of the first local sequence before the shard
    if window is None:
        gathered = all_gather_sequence(sp, kv, "kv")
        past = gathered[:, layout.first_sequence_start:layout.start]
    elif window > 1:
        n = window - 1
        halo = halo_exchange(sp, kv, n, "kv")
        past = halo[:, n - min(n, before):]
    else:
        past = kv[:, :0]
    k_past, v_past = past[..., :Kd], past[..., Kd:]
    P = past.shape[1]
    if not layout.packed:
        o, _ = local_attn(q, k, v, initial_state=(k_past, v_past) if P else None, cu_seqlens=None)
    else:
        cu = layout.cu_seqlens(q.device)
        first = layout.segments[0]
        if first.fresh or P == 0:
            o, _ = local_attn(q, k, v, initial_state=None, cu_seqlens=cu)
        else:
            e = first.end
            o, _ = local_attn(q[:, :e], k[:, :e], v[:, :e], initial_state=(k_past, v_past), cu_seqlens=None)
            if e < layout.shard_len:
                o_rest, _ = local_attn(q[:, e:], k[:, e:], v[:, e:], initial_state=None, cu_seqlens=cu[1:] - e)
                o = torch.cat([o, o_rest], dim=1)
    return tie(o, past)  # every rank runs the exchange's backward, also where the past is empty


def shard_softmax_attn(layout: ShardLayout, fn: Callable[..., Any], q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, *, causal: bool = True, window: int | None = None, scale: float,
                       initial_state: Any = None, output_final_state: bool = False,
                       cu_seqlens: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """The backend ``fn`` of ``softmax_attn`` as called by the public op, run on the shard ``layout``."""
    if not causal:
        raise ValueError("sequence parallelism: softmax_attn with causal=False (bidirectional) is not supported")
    if initial_state is not None or output_final_state:
        raise ValueError("sequence parallelism: softmax_attn runs without a KV cache under a shard "
                         "(no initial_state, output_final_state=False); use the layers with use_cache=False")
    if attention_mask is not None:
        raise ValueError("sequence parallelism takes packed sequences (cu_seqlens), not a padding attention_mask")
    B, T = q.shape[:2]
    if (B, T) != (layout.batch_size, layout.shard_len):
        raise ValueError(f"sequence parallelism: softmax_attn got [B, T] = [{B}, {T}] but the shard layout is "
                         f"[{layout.batch_size}, {layout.shard_len}]")
    check_local_cu_seqlens(layout, cu_seqlens, "softmax_attn")

    def local_attn(q, k, v, *, initial_state, cu_seqlens):
        return fn(q, k, v, causal=True, window=window, scale=scale, initial_state=initial_state,
                  output_final_state=False, cu_seqlens=cu_seqlens, attention_mask=None)

    return run_attention(local_attn, q, k, v, window, layout), None


def sp_softmax_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
                    scale: float | None = None, cu_seqlens: torch.Tensor | None = None, backend: str = "auto",
                    sp: SequenceParallel | None = None) -> torch.Tensor:
    """Sequence-parallel causal :func:`linmix.ops.softmax_attn` (full or sliding-window, grouped KV heads).

    Args:
        q: [B, T_local, Hq, K], k: [B, T_local, Hkv, K], v: [B, T_local, Hkv, V]: this rank's shard.
        window: None (full causal attention) or the sliding window (keys per query, itself included).
        scale: multiplies the scores; default K ** -0.5.
        cu_seqlens: the global offsets [N + 1] of packed sequences (the same on every rank), or None.
        backend: the backend of the local attention.
        sp: the :class:`~linmix.parallel.SequenceParallel`; default: the innermost ``with sp:``.

    Returns:
        o [B, T_local, Hq, V]: this rank's shard of the attention output on the whole sequence.
    """
    sp = sp if sp is not None else current_sequence_parallel()
    if not isinstance(sp, SequenceParallel):
        raise ValueError("sp_softmax_attn: no sequence-parallel context; pass sp=SequenceParallel(group) or call it "
                         "inside `with sp:`")
    check_tensor("sp_softmax_attn", "q", q, "BTHK")
    layout = sp.layout(q.shape[0], q.shape[1], cu_seqlens)

    def local_attn(q, k, v, *, initial_state, cu_seqlens):
        with no_op_hook():
            return softmax_attn(q, k, v, window=window, scale=scale, initial_state=initial_state,
                                cu_seqlens=cu_seqlens, backend=backend)

    return run_attention(local_attn, q, k, v, window, layout)


__all__ = ["run_attention", "shard_softmax_attn", "sp_softmax_attn"]
