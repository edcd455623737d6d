"""Mixer-specific tests of the linear-attention family: LinearAttention, Based, RetNet, Lightning.

Each layer is compared with a hand-written quadratic (attention-matrix) form of its paper's
equations on tiny float64 inputs; decays are checked against the papers' formulas; Based's window
branch (a SlidingWindowAttention submodule) is exercised past its window length with padding,
packing and chunked prefill.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linmix.layers import MIXERS
from linmix.layers.attention import SlidingWindowAttention
from linmix.layers.based import Based
from linmix.layers.lightning import Lightning, alibi_slopes
from linmix.layers.linear_attention import LinearAttention
from linmix.layers.retnet import RetNet
from linmix.modules import FEATURE_MAPS
from tests.layers.utils import dense_attention, perturbed, rope
from tests.ops.utils import rel_err

TOL = 1e-10


def causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


def heads(t: torch.Tensor, H: int) -> torch.Tensor:
    return t.unflatten(-1, (H, -1))


def decode_all(mixer, x, split):
    """Prefill x[:, :split], then decode the rest token by token; the concatenated outputs."""
    y, st = mixer(x[:, :split], use_cache=True)
    ys = [y]
    for t in range(split, x.shape[1]):
        y, st = mixer(x[:, t:t + 1], state=st, use_cache=True)
        ys.append(y)
    return torch.cat(ys, 1), st


# ----------------------------------------------------------------------------- LinearAttention

@pytest.mark.parametrize("normalize,norm", [(True, None), (True, "rms"), (False, "rms")])
def test_linear_attention_equals_quadratic_form(normalize, norm):
    D, H, T = 32, 4, 13
    m = perturbed(LinearAttention(D, num_heads=H, feature_map="elu", normalize=normalize, norm=norm))
    x = torch.randn(2, T, D, dtype=torch.float64)
    y, _ = m(x)
    q = F.elu(heads(m.q_proj(x), H)) + 1
    k = F.elu(heads(m.k_proj(x), H)) + 1
    v = heads(m.v_proj(x), H)
    A = torch.einsum("bthd,bshd->bhts", q, k) * causal(T)            # phi(q_t).phi(k_s), s <= t
    o = torch.einsum("bhts,bshd->bthd", A, v)
    if normalize:
        o = o / (A.sum(-1).transpose(1, 2)[..., None] + m.eps)
    if norm == "rms":
        o = o / (o.pow(2).mean(-1, keepdim=True) + m.norm.eps).sqrt() * m.norm.weight
    assert rel_err(y, m.o_proj(o.flatten(-2))) < TOL


def test_linear_attention_normaliser_is_last_state_column():
    D, H = 32, 2
    m = perturbed(LinearAttention(D, num_heads=H))
    x = torch.randn(3, 9, D, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    _, st = m(x, use_cache=True, attention_mask=mask)
    phi_k = (F.elu(heads(m.k_proj(x), H)) + 1) * mask[..., None, None]
    z = phi_k.sum(1)                                                  # [B, H, D'] over real tokens
    assert st["recurrent_state"].shape == (3, H, D // H, D // H + 1)
    assert rel_err(st["recurrent_state"][..., -1], z) < TOL


def _feature_map_kwargs(name):
    return {"feature_map_kwargs": {"max_len": 64}} if name == "cosformer" else {}


@pytest.mark.parametrize("name", sorted(FEATURE_MAPS))
def test_every_feature_map_builds_a_working_layer(name):
    signed = name in ("identity", "cosine")                           # sign-indefinite: no normaliser
    m = perturbed(LinearAttention(32, num_heads=4, feature_map=name, normalize=not signed,
                                  norm="rms" if signed else None, **_feature_map_kwargs(name)))
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    y, _ = m(x)
    assert torch.isfinite(y).all()
    y_dec, st = decode_all(m, x, 4)
    assert rel_err(y_dec, y) < 1e-9
    assert st["recurrent_state"].shape[2] == m.feature_dim
    # left-padded row == the row alone (positions for cosformer count real tokens only)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :6] = 0
    y_pad, _ = m(x, attention_mask=mask)
    y_alone, _ = m(x[1:, 6:])
    assert rel_err(y_pad[1:, 6:], y_alone) < 1e-9


def test_cosformer_positions_continue_across_calls_and_packing():
    m = perturbed(LinearAttention(32, num_heads=4, feature_map="cosformer", feature_map_kwargs={"max_len": 40}))
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    cu = torch.tensor([0, 5, 12])
    y, st = m(x, cu_seqlens=cu, use_cache=True)
    assert st["position"].tolist() == [5, 7]
    for a, b in ((0, 5), (5, 12)):
        y_alone, _ = m(x[:, a:b])
        assert rel_err(y[:, a:b], y_alone) < TOL
    # positions past max_len are refused by the map, not silently wrapped
    with pytest.raises(ValueError, match="max_len"):
        m(torch.randn(1, 42, 32, dtype=torch.float64))                 # positions 0..41 > M = 40


@pytest.mark.parametrize("share", [True, False])
def test_learnable_feature_maps_get_gradients(share):
    for name in ("hedgehog", "dijiang"):
        m = LinearAttention(32, num_heads=4, feature_map=name, share_feature_map=share)
        x = torch.randn(2, 10, 32)
        y, _ = m(x)
        (y * torch.randn_like(y)).sum().backward()
        maps = [m.q_map] if share else [m.q_map, m.k_map]
        for fmap in maps:
            params = list(fmap.parameters())
            assert params, name
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    assert (m.q_map is m.k_map) == share


def test_hedgehog_is_per_head_by_default():
    m = LinearAttention(32, num_heads=4, feature_map="hedgehog")
    assert m.q_map.weight.shape == (4, 8, 8) and m.feature_dim == 16


def test_linear_attention_bad_args():
    with pytest.raises(ValueError, match="num_heads"):
        LinearAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(32, feature_map="softmax")
    with pytest.raises(ValueError, match="max_len"):
        LinearAttention(32, feature_map="cosformer")
    with pytest.raises(ValueError, match="norm"):
        LinearAttention(32, norm="layer")
    with pytest.raises(ValueError, match="eps"):
        LinearAttention(32, eps=0.0)
    m = LinearAttention(32, num_heads=4)
    _, st = m(torch.randn(2, 3, 32), use_cache=True)
    with pytest.raises(ValueError, match="recurrent_state"):
        m(torch.randn(3, 1, 32), state=st)                            # N = 2 state for a batch of 3
    with pytest.raises(ValueError, match="keys"):
        m(torch.randn(2, 1, 32), state={"state": st["recurrent_state"]})


# ----------------------------------------------------------------------------- RetNet

@pytest.mark.parametrize("H", [1, 4, 8])
def test_retnet_decays_follow_the_paper(H):
    m = RetNet(16 * H, num_heads=H)
    gamma = m.log_decays(torch.float64).exp()
    assert torch.allclose(gamma, 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64)), rtol=0, atol=1e-15)
    assert (gamma.diff() > 0).all() and gamma[0] == 1 - 1 / 32
    # the decay is a constant of the architecture, not a parameter, and survives a bf16 cast
    assert not any("decay" in n for n, _ in m.named_parameters())
    assert m.to(torch.bfloat16).log_decays(torch.float64).exp().equal(gamma)


@pytest.mark.parametrize("expand_v", [2.0, 1.0])
def test_retnet_equals_handwritten_retention(expand_v):
    D, H, T, B = 32, 2, 11, 2
    m = perturbed(RetNet(D, num_heads=H, expand_v=expand_v))
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, st = m(x, use_cache=True)
    pos = torch.arange(T)[None].expand(B, T)
    q, k = rope(heads(m.q_proj(x), H), pos), rope(heads(m.k_proj(x), H), pos)
    v, g = heads(m.v_proj(x), H), heads(m.g_proj(x), H)
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))
    n = torch.arange(T)
    decay = torch.where(causal(T), gamma[:, None, None] ** (n[:, None] - n[None, :]).clamp_min(0), 0.0)  # [H, T, T]
    A = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D // H) * decay
    o = torch.einsum("bhts,bshd->bthd", A, v)
    o = o / (o.pow(2).mean(-1, keepdim=True) + m.g_norm.eps).sqrt() * m.g_norm.weight   # norm per head
    y_ref = m.o_proj((o * F.silu(g)).flatten(-2))
    assert rel_err(y, y_ref) < TOL
    assert st["recurrent_state"].shape == (B, H, D // H, int(D * expand_v) // H)
    assert st["position"].tolist() == [T, T]


def test_retnet_positions_count_real_tokens():
    m = perturbed(RetNet(32, num_heads=2))
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    _, st = m(torch.randn(2, 5, 32, dtype=torch.float64), attention_mask=mask, use_cache=True)
    assert st["position"].tolist() == [2, 5]


def test_retnet_bad_args():
    with pytest.raises(ValueError, match="num_heads"):
        RetNet(64, num_heads=3)
    with pytest.raises(ValueError, match="even"):
        RetNet(36, num_heads=4)                                       # key head dim 9
    with pytest.raises(ValueError, match="expand_v"):
        RetNet(64, expand_v=0)


# ----------------------------------------------------------------------------- Lightning

def test_alibi_slopes():
    assert alibi_slopes(8) == [2.0 ** -(h + 1) for h in range(8)]
    # not a power of two: the 4-head slopes, then every other slope of the 8-head list
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


@pytest.mark.parametrize("H,L,layer", [(8, 12, 0), (8, 12, 3), (8, 12, 11), (4, 1, 0), (6, 4, 2)])
def test_lightning_decays_follow_the_formula(H, L, layer):
    m = Lightning(8 * H, num_heads=H, num_layers=L, layer_idx=layer)
    lam = m.log_decays(torch.float64).exp()
    depth = layer / (L - 1) if L > 1 else 0.0
    want = torch.tensor([math.exp(-s * (1 - depth + 1e-5)) for s in alibi_slopes(H)], dtype=torch.float64)
    assert torch.allclose(lam, want, rtol=1e-14, atol=0)
    assert ((lam > 0) & (lam < 1)).all()
    if H == 8 and layer == 0:                                         # lambda_h = exp(-2^(-(h+1)))
        assert torch.allclose(lam, torch.exp(-(2.0 ** -(torch.arange(8.0, dtype=torch.float64) + 1))))


def test_lightning_deeper_layers_remember_longer():
    lams = torch.stack([Lightning(32, num_heads=4, num_layers=6, layer_idx=i).log_decays(torch.float64).exp()
                        for i in range(6)])
    assert (lams.diff(dim=0) > 0).all()                               # every head, layer after layer
    assert (lams[-1] > 1 - 1e-5).all()                                # the last layer almost never forgets
    assert (lams.diff(dim=1) > 0).all()                               # later heads decay less


@pytest.mark.parametrize("gate_activation", [None, "sigmoid"])
def test_lightning_equals_handwritten_form(gate_activation):
    D, H, T, B = 32, 4, 10, 2
    m = perturbed(Lightning(D, num_heads=H, num_layers=4, layer_idx=1, gate_activation=gate_activation))
    x = torch.randn(B, T, D, dtype=torch.float64)
    y, _ = m(x)
    q, k = F.silu(heads(m.q_proj(x), H)), F.silu(heads(m.k_proj(x), H))
    v, u = heads(m.v_proj(x), H), m.u_proj(x)
    lam = torch.tensor([math.exp(-s * (1 - 1 / 3 + 1e-5)) for s in alibi_slopes(H)], dtype=torch.float64)
    n = torch.arange(T)
    decay = torch.where(causal(T), lam[:, None, None] ** (n[:, None] - n[None, :]).clamp_min(0), 0.0)
    o = torch.einsum("bhts,bshd->bthd", torch.einsum("bthd,bshd->bhts", q, k) * decay, v).flatten(-2)
    o = o / (o.pow(2).mean(-1, keepdim=True) + m.norm.eps).sqrt()     # SRMSNorm: no learnable scale
    gate = u if gate_activation is None else torch.sigmoid(u)
    assert rel_err(y, m.o_proj(o * gate)) < TOL
    assert m.norm.weight is None


def test_lightning_bad_args():
    with pytest.raises(ValueError, match="layer_idx"):
        Lightning(32, num_layers=4, layer_idx=4)
    with pytest.raises(ValueError, match="num_heads"):
        Lightning(30, num_heads=4)
    with pytest.raises(ValueError, match="activation"):
        Lightning(32, activation="gelu")
    with pytest.raises(ValueError, match="gate_activation"):
        Lightning(32, gate_activation="tanh")


# ----------------------------------------------------------------------------- Based

def based_linear_reference(m: Based, x: torch.Tensor) -> torch.Tensor:
    """The paper's normalised Taylor linear attention as a T x T matrix (before W_o)."""
    H, d = m.num_heads, m.feature_dim
    q, k, v = heads(m.q_proj(x), H), heads(m.k_proj(x), H), heads(m.v_proj(x), H)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    A = (1 + s + s * s / 2) * causal(x.shape[1])                      # phi(q).phi(k) ~ exp(q.k / sqrt(d))
    o = torch.einsum("bhts,bshd->bthd", A, v)
    return o / (A.sum(-1).transpose(1, 2)[..., None] + m.eps)


