"""A short causal depthwise convolution as a token mixer of its own (the first layer of recall probes)."""

from __future__ import annotations

import torch

from linmix.layers.base import (LayerState, TokenMixer, apply_short_conv, check_positive_int, check_state,
                                conv_state_bytes, conv_state_shapes, num_sequences, register_mixer)
from linmix.modules import ShortConvolution


@register_mixer("short_conv")
class ShortConvMixer(TokenMixer):
    r"""A causal depthwise convolution over the last ``conv_size`` tokens, nothing else.

    For each channel d, with W = ``conv_size`` and act = identity (default) or SiLU:

        y[t, d] = act( b[d] + sum_{j=0}^{W-1} w[d, j] * x[t - (W-1) + j, d] )

    This is the "short convolution" layer of the MQAR probes of Zoology / Based: placed before the
    mixer under test, it copies each key token's features into the next position (the value), so
    that a single recall layer can match a query against the key stored next to its value. It has
    no projections: the block's residual stream and the next layer's projections do the rest.

    Args:
        hidden_size: model width D (the number of channels).
        conv_size: W, the current token plus W-1 previous ones.
        bias: add a learned per-channel bias.
        activation: ``None`` (a linear filter, default) or ``"silu"``.
        layer_idx: index of the layer in the model.

    State (``dict``): ``"conv"``: [N, W-1, D] the last W-1 inputs, in the input dtype; size
    (W-1) * D * itemsize bytes per sequence (768 B at D = 64, W = 4, float32).

    Example:
        >>> import torch
        >>> mixer = ShortConvMixer(hidden_size=64, conv_size=4)
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = mixer(x, use_cache=True)
        >>> y.shape, state["conv"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 3, 64]))
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, conv_size: int = 4, bias: bool = False, activation: str | None = None,
                 layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        check_positive_int(type(self).__name__, "conv_size", conv_size)
        if activation not in (None, "silu"):
            raise ValueError(f"{type(self).__name__}: activation must be None or 'silu', got {activation!r}")
        self.conv_size = conv_size
        self.conv = ShortConvolution(hidden_size, conv_size, bias=bias, activation=activation)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, conv_size={self.conv_size}"

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        """Convolve x [B, T, D] (continuing from ``state``); returns (y [B, T, D], new state or None)."""
        self.check_input(x, attention_mask, cu_seqlens)
        convs = {"conv": self.conv}
        state = check_state(type(self).__name__, state, conv_state_shapes(num_sequences(x, cu_seqlens), convs))
        new_state: LayerState = {}
        y = apply_short_conv(self.conv, "conv", x, past=state, new_state=new_state, use_cache=use_cache,
                             cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        return y, (new_state if use_cache else None)

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """(W-1) * D values per sequence in the convolution's dtype, whatever ``context_len``."""
        return batch_size * conv_state_bytes({"conv": self.conv})
