"""LoLCATs attention: sliding-window softmax attention plus Hedgehog linear attention over the rest.

The mixer that linearised transformers use in place of softmax attention (Zhang et al.,
"LoLCATs: On Low-Rank Linearizing of Large Language Models", 2024, eq. 7), and its window-free
special case, Hedgehog linear attention (Zhang et al., "The Hedgehog & the Porcupine", 2024).

Layout. As in :mod:`linmix.layers.attention`, a padded batch is first put in its canonical
"left-padded" order (every row's real tokens right-aligned and contiguous), so that "the last w
tokens" is "the last w slots". In that order both halves of eq. 7 are shifts:

* the window half is a banded softmax computed in blocks of ``window_size`` queries (each block
  sees its own and the previous block's keys: O(T w) work and memory);
* the linear half over tokens older than the window is plain causal linear attention whose keys
  and values are *delayed* by ``window_size`` slots (query n writes key n - w), so it runs on the
  chunked ``linear_attn`` op and its state holds exactly the tokens that left the window.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.layers.base import (LayerState, TokenMixer, check_positive_int, check_state, num_sequences, register_mixer,
                                resolve_attention_heads, resolve_rotary_dim, sequence_shard)
from linmix.modules import HedgehogFeatureMap, RotaryEmbedding
from linmix.ops import linear_attn
from linmix.ops.common.utils import compute_dtype


def _left_pad_layout(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each packed token goes in a left-padded batch [N, L_max]: (sequence [T], slot [T], L_max)."""
    cu = cu_seqlens.to(dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    max_len = max(int(lengths.max()), 1)
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=T)
    slot = max_len - lengths[seq_id] + torch.arange(T, device=cu.device) - cu[seq_id]
    return seq_id, slot, max_len