def test_based_without_window_is_its_linear_branch():
    m = perturbed(Based(32, num_heads=4, feature_dim=4, window_size=0))
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    y, st = m(x, use_cache=True)
    assert rel_err(y, m.o_proj(based_linear_reference(m, x).flatten(-2))) < TOL
    assert set(st) == {"recurrent_state"} and st["recurrent_state"].shape == (2, 4, 1 + 4 + 16, 8 + 1)
    assert m.window is None and not any(name.startswith("window") for name, _ in m.named_parameters())


def test_based_window_branch_is_local_softmax_attention_with_rope():
    w, T, H, D = 4, 11, 4, 32
    m = perturbed(Based(D, num_heads=H, feature_dim=4, window_size=w))
    x = torch.randn(2, T, D, dtype=torch.float64)
    y, _ = m(x)
    assert isinstance(m.window, SlidingWindowAttention) and m.window.window_size == w
    assert (m.window.num_heads, m.window.num_kv_heads, m.window.head_dim) == (H, H, D // H)
    # each branch through its own output projection, summed; the window branch sees the last w keys
    y_ref = m.o_proj(based_linear_reference(m, x).flatten(-2)) + dense_attention(m.window, x, window=w)
    assert rel_err(y, y_ref) < TOL


def test_based_window_cache_past_the_window():
    w = 3
    m = perturbed(Based(32, num_heads=4, feature_dim=4, window_size=w))
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    y, _ = m(x)
    y_dec, st = decode_all(m, x, 5)
    assert rel_err(y_dec, y) < 1e-9
    assert st["window_k"].shape == (2, w, 4, 8) and st["window_mask"].all() and st["window_pos"].tolist() == [17, 17]
    y_a, st_a = m(x[:, :2], use_cache=True)                           # cache shorter than the window
    assert st_a["window_k"].shape[1] == 2
    y_b, st_b = m(x[:, 2:9], state=st_a, use_cache=True)
    y_c, _ = m(x[:, 9:], state=st_b, use_cache=True)
    assert rel_err(torch.cat([y_a, y_b, y_c], 1), y) < 1e-9


def test_based_padded_chunks_with_holes_equal_sequences_alone():
    """Left padding in every call (gaps between cached and new real tokens), then decoding."""
    w = 3
    m = perturbed(Based(32, num_heads=4, feature_dim=4, window_size=w))
    x1, x2 = torch.randn(3, 6, 32, dtype=torch.float64), torch.randn(3, 5, 32, dtype=torch.float64)
    x3 = torch.randn(3, 2, 32, dtype=torch.float64)
    m1 = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    m2 = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 0, 1, 1]])  # left, right, holes
    y1, st = m(x1, attention_mask=m1, use_cache=True)
    y2, st = m(x2, attention_mask=m2, state=st, use_cache=True)
    y3, _ = m(x3, state=st, use_cache=True)
    assert st["window_pos"].tolist() == [3 + 3, 6 + 3, 1 + 3]
    for b in range(3):
        r1, r2 = m1[b].bool(), m2[b].bool()
        seq = torch.cat([x1[b][r1], x2[b][r2], x3[b]])[None]
        y_alone, _ = m(seq)
        n1, n2 = int(r1.sum()), int(r2.sum())
        assert rel_err(y1[b][r1], y_alone[0, :n1]) < 1e-9, b
        assert rel_err(y2[b][r2], y_alone[0, n1:n1 + n2]) < 1e-9, b
        assert rel_err(y3[b], y_alone[0, n1 + n2:]) < 1e-9, b


