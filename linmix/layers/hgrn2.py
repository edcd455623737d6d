"""HGRN2: a gated linear RNN whose state is expanded by an outer product (GLA with k = 1 - f)."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.layers.base import (LayerState, TokenMixer, apply_short_conv, check_positive_int, check_state,
                                conv_state_bytes, conv_state_shapes, mask_steps, num_sequences, register_mixer)
from linmix.modules import RMSNorm, ShortConvolution
from linmix.ops import gla
from linmix.ops.common.utils import compute_dtype


@register_mixer("hgrn2")
class HGRN2(TokenMixer):
    r"""HGRN2 (Qin et al., "HGRN2: Gated Linear RNNs with State Expansion", 2024).

    HGRN's elementwise recurrence h_t = f_t * h_{t-1} + (1 - f_t) * i_t with its state expanded
    by an outer product; per head (d_f = ``expand_ratio`` forget channels, d_i = D / H inputs):

        f_t = lower_bound + (1 - lower_bound) * sigmoid(W_f x_t)       (forget gate, in [lower_bound, 1))
        i_t = W_i x_t,   o_t = swish(W_o x_t)                          (input; output gate = the query)
        H_t = Diag(f_t) H_{t-1} + (1 - f_t) i_t^T                      (H_t in R^{d_f x d_i})
        y_t = W_out RMSNorm(concat_heads(H_t^T o_t))

    i.e. ``linmix.ops.gla`` with q = o_t, k = 1 - f_t, v = i_t, log-decay g = log f_t and scale 1
    (the paper's y = o H has no 1/sqrt(d) factor; the RMSNorm that follows makes the output
    insensitive to it anyway). log f and 1 - f are computed without cancellation:
    log f = logaddexp(log lb, log(1 - lb) + logsigmoid(z)) and 1 - f = (1 - lb) * sigmoid(-z).

    Lower bound: the paper (following HGRN) learns one lower bound per layer and channel that
    increases with depth -- ``cumsum(softmax(Gamma, dim=layers))`` shifted so the first layer's
    bound is 0 -- so upper layers keep long-term memory. That is a model-level parameter; a single
    layer takes a fixed ``lower_bound`` (default 0, the first layer's value).

    Args:
        hidden_size: model width D (also the total input/value width).
        expand_ratio: forget/key channels per head d_f, the state expansion (paper: 128).
        num_heads: heads H; default ``max(1, D // expand_ratio)`` (paper: D / 128), so D = 64
            gives one head with a 128 x 64 state. Must divide D.
        lower_bound: fixed lower bound of the forget gate, in [0, 1).
        use_short_conv: causal short convolution (no activation) on the q, f, i projections.
        conv_size, conv_bias: the short convolution's kernel size and bias.
        norm_eps: epsilon of the output RMSNorm.
        layer_idx: index of the layer in the model (for caches).

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: [N, H, expand_ratio, D/H] float32 (float64 for float64 inputs);
        with ``use_short_conv`` also ``"conv_q"``, ``"conv_f"``: [N, conv_size-1, H * expand_ratio]
        and ``"conv_i"``: [N, conv_size-1, D] in the input's dtype. Fixed size, independent of the
        context length: at D=64 with defaults, 128 * 64 floats = 32 KiB per sequence.

    Example:
        >>> import torch
        >>> mixer = HGRN2(hidden_size=64)
        >>> y, state = mixer(torch.randn(2, 10, 64), use_cache=True)
        >>> y.shape, state["recurrent_state"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 1, 128, 64]))
    """

    def __init__(self, hidden_size: int, expand_ratio: int = 128, num_heads: int | None = None,
                 lower_bound: float = 0.0, use_short_conv: bool = False, conv_size: int = 4,
                 conv_bias: bool = False, norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        check_positive_int(name, "expand_ratio", expand_ratio)
        check_positive_int(name, "conv_size", conv_size)
        if num_heads is None:
            num_heads = max(1, hidden_size // expand_ratio)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"{name}: num_heads must be a positive int or None, got {num_heads!r}")
        if hidden_size % num_heads:
            raise ValueError(f"{name}: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float)) \
                or not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"{name}: lower_bound must be a number in [0, 1), got {lower_bound!r}")
        self.expand_ratio = expand_ratio
        self.num_heads = num_heads
        self.forget_dim = num_heads * expand_ratio
        self.head_i_dim = hidden_size // num_heads
        self.lower_bound = float(lower_bound)
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size

        self.q_proj = nn.Linear(hidden_size, self.forget_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, self.forget_dim, bias=False)
        self.i_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if use_short_conv:
            self.q_conv = ShortConvolution(self.forget_dim, conv_size, bias=conv_bias, activation=None)
            self.f_conv = ShortConvolution(self.forget_dim, conv_size, bias=conv_bias, activation=None)
            self.i_conv = ShortConvolution(hidden_size, conv_size, bias=conv_bias, activation=None)
        self.g_norm = RMSNorm(hidden_size, eps=norm_eps)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, expand_ratio={self.expand_ratio}, "
                f"lower_bound={self.lower_bound}, use_short_conv={self.use_short_conv}")

    def _convs(self) -> dict[str, ShortConvolution]:
        """The short convolutions by the state key of their tail (none without ``use_short_conv``)."""
        return {"conv_q": self.q_conv, "conv_f": self.f_conv, "conv_i": self.i_conv} if self.use_short_conv else {}

    def forget_gate(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and log-decay from the forget pre-activation z = W_f x, [..., H * expand_ratio].

        Returns (k = 1 - f, g = log f) in float32 (float64 for float64 inputs), with
        f = lower_bound + (1 - lower_bound) * sigmoid(z); g is finite and <= 0.
        """
        z = f.to(compute_dtype(f))
        lb = self.lower_bound
        if lb == 0.0:
            return torch.sigmoid(-z), F.logsigmoid(z)
        g = torch.logaddexp(torch.full_like(z, math.log(lb)), math.log1p(-lb) + F.logsigmoid(z))
        return (1.0 - lb) * torch.sigmoid(-z), g.clamp(max=0.0)

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        self.check_input(x, attention_mask, cu_seqlens)
        n = num_sequences(x, cu_seqlens)
        state = check_state(type(self).__name__, state, {
            "recurrent_state": [n, self.num_heads, self.expand_ratio, self.head_i_dim],
            **conv_state_shapes(n, self._convs())})
        new_state: LayerState = {}
        q, f, i = self.q_proj(x), self.f_proj(x), self.i_proj(x)
        if self.use_short_conv:
            conv = partial(apply_short_conv, past=state, new_state=new_state, use_cache=use_cache,
                           cu_seqlens=cu_seqlens, attention_mask=attention_mask)
            q, f, i = conv(self.q_conv, "conv_q", q), conv(self.f_conv, "conv_f", f), conv(self.i_conv, "conv_i", i)
        q = F.silu(q)
        k, g = self.forget_gate(f)
        q, k, g = (t.unflatten(-1, (self.num_heads, self.expand_ratio)) for t in (q, k.to(i.dtype), g))
        v = i.unflatten(-1, (self.num_heads, self.head_i_dim))
        k, v, g = mask_steps(attention_mask, k, v, g)
        o, recurrent = gla(q, k, v, g, scale=1.0, initial_state=None if state is None else state["recurrent_state"],
                           output_final_state=use_cache, cu_seqlens=cu_seqlens)
        y = self.o_proj(self.g_norm(o.flatten(-2)))
        if not use_cache:
            return y, None
        new_state["recurrent_state"] = recurrent
        return y, new_state

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the state (fixed): the float32 [H, expand_ratio, D/H] state plus conv tails."""
        return batch_size * (4 * self.forget_dim * self.head_i_dim + conv_state_bytes(self._convs()))
