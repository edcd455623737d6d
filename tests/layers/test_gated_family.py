"""GLA, HGRN2 and Mamba-2 layers: gate parameterisations, initialisation, and each layer against a
hand-written composition (projections + the op's reference backend, or Mamba-2's sequential scan)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.layers import get_mixer_class
from linmix.layers.gla import GLA
from linmix.layers.hgrn2 import HGRN2
from linmix.layers.mamba2 import Mamba2
from tests.layers.utils import causal_conv, perturbed, rms
from tests.ops.utils import rel_err

TOL = 1e-10  # float64


def test_registered_names():
    assert get_mixer_class("gla") is GLA
    assert get_mixer_class("hgrn2") is HGRN2
    assert get_mixer_class("mamba2") is Mamba2


# ---------------------------------------------------------------------------------------------- GLA

@pytest.mark.parametrize("normalizer", [16.0, 1.0])
def test_gla_gate_is_normalised_log_decay(normalizer):
    mixer = perturbed(GLA(64, gate_logit_normalizer=normalizer))
    x = torch.randn(2, 9, 64, dtype=torch.float64) * torch.logspace(-1, 2, 9, dtype=torch.float64)[:, None]
    g = mixer.log_gate(x)
    assert g.shape == (2, 9, 4, 8) and g.dtype == torch.float64
    assert torch.isfinite(g).all() and (g <= 0).all()
    assert g.min() < -1.0 / normalizer  # large inputs reach strong decays (not clamped near 0)
    z = x @ mixer.gk_proj[0].weight.T @ mixer.gk_proj[1].weight.T + mixer.gk_proj[1].bias
    expect = torch.log(torch.sigmoid(z)) / normalizer
    mask = z > -30  # where log(sigmoid) is still accurate in float64
    assert rel_err(g.flatten(-2)[mask], expect[mask]) < TOL
    # the normaliser pulls decays towards 1: exp(g) = sigmoid(z) ** (1 / normalizer)
    assert torch.allclose(torch.exp(g.flatten(-2)), torch.sigmoid(z).pow(1 / normalizer), rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_gla_equals_hand_written_composition(use_short_conv):
    mixer = perturbed(GLA(32, num_heads=2, use_short_conv=use_short_conv))
    B, T, H, dk, dv = 2, 11, 2, 8, 16
    x = torch.randn(B, T, 32, dtype=torch.float64)
    h0 = torch.randn(B, H, dk, dv, dtype=torch.float64)
    q, k, v = x @ mixer.q_proj.weight.T, x @ mixer.k_proj.weight.T, x @ mixer.v_proj.weight.T
    if use_short_conv:
        q, k, v = (causal_conv(t, c, True) for t, c in ((q, mixer.q_conv), (k, mixer.k_conv), (v, mixer.v_conv)))
    gate = F.logsigmoid(x @ mixer.gk_proj[0].weight.T @ mixer.gk_proj[1].weight.T + mixer.gk_proj[1].bias) / 16
    o, S = linmix.ops.gla(q.view(B, T, H, dk), k.view(B, T, H, dk), v.view(B, T, H, dv), gate.view(B, T, H, dk),
                          scale=dk ** -0.5, initial_state=h0, output_final_state=True, backend="reference")
    r = (x @ mixer.g_proj.weight.T).view(B, T, H, dv)
    o = rms(o, 1e-5) * mixer.g_norm.weight * F.silu(r)
    y_ref = o.reshape(B, T, H * dv) @ mixer.o_proj.weight.T

    state = {"recurrent_state": h0}
    if use_short_conv:  # start of sequence: zero conv tails
        state |= {key: torch.zeros(B, 3, d, dtype=torch.float64) for key, d in
                  (("conv_q", H * dk), ("conv_k", H * dk), ("conv_v", H * dv))}
    y, new_state = mixer(x, state=state, use_cache=True)
    assert rel_err(y, y_ref) < TOL
    assert rel_err(new_state["recurrent_state"], S) < TOL


def test_gla_defaults_follow_the_paper():
    mixer = GLA(64)
    assert (mixer.num_heads, mixer.key_dim, mixer.value_dim) == (4, 32, 64)
    assert mixer.gk_proj[0].weight.shape == (16, 64) and mixer.gk_proj[1].weight.shape == (32, 16)
    assert mixer.gate_logit_normalizer == 16 and not mixer.use_short_conv
    assert mixer.state_bytes(10) == mixer.state_bytes(10_000) == 4 * 4 * 8 * 16


# -------------------------------------------------------------------------------------------- HGRN2

@pytest.mark.parametrize("lower_bound", [0.0, 0.3, 0.9])
def test_hgrn2_keys_are_one_minus_forget_gate_above_lower_bound(lower_bound):
    mixer = HGRN2(64, lower_bound=lower_bound).double()
    z = torch.cat([torch.randn(500, dtype=torch.float64) * 10,
                   torch.tensor([-1e4, -800.0, -50.0, 0.0, 50.0, 800.0, 1e4], dtype=torch.float64)])
    k, g = mixer.forget_gate(z)
    f = lower_bound + (1 - lower_bound) * torch.sigmoid(z)
    assert torch.isfinite(g).all() and (g <= 0).all()
    assert torch.allclose(k, 1 - f, rtol=0, atol=1e-15)
    assert torch.allclose(torch.exp(g), f, rtol=1e-12, atol=0)
    assert (torch.exp(g) >= lower_bound * (1 - 1e-12)).all()
    if lower_bound > 0:
        assert (g >= math.log(lower_bound) - 1e-12).all()  # the bound holds in log space too
    else:
        assert g.min() < -1e3  # no bound: strong forgetting is reachable
    # float32 inputs: still finite and consistent (what the layer sees in bf16/fp32)
    k32, g32 = mixer.float().forget_gate(z.float())
    assert torch.isfinite(g32).all() and (g32 <= 0).all() and (k32 >= 0).all() and (k32 <= 1).all()


@pytest.mark.parametrize("lower_bound", [0.0, 0.5])
def test_hgrn2_equals_hand_written_composition(lower_bound):
    mixer = perturbed(HGRN2(32, expand_ratio=8, lower_bound=lower_bound))
    B, T, H, df, di = 2, 10, 4, 8, 8
    x = torch.randn(B, T, 32, dtype=torch.float64)
    q = F.silu(x @ mixer.q_proj.weight.T)
    f = lower_bound + (1 - lower_bound) * torch.sigmoid(x @ mixer.f_proj.weight.T)
    i = x @ mixer.i_proj.weight.T
    o, S = linmix.ops.gla(q.view(B, T, H, df), (1 - f).view(B, T, H, df), i.view(B, T, H, di),
                          torch.log(f).view(B, T, H, df), scale=1.0, output_final_state=True, backend="reference")
    y_ref = rms(o.reshape(B, T, H * di), 1e-5) * mixer.g_norm.weight @ mixer.o_proj.weight.T
    y, state = mixer(x, use_cache=True)
    assert rel_err(y, y_ref) < TOL
    assert rel_err(state["recurrent_state"], S) < TOL


def test_hgrn2_default_heads():
    # paper: head state dim expand_ratio = 128, heads = D / 128; at D = 64 one head with a 128 x 64 state
    m = HGRN2(64)
    assert (m.num_heads, m.expand_ratio, m.head_i_dim) == (1, 128, 64)
    assert m.state_bytes(1) == m.state_bytes(999) == 4 * 128 * 64
    m = HGRN2(512)
    assert (m.num_heads, m.expand_ratio, m.head_i_dim) == (4, 128, 128)


# ------------------------------------------------------------------------------------------- Mamba2

def mamba2_sequential(m: Mamba2, u: torch.Tensor, h0: torch.Tensor):
    """Mamba-2 written as the selective scan, one token and one head at a time."""
    Bsz, T, _ = u.shape
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    z, xBC, dt = (u @ m.in_proj.weight.T).split([m.d_inner, m.conv_dim, H], dim=-1)
    xBC = causal_conv(xBC, m.conv1d, True)
    x, Bm, Cm = xBC.split([m.d_inner, G * N, G * N], dim=-1)
    x, Bm, Cm = x.view(Bsz, T, H, P), Bm.view(Bsz, T, G, N), Cm.view(Bsz, T, G, N)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    h = h0.clone()  # [B, H, N, P]
    y = torch.zeros(Bsz, T, H, P, dtype=u.dtype)
    for t in range(T):
        for head in range(H):
            grp = head // (H // G)
            h[:, head] = (torch.exp(dt[:, t, head] * A[head])[:, None, None] * h[:, head]
                          + dt[:, t, head, None, None] * Bm[:, t, grp, :, None] * x[:, t, head, None, :])
            y[:, t, head] = torch.einsum("bn,bnp->bp", Cm[:, t, grp], h[:, head]) + m.D[head] * x[:, t, head]
    y = (y.reshape(Bsz, T, H * P) * F.silu(z)).unflatten(-1, (G, -1))
    y = rms(y, 1e-5).flatten(-2) * m.norm.weight
    return y @ m.out_proj.weight.T, h


@pytest.mark.parametrize("kwargs", [dict(), dict(d_state=8, headdim=8, ngroups=2)])
def test_mamba2_equals_sequential_selective_scan(kwargs):
    hidden = 64 if not kwargs else 16
    mixer = perturbed(Mamba2(hidden, **kwargs))
    x = torch.randn(2, 9, hidden, dtype=torch.float64)
    h0 = torch.randn(2, mixer.nheads, mixer.d_state, mixer.headdim, dtype=torch.float64)
    state = {"recurrent_state": h0, "conv_state": torch.zeros(2, 3, mixer.conv_dim, dtype=torch.float64)}
    y, new_state = mixer(x, state=state, use_cache=True)
    y_ref, h_ref = mamba2_sequential(mixer, x, h0)
    assert rel_err(y, y_ref) < TOL
    assert rel_err(new_state["recurrent_state"], h_ref) < TOL
    assert torch.equal(new_state["conv_state"], (x @ mixer.in_proj.weight.T)[:, -3:, mixer.d_inner:-mixer.nheads])


@pytest.mark.parametrize("dt_min,dt_max,floor", [(0.001, 0.1, 1e-4), (1e-5, 1e-2, 1e-3)])
def test_mamba2_initial_dt_and_A_ranges(dt_min, dt_max, floor):
    m = Mamba2(256, headdim=4, dt_min=dt_min, dt_max=dt_max, dt_init_floor=floor)  # 128 heads
    assert m.nheads == 128
    dt = F.softplus(m.dt_bias.double())
    lo = max(dt_min, floor)
    assert (dt >= lo * (1 - 1e-5)).all() and (dt <= dt_max * (1 + 1e-5)).all()
    assert dt.max() / dt.min() > 2  # log-uniform spread, not one value
    A = torch.exp(m.A_log.double())
    assert (A >= 1 - 1e-6).all() and (A <= 16 + 1e-5).all() and A.max() - A.min() > 1
    assert torch.equal(m.D, torch.ones(128))


def test_mamba2_defaults_at_hidden_64():
    m = Mamba2(64)
    assert (m.d_inner, m.nheads, m.headdim, m.d_state, m.ngroups) == (128, 2, 64, 64, 1)
    assert m.conv_dim == 128 + 2 * 64 and m.in_proj.out_features == 2 * 128 + 2 * 64 + 2
    assert m.state_bytes(5) == m.state_bytes(50_000) == 4 * 2 * 64 * 64 + 3 * 256 * 4


def test_mamba2_padded_steps_neither_decay_nor_write():
    mixer = perturbed(Mamba2(16, d_state=8, headdim=8))
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    h0 = torch.randn(1, mixer.nheads, 8, 8, dtype=torch.float64)
    conv0 = torch.randn(1, 3, mixer.conv_dim, dtype=torch.float64)
    _, st = mixer(x, state={"recurrent_state": h0, "conv_state": conv0}, use_cache=True,
                  attention_mask=torch.zeros(1, 6, dtype=torch.long))
    assert torch.equal(st["recurrent_state"], h0)


# ------------------------------------------------------------------------------------------ bad args

@pytest.mark.parametrize("cls,kwargs,match", [
    (GLA, dict(num_heads=3), "num_heads"),
    (GLA, dict(expand_k=0), "expand_k"),
    (GLA, dict(gate_low_rank_dim=0), "gate_low_rank_dim"),
    (GLA, dict(gate_logit_normalizer=0.0), "gate_logit_normalizer"),
    (GLA, dict(hidden_size=0), "hidden_size"),
    (HGRN2, dict(num_heads=3), "num_heads"),
    (HGRN2, dict(expand_ratio=0), "expand_ratio"),
    (HGRN2, dict(lower_bound=1.0), "lower_bound"),
    (HGRN2, dict(lower_bound=-0.1), "lower_bound"),
    (Mamba2, dict(headdim=48), "headdim"),
    (Mamba2, dict(ngroups=3), "ngroups"),
    (Mamba2, dict(d_state=0), "d_state"),
    (Mamba2, dict(A_init_range=(0.0, 16.0)), "A_init_range"),
    (Mamba2, dict(dt_min=0.2), "dt_min"),
    (Mamba2, dict(dt_init_floor=0.0), "dt_init_floor"),
])
def test_bad_arguments_raise(cls, kwargs, match):
    kwargs = {"hidden_size": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [GLA, HGRN2, Mamba2])
def test_bad_state_raises(cls):
    mixer = cls(hidden_size=64)
    x = torch.randn(2, 3, 64)
    _, state = mixer(x, use_cache=True)
    with pytest.raises(ValueError, match="recurrent_state"):  # state of 2 sequences for 3
        mixer(torch.randn(3, 1, 64), state=state)
    with pytest.raises(ValueError, match="missing"):
        mixer(x, state={})
    with pytest.raises(TypeError, match="state"):
        mixer(x, state=[state["recurrent_state"]])
