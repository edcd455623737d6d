"""Rotary position embedding (RoPE; Su et al., RoFormer, 2021).

Feature pairs (x_a, x_b) of q and k at position p are rotated by the angle p * theta_i with
theta_i = base^(-2i / dim), i = 0 .. dim/2 - 1:

    x_a' = x_a cos(p theta_i) - x_b sin(p theta_i)
    x_b' = x_b cos(p theta_i) + x_a sin(p theta_i)

so that <R_m q, R_n k> depends on positions only through m - n. Pairs are (i, i + dim/2) in the
default "half" layout (GPT-NeoX, LLaMA) and (2i, 2i + 1) with ``interleaved=True`` (GPT-J, the
RoFormer paper). Only the first ``dim`` features of each head rotate (partial rotary); the rest pass
through.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from linmix.ops.common.checks import check_cu_seqlens


def _check_qk(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"RotaryEmbedding: {name} must be a floating tensor of shape [B, T, H, D], got {got}")
    if x.dim() != 4:
        raise ValueError(f"RotaryEmbedding: {name} must have shape [B, T, H, D], got {list(x.shape)}")
    return x


def _check_int_tensor(name: str, x: object, shape: list[int], dims: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"RotaryEmbedding: {name} must be an integer tensor of shape {dims} = {shape}, got {got}")
    if list(x.shape) != shape:
        raise ValueError(f"RotaryEmbedding: {name} must have shape {dims} = {shape}, got {list(x.shape)}")
    return x


class RotaryEmbedding(nn.Module):
    """Rotary position embedding applied to q and k of shape [B, T, H, D].

    Positions come from, in order of precedence: explicit ``position_ids`` [B, T]; packed
    sequences ``cu_seqlens`` (positions restart at 0 at each sequence start); or ``0 .. T-1``.
    ``offset`` (an int, or a tensor of one offset per sequence) is added to the latter two, for
    decoding after a prefix. Angles and rotation are computed in float32 (float64 for float64
    inputs); the result has the input's dtype. There are no buffers, so casting the module to bf16
    does not degrade the frequencies.

    Args:
        dim: number of rotated features per head (even); ``dim < D`` is partial rotary (the first
            ``dim`` features rotate, the rest are untouched).
        base: the frequency base (10000 in RoFormer).
        interleaved: rotate pairs (2i, 2i+1) instead of (i, i + dim/2).

    Example:
        >>> import torch
        >>> rope = RotaryEmbedding(64)
        >>> q, k = torch.randn(2, 10, 4, 64), torch.randn(2, 10, 4, 64)
        >>> q, k = rope(q, k)
        >>> q1, k1 = rope(torch.randn(2, 1, 4, 64), torch.randn(2, 1, 4, 64), offset=10)  # decode
        >>> q1.shape
        torch.Size([2, 1, 4, 64])
    """

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even int, got {dim!r}")
        if not base > 0:
            raise ValueError(f"RotaryEmbedding: base must be positive, got {base!r}")
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"

    def inv_freq(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """theta_i = base^(-2i/dim), [dim/2]."""
        return self.base ** (-torch.arange(0, self.dim, 2, dtype=dtype, device=device) / self.dim)

    def position_ids(self, B: int, T: int, *, offset: int | torch.Tensor = 0,
                     cu_seqlens: torch.Tensor | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        """The positions [B, T] (int64) that ``forward`` uses without explicit ``position_ids``."""
        N = check_cu_seqlens("RotaryEmbedding", cu_seqlens, B, T)
        pos = torch.arange(T, device=device)
        seq_id = None
        if cu_seqlens is not None:
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            seq_id = torch.repeat_interleave(torch.arange(N, device=device), cu[1:] - cu[:-1], output_size=T)
            pos = pos - cu[seq_id]
        pos = pos[None].expand(B, T)
        if isinstance(offset, torch.Tensor):
            what = "[N] (one per packed sequence)" if cu_seqlens is not None else "[B]"
            offset = _check_int_tensor("offset", offset, [N], what).to(device=device, dtype=torch.long)
            pos = pos + (offset[seq_id][None] if seq_id is not None else offset[:, None])
        elif isinstance(offset, int) and not isinstance(offset, bool):
            pos = pos + offset
        else:
            raise TypeError(f"RotaryEmbedding: offset must be an int or an integer tensor, "
                            f"got {type(offset).__name__}")
        return pos

    def rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, T, H, D] by positions [B, T] (or [1, T], broadcast over B)."""
        _check_qk("x", x)
        B, T, H, D = x.shape
        if D < self.dim:
            raise ValueError(f"RotaryEmbedding: the head dim D={D} is smaller than the rotary dim {self.dim}")
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 \
                or position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
            got = list(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
            raise ValueError(f"RotaryEmbedding: position_ids must have shape [B, T] = [{B}, {T}], got {got}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        angles = position_ids.to(device=x.device, dtype=dtype)[..., None] * self.inv_freq(dtype, x.device)
        cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]  # [B, T, 1, dim/2]
        xr = x[..., :self.dim].to(dtype)
        if self.interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        else:
            x1, x2 = xr.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        out = out.to(x.dtype)
        return out if D == self.dim else torch.cat([out, x[..., self.dim:]], dim=-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, offset: int | torch.Tensor = 0,
                cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k.

        Args:
            q: [B, T, H, D] queries.
            k: [B, T, H_kv, D] keys (H_kv may differ from H).
            offset: added to the positions: an int, or an integer tensor [B] (one per row; [N],
                one per packed sequence, with ``cu_seqlens``) for batched decoding at different
                lengths.
            cu_seqlens: int [N+1] offsets of packed sequences (B must be 1); positions restart at
                each sequence.
            position_ids: integer [B, T] explicit positions; excludes ``offset`` and
                ``cu_seqlens``.

        Returns:
            (q, k) rotated, same shapes and dtypes.
        """
        _check_qk("q", q)
        _check_qk("k", k)
        B, T, _, D = q.shape
        if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
            raise ValueError(f"RotaryEmbedding: k must have shape [B, T, H_kv, D] = [{B}, {T}, H_kv, {D}], "
                             f"got {list(k.shape)}")
        if position_ids is not None:
            if cu_seqlens is not None:
                raise ValueError("RotaryEmbedding: pass either position_ids or cu_seqlens, not both")
            if isinstance(offset, torch.Tensor) or offset != 0:
                raise ValueError("RotaryEmbedding: position_ids are absolute; do not pass an offset with them")
            rows = position_ids.shape[0] if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 \
                and position_ids.shape[0] == 1 else B  # [1, T] broadcasts over the batch
            pos = _check_int_tensor("position_ids", position_ids, [rows, T], "[B, T]")
        else:
            pos = self.position_ids(B, T, offset=offset, cu_seqlens=cu_seqlens, device=q.device)
        return self.rotate(q, pos), self.rotate(k, pos)
