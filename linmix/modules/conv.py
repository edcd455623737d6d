"""Short causal depthwise convolution over the sequence axis.

Mamba, Mamba-2, DeltaNet, Gated DeltaNet and Based all run a small (``kernel_size`` = 4) causal
depthwise convolution over q/k/v (or the SSM input) before the token mixer. For each channel d

    y[t, d] = act( bias[d] + sum_{j=0}^{W-1} w[d, j] * x[t - (W-1) + j, d] ),

with x[s] = 0 for s < 0 (or, when decoding, the cached inputs of the previous call). The decoding
state ("cache") is the last W-1 inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.ops.common.checks import check_cu_seqlens

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, None: None}


class ShortConvolution(nn.Conv1d):
    """Causal depthwise 1-D convolution over x [B, T, D] with a decoding cache.

    The weight is stored like a depthwise ``nn.Conv1d`` ([D, 1, W]), so checkpoints of Mamba /
    flash-linear-attention style models map onto it directly.

    Args:
        hidden_size: number of channels D (each channel has its own kernel).
        kernel_size: window W, the current token plus W-1 previous ones (Mamba's ``d_conv=4``).
        bias: add a learned per-channel bias.
        activation: ``"silu"`` (alias ``"swish"``) or ``None`` for no activation.

    Example:
        >>> import torch
        >>> conv = ShortConvolution(64, kernel_size=4)
        >>> x = torch.randn(2, 10, 64)
        >>> y, cache = conv(x, output_cache=True)
        >>> y.shape, cache.shape
        (torch.Size([2, 10, 64]), torch.Size([2, 3, 64]))
        >>> y_next, cache = conv.step(torch.randn(2, 64), cache)  # decode one more token
        >>> y_next.shape
        torch.Size([2, 64])
    """

    def __init__(self, hidden_size: int, kernel_size: int = 4, bias: bool = False,
                 activation: str | None = "silu"):
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"ShortConvolution: hidden_size must be a positive int, got {hidden_size!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"ShortConvolution: kernel_size must be a positive int, got {kernel_size!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ShortConvolution: activation must be one of 'silu', 'swish' or None, "
                             f"got {activation!r}")
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=0, bias=bias)
        self.hidden_size = hidden_size
        self.activation = activation

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, kernel_size={self.kernel_size[0]}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")

    @property
    def cache_len(self) -> int:
        """W - 1: the number of past inputs the cache holds."""
        return self.kernel_size[0] - 1

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        fn = _ACTIVATIONS[self.activation]
        return y if fn is None else fn(y)

    def _check_x(self, x: object, what: str, dims: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"ShortConvolution: {what} must be a floating tensor of shape {dims}, got {got}")
        return x

    def _check_cache(self, cache: torch.Tensor, n: int, x: torch.Tensor) -> None:
        want = [n, self.cache_len, self.hidden_size]
        if not isinstance(cache, torch.Tensor):
            raise TypeError(f"ShortConvolution: cache must be a tensor of shape [N, W-1, D] = {want}, "
                            f"got {type(cache).__name__}")
        if list(cache.shape) != want:
            raise ValueError(f"ShortConvolution: cache must have shape [N, W-1, D] = {want}, "
                             f"got {list(cache.shape)}")
        if cache.dtype != x.dtype or cache.device != x.device:
            raise TypeError(f"ShortConvolution: cache must match x's dtype and device ({x.dtype}, {x.device}), "
                            f"got ({cache.dtype}, {cache.device})")

    def _conv_valid(self, ext: torch.Tensor) -> torch.Tensor:
        """Valid (unpadded) depthwise conv of ext [B, L, D] -> [B, L - W + 1, D]."""
        y = F.conv1d(ext.transpose(1, 2), self.weight, self.bias, groups=self.hidden_size)
        return y.transpose(1, 2)

    def forward(self, x: torch.Tensor, *, cache: torch.Tensor | None = None, output_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Convolve a sequence (or a packed batch of sequences).

        Args:
            x: [B, T, D] inputs.
            cache: [N, W-1, D] the last W-1 inputs before ``x`` of each sequence (N = B, or the
                number of packed sequences with ``cu_seqlens``); ``None`` = start of sequence
                (zeros).
            output_cache: also return the new cache (the last W-1 inputs, cache included, of each
                sequence; shorter sequences keep the tail of the old cache).
            cu_seqlens: int [N+1] offsets of packed sequences along T (then B must be 1). No
                information crosses sequence boundaries.
            mask: [B, T] 1 for real tokens, 0 for (left) padding; padded inputs are zeroed before the
                convolution, so a left-padded row sees the same zeros as an unpadded sequence start.

        Returns:
            (y [B, T, D] in x's dtype, new cache [N, W-1, D] or ``None``).
        """
        self._check_x(x, "x", "[B, T, D]")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"ShortConvolution: x must have shape [B, T, D={self.hidden_size}], "
                             f"got {list(x.shape)}")
        B, T, D = x.shape
        W1 = self.cache_len
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or list(mask.shape) != [B, T]:
                got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"ShortConvolution: mask must have shape [B, T] = [{B}, {T}], got {got}")
            x = x * mask.to(device=x.device, dtype=x.dtype)[..., None]
        N = check_cu_seqlens("ShortConvolution", cu_seqlens, B, T)
        if cache is not None:
            self._check_cache(cache, N, x)

        if cu_seqlens is None:
            past = cache if cache is not None else x.new_zeros(B, W1, D)
            ext = torch.cat([past, x], dim=1)  # [B, W-1+T, D]
            y = self._act(self._conv_valid(ext))
            new_cache = ext[:, ext.shape[1] - W1:] if output_cache else None
            return y, new_cache

        # Packed sequences: lay them out with W-1 cache slots in front of each sequence,
        # [c_0, x_0, c_1, x_1, ...], run one valid convolution and gather each token's output.
        # A token's window then never reaches past its own sequence's cache slots.
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        seq_id = torch.repeat_interleave(torch.arange(N, device=x.device), lengths, output_size=T)
        tok_pos = torch.arange(T, device=x.device) + (seq_id + 1) * W1
        ext = x.new_zeros(1, T + N * W1, D).index_copy(1, tok_pos, x)
        if cache is not None and W1 > 0:
            slots = (cu[:-1] + torch.arange(N, device=x.device) * W1)[:, None] + torch.arange(W1, device=x.device)
            ext = ext.index_copy(1, slots.reshape(-1), cache.reshape(1, N * W1, D))
        y = self._act(self._conv_valid(ext)[:, tok_pos - W1])
        new_cache = None
        if output_cache:
            ends = cu[1:] + (torch.arange(N, device=x.device) + 1) * W1  # one past each sequence's end
            tail = (ends - W1)[:, None] + torch.arange(W1, device=x.device)
            new_cache = ext[0, tail.reshape(-1)].reshape(N, W1, D)
        return y, new_cache

    def step(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step; equal to ``forward`` on a length-1 sequence with the same cache.

        Args:
            x: [B, D] the current token's inputs.
            cache: [B, W-1, D] the previous W-1 inputs, or ``None`` (start of sequence).

        Returns:
            (y [B, D], new cache [B, W-1, D]).
        """
        self._check_x(x, "x", "[B, D]")
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"ShortConvolution.step: x must have shape [B, D={self.hidden_size}], "
                             f"got {list(x.shape)}")
        B = x.shape[0]
        if cache is None:
            cache = x.new_zeros(B, self.cache_len, self.hidden_size)
        else:
            self._check_cache(cache, B, x)
        window = torch.cat([cache, x[:, None]], dim=1)  # [B, W, D]
        y = torch.einsum("bwd,dw->bd", window, self.weight[:, 0])
        if self.bias is not None:
            y = y + self.bias
        return self._act(y), window[:, 1:]
