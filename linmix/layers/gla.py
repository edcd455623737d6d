"""GLA: gated linear attention with a low-rank, data-dependent decay per key dimension."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.layers.base import (LayerState, TokenMixer, apply_short_conv, check_positive_float, check_positive_int,
                                check_state, conv_state_bytes, conv_state_shapes, mask_steps, num_sequences,
                                register_mixer)
from linmix.modules import GatedRMSNorm, ShortConvolution
from linmix.ops import gla
from linmix.ops.common.utils import compute_dtype


@register_mixer("gla")
class GLA(TokenMixer):
    r"""Gated Linear Attention (Yang et al., "Gated Linear Attention Transformers with
    Hardware-Efficient Training", 2023).

    Per head, with a log-space decay vector over the key dimension:

        q_t = W_q x_t,  k_t = W_k x_t,  v_t = W_v x_t,  r_t = W_r x_t           (output gate)
        g_t = logsigmoid(W_2 W_1 x_t + b) / gate_logit_normalizer                 (<= 0, per key dim)
        S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = S_t^T (q_t / sqrt(d_k))
        y_t = W_o [ RMSNorm_head(o_t) * swish(r_t) ]

    (``linmix.ops.gla``). ``RMSNorm_head`` normalises each head's output separately with one
    per-head-dim scale (:class:`linmix.modules.GatedRMSNorm`). With ``use_short_conv`` q, k and v
    first pass a causal depthwise convolution (SiLU), as in flash-linear-attention's GLA.

    Args:
        hidden_size: model width D.
        expand_k: key width = ``int(D * expand_k)`` (paper: 0.5).
        expand_v: value width = ``int(D * expand_v)`` (paper: 1.0).
        num_heads: heads H (paper: 4); must divide the key and value widths.
        gate_low_rank_dim: rank of the decay projection W_2 W_1 (paper: 16).
        gate_logit_normalizer: divides logsigmoid(.) so decays start near 1 (paper: 16).
        use_short_conv: causal short convolution on q, k, v (default off, as in the paper).
        conv_size: kernel size of the short convolution.
        conv_bias: bias in the short convolution.
        norm_eps: epsilon of the per-head output RMSNorm.
        layer_idx: index of the layer in the model (for caches).

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: [N, H, d_k/H, d_v/H] float32 (float64 for float64 inputs);
        with ``use_short_conv`` also ``"conv_q"``, ``"conv_k"``: [N, conv_size-1, d_k] and
        ``"conv_v"``: [N, conv_size-1, d_v] in the input's dtype.
        The size is fixed (it does not grow with the context): ``state_bytes(L)`` is the same for
        every L; at D=64 with defaults, 4 * 8 * 16 floats = 2 KiB per sequence.

    Example:
        >>> import torch
        >>> mixer = GLA(hidden_size=64)
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = mixer(x, use_cache=True)
        >>> y.shape, state["recurrent_state"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 4, 8, 16]))
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, expand_k: float = 0.5, expand_v: float = 1.0, num_heads: int = 4,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, use_short_conv: bool = False,
                 conv_size: int = 4, conv_bias: bool = False, norm_eps: float = 1e-5,
                 layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        for arg, value in (("expand_k", expand_k), ("expand_v", expand_v)):
            check_positive_float(name, arg, value)
        for arg, value in (("num_heads", num_heads), ("gate_low_rank_dim", gate_low_rank_dim),
                           ("conv_size", conv_size)):
            check_positive_int(name, arg, value)
        check_positive_float(name, "gate_logit_normalizer", gate_logit_normalizer)
        self.key_dim = int(hidden_size * expand_k)
        self.value_dim = int(hidden_size * expand_v)
        for arg, dim, ratio in (("key", self.key_dim, expand_k), ("value", self.value_dim, expand_v)):
            if dim < 1 or dim % num_heads:
                raise ValueError(f"{name}: the {arg} width int(hidden_size * expand_{arg[0]}) = "
                                 f"int({hidden_size} * {ratio}) = {dim} must be a positive multiple of "
                                 f"num_heads ({num_heads})")
        self.expand_k, self.expand_v = expand_k, expand_v
        self.num_heads = num_heads
        self.head_k_dim = self.key_dim // num_heads
        self.head_v_dim = self.value_dim // num_heads
        self.gate_low_rank_dim = gate_low_rank_dim
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)  # output gate r_t
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, self.key_dim, bias=True))
        if use_short_conv:
            self.q_conv = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation="silu")
            self.k_conv = ShortConvolution(self.key_dim, conv_size, bias=conv_bias, activation="silu")
            self.v_conv = ShortConvolution(self.value_dim, conv_size, bias=conv_bias, activation="silu")
        self.g_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation="swish", norm_before_gate=True)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, key_dim={self.key_dim}, "
                f"value_dim={self.value_dim}, gate_low_rank_dim={self.gate_low_rank_dim}, "
                f"gate_logit_normalizer={self.gate_logit_normalizer}, use_short_conv={self.use_short_conv}")

    def _convs(self) -> dict[str, ShortConvolution]:
        """The short convolutions by the state key of their tail (none without ``use_short_conv``)."""
        return {"conv_q": self.q_conv, "conv_k": self.k_conv, "conv_v": self.v_conv} if self.use_short_conv else {}

    def log_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The log-decay g = logsigmoid(W_2 W_1 x + b) / gate_logit_normalizer, [B, T, H, d_k/H].

        Computed in float32 (float64 for float64 inputs); every value is finite and <= 0.
        """
        gk = self.gk_proj(x).to(compute_dtype(x))
        g = F.logsigmoid(gk) / self.gate_logit_normalizer
        return g.unflatten(-1, (self.num_heads, self.head_k_dim))

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        self.check_input(x, attention_mask, cu_seqlens)
        n = num_sequences(x, cu_seqlens)
        state = check_state(type(self).__name__, state, {
            "recurrent_state": [n, self.num_heads, self.head_k_dim, self.head_v_dim],
            **conv_state_shapes(n, self._convs())})
        new_state: LayerState = {}
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            conv = partial(apply_short_conv, past=state, new_state=new_state, use_cache=use_cache,
                           cu_seqlens=cu_seqlens, attention_mask=attention_mask)
            q, k, v = conv(self.q_conv, "conv_q", q), conv(self.k_conv, "conv_k", k), conv(self.v_conv, "conv_v", v)
        g = self.log_gate(x)
        q, k = (t.unflatten(-1, (self.num_heads, self.head_k_dim)) for t in (q, k))
        v = v.unflatten(-1, (self.num_heads, self.head_v_dim))
        k, v, g = mask_steps(attention_mask, k, v, g)
        o, recurrent = gla(q, k, v, g, initial_state=None if state is None else state["recurrent_state"],
                           output_final_state=use_cache, cu_seqlens=cu_seqlens)
        r = self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim))
        o = self.g_norm(o, r).flatten(-2)
        y = self.o_proj(o)
        if not use_cache:
            return y, None
        new_state["recurrent_state"] = recurrent
        return y, new_state

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the state (fixed): the float32 [H, d_k/H, d_v/H] state plus conv tails per sequence."""
        return batch_size * (4 * self.num_heads * self.head_k_dim * self.head_v_dim + conv_state_bytes(self._convs()))
