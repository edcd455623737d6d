"""Lightning attention (TransNormerLLM): linear attention with a fixed, layer-dependent decay per head."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.layers.base import (LayerState, TokenMixer, check_positive_float, check_positive_int, check_state,
                                mask_steps, num_sequences, register_mixer)
from linmix.modules import RMSNorm
from linmix.ops import simple_gla
from linmix.ops.common.utils import compute_dtype

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, None: None}
_GATES = {None: None, "sigmoid": torch.sigmoid, "silu": F.silu, "swish": F.silu}


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al., 2022): s_h = 2^(-8 (h + 1) / H) for H a power of two,
    h = 0 .. H-1; other H take the power-of-two list below H plus every other slope of the list
    for 2H (ALiBi's rule).

    Example:
        >>> alibi_slopes(4)
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    below = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(below) + alibi_slopes(2 * below)[0::2][:num_heads - below]


def lightning_log_decays(num_heads: int, layer_idx: int, num_layers: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | None = None) -> torch.Tensor:
    """log(lambda_h) = -s_h * (1 - l / (L - 1) + 1e-5), [H] (TransNormerLLM's decay; see :class:`Lightning`).

    s_h are the ALiBi slopes (:func:`alibi_slopes`), l = ``layer_idx``, L = ``num_layers``
    (l / (L - 1) is taken as 0 when L = 1).
    """
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64, device=device)
    return (-slopes * (1.0 - depth + 1e-5)).to(dtype)


@register_mixer("lightning")
class Lightning(TokenMixer):
    r"""Lightning attention, the token mixer of TransNormerLLM (Qin et al., "Scaling TransNormer to
    175 Billion Parameters" / "TransNormerLLM: A Faster and Better Large Language Model with
    Improved TransNormer", 2023; kernel: "Lightning Attention-2", 2024).

    Per head h, with a fixed decay lambda_h (no softmax, no 1/sqrt(d) scale):

        q_t = act(W_q x_t),  k_t = act(W_k x_t),  v_t = W_v x_t,  u_t = W_u x_t
        S_t = lambda_h S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t
        (``linmix.ops.simple_gla`` with the constant log-decay g = log lambda_h)
        y_t = W_o [ gate(u_t) * SRMSNorm(o_t) ]

    where SRMSNorm is the simple RMSNorm without a learnable scale over the concatenated heads,
    act = SiLU (the released models' "swish"), and gate is the identity (TransNormerLLM's
    "gated linear attention" O = Norm(Q K^T V) * U; ``gate_activation="sigmoid"`` gives the
    MiniMax-01 variant).

    Decay. TransNormerLLM ties the decay to the head h and the depth l of the layer, so that
    heads range from short to long memory and deeper layers remember longer: with the ALiBi slope
    s_h = 2^(-8 (h + 1) / H) of head h = 0 .. H-1,

        lambda_h = exp(-s_h * (1 - l / (L - 1) + 1e-5))

    with the constants of the authors' released code (TransNormerLLM's HF model and the
    ``lightning_attn`` package); the paper states the same schedule in the shorter form
    exp(-(8h/H)(1 - l/L)), 8h/H being the ALiBi exponent and l/L the depth fraction. ``num_layers``
    (L) defaults to 1, which gives every layer the layer-0 decays exp(-s_h (1 + 1e-5)); pass the
    model's depth and the layer's ``layer_idx`` (l; None = 0) for the depth schedule.
    TransNormerLLM's LRPE (a relative position encoding used in its first layer only) is not
    included.

    Args:
        hidden_size: model width D (q, k, v, u all have width D, as in TransNormerLLM).
        num_heads: heads H; must divide D (the released models use head dim 128; 4 keeps small
            models valid).
        num_layers: L, the number of layers in the model, for the decay schedule.
        activation: of q and k: ``"silu"`` (default), ``"relu"`` or None (the "no-act" models).
        gate_activation: of the output gate u: None (TransNormerLLM), ``"sigmoid"`` or ``"silu"``.
        norm_eps: epsilon of the SRMSNorm.
        layer_idx: l, index of the layer (0 .. L-1).

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: [N, H, D/H, D/H] float32 (float64 for float64 inputs).
        Fixed size: 4 * D^2 / H bytes per sequence (D = 64, defaults: 4 KiB).

    Example:
        >>> import torch
        >>> mixer = Lightning(hidden_size=64, num_heads=4, num_layers=12, layer_idx=3)
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = mixer(x, use_cache=True)
        >>> y.shape, state["recurrent_state"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 4, 16, 16]))
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, num_layers: int = 1, activation: str | None = "silu",
                 gate_activation: str | None = None, norm_eps: float = 1e-6, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        check_positive_int(name, "num_heads", num_heads)
        check_positive_int(name, "num_layers", num_layers)
        check_positive_float(name, "norm_eps", norm_eps)
        if hidden_size % num_heads:
            raise ValueError(f"{name}: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        depth = 0 if layer_idx is None else layer_idx
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth < num_layers:
            raise ValueError(f"{name}: layer_idx must be None or an int in [0, num_layers={num_layers}) for the "
                             f"decay schedule, got {layer_idx!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of 'silu', 'swish', 'relu' or None, got {activation!r}")
        if gate_activation not in _GATES:
            raise ValueError(f"{name}: gate_activation must be None, 'sigmoid', 'silu' or 'swish', "
                             f"got {gate_activation!r}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.num_layers = num_layers
        self.activation = activation
        self.gate_activation = gate_activation

        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.u_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm = RMSNorm(hidden_size, eps=norm_eps, elementwise_affine=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, layer_idx={self.layer_idx}, "
                f"num_layers={self.num_layers}, activation={self.activation!r}, "
                f"gate_activation={self.gate_activation!r}")

    def log_decays(self, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
        """log(lambda_h), [H], for this layer (computed on the fly; no buffer to round in bf16)."""
        return lightning_log_decays(self.num_heads, self.layer_idx or 0, self.num_layers, dtype, device)

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        self.check_input(x, attention_mask, cu_seqlens)
        B, T, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        n = num_sequences(x, cu_seqlens)
        state = check_state(type(self).__name__, state, {"recurrent_state": [n, H, Dh, Dh]})
        q, k, v = (proj(x).unflatten(-1, (H, Dh)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        act = _ACTIVATIONS[self.activation]
        if act is not None:
            q, k = act(q), act(k)
        g = self.log_decays(compute_dtype(x), x.device).expand(B, T, H)
        k, v, g = mask_steps(attention_mask, k, v, g)  # padded steps: nothing written, no decay
        o, recurrent = simple_gla(q, k, v, g, scale=1.0,
                                  initial_state=None if state is None else state["recurrent_state"],
                                  output_final_state=use_cache, cu_seqlens=cu_seqlens)
        o = self.norm(o.flatten(-2))
        u = self.u_proj(x)
        gate = _GATES[self.gate_activation]
        y = self.o_proj(o * (u if gate is None else gate(u)))
        if not use_cache:
            return y, None
        return y, {"recurrent_state": recurrent}

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the state (fixed): the float32 [H, D/H, D/H] state per sequence."""
        return batch_size * 4 * self.num_heads * self.head_dim * self.head_dim
