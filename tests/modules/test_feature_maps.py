"""Feature maps: shapes, positivity, the kernels they promise, learnability, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linmix.modules import (
    FEATURE_MAPS,
    CosFormerFeatureMap,
    DiJiangFeatureMap,
    FeatureMap,
    HedgehogFeatureMap,
    PerformerFeatureMap,
    TaylorFeatureMap,
    dct_matrix,
    get_feature_map,
)

B, T, H, D = 2, 7, 3, 8
KWARGS = {"hedgehog": {"num_heads": H}, "cosformer": {"max_len": 64}}
EXPECTED_DIM = {"identity": D, "elu": D, "relu": D, "taylor": 1 + D + D * D, "hedgehog": 2 * D,
                "cosformer": 2 * D, "performer": round(D * math.log(D)), "cosine": D, "dijiang": D}


def apply(phi: FeatureMap, x: torch.Tensor) -> torch.Tensor:
    if phi.needs_positions:
        return phi(x, positions=torch.arange(x.shape[1]))
    return phi(x)


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_feature_dim(name, dtype):
    phi = get_feature_map(name, D, **KWARGS.get(name, {}))
    assert isinstance(phi, FEATURE_MAPS[name]) and phi.head_dim == D
    assert phi.feature_dim == EXPECTED_DIM[name]
    x = torch.randn(B, T, H, D, dtype=dtype)
    y = apply(phi, x)
    assert y.shape == (B, T, H, phi.feature_dim) and y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name, strict", [("elu", True), ("relu", False), ("performer", True), ("hedgehog", True),
                                          ("dijiang", True), ("cosformer", False)])
def test_positivity(name, strict):
    phi = get_feature_map(name, D, **KWARGS.get(name, {}))
    if name == "hedgehog":  # away from the identity init
        with torch.no_grad():
            phi.weight.normal_()
    x = torch.randn(B, T, H, D) * 3
    y = apply(phi, x)
    assert bool((y > 0).all()) if strict else bool((y >= 0).all())
    assert bool((y > 0).any())


def test_taylor_identity():
    d = 16
    phi = TaylorFeatureMap(d)
    q = torch.randn(4, 5, d, dtype=torch.float64) * 2
    k = torch.randn(4, 5, d, dtype=torch.float64) * 2
    got = (phi(q) * phi(k)).sum(-1)
    s = (q * k).sum(-1)
    want = 1 + s / math.sqrt(d) + s ** 2 / (2 * d)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # all pairs (what linear attention actually uses)
    torch.testing.assert_close(phi(q) @ phi(k).transpose(-1, -2),
                               1 + (q @ k.transpose(-1, -2)) / math.sqrt(d)
                               + (q @ k.transpose(-1, -2)) ** 2 / (2 * d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_heads", [None, H])
def test_hedgehog_init_and_gradients(num_heads):
    phi = HedgehogFeatureMap(D, num_heads=num_heads, bias=True).double()
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    torch.testing.assert_close(phi(x), torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))  # identity init
    # each half is a distribution
    torch.testing.assert_close(phi(x).unflatten(-1, (2, D)).sum(-1), torch.ones(B, T, H, 2, dtype=torch.float64))
    target = torch.randn(B, T, H, 2 * D, dtype=torch.float64)
    (phi(x) * target).sum().backward()
    assert phi.weight.grad is not None and phi.weight.grad.abs().sum() > 0
    assert phi.bias.grad is not None and phi.bias.grad.abs().sum() > 0
    x_small = x[:1, :2]
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(phi, {"weight": w, "bias": phi.bias},
                                                                         (x_small,)),
                                    (phi.weight.detach().clone().requires_grad_(True),))


def test_hedgehog_per_head_weights_differ():
    phi = HedgehogFeatureMap(D, num_heads=H, num_features=5)
    with torch.no_grad():
        phi.weight.normal_()
    x = torch.randn(B, T, 1, D).expand(B, T, H, D)  # the same vector in every head
    y = phi(x)
    assert y.shape[-1] == 10
    assert not torch.allclose(y[:, :, 0], y[:, :, 1])
    with pytest.raises(ValueError, match="num_heads=3"):
        phi(torch.randn(B, T, 2, D))


def test_cosformer_kernel():
    M = 32
    phi = CosFormerFeatureMap(D, max_len=M).double()
    q = torch.randn(1, 10, 1, D, dtype=torch.float64)
    k = torch.randn(1, 10, 1, D, dtype=torch.float64)
    pos = torch.randint(0, M + 1, (1, 10))
    scores = torch.einsum("bihd,bjhd->bhij", phi(q, positions=pos), phi(k, positions=pos))[0, 0]
    rel = (pos[0][:, None] - pos[0][None, :]).double()
    want = (F.relu(q[0, :, 0]) @ F.relu(k[0, :, 0]).T) * torch.cos(math.pi / 2 * rel / M)
    torch.testing.assert_close(scores, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="positions must lie in"):
        phi(q, positions=torch.arange(10) + M)
    with pytest.raises(ValueError, match="max_len"):
        CosFormerFeatureMap(D)(q, positions=pos)


def test_performer_reproducible_with_seed():
    x = torch.randn(B, T, H, D)
    a, b, c = PerformerFeatureMap(D, 20, seed=3), PerformerFeatureMap(D, 20, seed=3), PerformerFeatureMap(D, 20, seed=4)
    assert torch.equal(a.projection, b.projection) and torch.equal(a(x), b(x))
    assert not torch.allclose(a.projection, c.projection)
    c.redraw(3)
    assert torch.equal(c.projection, a.projection)
    # the projection is saved with the module
    assert "projection" in a.state_dict()
    # rows within a block of D are orthogonal
    w = a.projection[:D].double()
    gram = w @ w.T
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(D, D, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_performer_approximates_softmax_kernel():
    # Unit-norm q, k bound the estimator's variance: over 600 seeds the error was 0.006 +- 0.002
    # (max 0.016); the wrong kernel exp(q.k) is 0.18 away, and unsign-fixed QR directions ~0.1.
    d, m = 4, 65536
    phi = PerformerFeatureMap(d, m, seed=int(torch.randint(0, 2**31 - 1, ())), stabilize=False).double()
    q = F.normalize(torch.randn(6, d, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(6, d, dtype=torch.float64), dim=-1)
    approx = phi(q) @ phi(k).T
    exact = torch.exp(q @ k.T / math.sqrt(d))
    assert ((approx - exact).norm() / exact.norm()).item() < 0.04


def test_performer_projection_is_isotropic():
    w = PerformerFeatureMap(4, 16384, seed=int(torch.randint(0, 2**31 - 1, ()))).projection.double()
    directions = w / w.norm(dim=-1, keepdim=True)
    assert directions.mean(0).abs().max() < 0.03  # ~0.004 expected; biased QR signs give ~0.1
    torch.testing.assert_close(w.T @ w / len(w), torch.eye(4, dtype=torch.float64), atol=0.06, rtol=0)


def test_performer_stabilizer_is_a_per_token_factor():
    phi_s = PerformerFeatureMap(D, 32, seed=1, stabilize=True).double()
    phi_u = PerformerFeatureMap(D, 32, seed=1, stabilize=False).double()
    x = torch.randn(B, T, H, D, dtype=torch.float64) * 4
    ys, yu = phi_s(x), phi_u(x)
    ratio = ys / yu
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    torch.testing.assert_close(ys.amax(-1), torch.full((B, T, H), 32 ** -0.5, dtype=torch.float64))
    # huge inputs stay finite with the stabiliser
    assert torch.isfinite(phi_s(x * 100)).all()


def test_cosine_unit_norm():
    phi = get_feature_map("cosine", D)
    x = torch.randn(B, T, H, D) * 5
    y = phi(x)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(B, T, H))
    torch.testing.assert_close(y * x.norm(dim=-1, keepdim=True), x)


def test_dct_matrix_is_orthonormal_dct2():
    n = 12
    C = dct_matrix(n)
    torch.testing.assert_close(C @ C.T, torch.eye(n, dtype=torch.float64))
    # independent DCT-II via the FFT of the mirrored sequence (Makhoul)
    x = torch.randn(5, n, dtype=torch.float64)
    V = torch.fft.fft(torch.cat([x, x.flip(-1)], -1))[..., :n]
    k = torch.arange(n, dtype=torch.float64)
    y = (torch.exp(-1j * math.pi * k / (2 * n)) * V).real  # 2 * sum_j x_j cos(pi (2j+1) k / 2n)
    y = y * math.sqrt(1 / (2 * n))
    y[..., 0] = y[..., 0] * math.sqrt(0.5)
    torch.testing.assert_close(x @ C.T, y)


def test_dijiang_formula_and_learnable_weight():
    phi = DiJiangFeatureMap(D, seed=2).double()
    with torch.no_grad():
        phi.log_weight.normal_()
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    t = torch.special.ndtri((torch.arange(D, dtype=torch.float64) + 0.5) / D)
    assert torch.allclose(phi.frequencies.double().sort().values, t, atol=1e-6)  # a permutation of the nodes
    u = phi.log_weight.exp() * torch.exp((x @ dct_matrix(D).T) * phi.frequencies.double())
    torch.testing.assert_close(phi(x), u / u.sum(-1, keepdim=True), rtol=1e-6, atol=1e-9)
    (phi(x) * torch.randn(B, T, H, D, dtype=torch.float64)).sum().backward()
    assert phi.log_weight.grad is not None and phi.log_weight.grad.abs().sum() > 0
    assert torch.equal(DiJiangFeatureMap(D, seed=2).frequencies, DiJiangFeatureMap(D, seed=2).frequencies)


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown feature map 'softmax'.*valid names: identity, elu, relu"):
        get_feature_map("softmax", D)
    with pytest.raises(ValueError, match="head_dim=8"):
        get_feature_map("elu", D)(torch.randn(2, 3, 7))
    with pytest.raises(TypeError, match="floating"):
        get_feature_map("relu", D)(torch.ones(2, D, dtype=torch.long))
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        get_feature_map("taylor", 0)
