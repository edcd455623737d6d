"""Mamba-2: the selective state-space layer in its state-space-duality (SSD) form."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.layers.base import (LayerState, TokenMixer, apply_short_conv, check_positive_int, check_state,
                                conv_state_bytes, conv_state_shapes, mask_steps, num_sequences, register_mixer)
from linmix.modules import GatedRMSNorm, ShortConvolution
from linmix.ops import simple_gla
from linmix.ops.common.utils import compute_dtype


@register_mixer("mamba2")
class Mamba2(TokenMixer):
    r"""Mamba-2 (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
    Through Structured State Space Duality", 2024), with the defaults of ``mamba_ssm``'s ``Mamba2``
    except ``d_state`` (64 here, 128 there).

    With d_inner = expand * D split into H = d_inner / headdim heads, and B, C shared by the heads
    of each of ``ngroups`` groups:

        [z, x, B, C, dt] = in_proj(u_t);   [x, B, C] = silu(conv1d([x, B, C]))   (causal, width d_conv)
        dt_t = softplus(dt_t + dt_bias)  [H],   A = -exp(A_log)  [H]
        h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T      (per head, h_t in R^{d_state x headdim})
        y_t = C_t^T h_t + D x_t
        out_t = out_proj(RMSNorm(y_t * silu(z_t)))       (norm_before_gate=False, per group)

    The scan is ``linmix.ops.simple_gla`` with q = C, k = B, v = x * dt, g = dt * A, scale = 1.

    Initialisation as in the paper's code: A ~ U(A_init_range) stored as A_log = log A; dt_bias =
    softplus^{-1}(dt) with dt log-uniform in [dt_min, dt_max] (floored at dt_init_floor), so
    softplus(dt_bias) starts in [dt_min, dt_max]; D = 1.

    Args:
        hidden_size: model width D.
        d_state: SSM state size N per head (64).
        d_conv: width of the causal convolution over [x, B, C] (4).
        expand: d_inner = expand * D (2).
        headdim: channels per head P (64); must divide d_inner (D = 64 gives 2 heads).
        ngroups: groups sharing B and C (1); must divide the number of heads.
        A_init_range: range of the initial A (1, 16).
        dt_min, dt_max, dt_init_floor: range of the initial dt (0.001, 0.1, 1e-4).
        conv_bias: bias in the convolution (True); bias: bias in in_proj / out_proj (False).
        norm_eps: epsilon of the gated RMSNorm (1e-5).
        layer_idx: index of the layer in the model (for caches).

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: the SSM state [N, H, d_state, headdim] float32 (float64 for float64
        inputs); ``"conv_state"``: [N, d_conv-1, d_inner + 2 * ngroups * d_state], the last
        d_conv-1 inputs of the convolution, in the input's dtype. Fixed size, independent of the
        context length: at D=64 with defaults, 2 * 64 * 64 floats (32 KiB) + 3 * 256 conv inputs.

    Example:
        >>> import torch
        >>> mixer = Mamba2(hidden_size=64)
        >>> y, state = mixer(torch.randn(2, 10, 64), use_cache=True)
        >>> y.shape, state["recurrent_state"].shape, state["conv_state"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 2, 64, 64]), torch.Size([2, 3, 256]))
    """

    def __init__(self, hidden_size: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, A_init_range: tuple[float, float] = (1.0, 16.0), dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        for arg, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand), ("headdim", headdim),
                           ("ngroups", ngroups)):
            check_positive_int(name, arg, value)
        d_inner = expand * hidden_size
        if d_inner % headdim:
            raise ValueError(f"{name}: d_inner = expand * hidden_size = {expand} * {hidden_size} = {d_inner} "
                             f"must be divisible by headdim ({headdim})")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"{name}: the number of heads d_inner / headdim = {nheads} must be divisible by "
                             f"ngroups ({ngroups})")
        if (not isinstance(A_init_range, (tuple, list)) or len(A_init_range) != 2
                or not 0 < A_init_range[0] <= A_init_range[1]):
            raise ValueError(f"{name}: A_init_range must be (low, high) with 0 < low <= high, got {A_init_range!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"{name}: need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
        if not dt_init_floor > 0:
            raise ValueError(f"{name}: dt_init_floor must be positive, got {dt_init_floor!r}")
        self.d_state, self.d_conv, self.expand, self.headdim, self.ngroups = d_state, d_conv, expand, headdim, ngroups
        self.d_inner, self.nheads = d_inner, nheads
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor

        self.in_proj = nn.Linear(hidden_size, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias)
        self.conv1d = ShortConvolution(self.conv_dim, d_conv, bias=conv_bias, activation="silu")
        # dt = exp(U(log dt_min, log dt_max)) floored; dt_bias = softplus^{-1}(dt) = dt + log(1 - exp(-dt)).
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(nheads))
        self.norm = GatedRMSNorm(d_inner, eps=norm_eps, activation="silu", norm_before_gate=False,
                                 group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=bias)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"expand={self.expand}, headdim={self.headdim}, nheads={self.nheads}, ngroups={self.ngroups}")

    def _convs(self) -> dict[str, ShortConvolution]:
        """The short convolution by the state key of its tail."""
        return {"conv_state": self.conv1d}

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        self.check_input(x, attention_mask, cu_seqlens)
        n = num_sequences(x, cu_seqlens)
        state = check_state(type(self).__name__, state, {
            "recurrent_state": [n, self.nheads, self.d_state, self.headdim], **conv_state_shapes(n, self._convs())})
        new_state: LayerState = {}
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)
        xBC = apply_short_conv(self.conv1d, "conv_state", xBC, past=state, new_state=new_state, use_cache=use_cache,
                               cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        xs, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        xs = xs.unflatten(-1, (H, P))
        # B and C are shared by the H / G heads of each group.
        Bm, Cm = (t.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2) for t in (Bm, Cm))

        dtype = compute_dtype(x)
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))  # [B, T, H]
        (dt,) = mask_steps(attention_mask, dt)  # padded steps: no decay, no write
        g = dt * -torch.exp(self.A_log.to(dtype))
        v = (xs.to(dtype) * dt[..., None]).to(xs.dtype)  # xs: the projection dtype (bf16 under autocast)
        y, recurrent = simple_gla(Cm, Bm, v, g, scale=1.0,
                                  initial_state=None if state is None else state["recurrent_state"],
                                  output_final_state=use_cache, cu_seqlens=cu_seqlens)
        y = y + xs * self.D.to(xs.dtype)[:, None]
        y = self.norm(y.flatten(-2), z)
        out = self.out_proj(y)
        if not use_cache:
            return out, None
        return out, {"recurrent_state": recurrent, **new_state}

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the state (fixed): float32 SSM state [H, d_state, headdim] + conv tail per sequence."""
        return batch_size * (4 * self.nheads * self.d_state * self.headdim + conv_state_bytes(self._convs()))
