"""RetNet: multi-scale retention with a fixed decay per head."""

from __future__ import annotations

import torch
import torch.nn as nn

from linmix.layers.base import (LayerState, TokenMixer, check_positive_float, check_positive_int, check_state,
                                mask_steps, num_sequences, register_mixer, token_positions)
from linmix.modules import GatedRMSNorm, RotaryEmbedding
from linmix.ops import simple_gla
from linmix.ops.common.utils import compute_dtype


def retention_log_decays(num_heads: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | None = None) -> torch.Tensor:
    """log(gamma_h) with gamma_h = 1 - 2^(-5 - h), h = 0 .. H-1 (RetNet's multi-scale decays), [H].

    Example:
        >>> retention_log_decays(2, torch.float64).exp().tolist()
        [0.96875, 0.984375]
    """
    h = torch.arange(num_heads, dtype=dtype, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h))


@register_mixer("retnet")
class RetNet(TokenMixer):
    r"""Multi-scale retention (Sun et al., "Retentive Network: A Successor to Transformer for Large
    Language Models", 2023).

    Per head h, with the fixed decay gamma_h = 1 - 2^(-5 - h) (h = 0 .. H-1, the paper's
    ``gamma = 1 - 2 ** (-5 - arange(H))``) and rotary positions on q and k:

        q_t = R_t W_q x_t,  k_t = R_t W_k x_t,  v_t = W_v x_t,  r_t = W_g x_t
        S_t = gamma_h S_{t-1} + k_t v_t^T,   o_t = S_t^T (q_t / sqrt(d_k))
        (``linmix.ops.simple_gla`` with the constant log-decay g = log gamma_h)
        y_t = W_o [ swish(r_t) * GroupNorm_h(o_t) ]

    i.e. the parallel form o = (Q K^T / sqrt(d_k) * D) V with D[n, m] = gamma^(n - m) for n >= m.
    Differences from the paper, as in later releases (flash-linear-attention): the xPos
    rotation is plain RoPE (xPos's extra length-extrapolation scaling is dropped: the decay
    gamma already damps long distances) and the per-head GroupNorm is an RMSNorm per head with one
    shared per-channel scale (:class:`linmix.modules.GatedRMSNorm`, which also applies the swish
    gate). RoPE positions count real tokens only (a padded row or packed sequence gets the
    positions it has alone); a position counter is kept in the state.

    Args:
        hidden_size: model width D.
        num_heads: heads H (each with its own gamma_h); must divide the key and value widths.
            The paper uses head dim 256 (H = D / 256); 4 keeps small models valid.
        expand_k: key width = ``int(D * expand_k)`` (paper: 1).
        expand_v: value width = ``int(D * expand_v)`` (paper: 2, the "double value dim" of RetNet;
            pass 1 for a square layer).
        norm_eps: epsilon of the per-head norm (1e-5 here; the paper's GroupNorm uses 1e-6).
        rope_base: RoPE frequency base (10000).
        layer_idx: index of the layer in the model.

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: [N, H, d_k/H, d_v/H] float32 (float64 for float64 inputs);
        ``"position"``: int64 [N], real tokens seen (for RoPE).
        Fixed size: 4 * d_k * d_v / H bytes per sequence (D = 64, defaults: 4 * 64 * 128 / 4 = 8 KiB).

    Example:
        >>> import torch
        >>> mixer = RetNet(hidden_size=64, num_heads=4)
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = mixer(x, use_cache=True)
        >>> y.shape, state["recurrent_state"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 4, 16, 32]))
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, expand_k: float = 1.0, expand_v: float = 2.0,
                 norm_eps: float = 1e-5, rope_base: float = 10000.0, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        check_positive_int(name, "num_heads", num_heads)
        check_positive_float(name, "expand_k", expand_k)
        check_positive_float(name, "expand_v", expand_v)
        self.key_dim = int(hidden_size * expand_k)
        self.value_dim = int(hidden_size * expand_v)
        for arg, dim, ratio in (("k", self.key_dim, expand_k), ("v", self.value_dim, expand_v)):
            if dim < 1 or dim % num_heads:
                raise ValueError(f"{name}: int(hidden_size * expand_{arg}) = int({hidden_size} * {ratio}) = {dim} "
                                 f"must be a positive multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads
        if self.head_k_dim % 2:
            raise ValueError(f"{name}: the key head dim (hidden_size * expand_k / num_heads = {self.head_k_dim}) "
                             "must be even for the rotary embedding")
        self.expand_k, self.expand_v = expand_k, expand_v

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.rotary = RotaryEmbedding(self.head_k_dim, base=rope_base)
        self.g_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation="swish", norm_before_gate=True)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, key_dim={self.key_dim}, "
                f"value_dim={self.value_dim}")

    def log_decays(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """log(gamma_h) = log(1 - 2^(-5 - h)), [H]; computed on the fly (no buffer to lose precision in bf16)."""
        return retention_log_decays(self.num_heads, dtype, device)

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        self.check_input(x, attention_mask, cu_seqlens)
        B, T, _ = x.shape
        n = num_sequences(x, cu_seqlens)
        H = self.num_heads
        state = check_state(type(self).__name__, state, {
            "recurrent_state": [n, H, self.head_k_dim, self.head_v_dim], "position": [n]})
        pos, next_pos = token_positions(B, T, offset=None if state is None else state["position"],
                                        attention_mask=attention_mask, cu_seqlens=cu_seqlens, device=x.device)
        q = self.q_proj(x).unflatten(-1, (H, self.head_k_dim))
        k = self.k_proj(x).unflatten(-1, (H, self.head_k_dim))
        v = self.v_proj(x).unflatten(-1, (H, self.head_v_dim))
        q, k = self.rotary(q, k, position_ids=pos)
        g = self.log_decays(compute_dtype(x), x.device).expand(B, T, H)
        k, v, g = mask_steps(attention_mask, k, v, g)  # padded steps: nothing written, no decay
        o, recurrent = simple_gla(q, k, v, g, scale=self.head_k_dim ** -0.5,
                                  initial_state=None if state is None else state["recurrent_state"],
                                  output_final_state=use_cache, cu_seqlens=cu_seqlens)
        r = self.g_proj(x).unflatten(-1, (H, self.head_v_dim))
        y = self.o_proj(self.g_norm(o, r).flatten(-2))
        if not use_cache:
            return y, None
        return y, {"recurrent_state": recurrent, "position": next_pos}

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the state (fixed): the float32 [H, d_k/H, d_v/H] state per sequence."""
        return batch_size * 4 * self.num_heads * self.head_k_dim * self.head_v_dim
