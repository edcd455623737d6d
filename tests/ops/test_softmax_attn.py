"""Tests of ``softmax_attn``: the SDPA backend against the reference, the reference against a dense
loop, varlen, KV-cache continuation, half precision, and argument validation."""

from __future__ import annotations

import pytest
import torch

from linmix.ops.softmax_attn import softmax_attn
from tests.ops.utils import TOL, assert_close_fwd_bwd, ragged_cu_seqlens, rel_err

K_DIM, V_DIM = 8, 12
HEADS = [(2, 2), (4, 2), (6, 1)]  # (Hq, Hkv)


def attn(q, k, v, k_past=None, v_past=None, *, backend, output_final_state=False, **kwargs):
    """softmax_attn with the cache passed as two tensors and returned as one [N, L, Hkv, K + V] tensor,
    so ``assert_close_fwd_bwd`` compares the cache and the gradients of k_past / v_past."""
    initial_state = None if k_past is None else (k_past, v_past)
    o, cache = softmax_attn(q, k, v, initial_state=initial_state, output_final_state=output_final_state,
                            backend=backend, **kwargs)
    return o, None if cache is None else torch.cat(cache, dim=-1)


def make_inputs(B, T, Hq, Hkv, P=None, N=None, dtype=torch.float32, K=K_DIM, V=V_DIM):
    x = {"q": torch.randn(B, T, Hq, K, dtype=dtype), "k": torch.randn(B, T, Hkv, K, dtype=dtype),
         "v": torch.randn(B, T, Hkv, V, dtype=dtype)}
    if P is not None:
        N = B if N is None else N
        x["k_past"] = torch.randn(N, P, Hkv, K, dtype=dtype)
        x["v_past"] = torch.randn(N, P, Hkv, V, dtype=dtype)
    return x


def dense_attention(q, k, v, k_past, v_past, *, causal, window, scale):
    """An independent oracle: expanded kv heads, a mask written as a loop of if-statements."""
    B, T, Hq, _ = q.shape
    Hkv = k.shape[2]
    if k_past is not None:
        k, v = torch.cat([k_past, k], 1), torch.cat([v_past, v], 1)
    P = k.shape[1] - T
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    allowed = torch.zeros(T, P + T, dtype=torch.bool)
    for t in range(T):
        i = P + t
        for j in range(P + T):
            if causal:
                ok = j <= i and (window is None or i - j < window)
            else:
                ok = window is None or abs(i - j) < window
            allowed[t, j] = ok
    scores = torch.einsum("bihk,bjhk->bhij", q, k) * scale
    scores = torch.where(allowed, scores, torch.full_like(scores, -torch.inf))
    p = scores.exp() / scores.exp().sum(-1, keepdim=True)  # plain softmax (inputs are small)
    return torch.einsum("bhij,bjhv->bihv", p, v)


# ---------------------------------------------------------------- torch (SDPA) vs reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window", [None, 1, 5, 16])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"Hq{h[0]}Hkv{h[1]}")
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("causal,P", [(True, None), (True, 0), (True, 5), (False, None)],
                         ids=["causal", "causal-P0", "causal-P5", "bidirectional"])
def test_torch_vs_reference(dtype, window, heads, T, causal, P):
    Hq, Hkv = heads
    inputs = make_inputs(2, T, Hq, Hkv, P=P, dtype=dtype)
    errs = assert_close_fwd_bwd(attn, inputs, causal=causal, window=window, output_final_state=causal)
    if P is not None:
        assert "dk_past" in errs and "dv_past" in errs
    if causal:
        assert "final_state" in errs


def test_torch_vs_reference_scale_and_square_heads():
    inputs = make_inputs(3, 20, 4, 4, P=3, dtype=torch.float64, K=16, V=16)
    assert_close_fwd_bwd(attn, inputs, causal=True, window=7, scale=0.37, output_final_state=True)


def test_auto_is_torch_on_cpu():
    x = make_inputs(2, 9, 4, 2, P=2)
    o_auto, c_auto = attn(**x, backend="auto", window=3, output_final_state=True)
    o_torch, c_torch = attn(**x, backend="torch", window=3, output_final_state=True)
    assert torch.equal(o_auto, o_torch) and torch.equal(c_auto, c_torch)


def test_gradcheck_torch_backend():
    x = make_inputs(1, 5, 2, 1, P=3, dtype=torch.float64, K=3, V=2)
    x = {n: t.requires_grad_(True) for n, t in x.items()}

    def f(q, k, v, k_past, v_past):
        o, cache = softmax_attn(q, k, v, window=4, initial_state=(k_past, v_past), output_final_state=True,
                                backend="torch")
        return o, cache[0], cache[1]

    assert torch.autograd.gradcheck(f, tuple(x.values()))


