"""DeltaNet, Gated DeltaNet, Attention and SlidingWindowAttention: paper-specific properties.

Each layer is checked against a hand-written composition (projections, causal conv, feature map,
the op's reference backend / a dense softmax with RoPE) on tiny float64 inputs, plus its
parameter ranges, bounded caches, padding / packing beyond the generic contract, and bad args.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linmix.layers import MIXERS
from linmix.layers.attention import Attention, SlidingWindowAttention
from linmix.layers.deltanet import DeltaNet
from linmix.layers.gated_deltanet import GatedDeltaNet
from linmix.ops import delta_rule
from tests.layers.utils import causal_conv, dense_attention, perturbed, rms
from tests.ops.utils import rel_err

TOL = 1e-10


# -- hand-written pieces ------------------------------------------------------------------------------

def l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def delta_composition(m, x: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """DeltaNet / Gated DeltaNet written out: linear maps, conv+SiLU, L2 norm, reference delta rule, norm."""
    H, K, V = m.num_heads, m.head_k_dim, m.head_v_dim
    q = causal_conv(x @ m.q_proj.weight.T, m.q_conv, True).unflatten(-1, (H, K))
    k = causal_conv(x @ m.k_proj.weight.T, m.k_conv, True).unflatten(-1, (H, K))
    v = causal_conv(x @ m.v_proj.weight.T, m.v_conv, True).unflatten(-1, (H, V))
    beta = torch.sigmoid(x @ m.b_proj.weight.T)
    if m.allow_neg_eigval:
        beta = 2 * beta
    o, _ = delta_rule(l2(q), l2(k), v, beta, g, backend="reference")
    o = rms(o, m.o_norm.eps, m.o_norm.weight)
    if m.use_gate:
        o = o * F.silu(x @ m.g_proj.weight.T).unflatten(-1, (H, V))
    return o.flatten(-2) @ m.o_proj.weight.T


# -- DeltaNet / Gated DeltaNet --------------------------------------------------------------------------

@pytest.mark.parametrize("use_gate,allow_neg_eigval", [(False, False), (True, True)])
def test_deltanet_equals_hand_written_composition(use_gate, allow_neg_eigval):
    m = perturbed(DeltaNet(32, num_heads=2, use_gate=use_gate, allow_neg_eigval=allow_neg_eigval))
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    y, _ = m(x)
    assert rel_err(y, delta_composition(m, x, None)) < TOL


@pytest.mark.parametrize("use_gate", [True, False])
def test_gated_deltanet_equals_hand_written_composition(use_gate):
    m = perturbed(GatedDeltaNet(32, num_heads=2, use_gate=use_gate))
    assert (m.head_k_dim, m.head_v_dim) == (16, 32)  # expand_v = 2 (paper)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    g = -torch.exp(m.A_log) * F.softplus(x @ m.a_proj.weight.T + m.dt_bias)
    y, _ = m(x)
    assert rel_err(y, delta_composition(m, x, g)) < TOL


def test_deltanet_beta_ranges():
    x = 3 * torch.randn(2, 50, 64, dtype=torch.float64)
    m = perturbed(DeltaNet(64))
    beta = m.compute_beta(x)
    assert beta.shape == (2, 50, m.num_heads)
    assert (beta > 0).all() and (beta < 1).all()
    m.allow_neg_eigval = True
    beta2 = m.compute_beta(x)
    assert (beta2 > 0).all() and (beta2 < 2).all() and (beta2 > 1).any()
    assert torch.equal(beta2, 2 * beta)
    built = DeltaNet(64, allow_neg_eigval=True)
    assert built.allow_neg_eigval and built.log_decay(x.float()) is None


def test_gated_deltanet_decays_and_init():
    m = GatedDeltaNet(64, num_heads=8, head_dim=16)
    A = torch.exp(m.A_log)
    assert A.shape == (8,) and (A > 0).all() and (A <= 16).all()
    dt = F.softplus(m.dt_bias)
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    assert len(set(A.tolist())) == 8  # drawn per head, not shared
    x = torch.randn(2, 40, 64)
    g = m.log_decay(torch.cat([x, 30 * x], dim=1))
    assert g.shape == (2, 80, 8) and g.dtype == torch.float32
    assert torch.isfinite(g).all() and (g <= 0).all() and (g < 0).any()
    # larger dt (input) -> stronger decay: g is decreasing in W_a x
    with torch.no_grad():
        m.a_proj.weight.copy_(torch.randn_like(m.a_proj.weight))
    a = x @ m.a_proj.weight.T
    g = m.log_decay(x)
    g_shift = -torch.exp(m.A_log) * F.softplus(a + 1.0 + m.dt_bias)
    assert (g_shift < g).all()


# -- Attention ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_kv_heads,qk_norm", [(None, False), (2, False), (1, True)])
def test_attention_equals_dense_softmax_with_rope(num_kv_heads, qk_norm):
    m = perturbed(Attention(32, num_heads=4, num_kv_heads=num_kv_heads, qk_norm=qk_norm))
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    y, state = m(x, use_cache=True)
    assert rel_err(y, dense_attention(m, x)) < TOL
    assert state["k"].shape == (2, 9, m.num_kv_heads, 8)
    assert state["mask"].dtype == torch.bool and state["pos"].dtype == torch.int64


def test_swa_equals_dense_band_and_cache_is_bounded_while_decoding():
    window = 4
    m = perturbed(SlidingWindowAttention(32, window_size=window, num_heads=4, num_kv_heads=2))
    x = torch.randn(2, 2 + 3 * window, 32, dtype=torch.float64)
    y_full, _ = m(x)
    assert rel_err(y_full, dense_attention(m, x, window=window)) < TOL
    y, state = m(x[:, :2], use_cache=True)
    ys = [y]
    for t in range(2, x.shape[1]):
        y_t, state = m(x[:, t:t + 1], state=state, use_cache=True)
        assert state["k"].shape[1] <= window and state["v"].shape[1] <= window
        assert state["mask"].shape[1] == state["k"].shape[1]
        ys.append(y_t)
    assert state["k"].shape[1] == window and state["pos"].tolist() == [x.shape[1]] * 2
    assert rel_err(torch.cat(ys, 1), y_full) < TOL
    assert m.state_bytes(2) < m.state_bytes(window) == m.state_bytes(3 * window) == m.state_bytes(10**6)


@pytest.mark.parametrize("name", ["attention", "swa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_padded_prefill_then_decode_small_window(name, side):
    """Prompts longer than the window, left or right padded, then several decode steps."""
    kwargs = {"window_size": 3} if name == "swa" else {}
    m = perturbed(MIXERS[name](32, num_heads=2, **kwargs))
    lengths, T, steps = [9, 4, 1], 9, 5
    x = torch.randn(3, T, 32, dtype=torch.float64)
    x_next = torch.randn(3, steps, 32, dtype=torch.float64)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    y, state = m(x, attention_mask=mask, use_cache=True)
    outs = []
    for t in range(steps):
        y_t, state = m(x_next[:, t:t + 1], state=state, use_cache=True)
        outs.append(y_t)
    y_next = torch.cat(outs, 1)
    if name == "swa":
        assert state["k"].shape[1] <= 3
    for b, n in enumerate(lengths):
        real = mask[b].bool()
        y_b, _ = m(torch.cat([x[b:b + 1, real], x_next[b:b + 1]], 1))
        assert rel_err(y[b:b + 1, real], y_b[:, :n]) < TOL, f"row {b}: prefill"
        assert rel_err(y_next[b:b + 1], y_b[:, n:]) < TOL, f"row {b}: decode"
        assert state["pos"][b].item() == n + steps


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "attention", "swa"])
def test_packed_continuation_with_state(name):
    """Packed prefill, then a second packed chunk continuing from the state (cu_seqlens + state)."""
    kwargs = {"window_size": 4} if name == "swa" else {}
    m = perturbed(MIXERS[name](32, **kwargs))
    first, second = [6, 1, 3], [2, 5, 1]
    cu1 = torch.tensor([0, 6, 7, 10], dtype=torch.int32)
    cu2 = torch.tensor([0, 2, 7, 8], dtype=torch.int64)
    x1, x2 = torch.randn(1, 10, 32, dtype=torch.float64), torch.randn(1, 8, 32, dtype=torch.float64)
    _, state = m(x1, cu_seqlens=cu1, use_cache=True)
    y2, state = m(x2, cu_seqlens=cu2, state=state, use_cache=True)
    for n in range(3):
        a1, a2 = cu1[n].item(), cu2[n].item()
        seq = torch.cat([x1[:, a1:a1 + first[n]], x2[:, a2:a2 + second[n]]], 1)
        y_alone, _ = m(seq)
        assert rel_err(y2[:, a2:a2 + second[n]], y_alone[:, first[n]:]) < TOL, f"sequence {n}"
    if name == "swa":
        assert state["k"].shape[1] <= 4


def test_attention_left_padded_continuation_chunk():
    """A second (padded) chunk after a padded prefill: pads between real tokens must not count."""
    m = perturbed(SlidingWindowAttention(32, window_size=3, num_heads=2))
    x1, x2 = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 4, 32, dtype=torch.float64)
    m1 = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    m2 = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    _, state = m(x1, attention_mask=m1, use_cache=True)
    y2, _ = m(x2, attention_mask=m2, state=state)
    for b in range(2):
        seq = torch.cat([x1[b:b + 1, m1[b].bool()], x2[b:b + 1, m2[b].bool()]], 1)
        y_alone, _ = m(seq)
        n2 = int(m2[b].sum())
        assert rel_err(y2[b:b + 1, m2[b].bool()], y_alone[:, -n2:]) < TOL


# -- arguments and state checks -------------------------------------------------------------------------

def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_heads"):
        DeltaNet(64, num_heads=5)
    with pytest.raises(ValueError, match="num_heads.*hidden_size"):
        GatedDeltaNet(64, num_heads=5)
    GatedDeltaNet(64, num_heads=5, head_dim=16)  # explicit head_dim frees the width
    with pytest.raises(ValueError, match="num_heads.*hidden_size"):
        Attention(64, num_heads=5)
    with pytest.raises(ValueError, match="num_kv_heads.*num_heads"):
        Attention(64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads.*num_heads"):
        SlidingWindowAttention(64, num_heads=4, num_kv_heads=8)
    with pytest.raises(ValueError, match="window_size"):
        SlidingWindowAttention(64, window_size=0)
    with pytest.raises(ValueError, match="qk_norm"):
        DeltaNet(64, qk_norm="sum")  # needs non-negative features
    with pytest.raises(ValueError, match="A_init_range"):
        GatedDeltaNet(64, A_init_range=(4.0, 1.0))


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "attention", "swa"])
def test_bad_state_raises(name):
    m = MIXERS[name](32)
    x = torch.randn(2, 3, 32)
    _, state = m(x, use_cache=True)
    with pytest.raises(ValueError, match="state"):
        m(x[:1], state=state)  # state for 2 sequences, 1 given
    broken = dict(state)
    broken.pop(next(iter(broken)))
    with pytest.raises(ValueError, match="missing"):
        m(x, state=broken)


def test_gqa_cache_holds_kv_heads_only():
    m = Attention(64, num_heads=8, num_kv_heads=2)
    _, state = m(torch.randn(1, 5, 64), use_cache=True)
    assert state["k"].shape == (1, 5, 2, 8)
    assert m.state_bytes(5) == 2 * 5 * 2 * 8 * 4
