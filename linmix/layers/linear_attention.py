"""Linear attention with a feature map (Katharopoulos et al., "Transformers are RNNs", 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn

from linmix.layers.base import (LayerState, TokenMixer, check_positive_float, check_positive_int, check_state,
                                mask_steps, num_sequences, register_mixer, token_positions)
from linmix.modules import FEATURE_MAPS, RMSNorm, get_feature_map
from linmix.ops import linear_attn
from linmix.ops.common.utils import compute_dtype


@register_mixer("linear_attn")
class LinearAttention(TokenMixer):
    r"""Feature-map linear attention (Katharopoulos et al., "Transformers are RNNs: Fast
    Autoregressive Transformers with Linear Attention", 2020).

    Per head, with a feature map phi (``linmix.modules.FEATURE_MAPS``; elu(x) + 1 in the paper):

        q_t = phi(W_q x_t),  k_t = phi(W_k x_t),  v_t = W_v x_t
        S_t = S_{t-1} + k_t v_t^T,     z_t = z_{t-1} + k_t                  (``linmix.ops.linear_attn``)
        o_t = S_t^T q_t / (z_t . q_t + eps)        (``normalize=True``; else o_t = S_t^T q_t)
        y_t = W_o [ norm(o_t) ]                     (``norm="rms"``: RMSNorm per head; else identity)

    The kernel phi(q).phi(k) is used as it is (the op runs with ``scale=1.0``; the Taylor and
    Performer maps carry their own 1/sqrt(d)). The normaliser z is computed by the same op call:
    a column of ones is appended to v, so the state's last value column *is* z (the normaliser
    state lives in the op state). ``normalize=True`` is meant for positive maps (elu, relu,
    taylor, hedgehog, performer, dijiang, cosformer with relu); with sign-indefinite maps
    (identity, cosine) the denominator can vanish: use ``normalize=False`` and ``norm="rms"``.

    Maps that need positions (cosformer) are supported: positions count real tokens of each
    sequence (padding excluded; restarting per packed sequence) and continue from a position
    counter kept in the state. cosformer's ``max_len`` (M, which must bound every position seen)
    has no default here: pass ``feature_map_kwargs={"max_len": M}``.

    Args:
        hidden_size: model width D.
        num_heads: heads H; must divide D (head dim D/H for q, k and v).
        feature_map: a name in ``FEATURE_MAPS`` (default ``"elu"``, the paper's elu + 1).
        feature_map_kwargs: extra constructor arguments of the map (e.g. ``{"num_features": 64}``);
            hedgehog gets ``num_heads=H`` (one learnable map per head) unless given.
        share_feature_map: one map for q and k (default); False gives keys their own map (e.g.
            separate learnable hedgehog maps for q and k, as in the Hedgehog paper).
        normalize: divide by the normaliser z_t . q_t (default True, as in the paper).
        eps: added to the normaliser (1e-6, as in the paper's release).
        norm: ``"rms"`` for an RMSNorm over each head's output (one per-head-dim scale), or None.
        norm_eps: epsilon of that RMSNorm.
        layer_idx: index of the layer in the model.

    State (``dict``, every tensor with leading dim N):
        ``"recurrent_state"``: [N, H, D', D/H + normalize] float32 (float64 for float64 inputs),
        where D' = ``feature_map.feature_dim`` and the extra last column (``normalize=True``) is z;
        with a map that needs positions also ``"position"``: int64 [N], real tokens seen.
        Fixed size: 4 * H * D' * (D/H + 1) bytes per sequence (at D = 64 with defaults:
        4 heads, D' = 16, 17 columns -> 4352 bytes), whatever the context length.

    Example:
        >>> import torch
        >>> mixer = LinearAttention(hidden_size=64, num_heads=4, feature_map="elu")
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = mixer(x, use_cache=True)
        >>> y.shape, state["recurrent_state"].shape
        (torch.Size([2, 10, 64]), torch.Size([2, 4, 16, 17]))
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, feature_map: str = "elu",
                 feature_map_kwargs: dict | None = None, share_feature_map: bool = True, normalize: bool = True,
                 eps: float = 1e-6, norm: str | None = None, norm_eps: float = 1e-6,
                 layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        check_positive_int(name, "num_heads", num_heads)
        if hidden_size % num_heads:
            raise ValueError(f"{name}: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"{name}: unknown feature_map {feature_map!r}; valid names: {', '.join(FEATURE_MAPS)}")
        if feature_map_kwargs is not None and not isinstance(feature_map_kwargs, dict):
            raise TypeError(f"{name}: feature_map_kwargs must be a dict or None, "
                            f"got {type(feature_map_kwargs).__name__}")
        if norm not in ("rms", None):
            raise ValueError(f"{name}: norm must be 'rms' or None, got {norm!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"{name}: normalize must be a bool, got {type(normalize).__name__}")
        self.eps = check_positive_float(name, "eps", eps)
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.feature_map_name = feature_map
        self.normalize = normalize
        self.norm_type = norm

        kwargs = dict(feature_map_kwargs or {})
        if feature_map == "hedgehog":
            kwargs.setdefault("num_heads", num_heads)
        if FEATURE_MAPS[feature_map].needs_positions and kwargs.get("max_len") is None:
            raise ValueError(f"{name}: feature_map {feature_map!r} needs positions bounded by max_len; pass "
                             f"feature_map_kwargs={{'max_len': M}} with M >= the longest context")
        self.q_map = get_feature_map(feature_map, self.head_dim, **kwargs)
        self.k_map = self.q_map if share_feature_map else get_feature_map(feature_map, self.head_dim, **kwargs)
        self.share_feature_map = share_feature_map
        self.needs_positions = self.q_map.needs_positions
        self.feature_dim = self.q_map.feature_dim

        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm = RMSNorm(self.head_dim, eps=norm_eps) if norm == "rms" else None
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, feature_map={self.feature_map_name!r}, "
                f"feature_dim={self.feature_dim}, normalize={self.normalize}, norm={self.norm_type!r}")

    def _state_shapes(self, n: int) -> dict[str, list[int | None]]:
        shapes: dict[str, list[int | None]] = {
            "recurrent_state": [n, self.num_heads, self.feature_dim, self.head_dim + self.normalize]}
        if self.needs_positions:
            shapes["position"] = [n]
        return shapes

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        self.check_input(x, attention_mask, cu_seqlens)
        B, T, _ = x.shape
        n = num_sequences(x, cu_seqlens)
        state = check_state(type(self).__name__, state, self._state_shapes(n))
        H, Dh = self.num_heads, self.head_dim
        q = self.q_proj(x).unflatten(-1, (H, Dh))
        k = self.k_proj(x).unflatten(-1, (H, Dh))
        v = self.v_proj(x).unflatten(-1, (H, Dh))
        if self.needs_positions:
            pos, next_pos = token_positions(B, T, offset=None if state is None else state["position"],
                                            attention_mask=attention_mask, cu_seqlens=cu_seqlens, device=x.device)
            q, k = self.q_map(q, positions=pos), self.k_map(k, positions=pos)
        else:
            q, k = self.q_map(q), self.k_map(k)
        if self.normalize:
            v = torch.cat([v, v.new_ones(B, T, H, 1)], dim=-1)  # the last output column is z_t . q_t
        k, v = mask_steps(attention_mask, k, v)  # after phi: phi(0) need not be 0
        o, recurrent = linear_attn(q, k, v, scale=1.0,
                                   initial_state=None if state is None else state["recurrent_state"],
                                   output_final_state=use_cache, cu_seqlens=cu_seqlens)
        if self.normalize:
            dtype = compute_dtype(o)
            o = (o[..., :Dh].to(dtype) / (o[..., Dh:].to(dtype) + self.eps)).to(x.dtype)
        if self.norm is not None:
            o = self.norm(o)
        y = self.o_proj(o.flatten(-2))
        if not use_cache:
            return y, None
        new_state: LayerState = {"recurrent_state": recurrent}
        if self.needs_positions:
            new_state["position"] = next_pos
        return y, new_state

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the state (fixed): the float32 [H, D', D/H (+1)] state per sequence."""
        return batch_size * 4 * self.num_heads * self.feature_dim * (self.head_dim + self.normalize)
