"""Gated DeltaNet: the delta rule with a Mamba-2 style data-dependent scalar decay per head."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.layers.base import check_positive_float, check_positive_int, register_mixer, resolve_head_dim
from linmix.layers.deltanet import DeltaRuleMixer
from linmix.ops.common.utils import compute_dtype


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaRuleMixer):
    r"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with
    Delta Rule", ICLR 2025).

    DeltaNet (see :class:`linmix.layers.deltanet.DeltaNet`) plus Mamba-2's decay and an output gate,
    per head (``linmix.ops.delta_rule(..., g=g)``):

        q_t, k_t = L2Norm(SiLU(Conv(W_{q,k} x)_t)),   v_t = SiLU(Conv(W_v x)_t),   beta_t = sigmoid(W_b x_t)
        g_t = -exp(A_log) * softplus(W_a x_t + dt_bias)                    (log-decay, <= 0; alpha_t = exp(g_t))
        S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(d_k)
        y_t = W_o [ RMSNorm_head(o_t) * SiLU(W_g x_t) ]

    A = exp(A_log) is drawn uniformly from ``A_init_range`` and dt_bias is the inverse softplus of
    dt ~ log-uniform in [dt_min, dt_max] (floored at ``dt_init_floor``), as in Mamba-2.

    Widths: d_k = H * head_dim for q and k, d_v = d_k * expand_v for v and the gate. The paper's
    models (flash-linear-attention's reference layer) use ``num_heads=6, head_dim=256, expand_v=2``
    at hidden 2048 (d_k = 0.75 D). Here ``head_dim=None`` means ``hidden_size // num_heads`` so that
    the defaults work at any width divisible by 4 (hidden 64 -> head dim 16, value head dim 32);
    pass the paper's values explicitly to reproduce it.

    Args:
        hidden_size: model width D.
        num_heads: heads H.
        head_dim: key/query dim per head; None -> hidden_size // num_heads (num_heads must divide D).
        expand_v: value head dim = ``int(head_dim * expand_v)`` (paper: 2).
        use_gate: SiLU output gate with a gated per-head RMSNorm (paper: on); off -> plain RMSNorm.
        use_short_conv: causal short convolutions (with SiLU) on q, k and v.
        conv_size: width of the short convolutions (4).
        conv_bias: bias in the short convolutions.
        allow_neg_eigval: beta in (0, 2) instead of (0, 1).
        A_init_range: (low, high) of the uniform draw of A = exp(A_log) (0 < A; Mamba-2 style).
        dt_min, dt_max: range of the log-uniform draw of the initial dt = softplus(dt_bias).
        dt_init_floor: lower bound of the initial dt.
        norm_eps: epsilon of the output RMSNorm.
        layer_idx: index of the layer in the model (for caches).

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: [N, H, head_dim, head_v_dim] float32 (float64 for float64 inputs);
        with ``use_short_conv`` also ``"conv_q"``, ``"conv_k"``: [N, conv_size-1, d_k] and
        ``"conv_v"``: [N, conv_size-1, d_v] in the input's dtype.
        The size is fixed (0 bytes per extra token of context); at D=64 with the defaults:
        4 * 16 * 32 float32 + 3 * (64 + 64 + 128) values of the conv tails per sequence.

    Example:
        >>> import torch
        >>> mixer = GatedDeltaNet(hidden_size=64)
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = mixer(x, use_cache=True)
        >>> y.shape, state["recurrent_state"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 4, 16, 32]))
        >>> bool((mixer.log_decay(x) <= 0).all())
        True
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, expand_v: float = 2.0,
                 use_gate: bool = True, use_short_conv: bool = True, conv_size: int = 4, conv_bias: bool = False,
                 allow_neg_eigval: bool = False, A_init_range: tuple[float, float] = (0.0, 16.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, norm_eps: float = 1e-5,
                 layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        check_positive_int(name, "num_heads", num_heads)
        check_positive_int(name, "conv_size", conv_size)
        check_positive_float(name, "expand_v", expand_v)
        check_positive_float(name, "norm_eps", norm_eps)
        head_dim = resolve_head_dim(name, hidden_size, num_heads, head_dim)
        head_v_dim = int(head_dim * expand_v)
        if head_v_dim < 1:
            raise ValueError(f"{name}: the value head dim int(head_dim * expand_v) = int({head_dim} * {expand_v}) "
                             "must be positive")
        if not (isinstance(A_init_range, (tuple, list)) and len(A_init_range) == 2
                and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in A_init_range)
                and 0 <= A_init_range[0] < A_init_range[1]):
            raise ValueError(f"{name}: A_init_range must be a pair (low, high) with 0 <= low < high, "
                             f"got {A_init_range!r}")
        for arg, value in (("dt_min", dt_min), ("dt_max", dt_max), ("dt_init_floor", dt_init_floor)):
            check_positive_float(name, arg, value)
        if not dt_min <= dt_max:
            raise ValueError(f"{name}: dt_min ({dt_min}) must be <= dt_max ({dt_max})")
        self.head_dim, self.expand_v = head_dim, expand_v
        self._build(num_heads=num_heads, key_dim=num_heads * head_dim, value_dim=num_heads * head_v_dim,
                    use_beta=True, use_gate=use_gate, use_short_conv=use_short_conv, conv_size=conv_size,
                    conv_bias=conv_bias, allow_neg_eigval=allow_neg_eigval, qk_activation="silu", qk_norm="l2",
                    norm_eps=norm_eps)

        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        # A ~ U(A_init_range) (kept away from 0 so that log A is finite), stored as log A.
        A = torch.empty(num_heads).uniform_(*A_init_range).clamp_min(1e-4)
        self.A_log = nn.Parameter(torch.log(A))
        # dt ~ log-uniform in [dt_min, dt_max]; dt_bias = softplus^{-1}(dt) = dt + log(1 - exp(-dt)).
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

    def log_decay(self, x: torch.Tensor) -> torch.Tensor:
        """Log-decay g = -exp(A_log) * softplus(W_a x + dt_bias), [B, T, H], every value <= 0.

        Computed in float32 (float64 for float64 inputs).
        """
        dtype = compute_dtype(x)
        a = self.a_proj(x).to(dtype)
        return -torch.exp(self.A_log.to(dtype)) * F.softplus(a + self.dt_bias.to(dtype))


__all__ = ["GatedDeltaNet"]
