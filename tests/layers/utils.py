"""Helpers shared by the mixer tests: parameter perturbation and hand-written reference pieces
(causal depthwise convolution, RMS normalisation, RoPE) written independently of linmix.modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def perturbed(mixer: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """float64 copy with every parameter nudged by ``scale`` * N(0, 1), so that zero/one-initialised
    parts (biases, norm weights, output gates, Mamba's D) matter in the comparisons."""
    mixer = mixer.double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(scale * torch.randn_like(p))
    return mixer


def causal_conv(x: torch.Tensor, conv: torch.nn.Module, activation: bool) -> torch.Tensor:
    """y[t] = b + sum_j w[:, j] x[t - (W-1) + j] (zeros before t = 0), then SiLU if ``activation``.

    x [B, T, C]; ``conv`` supplies the depthwise weight [C, 1, W] and the bias (or None).
    """
    W = conv.weight.shape[-1]
    y = torch.zeros_like(x)
    for j in range(W):
        shift = W - 1 - j
        y = y + F.pad(x, (0, 0, shift, 0))[:, :x.shape[1]] * conv.weight[:, 0, j]
    if conv.bias is not None:
        y = y + conv.bias
    return F.silu(y) if activation else y


def rms(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, times ``weight`` if given."""
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE, half layout: pairs (i, i + d/2) of x [B, T, H, d] rotated by pos [B, T] * base^(-2i/d)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[..., None] * inv
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def dense_attention(m: torch.nn.Module, x: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """An :class:`~linmix.layers.attention.Attention` layer ``m`` written out: causal softmax attention
    over the last ``window`` keys (all with None) with RoPE, qk-norm and grouped KV heads, as explicit
    matrices; x [B, T, D] from position 0."""
    B, T, _ = x.shape
    H, Hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = (x @ m.q_proj.weight.T).unflatten(-1, (H, d))
    k = (x @ m.k_proj.weight.T).unflatten(-1, (Hkv, d))
    v = (x @ m.v_proj.weight.T).unflatten(-1, (Hkv, d))
    if m.qk_norm:
        q, k = rms(q, m.q_norm.eps, m.q_norm.weight), rms(k, m.k_norm.eps, m.k_norm.weight)
    pos = torch.arange(T).expand(B, T)
    q, k = rope(q, pos), rope(k, pos)
    k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / d ** 0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) if window is None else (j <= i) & (j > i - window)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    o = torch.einsum("bhij,bjhd->bihd", probs, v)
    return o.flatten(-2) @ m.o_proj.weight.T