def test_based_packed_continuation_equals_sequences_alone():
    w = 3
    m = perturbed(Based(32, num_heads=4, feature_dim=4, window_size=w))
    cu1 = torch.tensor([0, 5, 6, 8])                                  # lengths 5, 1, 2
    cu2 = torch.tensor([0, 2, 8, 9])                                  # lengths 2, 6, 1
    x1, x2 = torch.randn(1, 8, 32, dtype=torch.float64), torch.randn(1, 9, 32, dtype=torch.float64)
    y1, st = m(x1, cu_seqlens=cu1, use_cache=True)
    y2, st = m(x2, cu_seqlens=cu2, state=st, use_cache=True)
    assert st["window_k"].shape[1] == w and st["window_mask"].sum(1).tolist() == [3, 3, 3]
    for n in range(3):
        a1, b1, a2, b2 = cu1[n], cu1[n + 1], cu2[n], cu2[n + 1]
        y_alone, _ = m(torch.cat([x1[:, a1:b1], x2[:, a2:b2]], 1))
        assert rel_err(torch.cat([y1[:, a1:b1], y2[:, a2:b2]], 1), y_alone) < 1e-9, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_based_state_bytes(dtype):
    m = Based(64, window_size=5).to(dtype)
    for ctx in (2, 5, 9):
        _, st = m(torch.randn(1, ctx, 64, dtype=dtype), use_cache=True)
        real = sum(t.numel() * t.element_size() for t in st.values() if t.is_floating_point())
        assert real == m.state_bytes(ctx), ctx
        assert st["window_k"].dtype == dtype and st["recurrent_state"].dtype == torch.float32
    assert m.state_bytes(100, batch_size=3) == 3 * m.state_bytes(5)
    # linear part (fixed) + the window branch's KV cache
    linear_only = Based(64, window_size=0).to(dtype)
    assert m.state_bytes(9, batch_size=2) == linear_only.state_bytes(9, batch_size=2) + m.window.state_bytes(9, 2)


def test_based_bad_args():
    with pytest.raises(ValueError, match="window_size"):
        Based(64, window_size=-1)
    with pytest.raises(ValueError, match="num_heads"):
        Based(64, num_heads=5)
    with pytest.raises(ValueError, match="feature_dim"):
        Based(64, feature_dim=0)
    m = Based(64, window_size=4)
    _, st = m(torch.randn(1, 6, 64), use_cache=True)
    st["window_mask"] = st["window_mask"][:, :2]
    with pytest.raises(ValueError, match="window_mask"):
        m(torch.randn(1, 1, 64), state=st)


def test_registered_names():
    assert MIXERS["linear_attn"] is LinearAttention and MIXERS["based"] is Based
    assert MIXERS["retnet"] is RetNet and MIXERS["lightning"] is Lightning