@register_mixer("lolcats")
class LolcatsAttention(TokenMixer):
    r"""LoLCATs hybrid attention (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language
    Models", 2024, eq. 7): exact softmax attention over the last ``window_size`` tokens and Hedgehog
    linear attention over everything older, under one shared normaliser.

    Per query head, with q_n, k_i rotated by RoPE, phi_q / phi_k learnable Hedgehog maps
    (:class:`~linmix.modules.HedgehogFeatureMap`, one per head), gamma_h = sigmoid(mix_logit_h) a
    learnable per-head mixing weight, and c_n the largest window score of query n (stability):

        a_{n,i} = gamma exp(q_n . k_i / sqrt(d) - c_n)            n - w < i <= n   (window)
        b_{n,j} = phi_q(q_n) . phi_k(k_j)                                j <= n - w   (older)
        o_n = (sum_i a_{n,i} v_i + sum_j b_{n,j} v_j) / (sum_i a_{n,i} + sum_j b_{n,j})
        y_n = W_o [o_n]

    With ``window_size >= T`` the linear half is empty and the layer *is* softmax attention with the
    given q/k/v/o weights, which is how a converted layer starts; ``window_size = 0`` leaves only
    the linear half (pure Hedgehog attention, see :class:`HedgehogAttention`). Keys and values are
    shared by groups of query heads (GQA) and repeated for the linear half, whose feature maps are
    per query head.

    Args:
        hidden_size: model width D.
        num_heads: query heads H.
        num_kv_heads: key/value heads (default H); must divide H.
        head_dim: per-head width d (default D / H).
        window_size: w, keys per query in the softmax window, itself included (LoLCATs uses 64,
            the value ``linmix convert`` passes; the default is smaller so that short contexts
            exercise both halves); 0 = no window.
        feature_dim: features per half of the Hedgehog map (its ``num_features``; default d, so
            phi has 2d features).
        feature_map_bias: learn a bias in the Hedgehog maps.
        share_feature_map: one map for q and k (default: separate maps, as in Hedgehog).
        mixing_init: initial mix_logit (gamma = sigmoid(mixing_init), 0.5 by default).
        qkv_bias: biases on the q/k/v projections (Qwen2, GPT-2).
        use_rope, rope_theta, rotary_dim: rotary positions as in :class:`~linmix.layers.Attention`
            (off for GPT-2-style models with absolute positions).
        layer_idx: index of the layer in the model.

    State (``dict``, every tensor with leading dim N):
        ``"k"``, ``"v"``: [N, L, H_kv, d] the last L <= w keys (rotated) and values, x's dtype;
        ``"mask"``: [N, L] bool, real slots; ``"pos"``: [N] int64, real tokens seen;
        ``"recurrent_state"``: [N, H, 2 * feature_dim, d + 1] float32 (float64 for float64 inputs),
        the linear-attention state of the tokens that left the window (last column: normaliser).
        Bounded: at most w tokens of KV plus a fixed state, whatever the context length.

    Example:
        >>> import torch
        >>> mixer = LolcatsAttention(hidden_size=64, num_heads=4, num_kv_heads=2, window_size=8)
        >>> y, state = mixer(torch.randn(2, 20, 64), use_cache=True)
        >>> y.shape, state["k"].shape, state["recurrent_state"].shape
        (torch.Size([2, 20, 64]), torch.Size([2, 8, 2, 16]), torch.Size([2, 4, 32, 17]))
        >>> y_next, state = mixer(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, window_size: int = 16, feature_dim: int | None = None,
                 feature_map_bias: bool = False, share_feature_map: bool = False, mixing_init: float = 0.0,
                 qkv_bias: bool = False, use_rope: bool = True, rope_theta: float = 10000.0,
                 rotary_dim: int | None = None, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        num_kv_heads, head_dim = resolve_attention_heads(name, hidden_size, num_heads, num_kv_heads, head_dim)
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"{name}: window_size must be an int >= 0, got {window_size!r}")
        feature_dim = head_dim if feature_dim is None else feature_dim
        check_positive_int(name, "feature_dim", feature_dim)
        rotary_dim = resolve_rotary_dim(name, rotary_dim, head_dim, use_rope)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window_size = window_size
        self.use_rope = bool(use_rope)

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(rotary_dim, base=rope_theta) if self.use_rope else None
        self.q_map = HedgehogFeatureMap(head_dim, num_heads=num_heads, num_features=feature_dim, bias=feature_map_bias)
        self.k_map = self.q_map if share_feature_map else HedgehogFeatureMap(
            head_dim, num_heads=num_heads, num_features=feature_dim, bias=feature_map_bias)
        self.feature_dim = self.q_map.feature_dim  # 2 * feature_dim: D' of the linear state
        # gamma = sigmoid(mix_logit): the weight of the window half (absent without a window)
        self.mix_logit = nn.Parameter(torch.full((num_heads,), float(mixing_init))) if window_size else None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, window_size={self.window_size}, feature_dim={self.feature_dim}, "
                f"use_rope={self.use_rope}")

    def feature_map_parameters(self) -> list[nn.Parameter]:
        """The parameters a conversion adds to the teacher's attention: feature maps and mixing weights."""
        maps = list(self.q_map.parameters()) + ([] if self.k_map is self.q_map else list(self.k_map.parameters()))
        return maps + ([self.mix_logit] if self.mix_logit is not None else [])

    # -- state -------------------------------------------------------------------------------------

    def _state_shapes(self, n: int) -> dict[str, list[int | str]]:
        kv = [n, "L", self.num_kv_heads, self.head_dim]
        return {"k": kv, "v": kv, "mask": [n, "L"], "pos": [n],
                "recurrent_state": [n, self.num_heads, self.feature_dim, self.head_dim + 1]}

    def _check_state(self, state: object, n: int, x: torch.Tensor) -> LayerState | None:
        name = type(self).__name__
        state = check_state(name, state, self._state_shapes(n))
        if state is None:
            return None
        for key in ("k", "v"):
            if state[key].dtype != x.dtype:
                raise TypeError(f"{name}: state[{key!r}] must have x's dtype {x.dtype}, got {state[key].dtype}")
        for key, what in (("mask", "a bool/int tensor [N, L]"), ("pos", "an integer tensor [N]")):
            if state[key].is_floating_point():
                raise ValueError(f"{name}: state[{key!r}] must be {what}, got {state[key].dtype}")
        if state["k"].shape[1] > max(self.window_size, 0):
            raise ValueError(f"{name}: state['k'] holds {state['k'].shape[1]} tokens, more than "
                             f"window_size={self.window_size}")
        return state

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the state after ``context_len`` tokens: min(context, w) tokens of KV (parameter
        dtype) plus the fixed float32 linear state (mask/pos not counted)."""
        param = self.q_proj.weight
        itemsize = param.element_size()
        kv = 2 * min(context_len, self.window_size) * self.num_kv_heads * self.head_dim * itemsize
        state_itemsize = 8 if param.dtype == torch.float64 else 4
        linear = state_itemsize * self.num_heads * self.feature_dim * (self.head_dim + 1)
        return batch_size * (kv + linear)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        """Mix x [B, T, D] (see the class docstring); returns (y [B, T, D], new state or None)."""
        self.check_input(x, attention_mask, cu_seqlens)
        if sequence_shard() is not None:
            raise ValueError(f"{type(self).__name__}: sequence parallelism is not supported for this layer yet "
                             "(its sliding window would need the previous shard's keys)")
        B, T, _ = x.shape
        state = self._check_state(state, num_sequences(x, cu_seqlens), x)
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if cu_seqlens is not None:
            # Packed sequences become a left-padded batch [N, L_max]; outputs are gathered back.
            seq_id, slot, max_len = _left_pad_layout(cu_seqlens.to(x.device), T)
            N = cu_seqlens.numel() - 1

            def left_pad(t: torch.Tensor) -> torch.Tensor:
                return t.new_zeros(N, max_len, *t.shape[2:]).index_put((seq_id, slot), t[0])

            mask = torch.zeros(N, max_len, dtype=torch.bool, device=x.device).index_put(
                (seq_id, slot), torch.ones(T, dtype=torch.bool, device=x.device))
            o, new_state = self._mix(left_pad(q), left_pad(k), left_pad(v), mask, state, use_cache)
            o = o[seq_id, slot][None]
        else:
            mask = None if attention_mask is None else attention_mask.to(device=x.device).bool()
            if mask is not None and bool(mask.all()):
                mask = None
            o, new_state = self._mix(q, k, v, mask, state, use_cache)
        return self.o_proj(o.flatten(-2).to(x.dtype)), new_state

    def _mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             state: LayerState | None, use_cache: bool) -> tuple[torch.Tensor, LayerState | None]:
        """A padded batch: q [B, T, H, d], k/v [B, T, H_kv, d] (not yet rotated), mask [B, T] or None."""
        B, T = q.shape[:2]
        device = q.device
        cur = torch.ones(B, T, dtype=torch.bool, device=device) if mask is None else mask
        past_pos = (torch.zeros(B, dtype=torch.long, device=device) if state is None
                    else state["pos"].to(device=device, dtype=torch.long))
        if self.rotary is not None:  # positions count real tokens; pads reuse a neighbour's
            positions = past_pos[:, None] + (cur.long().cumsum(1) - 1).clamp_min(0)
            q, k = self.rotary(q, k, position_ids=positions)
        if state is None:
            k_past, v_past = k.new_zeros(B, 0, *k.shape[2:]), v.new_zeros(B, 0, *v.shape[2:])
            past_mask = torch.zeros(B, 0, dtype=torch.bool, device=device)
            recurrent = None
        else:
            k_past, v_past = state["k"], state["v"]
            past_mask = state["mask"].to(device=device).bool()
            recurrent = state["recurrent_state"]
        P = past_mask.shape[1]
        k_all, v_all = torch.cat([k_past, k], 1), torch.cat([v_past, v], 1)      # [B, P + T, H_kv, d]
        mask_all = torch.cat([past_mask, cur], 1)                                 # [B, P + T]
        if mask is None:
            # The cache is canonical (real tokens right-aligned) and every new token is real: so is
            # the concatenation, and the queries are the last T slots.
            o, recurrent = self._attend(q, k_all, v_all, mask_all, cur, recurrent, use_cache)
        else:
            # Move every row's real tokens to the right end, in order; the new real tokens are the
            # last real ones, so they land in the last T slots (the query slots); other query slots
            # get a stand-in query whose output is dropped and which writes nothing.
            rows = torch.arange(B, device=device)[:, None]
            order = torch.sort(mask_all.to(torch.uint8), dim=1, stable=True).indices   # pads first
            inverse = torch.argsort(order, dim=1)
            k_all, v_all, mask_all = k_all[rows, order], v_all[rows, order], mask_all[rows, order]
            is_new = order[:, P:] >= P
            q_slots = q[rows, (order[:, P:] - P).clamp_min(0)]
            o_s, recurrent = self._attend(q_slots, k_all, v_all, mask_all, is_new & mask_all[:, P:], recurrent,
                                          use_cache)
            o = o_s[rows, (inverse[:, P:] - P).clamp_min(0)]
        if not use_cache:
            return o, None
        keep = min(self.window_size, mask_all.shape[1])
        L = mask_all.shape[1]
        return o, {"k": k_all[:, L - keep:], "v": v_all[:, L - keep:], "mask": mask_all[:, L - keep:],
                   "pos": past_pos + cur.sum(1), "recurrent_state": recurrent}

    def _attend(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, mask_all: torch.Tensor,
                writes: torch.Tensor, recurrent: torch.Tensor | None,
                use_cache: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eq. 7 in the canonical layout.

        Args:
            q: [B, T, H, d] rotated queries of the last T of the L slots.
            k_all, v_all: [B, L, H_kv, d] rotated keys and values of every slot (past and new).
            mask_all: [B, L] real slots (right-aligned, contiguous).
            writes: [B, T] query slots that hold a new real token: only those write their delayed
                key (slot - w) into the linear state, so every token enters it exactly once.
            recurrent: [B, H, D', d + 1] linear state of the tokens older than the past window.

        Returns:
            (o [B, T, H, d] in the compute dtype, the new linear state or None).
        """
        B, T, H, d = q.shape
        L, Hkv, w = k_all.shape[1], self.num_kv_heads, self.window_size
        G = H // Hkv
        P = L - T
        dtype = compute_dtype(q)
        qf, kf, vf = q.to(dtype), k_all.to(dtype), v_all.to(dtype)
        # Left-pad by w empty slots: slot s of the padded arrays is slot s - w of the originals.
        k_pad, v_pad = F.pad(kf, (0, 0, 0, 0, w, 0)), F.pad(vf, (0, 0, 0, 0, w, 0))
        mask_pad = F.pad(mask_all, (w, 0))

        # Linear half: query slot P + t reads the keys up to slot P + t - w, i.e. delayed keys.
        writes = writes & mask_pad[:, P:P + T]
        k_old, v_old = k_pad[:, P:P + T], v_pad[:, P:P + T]                # slot P + t - w
        k_old, v_old = (t.repeat_interleave(G, dim=2) for t in (k_old, v_old))
        keep = writes[:, :, None, None].to(dtype)
        phi_k = self.k_map(k_old) * keep
        v_old = torch.cat([v_old, v_old.new_ones(B, T, H, 1)], dim=-1) * keep   # last column: normaliser
        o_lin, recurrent = linear_attn(self.q_map(qf), phi_k, v_old, scale=1.0, initial_state=recurrent,
                                       output_final_state=use_cache)
        num, den = o_lin[..., :d], o_lin[..., d]
        if w:
            num_win, den_win = self._window(qf, k_pad, v_pad, mask_pad, P)
            num, den = num + num_win, den + den_win
        den = torch.where(den > 0, den, torch.ones_like(den))  # only stand-in query slots have nothing
        return num / den[..., None], recurrent

    def _window(self, q: torch.Tensor, k_pad: torch.Tensor, v_pad: torch.Tensor, mask_pad: torch.Tensor,
                P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window half, gamma sum_i exp(s_i - c) v_i and its normaliser, for the T queries.

        Queries are taken in blocks of w; block b (query slots P + b w + i, i < w) sees the 2w
        padded slots P + b w .. P + b w + 2w - 1 (original slots from P + b w - w), of which query
        i may use j in [i + 1, i + w] (its last w keys, itself included).

        Returns: (numerator [B, T, H, d], normaliser [B, T, H]).
        """
        B, T, H, d = q.shape
        Hkv, w = self.num_kv_heads, self.window_size
        G = H // Hkv
        nb = -(-T // w)
        span = (nb + 1) * w
        keys = k_pad[:, P:P + span]
        pad = span - keys.shape[1]
        keys, vals = F.pad(keys, (0, 0, 0, 0, 0, pad)), F.pad(v_pad[:, P:P + span], (0, 0, 0, 0, 0, pad))
        kmask = F.pad(mask_pad[:, P:P + span], (0, pad))
        keys = keys.unfold(1, 2 * w, w)                                    # [B, nb, H_kv, d, 2w]
        vals = vals.unfold(1, 2 * w, w)
        kmask = kmask.unfold(1, 2 * w, w)                                  # [B, nb, 2w]
        qb = F.pad(q, (0, 0, 0, 0, 0, nb * w - T)).reshape(B, nb, w, Hkv, G, d)
        scores = torch.einsum("bnihgd,bnhdj->bnhgij", qb, keys) * self.head_dim ** -0.5
        i = torch.arange(w, device=q.device)[:, None]
        j = torch.arange(2 * w, device=q.device)[None, :]
        visible = (j > i) & (j <= i + w)                                   # [w, 2w]
        visible = visible & kmask[:, :, None, None, None, :]               # [B, nb, 1, 1, w, 2w]
        scores = scores.masked_fill(~visible, float("-inf"))
        c = scores.amax(-1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))         # stand-in queries see no key
        gamma = torch.sigmoid(self.mix_logit.to(q.dtype)).reshape(Hkv, G, 1, 1)
        a = torch.exp(scores - c) * gamma                                  # [B, nb, H_kv, G, w, 2w]
        num = torch.einsum("bnhgij,bnhdj->bnihgd", a, vals).reshape(B, nb * w, H, d)[:, :T]
        den = a.sum(-1).permute(0, 1, 4, 2, 3).reshape(B, nb * w, H)[:, :T]
        return num, den


@register_mixer("hedgehog")
class HedgehogAttention(LolcatsAttention):
    r"""Hedgehog linear attention (Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear
    Attentions with Softmax Mimicry", 2024) in a converted transformer: :class:`LolcatsAttention`
    without the window, i.e. per query head

        o_n = sum_{j <= n} phi_q(q_n) . phi_k(k_j) v_j / sum_{j <= n} phi_q(q_n) . phi_k(k_j)

    with learnable Hedgehog maps (softmax-mimicking, one per head) on the rotated q and k, grouped
    KV heads and the teacher's q/k/v/o projections.

    Args: as :class:`LolcatsAttention`, without ``window_size`` and ``mixing_init``.

    State: as :class:`LolcatsAttention` with an empty KV cache (L = 0): the fixed
    ``"recurrent_state"`` [N, H, 2 * feature_dim, d + 1] and the position counter.

    Example:
        >>> import torch
        >>> mixer = HedgehogAttention(hidden_size=64, num_heads=4)
        >>> y, state = mixer(torch.randn(2, 10, 64), use_cache=True)
        >>> y.shape, state["recurrent_state"].shape, state["k"].shape[1]
        (torch.Size([2, 10, 64]), torch.Size([2, 4, 32, 17]), 0)
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, feature_dim: int | None = None, feature_map_bias: bool = False,
                 share_feature_map: bool = False, qkv_bias: bool = False, use_rope: bool = True,
                 rope_theta: float = 10000.0, rotary_dim: int | None = None, layer_idx: int | None = None):
        super().__init__(hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         window_size=0, feature_dim=feature_dim, feature_map_bias=feature_map_bias,
                         share_feature_map=share_feature_map, qkv_bias=qkv_bias, use_rope=use_rope,
                         rope_theta=rope_theta, rotary_dim=rotary_dim, layer_idx=layer_idx)


__all__ = ["LolcatsAttention", "HedgehogAttention"]
