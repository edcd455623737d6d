"""Softmax attention layers for hybrids: full causal attention and sliding-window attention (SWA).

Both keep a KV cache as their decoding state. Positions (RoPE) count real tokens only, so a row of
a padded batch or a packed sequence sees the same positions as the sequence run alone.

Cache layout. The cache is a padded batch ``[N, L, H_kv, head_dim]`` with a key mask ``[N, L]``.
A sliding window counts cache *slots* (:func:`linmix.ops.softmax_attn`), so the sliding-window
layer keeps its cache canonical: the real tokens of every row right-aligned and contiguous (pads
in front, the "left-padded" layout). Decoding then sees exactly the last ``window_size`` real
tokens of each row, whatever padding the prompt had. Full attention needs no such order (a key
mask is enough), so its cache is simply past + new slots.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from linmix.layers.base import (LayerState, TokenMixer, check_positive_int, check_state, num_sequences, register_mixer,
                                reject_padding_on_shard, resolve_attention_heads, resolve_rotary_dim, sequence_shard)
from linmix.modules import RMSNorm, RotaryEmbedding
from linmix.ops import softmax_attn


def _left_pad_layout(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each packed token goes in a left-padded batch [N, L_max] (real tokens right-aligned).

    Returns (sequence index [T], slot [T], L_max); L_max >= 1 even if every sequence is empty.
    """
    cu = cu_seqlens.to(dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    N = lengths.numel()
    max_len = max(int(lengths.max()), 1)
    seq_id = torch.repeat_interleave(torch.arange(N, device=cu.device), lengths, output_size=T)
    slot = max_len - lengths[seq_id] + torch.arange(T, device=cu.device) - cu[seq_id]
    return seq_id, slot, max_len


@register_mixer("attention")
class Attention(TokenMixer):
    r"""Causal softmax attention with rotary positions and grouped KV heads (the full-attention
    layer of hybrids; Vaswani et al., "Attention Is All You Need", 2017, with RoPE from Su et al.,
    "RoFormer", 2021, and grouped-query attention from Ainslie et al., "GQA", 2023).

    Per query head h (KV head g = h // (H / H_kv)):

        q_t = R_{p_t} W_q x_t,   k_t = R_{p_t} W_k x_t,   v_t = W_v x_t        (R_p: rotation by position p)
        o_t = sum_{s <= t} softmax_s(q_t . k_s / sqrt(head_dim)) v_s,   y_t = W_o o_t

    computed by ``linmix.ops.softmax_attn`` (SDPA). With ``qk_norm`` q and k pass a per-head
    RMSNorm before the rotation (as in OLMo-2 / Qwen-3). Positions p_t count the real tokens of a
    sequence (padding does not advance them). With ``window_size`` each query sees only the last
    ``window_size`` positions, itself included (see :class:`SlidingWindowAttention`).

    Args:
        hidden_size: model width D.
        num_heads: query heads H (default 4, so that small widths work; LLaMA-style models use
            head_dim 64-128, i.e. ``num_heads = hidden_size // 128``).
        num_kv_heads: key/value heads H_kv (must divide num_heads); None = num_heads (multi-head),
            1 = multi-query attention.
        head_dim: dim per head; None -> hidden_size // num_heads (num_heads must divide D).
        qkv_bias: biases in the q, k, v projections.
        qk_norm: per-head RMSNorm of q and k (default off).
        use_rope: rotary position embedding on q and k (off = no positional encoding, NoPE).
        rope_theta: RoPE frequency base (10000).
        rotary_dim: rotated features per head (partial rotary); None = head_dim.
        window_size: None (full attention) or the sliding window.
        norm_eps: epsilon of the qk-norm.
        layer_idx: index of the layer in the model (for caches).

    State (``dict``, every tensor with leading dim N):
        ``"k"``, ``"v"``: [N, L, H_kv, head_dim] rotated keys and values in the input's dtype,
        ``"mask"``: [N, L] bool, True at real tokens (False at padding),
        ``"pos"``: [N] int64, the number of real tokens seen (the next token's position).
        L grows by T per call (full attention); bounded by ``window_size`` with a window.
        Size: 2 * H_kv * head_dim values per token of context (``state_bytes``).

    Example:
        >>> import torch
        >>> attn = Attention(hidden_size=64, num_heads=4, num_kv_heads=2)
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = attn(x, use_cache=True)
        >>> y.shape, state["k"].shape, state["pos"].tolist()
        (torch.Size([2, 10, 64]), torch.Size([2, 10, 2, 16]), [10, 10])
        >>> y_next, state = attn(torch.randn(2, 1, 64), state=state, use_cache=True)  # decode
        >>> state["k"].shape
        torch.Size([2, 11, 2, 16])
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, qk_norm: bool = False, use_rope: bool = True,
                 rope_theta: float = 10000.0, rotary_dim: int | None = None, window_size: int | None = None,
                 norm_eps: float = 1e-6, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        name = type(self).__name__
        num_kv_heads, head_dim = resolve_attention_heads(name, hidden_size, num_heads, num_kv_heads, head_dim)
        if window_size is not None:
            check_positive_int(name, "window_size", window_size)
        rotary_dim = resolve_rotary_dim(name, rotary_dim, head_dim, use_rope)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window_size = window_size
        self.use_rope, self.qk_norm = bool(use_rope), bool(qk_norm)

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps)
        self.rotary = RotaryEmbedding(rotary_dim, base=rope_theta) if self.use_rope else None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, window_size={self.window_size}, qk_norm={self.qk_norm}, "
                f"use_rope={self.use_rope}")

    # -- state -------------------------------------------------------------------------------------

    def _state_shapes(self, n: int) -> dict[str, list[int | str]]:
        kv = [n, "L", self.num_kv_heads, self.head_dim]
        return {"k": kv, "v": kv, "mask": [n, "L"], "pos": [n]}

    def _check_state(self, state: LayerState, n: int, x: torch.Tensor) -> None:
        name = type(self).__name__
        check_state(name, state, self._state_shapes(n))
        for key in ("k", "v"):
            if state[key].dtype != x.dtype:
                raise TypeError(f"{name}: state[{key!r}] must have x's dtype {x.dtype}, got {state[key].dtype}")
        for key, what in (("mask", "a bool/int tensor [N, L]"), ("pos", "an integer tensor [N]")):
            if state[key].is_floating_point():
                raise ValueError(f"{name}: state[{key!r}] must be {what}, got {state[key].dtype}")

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of the KV cache after ``context_len`` tokens (parameter dtype; mask/pos not counted)."""
        tokens = context_len if self.window_size is None else min(context_len, self.window_size)
        itemsize = next(self.parameters()).element_size()
        return 2 * batch_size * tokens * self.num_kv_heads * self.head_dim * itemsize

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        """Attend causally over the past (cache) and the new tokens.

        Args:
            x: [B, T, hidden_size] inputs.
            state: the KV cache of a previous call (``use_cache=True``), or None (sequence start).
            use_cache: return the KV cache after the last token.
            cu_seqlens: int [N+1] offsets of N sequences packed along T (B == 1).
            attention_mask: [B, T] 1 = real token, 0 = padding (left or right) of the new tokens;
                the cache remembers the mask of the past ones.

        Returns:
            (y [B, T, hidden_size] in x's dtype, the new state or None).
        """
        self.check_input(x, attention_mask, cu_seqlens)
        if state is not None:
            self._check_state(state, num_sequences(x, cu_seqlens), x)
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        past_pos = None if state is None else state["pos"].to(device=x.device, dtype=torch.long)
        shard = sequence_shard()
        if past_pos is None and shard is not None:  # one shard of a longer sequence: global positions
            reject_padding_on_shard(attention_mask)
            past_pos = shard.position_offsets(x.device)

        if cu_seqlens is not None:
            o, new_state = self._forward_packed(q, k, v, cu_seqlens, state, past_pos, use_cache)
        else:
            mask = None if attention_mask is None else attention_mask.to(device=x.device).bool()
            if self.rotary is not None:
                if mask is None:
                    q, k = self.rotary(q, k, offset=0 if past_pos is None else past_pos)
                else:
                    # real tokens get positions past_pos, past_pos + 1, ...; pads reuse a neighbour's
                    positions = (mask.long().cumsum(1) - 1).clamp_min(0)
                    if past_pos is not None:
                        positions = positions + past_pos[:, None]
                    q, k = self.rotary(q, k, position_ids=positions)
            o, new_state = self._attend(q, k, v, mask, state, past_pos, use_cache)
        y = self.o_proj(o.flatten(-2))
        return y, new_state

    def _forward_packed(self, q, k, v, cu_seqlens, state, past_pos, use_cache):
        """Packed sequences (B == 1): q [1, T, H, d], k/v [1, T, H_kv, d]."""
        T = q.shape[1]
        if self.rotary is not None:
            q, k = self.rotary(q, k, cu_seqlens=cu_seqlens, offset=0 if past_pos is None else past_pos)
        seq_id, slot, max_len = _left_pad_layout(cu_seqlens.to(q.device), T)
        N = cu_seqlens.numel() - 1

        def left_pad(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros(N, max_len, *t.shape[2:]).index_put((seq_id, slot), t[0])

        mask = torch.zeros(N, max_len, dtype=torch.bool, device=q.device).index_put(
            (seq_id, slot), torch.ones(T, dtype=torch.bool, device=q.device))
        if state is not None:
            # Continue each sequence from its cache: run the packed tokens as a left-padded batch.
            o, new_state = self._attend(left_pad(q), left_pad(k), left_pad(v), mask, state, past_pos, use_cache)
            return o[seq_id, slot][None], new_state
        o, _ = softmax_attn(q, k, v, window=self.window_size, cu_seqlens=cu_seqlens)
        if not use_cache:
            return o, None
        # The op gives no cache for ragged sequences: build the left-padded one from the packed k/v.
        k_cache, v_cache = left_pad(k), left_pad(v)
        if self.window_size is not None and max_len > self.window_size:
            k_cache, v_cache, mask = (t[:, -self.window_size:] for t in (k_cache, v_cache, mask))
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=q.device, dtype=torch.long)
        return o, {"k": k_cache, "v": v_cache, "mask": mask, "pos": lengths}

    def _attend(self, q, k, v, mask, state, past_pos, use_cache):
        """A padded batch: q [B, T, H, d], k/v [B, T, H_kv, d] (rotated), mask [B, T] bool or None."""
        B, T = q.shape[:2]
        window = self.window_size
        n_new = torch.full((B,), T, dtype=torch.long, device=q.device) if mask is None else mask.sum(1)
        new_pos = n_new if past_pos is None else past_pos + n_new
        if state is None and mask is None:
            o, cache = softmax_attn(q, k, v, window=window, output_final_state=use_cache)
            if not use_cache:
                return o, None
            key_mask = torch.ones(B, cache[0].shape[1], dtype=torch.bool, device=q.device)
            return o, {"k": cache[0], "v": cache[1], "mask": key_mask, "pos": new_pos}

        if state is None:
            k_past = v_past = None
            past_mask = torch.zeros(B, 0, dtype=torch.bool, device=q.device)
        else:
            k_past, v_past = state["k"], state["v"]
            past_mask = state["mask"].to(device=q.device).bool()
        P = past_mask.shape[1]
        cur_mask = torch.ones(B, T, dtype=torch.bool, device=q.device) if mask is None else mask
        full_mask = torch.cat([past_mask, cur_mask], dim=1)                       # [B, P + T]

        if window is None or mask is None:
            # Full attention: the key mask is all it takes. A window with all-real new tokens after
            # a canonical (right-aligned) cache: real tokens stay contiguous, slots == real tokens.
            o, cache = softmax_attn(q, k, v, window=window, attention_mask=full_mask, output_final_state=use_cache,
                                    initial_state=None if k_past is None else (k_past, v_past))
            if not use_cache:
                return o, None
            key_mask = full_mask[:, full_mask.shape[1] - cache[0].shape[1]:]
            return o, {"k": cache[0], "v": cache[1], "mask": key_mask, "pos": new_pos}

        # A window with padded new tokens: move every row's real tokens (past and new) to the right
        # end, in order, so that the window's slots are real tokens; queries follow their keys.
        rows = torch.arange(B, device=q.device)[:, None]
        order = torch.sort(full_mask.to(torch.uint8), dim=1, stable=True).indices    # pads first
        inverse = torch.argsort(order, dim=1)                                        # slot of each original
        k_all = k if k_past is None else torch.cat([k_past, k], dim=1)
        v_all = v if v_past is None else torch.cat([v_past, v], dim=1)
        k_s, v_s, mask_s = k_all[rows, order], v_all[rows, order], full_mask[rows, order]
        # The new real tokens are the last real ones, so they land in the last T slots (the query
        # slots of the op); other query slots get a stand-in query whose output is dropped.
        q_s = q[rows, (order[:, P:] - P).clamp_min(0)]
        o_s, cache = softmax_attn(q_s, k_s[:, P:], v_s[:, P:], window=window, attention_mask=mask_s,
                                  output_final_state=use_cache,
                                  initial_state=None if P == 0 else (k_s[:, :P], v_s[:, :P]))
        o = o_s[rows, (inverse[:, P:] - P).clamp_min(0)]
        if not use_cache:
            return o, None
        key_mask = mask_s[:, mask_s.shape[1] - cache[0].shape[1]:]
        return o, {"k": cache[0], "v": cache[1], "mask": key_mask, "pos": new_pos}


@register_mixer("swa")
class SlidingWindowAttention(Attention):
    r"""Sliding-window causal softmax attention (local attention of hybrids: Beltagy et al.,
    "Longformer", 2020; used with linear/recurrent layers in Samba, Griffin and Based).

    As :class:`Attention`, but query t sees only the last ``window_size`` real tokens (itself
    included):

        o_t = sum_{t - w < s <= t} softmax_s(q_t . k_s / sqrt(head_dim)) v_s

    so the KV cache is bounded: at most ``window_size`` tokens per sequence, whatever the context
    length. The cache keeps every row's real tokens right-aligned (left-padded layout), so
    decoding after any padded or packed prefill equals the sequence alone.

    Args:
        hidden_size: model width D.
        window_size: keys per query, itself included (default 512; set it to the model you
            reproduce: Samba uses 2048, Griffin 1024, Based 64).
        num_heads, num_kv_heads, head_dim, qkv_bias, qk_norm, use_rope, rope_theta, rotary_dim,
        norm_eps, layer_idx: as in :class:`Attention`.

    State: as :class:`Attention`, with L <= window_size: 2 * H_kv * head_dim values per token of
    the last min(context, window_size) tokens.

    Example:
        >>> import torch
        >>> swa = SlidingWindowAttention(hidden_size=64, window_size=4)
        >>> y, state = swa(torch.randn(2, 10, 64), use_cache=True)
        >>> state["k"].shape  # only the last window_size tokens are kept
        torch.Size([2, 4, 4, 16])
        >>> y_next, state = swa(torch.randn(2, 1, 64), state=state, use_cache=True)
        >>> state["k"].shape, state["pos"].tolist()
        (torch.Size([2, 4, 4, 16]), [11, 11])
    """

    def __init__(self, hidden_size: int, window_size: int = 512, num_heads: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, qk_norm: bool = False, use_rope: bool = True,
                 rope_theta: float = 10000.0, rotary_dim: int | None = None, norm_eps: float = 1e-6,
                 layer_idx: int | None = None):
        if window_size is None:
            raise ValueError("SlidingWindowAttention: window_size must be a positive int, got None "
                             "(use Attention for full attention)")
        super().__init__(hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         qkv_bias=qkv_bias, qk_norm=qk_norm, use_rope=use_rope, rope_theta=rope_theta,
                         rotary_dim=rotary_dim, window_size=window_size, norm_eps=norm_eps, layer_idx=layer_idx)


__all__ = ["Attention", "SlidingWindowAttention"]