# ---------------------------------------------------------------- reference vs an independent dense form


@pytest.mark.parametrize("causal,window,P", [(True, None, 0), (True, 4, 6), (True, None, 6), (False, 3, None),
                                             (False, None, None)])
def test_reference_vs_dense(causal, window, P):
    x = make_inputs(2, 11, 6, 2, P=P, dtype=torch.float64)
    scale = 0.3
    o_ref, _ = attn(**x, backend="reference", causal=causal, window=window, scale=scale)
    o_dense = dense_attention(x["q"], x["k"], x["v"], x.get("k_past"), x.get("v_past"),
                              causal=causal, window=window, scale=scale)
    assert rel_err(o_ref, o_dense) < 1e-12


# ---------------------------------------------------------------- varlen


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("causal,P", [(True, None), (True, 4), (False, None)],
                         ids=["causal", "causal-past", "bidirectional"])
@pytest.mark.parametrize("lengths", [[3, 17, 1, 12], [0, 6, 0, 2]], ids=["ragged", "with-empty"])
def test_varlen_equals_separate(backend, window, causal, P, lengths):
    dtype = torch.float64
    cu = ragged_cu_seqlens(lengths)
    x = make_inputs(1, sum(lengths), 4, 2, P=P, N=len(lengths), dtype=dtype)
    o, cache = attn(**x, backend=backend, causal=causal, window=window, cu_seqlens=cu)
    assert cache is None and o.shape == (1, sum(lengths), 4, V_DIM)
    offsets = cu.tolist()
    for n, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if a == b:
            continue
        past = {} if P is None else {"k_past": x["k_past"][n:n + 1], "v_past": x["v_past"][n:n + 1]}
        o_n, _ = attn(x["q"][:, a:b], x["k"][:, a:b], x["v"][:, a:b], **past, backend=backend,
                      causal=causal, window=window)
        assert rel_err(o[:, a:b], o_n) < TOL[dtype], f"sequence {n}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("causal,P", [(True, None), (True, 4), (False, None)],
                         ids=["causal", "causal-past", "bidirectional"])
def test_varlen_torch_vs_reference(dtype, window, causal, P):
    lengths = [3, 17, 1, 12]
    x = make_inputs(1, sum(lengths), 6, 2, P=P, N=len(lengths), dtype=dtype)
    assert_close_fwd_bwd(attn, x, causal=causal, window=window, cu_seqlens=ragged_cu_seqlens(lengths))


# ---------------------------------------------------------------- KV cache continuation


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("window", [None, 1, 5, 30])
@pytest.mark.parametrize("T1", [1, 7, 19])
def test_cache_continuation(backend, window, T1):
    T, dtype = 20, torch.float64
    x = make_inputs(2, T, 4, 2, dtype=dtype)
    q, k, v = x["q"], x["k"], x["v"]
    o_full, (kc, vc) = softmax_attn(q, k, v, window=window, output_final_state=True, backend=backend)
    L = T if window is None else min(window, T)
    assert kc.shape == (2, L, 2, K_DIM) and vc.shape == (2, L, 2, V_DIM)
    assert torch.equal(kc, k[:, T - L:]) and torch.equal(vc, v[:, T - L:])

    o1, cache = softmax_attn(q[:, :T1], k[:, :T1], v[:, :T1], window=window, output_final_state=True,
                             backend=backend)
    assert cache[0].shape[1] == (T1 if window is None else min(window, T1))
    o2, (kc2, vc2) = softmax_attn(q[:, T1:], k[:, T1:], v[:, T1:], window=window, initial_state=cache,
                                  output_final_state=True, backend=backend)
    assert rel_err(torch.cat([o1, o2], 1), o_full) < 1e-12
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_cache_token_by_token_decoding(backend):
    T, window = 12, 4
    x = make_inputs(1, T, 6, 1, dtype=torch.float64)
    o_full, _ = softmax_attn(x["q"], x["k"], x["v"], window=window, backend=backend)
    cache, outs = None, []
    for t in range(T):
        o_t, cache = softmax_attn(x["q"][:, t:t + 1], x["k"][:, t:t + 1], x["v"][:, t:t + 1], window=window,
                                  initial_state=cache, output_final_state=True, backend=backend)
        assert cache[0].shape[1] == min(window, t + 1)
        outs.append(o_t)
    assert rel_err(torch.cat(outs, 1), o_full) < 1e-12


