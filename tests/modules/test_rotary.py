"""RotaryEmbedding: norm preservation, relative positions, decoding offsets, varlen, partial rotary."""

from __future__ import annotations

import pytest
import torch

from linmix.modules import RotaryEmbedding


def qk(B=2, T=9, H=3, D=16, Hk=None, dtype=torch.float64):
    return torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, Hk or H, D, dtype=dtype)


def pairs(x: torch.Tensor, dim: int, interleaved: bool) -> torch.Tensor:
    """[..., dim/2, 2] the rotated pairs."""
    x = x[..., :dim]
    if interleaved:
        return x.unflatten(-1, (dim // 2, 2))
    return torch.stack(x.chunk(2, -1), -1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_preserves_norms_of_pairs_and_rotates(interleaved):
    rope = RotaryEmbedding(16, interleaved=interleaved)
    q, k = qk()
    q2, k2 = rope(q, k)
    for a, b in ((q, q2), (k, k2)):
        torch.testing.assert_close(pairs(a, 16, interleaved).norm(dim=-1), pairs(b, 16, interleaved).norm(dim=-1))
    torch.testing.assert_close(q2[:, 0], q[:, 0])  # position 0 is the identity
    assert not torch.allclose(q2[:, 1:], q[:, 1:])


def test_matches_complex_rotation():
    rope = RotaryEmbedding(8, base=100.0, interleaved=True)
    x = torch.randn(1, 5, 2, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 3, 7, 11, 40]])
    theta = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    z = torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones(1, dtype=torch.float64),
                                              pos[..., None, None] * theta)).flatten(-2)
    torch.testing.assert_close(rope.rotate(x, pos), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_relative_property(interleaved):
    rope = RotaryEmbedding(16, interleaved=interleaved)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        qm = rope.rotate(q, torch.tensor([[m]]))
        kn = rope.rotate(k, torch.tensor([[n]]))
        return (qm * kn).sum()

    for m, n in [(5, 2), (7, 7), (3, 10)]:
        base = score(m, n)
        for shift in (1, 13, 1000):
            torch.testing.assert_close(score(m + shift, n + shift), base, rtol=1e-9, atol=1e-9)
    assert not torch.isclose(score(5, 2), score(5, 3))


def test_offset_decode_equals_full():
    rope = RotaryEmbedding(16)
    q, k = qk(T=10, Hk=1)
    q_full, k_full = rope(q, k)
    for t in range(10):
        q_t, k_t = rope(q[:, t:t + 1], k[:, t:t + 1], offset=t)
        torch.testing.assert_close(q_t, q_full[:, t:t + 1])
        torch.testing.assert_close(k_t, k_full[:, t:t + 1])
    # per-row offsets (a batch decoding at different lengths)
    offsets = torch.tensor([4, 7])
    q_t, k_t = rope(q[:, :1], k[:, :1], offset=offsets)
    for b in range(2):
        want, _ = rope(q[b:b + 1, :1], k[b:b + 1, :1], offset=int(offsets[b]))
        torch.testing.assert_close(q_t[b:b + 1], want)
    # explicit positions equal offsets
    pos = torch.arange(10)[None].expand(2, 10) + offsets[:, None]
    q_p, _ = rope(q, k, position_ids=pos)
    q_o, _ = rope(q, k, offset=offsets)
    torch.testing.assert_close(q_p, q_o)


def test_cu_seqlens_restarts_positions():
    rope = RotaryEmbedding(16, interleaved=True)
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)  # lengths 4, 1, 6
    q, k = qk(B=1, T=11)
    q2, k2 = rope(q, k, cu_seqlens=cu)
    offsets = torch.tensor([3, 0, 9])
    q3, _ = rope(q, k, cu_seqlens=cu, offset=offsets)
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        want_q, want_k = rope(q[:, a:b], k[:, a:b])
        torch.testing.assert_close(q2[:, a:b], want_q)
        torch.testing.assert_close(k2[:, a:b], want_k)
        want_q3, _ = rope(q[:, a:b], k[:, a:b], offset=int(offsets[n]))
        torch.testing.assert_close(q3[:, a:b], want_q3)


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_leaves_the_rest(interleaved):
    rope = RotaryEmbedding(8, interleaved=interleaved)
    q, k = qk(D=20)
    q2, k2 = rope(q, k)
    assert torch.equal(q2[..., 8:], q[..., 8:]) and torch.equal(k2[..., 8:], k[..., 8:])
    want, _ = rope(q[..., :8].contiguous(), k[..., :8].contiguous())
    torch.testing.assert_close(q2[..., :8], want)
    assert not torch.allclose(q2[:, 1:, :, :8], q[:, 1:, :, :8])


def test_bf16_dtype():
    rope = RotaryEmbedding(32).to(torch.bfloat16)
    q, k = qk(D=32, dtype=torch.float32)
    q32, _ = rope(q, k, offset=5000)
    q16, k16 = rope(q.bfloat16(), k.bfloat16(), offset=5000)
    assert q16.dtype == k16.dtype == torch.bfloat16
    assert (q16.float() - q32).norm() / q32.norm() < 1e-2


def test_bad_inputs():
    rope = RotaryEmbedding(16)
    q, k = qk()
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="smaller than the rotary dim"):
        RotaryEmbedding(32)(q, k)
    with pytest.raises(ValueError, match="k must have shape"):
        rope(q, k[:, :5])
    with pytest.raises(ValueError, match="B must be 1"):
        rope(q, k, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="offset must have shape"):
        rope(q, k, offset=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        rope(q, k, position_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids must be an integer"):
        rope(q, k, position_ids=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="either position_ids or cu_seqlens"):
        rope(q[:1], k[:1], position_ids=torch.zeros(1, 9, dtype=torch.long), cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="shape \\[B, T, H, D\\]"):
        rope(q[0], k[0])
