"""DeltaNet: linear attention whose state is updated by the delta rule (online regression of v on k)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.layers.base import (LayerState, TokenMixer, apply_short_conv, check_positive_float, check_positive_int,
                                check_state, conv_state_bytes, conv_state_shapes, mask_steps, num_sequences,
                                register_mixer)
from linmix.modules import GatedRMSNorm, RMSNorm, ShortConvolution
from linmix.ops import delta_rule
from linmix.ops.common.utils import compute_dtype

QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
QK_NORMS = ("l2", "sum")


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(||x||_2, eps) over the last axis, computed in float32 (float64 for float64 inputs)."""
    return F.normalize(x.to(compute_dtype(x)), p=2.0, dim=-1, eps=eps).to(x.dtype)


def sum_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(sum(x), eps) over the last axis, for non-negative features (||x||_2 <= 1 then)."""
    xf = x.to(compute_dtype(x))
    return (xf / xf.sum(-1, keepdim=True).clamp_min(eps)).to(x.dtype)


class DeltaRuleMixer(TokenMixer):
    """What DeltaNet and Gated DeltaNet share: projections, short convolutions, beta, the output.

    Subclasses set up the modules through :meth:`_build` and may override :meth:`log_decay`
    (``None`` = no decay, plain DeltaNet). Not registered itself.
    """

    def _build(self, *, num_heads: int, key_dim: int, value_dim: int, use_beta: bool, use_gate: bool,
               use_short_conv: bool, conv_size: int, conv_bias: bool, allow_neg_eigval: bool,
               qk_activation: str, qk_norm: str, norm_eps: float) -> None:
        name = type(self).__name__
        if qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"{name}: qk_activation must be one of {QK_ACTIVATIONS}, got {qk_activation!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"{name}: qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        if qk_norm == "sum" and qk_activation not in ("relu", "elu"):
            raise ValueError(f"{name}: qk_norm='sum' needs non-negative features (qk_activation 'relu' or "
                             f"'elu'), got qk_activation={qk_activation!r}")
        self.num_heads = num_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.use_beta, self.use_gate = bool(use_beta), bool(use_gate)
        self.use_short_conv = bool(use_short_conv)
        self.conv_size = conv_size
        self.allow_neg_eigval = bool(allow_neg_eigval)
        self.qk_activation, self.qk_norm = qk_activation, qk_norm

        D = self.hidden_size
        self.q_proj = nn.Linear(D, key_dim, bias=False)
        self.k_proj = nn.Linear(D, key_dim, bias=False)
        self.v_proj = nn.Linear(D, value_dim, bias=False)
        if self.use_beta:
            self.b_proj = nn.Linear(D, num_heads, bias=False)
        if self.use_short_conv:
            # SiLU inside the convolution is the q/k feature map when qk_activation == "silu".
            qk_conv_act = "silu" if qk_activation == "silu" else None
            self.q_conv = ShortConvolution(key_dim, conv_size, bias=conv_bias, activation=qk_conv_act)
            self.k_conv = ShortConvolution(key_dim, conv_size, bias=conv_bias, activation=qk_conv_act)
            self.v_conv = ShortConvolution(value_dim, conv_size, bias=conv_bias, activation="silu")
        if self.use_gate:
            self.g_proj = nn.Linear(D, value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation="silu", norm_before_gate=True)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, D, bias=False)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, key_dim={self.key_dim}, "
                f"value_dim={self.value_dim}, use_beta={self.use_beta}, use_gate={self.use_gate}, "
                f"use_short_conv={self.use_short_conv}, conv_size={self.conv_size}, "
                f"allow_neg_eigval={self.allow_neg_eigval}, qk_activation={self.qk_activation!r}, "
                f"qk_norm={self.qk_norm!r}")

    # -- the per-token quantities ------------------------------------------------------------------

    def compute_beta(self, x: torch.Tensor) -> torch.Tensor:
        """Step sizes beta [B, T, H]: sigmoid(W_b x) in (0, 1), times 2 with ``allow_neg_eigval``.

        Computed in float32 (float64 for float64 inputs). Without ``use_beta`` beta is 1 (2).
        """
        dtype = compute_dtype(x)
        if self.use_beta:
            beta = torch.sigmoid(self.b_proj(x).to(dtype))
        else:
            beta = x.new_ones(*x.shape[:2], self.num_heads, dtype=dtype)
        return beta * 2 if self.allow_neg_eigval else beta

    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """Log-decay g [B, T, H] (<= 0) of the gated delta rule; None for plain DeltaNet."""
        return None

    def _qk_feature(self, t: torch.Tensor) -> torch.Tensor:
        """Activation (unless the conv applied SiLU already) then normalisation; t: [B, T, H, K]."""
        act = self.qk_activation
        if act == "silu" and not self.use_short_conv:
            t = F.silu(t)
        elif act == "relu":
            t = F.relu(t)
        elif act == "elu":
            t = F.elu(t) + 1.0
        return l2_normalize(t) if self.qk_norm == "l2" else sum_normalize(t)

    def _convs(self) -> dict[str, ShortConvolution]:
        """The short convolutions by the state key of their tail (none without ``use_short_conv``)."""
        return {"conv_q": self.q_conv, "conv_k": self.k_conv, "conv_v": self.v_conv} if self.use_short_conv else {}

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        """Mix tokens with the (gated) delta rule.

        Args:
            x: [B, T, hidden_size] inputs.
            state: the state of a previous call (``use_cache=True``), or None (sequence start).
            use_cache: return the state after the last token.
            cu_seqlens: int [N+1] offsets of N sequences packed along T (B == 1).
            attention_mask: [B, T] 1 = real token, 0 = padding (left or right).

        Returns:
            (y [B, T, hidden_size] in x's dtype, the new state or None).
        """
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
        else:
            v = F.silu(v)
        q, k = (self._qk_feature(t.unflatten(-1, (self.num_heads, self.head_k_dim))) for t in (q, k))
        v = v.unflatten(-1, (self.num_heads, self.head_v_dim))
        beta, g = self.compute_beta(x), self.log_decay(x)
        # Padded steps: zero key/value, zero beta (identity transition), zero log-decay (no decay).
        k, v, beta, g = mask_steps(attention_mask, k, v, beta, g)
        o, recurrent = delta_rule(q, k, v, beta, g, initial_state=None if state is None else state["recurrent_state"],
                                  output_final_state=use_cache, cu_seqlens=cu_seqlens)
        if self.use_gate:
            o = self.o_norm(o, self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim)))
        else:
            o = self.o_norm(o)
        y = self.o_proj(o.flatten(-2))
        if not use_cache:
            return y, None
        new_state["recurrent_state"] = recurrent
        return y, new_state

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the (fixed-size) state: float32 [H, K/H, V/H] per sequence plus the conv tails."""
        return batch_size * (4 * self.num_heads * self.head_k_dim * self.head_v_dim + conv_state_bytes(self._convs()))


@register_mixer("deltanet")
class DeltaNet(DeltaRuleMixer):
    r"""DeltaNet (Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence
    Length", NeurIPS 2024).

    Per head (``linmix.ops.delta_rule``, chunked WY form for prefill, recurrent for decoding):

        q_t = L2Norm(SiLU(Conv_q(W_q x)_t)),  k_t = L2Norm(SiLU(Conv_k(W_k x)_t)),  v_t = SiLU(Conv_v(W_v x)_t)
        beta_t = sigmoid(W_b x_t)                        (in (0, 1); 2 * sigmoid in (0, 2) with allow_neg_eigval)
        S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t / sqrt(d_k)
        y_t = W_o [ RMSNorm_head(o_t) ]                  (RMSNorm_head(o_t) * SiLU(W_g x_t) with use_gate)

    Conv is a causal depthwise convolution of width ``conv_size``; RMSNorm_head normalises each
    head's output with one scale shared by the heads. The defaults follow the paper's best setting
    (SiLU feature map, L2-normalised q/k, short convolutions, no output gate) and
    flash-linear-attention's DeltaNet layer (``num_heads=4``, ``expand_k=expand_v=1``). The paper's
    1.3B model uses hidden 2048 with 16 heads of dim 128: pass ``num_heads=hidden_size // 128`` to
    reproduce it; the default 4 heads keeps small widths valid (hidden 64 -> head dim 16).

    Args:
        hidden_size: model width D.
        num_heads: heads H; must divide the key and value widths.
        expand_k: key width d_k = ``int(D * expand_k)``.
        expand_v: value width d_v = ``int(D * expand_v)``.
        use_beta: learn beta_t = sigmoid(W_b x_t) (else beta = 1).
        use_gate: SiLU output gate with a gated per-head RMSNorm (default off, as in the paper).
        use_short_conv: causal short convolutions (with SiLU) on q, k and v.
        conv_size: width of the short convolutions (4).
        conv_bias: bias in the short convolutions.
        allow_neg_eigval: beta in (0, 2) (eigenvalues of I - beta k k^T in (-1, 1); Grazzi et al.,
            "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues").
        qk_activation: feature map of q and k: "silu" (paper), "relu", "elu" (1 + ELU), "identity".
        qk_norm: "l2" (paper) or "sum" (L1, the paper's ablation; needs "relu" or "elu").
        norm_eps: epsilon of the output RMSNorm.
        layer_idx: index of the layer in the model (for caches).

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: [N, H, d_k/H, d_v/H] float32 (float64 for float64 inputs);
        with ``use_short_conv`` also ``"conv_q"``, ``"conv_k"``: [N, conv_size-1, d_k] and
        ``"conv_v"``: [N, conv_size-1, d_v] in the input's dtype.
        The size is fixed (0 bytes per extra token of context); at D=64 with the defaults:
        4 * 16 * 16 float32 + 3 * 3 * 64 values of the conv tails per sequence.

    Example:
        >>> import torch
        >>> mixer = DeltaNet(hidden_size=64)
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = mixer(x, use_cache=True)
        >>> y.shape, state["recurrent_state"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 4, 16, 16]))
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, expand_k: float = 1.0, expand_v: float = 1.0,
                 use_beta: bool = True, use_gate: bool = False, use_short_conv: bool = True, conv_size: int = 4,
                 conv_bias: bool = False, allow_neg_eigval: bool = False, qk_activation: str = "silu",
                 qk_norm: str = "l2", norm_eps: float = 1e-5, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        check_positive_int(name, "num_heads", num_heads)
        check_positive_int(name, "conv_size", conv_size)
        check_positive_float(name, "expand_k", expand_k)
        check_positive_float(name, "expand_v", expand_v)
        check_positive_float(name, "norm_eps", norm_eps)
        key_dim, value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        for arg, dim, ratio in (("k", key_dim, expand_k), ("v", value_dim, expand_v)):
            if dim < 1 or dim % num_heads:
                raise ValueError(f"{name}: num_heads ({num_heads}) must divide the width int(hidden_size * "
                                 f"expand_{arg}) = int({hidden_size} * {ratio}) = {dim}")
        self.expand_k, self.expand_v = expand_k, expand_v
        self._build(num_heads=num_heads, key_dim=key_dim, value_dim=value_dim, use_beta=use_beta,
                    use_gate=use_gate, use_short_conv=use_short_conv, conv_size=conv_size, conv_bias=conv_bias,
                    allow_neg_eigval=allow_neg_eigval, qk_activation=qk_activation, qk_norm=qk_norm,
                    norm_eps=norm_eps)


__all__ = ["DeltaNet", "DeltaRuleMixer", "l2_normalize", "sum_normalize"]