def test_empty_past_equals_no_past_varlen():
    lengths = [3, 17, 1, 12]
    x = make_inputs(1, sum(lengths), 4, 2, P=0, N=4, dtype=torch.float64)
    o0, _ = attn(x["q"], x["k"], x["v"], backend="torch", cu_seqlens=ragged_cu_seqlens(lengths))
    o1, _ = attn(**x, backend="torch", cu_seqlens=ragged_cu_seqlens(lengths))
    assert rel_err(o1, o0) < 1e-12


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("window,P", [(None, None), (5, 4)])
def test_bf16(backend, window, P):
    x = make_inputs(2, 33, 4, 2, P=P, dtype=torch.bfloat16)
    o, cache = attn(**x, backend=backend, window=window, output_final_state=True)
    assert o.dtype == torch.bfloat16 and cache.dtype == torch.bfloat16
    x32 = {n: t.float() for n, t in x.items()}
    o32, _ = attn(**x32, backend="reference", window=window)
    assert rel_err(o, o32) < 2e-2


def test_bf16_varlen():
    lengths = [3, 17, 1, 12]
    x = make_inputs(1, sum(lengths), 4, 2, P=2, N=4, dtype=torch.bfloat16)
    cu = ragged_cu_seqlens(lengths)
    o, _ = attn(**x, backend="torch", window=5, cu_seqlens=cu)
    o32, _ = attn(**{n: t.float() for n, t in x.items()}, backend="reference", window=5, cu_seqlens=cu)
    assert o.dtype == torch.bfloat16 and rel_err(o, o32) < 2e-2


# ---------------------------------------------------------------- validation


def _qkv(Hq=4, Hkv=2, T=5, B=2):
    return torch.randn(B, T, Hq, 8), torch.randn(B, T, Hkv, 8), torch.randn(B, T, Hkv, 6)


def _past(N=2, P=3, Hkv=2, K=8, V=6, dtype=torch.float32):
    return torch.randn(N, P, Hkv, K, dtype=dtype), torch.randn(N, P, Hkv, V, dtype=dtype)


@pytest.mark.parametrize("make_args,exc,match", [
    (lambda: (_qkv(Hq=3, Hkv=2), {}), ValueError, "multiple of the number of key/value heads"),
    (lambda: ((torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 7), torch.randn(2, 5, 2, 6)), {}), ValueError, "k must"),
    (lambda: ((torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 6, 2, 6)), {}), ValueError, "v must"),
    (lambda: ((torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 1, 6)), {}), ValueError, "v must"),
    (lambda: ((torch.randn(2, 5, 4, 8), torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 6)), {}), ValueError, "k must"),
    (lambda: ((torch.randn(5, 4, 8),) + _qkv()[1:], {}), ValueError, "q must have 4 dimensions"),
    (lambda: ((_qkv()[0].double(),) + _qkv()[1:], {}), TypeError, "share one dtype"),
    (lambda: ((_qkv()[0].long(),) + _qkv()[1:], {}), TypeError, "q must be float"),
    (lambda: (_qkv(), {"window": 0}), ValueError, "window must be None or a positive int"),
    (lambda: (_qkv(), {"window": -3}), ValueError, "window must be None or a positive int"),
    (lambda: (_qkv(), {"window": 2.0}), TypeError, "window must be None or a positive int"),
    (lambda: (_qkv(), {"window": True}), TypeError, "window must be None or a positive int"),
    (lambda: (_qkv(), {"causal": 1}), TypeError, "causal must be a bool"),
    (lambda: (_qkv(), {"output_final_state": None}), TypeError, "output_final_state must be a bool"),
    (lambda: (_qkv(), {"scale": "x"}), TypeError, "scale must be a float"),
    (lambda: (_qkv(), {"initial_state": _past()[0]}), TypeError, r"initial_state must be a KV cache: a tuple"),
    (lambda: (_qkv(), {"initial_state": _past()[:1]}), TypeError, "initial_state must be a KV cache"),
    (lambda: (_qkv(), {"initial_state": _past() + _past()[:1]}), TypeError, "initial_state must be a KV cache"),
    (lambda: (_qkv(), {"initial_state": (_past()[0], None)}), TypeError, r"initial_state\[1\] \(v_past\)"),
    (lambda: (_qkv(), {"initial_state": (_past()[0][0], _past()[1])}), ValueError, r"initial_state\[0\].*4 dim"),
    (lambda: (_qkv(), {"initial_state": _past(N=3)}), ValueError, r"initial_state\[0\] \(k_past\) must have shape"),
    (lambda: (_qkv(), {"initial_state": _past(Hkv=4)}), ValueError, r"k_past\) must have shape"),
    (lambda: (_qkv(), {"initial_state": _past(K=4)}), ValueError, r"k_past\) must have shape"),
    (lambda: (_qkv(), {"initial_state": _past(V=5)}), ValueError, r"v_past\) must have shape"),
    (lambda: (_qkv(), {"initial_state": (_past(P=3)[0], _past(P=4)[1])}), ValueError, r"v_past\) must have shape"),
    (lambda: (_qkv(), {"initial_state": _past(dtype=torch.float64)}), TypeError, "KV cache initial_state must"),
    (lambda: (_qkv(), {"initial_state": _past(), "causal": False}), ValueError, "initial_state.*causal=True"),
    (lambda: (_qkv(), {"output_final_state": True, "causal": False}), ValueError, "causal=True"),
    (lambda: (_qkv(B=1, T=5), {"cu_seqlens": torch.tensor([0, 2, 5]), "output_final_state": True}),
     ValueError, "output_final_state=True is not supported with cu_seqlens"),
    (lambda: (_qkv(B=2), {"cu_seqlens": torch.tensor([0, 2, 5])}), ValueError, "B must be 1"),
    (lambda: (_qkv(B=1), {"cu_seqlens": torch.tensor([0, 2, 5]), "initial_state": _past(N=1)}),
     ValueError, r"k_past\) must have shape \[N=2"),
    (lambda: (_qkv(), {"backend": "bad"}), ValueError, "backend must be one of"),
    (lambda: (_qkv(), {"backend": "triton"}), ValueError, "not available"),
])
def test_validation(make_args, exc, match):
    (q, k, v), kwargs = make_args()
    with pytest.raises(exc, match=match):
        softmax_attn(q, k, v, **kwargs)


