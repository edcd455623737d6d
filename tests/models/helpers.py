"""Shared pieces of the model tests: two tiny test-only mixers and small configs.

The test mixers make the model tests independent of the real mixers' progress and give two
extremes of state: a fixed-size running sum (like every recurrent mixer) and a growing KV cache
with a key mask (like attention). They follow the full TokenMixer contract (padding masks,
packed sequences, decoding state), so tests/layers/test_contract.py passes on them too when both
test folders are collected together.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import linmix.layers  # noqa: F401  (registers the real mixers)
from linmix.layers import MIXERS, TokenMixer, register_mixer
from linmix.layers.base import LayerState
from linmix.models import LinmixConfig, LinmixForCausalLM

VOCAB = 97
HIDDEN = 64


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sequence(mixer, x, state, use_cache, cu_seqlens):
    """Run a padded-batch mixer on packed sequences one at a time; states are stacked (KV right-padded)."""
    ys, states = [], []
    bounds = cu_seqlens.tolist()
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        row_state = None if state is None else {k: t[n:n + 1] for k, t in state.items()}
        y, st = mixer._forward_padded(x[:, a:b], row_state, use_cache, None)
        ys.append(y)
        states.append(st)
    if not use_cache:
        return torch.cat(ys, 1), None
    length = max(st["k"].shape[1] for st in states) if "k" in states[0] else None
    out = {}
    for key in states[0]:
        parts = [st[key] for st in states]
        if length is not None:  # right-pad KV caches and their key mask to a common length
            parts = [torch.cat([p, p.new_zeros(1, length - p.shape[1], *p.shape[2:])], 1) for p in parts]
        out[key] = torch.cat(parts, 0)
    return torch.cat(ys, 1), out


class _TestMixer(TokenMixer):
    def forward(self, x: torch.Tensor, *, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        self.check_input(x, attention_mask, cu_seqlens)
        if cu_seqlens is not None:
            if x.shape[0] != 1:
                raise ValueError(f"{type(self).__name__}: cu_seqlens needs B == 1, got {x.shape[0]}")
            return _per_sequence(self, x, state, use_cache, cu_seqlens)
        return self._forward_padded(x, state, use_cache, attention_mask)


@register_mixer("_test_cummean")
class CumulativeMeanMixer(_TestMixer):
    """y_t = W_o[ sigmoid(W_g x_t) * mean_{s <= t, real} W_v x_s ].  State: running sum and count."""

    def __init__(self, hidden_size: int, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.g_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def _forward_padded(self, x, state, use_cache, attention_mask):
        dtype = _compute_dtype(x)
        B, T, D = x.shape
        m = x.new_ones(B, T, 1, dtype=dtype) if attention_mask is None else attention_mask[..., None].to(dtype)
        v = self.v_proj(x).to(dtype) * m
        prev_sum = x.new_zeros(B, D, dtype=dtype) if state is None else state["sum"]
        prev_count = x.new_zeros(B, 1, dtype=dtype) if state is None else state["count"]
        csum = v.cumsum(1) + prev_sum[:, None]
        count = m.cumsum(1) + prev_count[:, None]
        mean = csum / count.clamp_min(1.0)
        y = self.o_proj((mean * torch.sigmoid(self.g_proj(x).to(dtype))).to(x.dtype))
        return y, ({"sum": csum[:, -1], "count": count[:, -1]} if use_cache else None)

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        return batch_size * 4 * (self.hidden_size + 1)


@register_mixer("_test_kv")
class TinyAttentionMixer(_TestMixer):
    """Single-head causal softmax attention without positions.  State: growing K, V and key mask."""

    def __init__(self, hidden_size: int, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _forward_padded(self, x, state, use_cache, attention_mask):
        B, T, D = x.shape
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        mask = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None \
            else attention_mask.bool()
        if state is not None:
            k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
            mask = torch.cat([state["mask"], mask], 1)
        L = k.shape[1]
        dtype = _compute_dtype(x)
        scores = q.to(dtype) @ k.to(dtype).transpose(1, 2) * D ** -0.5  # [B, T, L]
        causal = torch.arange(L, device=x.device)[None] <= (L - T + torch.arange(T, device=x.device))[:, None]
        allowed = causal[None] & mask[:, None, :]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        y = self.o_proj((probs @ v.to(dtype)).to(x.dtype))
        return y, ({"k": k, "v": v, "mask": mask} if use_cache else None)

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        return batch_size * context_len * 2 * self.hidden_size * next(self.parameters()).element_size()


@register_mixer("_test_depth")
class DepthMixer(CumulativeMeanMixer):
    """The cumulative mean, with a constructor that needs the model depth (like Lightning's decays)."""

    def __init__(self, hidden_size: int, num_layers: int = 1, layer_idx: int | None = None):
        super().__init__(hidden_size, layer_idx)
        if layer_idx is not None and not 0 <= layer_idx < num_layers:
            raise ValueError(f"{type(self).__name__}: layer_idx {layer_idx} outside [0, num_layers={num_layers})")
        self.num_layers = num_layers


TEST_MIXERS = ["_test_cummean", "_test_depth", "_test_kv"]
REAL_MIXERS = sorted(set(MIXERS) - set(TEST_MIXERS))
ALL_MIXERS = REAL_MIXERS + TEST_MIXERS

# A hybrid of real mixers (3 recurrent : 1 attention, as in the design's example) when they exist,
# and one made of the test mixers that always exists.
_REAL_HYBRID = ["gated_deltanet"] * 3 + ["attention"]
HYBRIDS = {"test_hybrid": ["_test_cummean", "_test_kv"]}
if all(name in MIXERS for name in _REAL_HYBRID):
    HYBRIDS["gdn3_attn1"] = _REAL_HYBRID


def tiny_config(layers, num_layers: int | None = None, **kwargs) -> LinmixConfig:
    layers = [layers] if isinstance(layers, str) else list(layers)
    kwargs = {"vocab_size": VOCAB, "hidden_size": HIDDEN, **kwargs}
    return LinmixConfig(num_layers=num_layers or max(2, len(layers)), layers=layers, **kwargs)


def tiny_model(layers, dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs) -> LinmixForCausalLM:
    """A tiny model in eval mode, every parameter perturbed (so zero-initialised parts matter)."""
    torch.manual_seed(seed)
    model = LinmixForCausalLM(tiny_config(layers, **kwargs)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model
