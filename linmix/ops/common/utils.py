"""Small helpers shared by the PyTorch backends: compute dtype, chunk layout, state passing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from linmix.ops.common.varlen import Packing


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision and float32 inputs, float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def upcast(dtype: torch.dtype, *xs: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if x is None else x.to(dtype) for x in xs]


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, H, *rest] -> [B, H, N, C, *rest], zero-padding T up to N * C."""
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    n = -(-T // chunk_size)
    pad = n * chunk_size - T
    if pad:
        x = F.pad(x, [0, 0] * (len(rest) + 1) + [0, pad])
    return x.reshape(B, n, chunk_size, H, *rest).movedim(3, 1)


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, N, C, *rest] -> [B, T, H, *rest] (drops the padding)."""
    B, H, n, C = x.shape[:4]
    return x.movedim(1, 3).reshape(B, n * C, H, *x.shape[4:])[:, :T]


def pass_states(E: torch.Tensor, decay: torch.Tensor | None,
                initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scan chunk states: S_n = decay_n * S_{n-1} + E_n.

    Args:
        E: [B, H, N, K, V] each chunk's state contribution from a zero initial state.
        decay: None (identity) or [B, H, N, K or 1, 1] each chunk's total decay (<= 1).
        initial_state: None or [B, H, K, V].

    Returns:
        (S_in [B, H, N, K, V] the state entering each chunk, S_final [B, H, K, V]).
    """
    B, H, N, K, V = E.shape
    if decay is None:
        shifted = torch.cat([E.new_zeros(B, H, 1, K, V), E[:, :, :-1]], dim=2)
        S_in = shifted.cumsum(2)
        if initial_state is not None:
            S_in = S_in + initial_state[:, :, None]
        return S_in, S_in[:, :, -1] + E[:, :, -1]
    S = initial_state if initial_state is not None else E.new_zeros(B, H, K, V)
    states = []
    # unbind, not E[:, :, n]: each indexing op's backward would write a full-size zero tensor.
    for E_n, decay_n in zip(E.unbind(2), decay.unbind(2)):
        states.append(S)
        S = decay_n * S + E_n
    return torch.stack(states, dim=2), S


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
