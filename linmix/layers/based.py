"""Based: Taylor-feature-map linear attention plus sliding-window softmax attention in one mixer."""

from __future__ import annotations

import torch
import torch.nn as nn

from linmix.layers.attention import SlidingWindowAttention
from linmix.layers.base import (LayerState, TokenMixer, check_positive_float, check_positive_int, check_state,
                                mask_steps, num_sequences, register_mixer)
from linmix.modules import TaylorFeatureMap
from linmix.ops import linear_attn
from linmix.ops.common.utils import compute_dtype

WINDOW_PREFIX = "window_"  # the window branch's state keys ("k", "v", "mask", "pos") carry this prefix


@register_mixer("based")
class Based(TokenMixer):
    r"""Based (Arora et al., "Simple linear attention language models balance the
    recall-throughput tradeoff", 2024): Taylor linear attention plus sliding-window attention.

    Linear branch (the paper's Based linear attention), per head, with q, k projected to a small
    ``feature_dim`` d (16) and phi the 2nd-order Taylor map of exp(q.k / sqrt(d)) (D' = 1 + d + d^2):

        q_t = phi(W_q x_t),  k_t = phi(W_k x_t),  v_t = W_v x_t                (values: head dim D/H)
        a_t = S_t^T q_t / (z_t . q_t + eps),  S_t = S_{t-1} + k_t v_t^T,  z_t = z_{t-1} + k_t

    computed by ``linmix.ops.linear_attn`` (scale 1; the normaliser z rides as a column of ones
    appended to v, so the state's last value column is z), as in the paper's normalised form.

    Window branch (``window_size`` = w > 0): the submodule ``window``, a
    :class:`~linmix.layers.attention.SlidingWindowAttention` over the last w tokens with its own
    q/k/v/o projections (H heads of dim D/H) and RoPE on q, k:

        b_t = sum_{t-w < s <= t} softmax_s(q'_t . k'_s / sqrt(D/H)) v'_s

    Output: y_t = W_o a_t + W'_o b_t, each branch through its own output projection. That is one
    projection [W_o, W'_o] of the concatenated branches [a_t; b_t], which includes summing the
    branches before a shared projection, W_o (a_t + b_t), as the case W'_o = W_o (at the cost of
    D^2 more parameters).

    The paper interleaves these as *separate* layers (Based linear attention layers, sliding-window
    attention layers with small windows, and short-convolution layers); this mixer fuses a linear
    and a local attention branch into one layer for convenience. ``window_size=0`` disables the
    window branch (pure Based linear attention, e.g. to interleave with separate ``"swa"``
    layers). Padding and packing follow the two parts: padded steps write nothing into the linear
    state, and the window branch's RoPE positions and KV cache count real tokens only (see
    :mod:`linmix.layers.attention`), so padded and packed runs equal runs alone.

    Args:
        hidden_size: model width D.
        num_heads: heads H of both branches; must divide D (value head dim D/H). The paper uses
            12 heads at D = 768 (head dim 64); 4 keeps small models valid.
        feature_dim: d, the q/k projection size per head before the Taylor map (paper: 16).
        eps: added to the linear branch's normaliser (paper: 1e-12).
        window_size: w, keys per query in the window branch, itself included (64; the paper's
            window layers use 64-128); 0 disables the branch.
        rope_base: RoPE frequency base of the window branch.
        layer_idx: index of the layer in the model.

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: [N, H, 1 + d + d^2, D/H + 1] float32 (float64 for float64
        inputs); the last column is the normaliser z.
        With ``window_size > 0`` also the window branch's KV cache (the
        :class:`~linmix.layers.attention.SlidingWindowAttention` state, keys prefixed
        ``"window_"``): ``"window_k"``, ``"window_v"``: [N, L, H, D/H] in the input dtype,
        L = min(w, tokens so far) (the last w real tokens); ``"window_mask"``: bool [N, L]
        (False = padding slot); ``"window_pos"``: int64 [N], real tokens seen (for RoPE).
        Size: 4 * H * (1 + d + d^2) * (D/H + 1) bytes (fixed) plus 2 * D * itemsize bytes per
        token of context up to w tokens (D = 64, defaults: 74,256 B + 256 B per token in float32,
        at most 16 KiB of cache).

    Example:
        >>> import torch
        >>> mixer = Based(hidden_size=64, num_heads=4, feature_dim=16, window_size=8)
        >>> x = torch.randn(2, 20, 64)
        >>> y, state = mixer(x, use_cache=True)
        >>> y.shape, state["recurrent_state"].shape, state["window_k"].shape
        (torch.Size([2, 20, 64]), torch.Size([2, 4, 273, 17]), torch.Size([2, 8, 4, 16]))
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, feature_dim: int = 16, eps: float = 1e-12,
                 window_size: int = 64, rope_base: float = 10000.0, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        check_positive_int(name, "num_heads", num_heads)
        check_positive_int(name, "feature_dim", feature_dim)
        self.eps = check_positive_float(name, "eps", eps)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"{name}: window_size must be a non-negative int (0 disables the window branch), "
                             f"got {window_size!r}")
        if hidden_size % num_heads:
            raise ValueError(f"{name}: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.feature_dim = feature_dim
        self.window_size = window_size
        if window_size and self.head_dim % 2:
            raise ValueError(f"{name}: the head dim hidden_size / num_heads = {self.head_dim} must be even for the "
                             "rotary embedding of the window branch")

        # linear branch
        self.q_proj = nn.Linear(hidden_size, num_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.feature_map = TaylorFeatureMap(feature_dim)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        # window branch
        self.window = SlidingWindowAttention(hidden_size, window_size=window_size, num_heads=num_heads,
                                             head_dim=self.head_dim, rope_theta=rope_base,
                                             layer_idx=layer_idx) if window_size else None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, feature_dim={self.feature_dim}, "
                f"window_size={self.window_size}")

    def _state_shapes(self, n: int) -> dict[str, list[int | str]]:
        shapes: dict[str, list[int | str]] = {
            "recurrent_state": [n, self.num_heads, self.feature_map.feature_dim, self.head_dim + 1]}
        if self.window is not None:
            shapes.update({WINDOW_PREFIX + key: shape for key, shape in self.window._state_shapes(n).items()})
        return shapes

    def _linear_branch(self, x, state, use_cache, cu_seqlens, attention_mask):
        B, T, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        q = self.feature_map(self.q_proj(x).unflatten(-1, (H, self.feature_dim)))
        k = self.feature_map(self.k_proj(x).unflatten(-1, (H, self.feature_dim)))
        v = self.v_proj(x).unflatten(-1, (H, Dh))
        v = torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1)  # the last output column is z_t . q_t
        k, v = mask_steps(attention_mask, k, v)  # after phi: phi(0) = [1, 0, ...] is not 0
        o, recurrent = linear_attn(q, k, v, scale=1.0,
                                   initial_state=None if state is None else state["recurrent_state"],
                                   output_final_state=use_cache, cu_seqlens=cu_seqlens)
        dtype = compute_dtype(o)
        o = o[..., :Dh].to(dtype) / (o[..., Dh:].to(dtype) + self.eps)
        return o.to(x.dtype), recurrent

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        self.check_input(x, attention_mask, cu_seqlens)
        state = check_state(type(self).__name__, state, self._state_shapes(num_sequences(x, cu_seqlens)))
        o, recurrent = self._linear_branch(x, state, use_cache, cu_seqlens, attention_mask)
        y = self.o_proj(o.flatten(-2))
        window_state = None
        if self.window is not None:
            past = None if state is None else {
                key[len(WINDOW_PREFIX):]: t for key, t in state.items() if key.startswith(WINDOW_PREFIX)}
            y_window, window_state = self.window(x, state=past, use_cache=use_cache, cu_seqlens=cu_seqlens,
                                                 attention_mask=attention_mask)
            y = y + y_window
        if not use_cache:
            return y, None
        new_state: LayerState = {"recurrent_state": recurrent}
        if window_state is not None:
            new_state.update({WINDOW_PREFIX + key: t for key, t in window_state.items()})
        return y, new_state

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the state: the float32 linear-attention state (fixed) plus the window branch's
        KV cache (``SlidingWindowAttention.state_bytes``: 2 * D values per token, up to
        ``window_size`` tokens, in the module's dtype)."""
        total = batch_size * 4 * self.num_heads * self.feature_map.feature_dim * (self.head_dim + 1)
        if self.window is not None:
            total += self.window.state_bytes(context_len, batch_size)
        return total
