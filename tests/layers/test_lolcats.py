"""LoLCATs / Hedgehog attention against eq. 7 written out as dense matrices (float64).

The contract tests (test_contract.py) cover decode == prefill, padding and packing at the default
window; here the window is small so that every path crosses it, and the layer is compared with an
independent dense formula.
"""

from __future__ import annotations

import pytest
import torch

from linmix.layers.attention import Attention
from linmix.layers.lolcats import HedgehogAttention, LolcatsAttention
from tests.layers.utils import perturbed, rope
from tests.ops.utils import rel_err

D = 64
TOL = 1e-10


def hedgehog(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[softmax(x W + b), softmax(-(x W + b))] per head; x [B, T, H, d], weight [H, d, F]."""
    z = torch.einsum("bthd,hdf->bthf", x, weight)
    if bias is not None:
        z = z + bias
    return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


def dense_lolcats(m: LolcatsAttention, x: torch.Tensor) -> torch.Tensor:
    """Eq. 7 of LoLCATs as [T, T] matrices, x [B, T, D] from position 0."""
    B, T, _ = x.shape
    H, Hkv, d, w = m.num_heads, m.num_kv_heads, m.head_dim, m.window_size

    def proj(lin, heads):
        y = x @ lin.weight.T + (0 if lin.bias is None else lin.bias)
        return y.unflatten(-1, (heads, d))

    q, k, v = proj(m.q_proj, H), proj(m.k_proj, Hkv), proj(m.v_proj, Hkv)
    if m.use_rope:
        pos = torch.arange(T).expand(B, T)
        q, k = rope(q, pos, m.rotary.base), rope(k, pos, m.rotary.base)
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    in_window = (j <= i) & (j > i - w)
    older = j <= i - w
    fq = hedgehog(q, m.q_map.weight, m.q_map.bias)
    fk = hedgehog(k, m.k_map.weight, m.k_map.bias)
    lin = torch.einsum("bihf,bjhf->bhij", fq, fk) * older
    if w:
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / d ** 0.5
        c = scores.masked_fill(~in_window, float("-inf")).amax(-1, keepdim=True)
        gamma = torch.sigmoid(m.mix_logit)[:, None, None]
        weights = gamma * torch.exp(scores - c) * in_window + lin
    else:
        weights = lin
    o = torch.einsum("bhij,bjhd->bihd", weights / weights.sum(-1, keepdim=True), v)
    return o.flatten(-2) @ m.o_proj.weight.T


@pytest.mark.parametrize("window", [0, 1, 3, 8, 40])
@pytest.mark.parametrize("options", [
    {},
    {"num_kv_heads": 2, "qkv_bias": True, "feature_map_bias": True},
    {"num_heads": 2, "head_dim": 24, "use_rope": False, "share_feature_map": True, "feature_dim": 8},
])
def test_matches_dense_formula(window, options):
    options = {"num_heads": 4, **options}
    m = perturbed(LolcatsAttention(D, window_size=window, **options), scale=0.1)
    x = torch.randn(2, 21, D, dtype=torch.float64)
    y, _ = m(x)
    assert rel_err(y, dense_lolcats(m, x)) < TOL


def test_hedgehog_is_lolcats_without_window():
    m = perturbed(HedgehogAttention(D, num_heads=4, num_kv_heads=2))
    assert m.window_size == 0 and m.mix_logit is None
    x = torch.randn(2, 17, D, dtype=torch.float64)
    assert rel_err(m(x)[0], dense_lolcats(m, x)) < TOL


def test_window_covering_the_context_is_softmax_attention():
    """With w >= T the linear half is empty: the layer is the teacher's softmax attention."""
    att = perturbed(Attention(D, num_heads=4, num_kv_heads=2, rope_theta=500.0))
    m = LolcatsAttention(D, num_heads=4, num_kv_heads=2, rope_theta=500.0, window_size=32).double()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(m, name).load_state_dict(getattr(att, name).state_dict())
    x = torch.randn(2, 32, D, dtype=torch.float64)
    assert rel_err(m(x)[0], att(x)[0]) < TOL


@pytest.mark.parametrize("window", [0, 3, 5])
def test_decode_and_chunked_prefill_equal_one_forward(window):
    m = perturbed(LolcatsAttention(D, num_heads=4, num_kv_heads=2, window_size=window))
    x = torch.randn(2, 19, D, dtype=torch.float64)
    y_full, _ = m(x)
    y, state = m(x[:, :7], use_cache=True)
    assert state["k"].shape[1] == min(window, 7)
    ys = [y]
    for t in range(7, 12):
        y_t, state = m(x[:, t:t + 1], state=state, use_cache=True)
        ys.append(y_t)
    y_rest, state = m(x[:, 12:], state=state, use_cache=True)  # a multi-token chunk after decoding
    assert rel_err(torch.cat(ys + [y_rest], 1), y_full) < TOL
    assert state["pos"].tolist() == [19, 19] and state["k"].shape[1] == window


@pytest.mark.parametrize("window", [0, 3])
def test_padding_and_packing_equal_sequences_alone(window):
    m = perturbed(LolcatsAttention(D, num_heads=4, num_kv_heads=2, window_size=window))
    lengths, T = [11, 4, 1], 11
    xs = [torch.randn(1, n, D, dtype=torch.float64) for n in lengths]
    alone = [m(x, use_cache=True) for x in xs]
    x_next = torch.randn(3, 2, D, dtype=torch.float64)
    next_alone = [m(x_next[b:b + 1], state=alone[b][1])[0] for b in range(3)]

    # left padding
    x = torch.zeros(3, T, D, dtype=torch.float64)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, T - n:], mask[b, T - n:] = xs[b][0], 1
    y, state = m(x, attention_mask=mask, use_cache=True)
    y_next, _ = m(x_next, state=state)
    for b, n in enumerate(lengths):
        assert rel_err(y[b:b + 1, T - n:], alone[b][0]) < TOL
        assert rel_err(y_next[b:b + 1], next_alone[b]) < TOL
    # right padding, and a padded step inside a decoding batch
    x = torch.zeros(3, T, D, dtype=torch.float64)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, :n], mask[b, :n] = xs[b][0], 1
    y, state = m(x, attention_mask=mask, use_cache=True)
    for b, n in enumerate(lengths):
        assert rel_err(y[b:b + 1, :n], alone[b][0]) < TOL
    step_mask = torch.tensor([[1, 0], [0, 1], [1, 1]])
    y_step, _ = m(x_next, state=state, attention_mask=step_mask)
    for b in range(3):
        keep = step_mask[b].bool()
        y_ref, _ = m(x_next[b:b + 1, keep], state=alone[b][1])
        assert rel_err(y_step[b:b + 1, keep], y_ref) < TOL
    # packed
    cu = torch.tensor([0, 11, 15, 16])
    y, state = m(torch.cat(xs, 1), cu_seqlens=cu, use_cache=True)
    y_next, _ = m(x_next, state=state)
    for b in range(3):
        assert rel_err(y[:, cu[b]:cu[b + 1]], alone[b][0]) < TOL
        assert rel_err(y_next[b:b + 1], next_alone[b]) < TOL


def test_feature_maps_and_mixing_weights_learn():
    m = LolcatsAttention(D, num_heads=4, window_size=4)
    x = torch.randn(2, 12, D)
    (m(x)[0] * torch.randn(2, 12, D)).sum().backward()
    for p in m.feature_map_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_state_bytes_bounded_by_the_window():
    m = LolcatsAttention(D, num_heads=4, num_kv_heads=2, window_size=8)
    assert m.state_bytes(8) == m.state_bytes(100_000) > m.state_bytes(3)
    _, state = m(torch.randn(1, 30, D), use_cache=True)
    held = sum(t.numel() * t.element_size() for t in state.values() if t.is_floating_point())
    assert held == m.state_bytes(30)


def test_bad_arguments():
    with pytest.raises(ValueError, match="window_size"):
        LolcatsAttention(D, window_size=-1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LolcatsAttention(D, num_heads=4, num_kv_heads=3)
    m = LolcatsAttention(D, num_heads=4, window_size=2)
    _, state = LolcatsAttention(D, num_heads=4, window_size=5)(torch.randn(1, 6, D), use_cache=True)
    with pytest.raises(ValueError, match="window_size"):
        m(torch.randn(1, 1, D), state=state)