def test_varlen_initial_state_allowed():
    q, k, v = _qkv(B=1, T=5)
    o, cache = softmax_attn(q, k, v, cu_seqlens=torch.tensor([0, 2, 5]), initial_state=_past(N=2), window=2)
    assert o.shape == (1, 5, 4, 6) and cache is None and torch.isfinite(o).all()


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("past", [0, 4])
def test_attention_mask_padding_equals_sequences_alone(window, past):
    """A left/right-padded batch with attention_mask gives each sequence's unpadded result.

    Windows count slots, padded ones included, so left padding is only tested without a past (the
    way a padded prompt starts a generation)."""
    Hq, Hkv, T = 4, 2, 9
    lengths, left = [9, 5, 1], ([True, False, True] if past == 0 else [False, False, False])
    B = len(lengths)
    q = torch.randn(B, T, Hq, K_DIM, dtype=torch.float64)
    k = torch.randn(B, T, Hkv, K_DIM, dtype=torch.float64)
    v = torch.randn(B, T, Hkv, V_DIM, dtype=torch.float64)
    kp = torch.randn(B, past, Hkv, K_DIM, dtype=torch.float64)
    vp = torch.randn(B, past, Hkv, V_DIM, dtype=torch.float64)
    new_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (n, is_left) in enumerate(zip(lengths, left)):
        if is_left:
            new_mask[b, T - n:] = True
        else:
            new_mask[b, :n] = True
    mask = torch.cat([torch.ones(B, past, dtype=torch.bool), new_mask], 1)
    init = (kp, vp) if past else None
    for backend in ("reference", "torch"):
        o, _ = softmax_attn(q, k, v, window=window, initial_state=init, attention_mask=mask.int(), backend=backend)
        assert torch.isfinite(o).all()
        for b in range(B):
            sel = new_mask[b]
            o_b, _ = softmax_attn(q[b:b + 1, sel], k[b:b + 1, sel], v[b:b + 1, sel], window=window,
                                  initial_state=(kp[b:b + 1], vp[b:b + 1]) if past else None, backend="reference")
            assert rel_err(o[b:b + 1, sel], o_b) < 1e-12, (backend, b)


def test_attention_mask_gradients_match_reference():
    q = torch.randn(2, 6, 2, K_DIM, dtype=torch.float64)
    k = torch.randn(2, 6, 1, K_DIM, dtype=torch.float64)
    v = torch.randn(2, 6, 1, V_DIM, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    assert_close_fwd_bwd(softmax_attn, {"q": q, "k": k, "v": v}, attention_mask=mask, window=4)


def test_attention_mask_validation():
    q, k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 4)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B=2, P \+ T=5\]"):
        softmax_attn(q, k, v, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be a bool or integer"):
        softmax_attn(q, k, v, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask and cu_seqlens"):
        softmax_attn(q[:1], k[:1], v[:1], attention_mask=torch.ones(1, 5, dtype=torch.bool),
                     cu_seqlens=torch.tensor([0, 2, 5]))
