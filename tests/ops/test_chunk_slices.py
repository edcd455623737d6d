"""The sliced CPU chunk forms (``ChunkDecayFn``, ``DeltaRuleFn``): carries across slices, partial
gradients, scratch-buffer reuse between calls, odd sub-chunk sizes -- against the token loops."""

from __future__ import annotations

import pytest
import torch

import linmix  # noqa: F401  (registers the backends)
from linmix.ops import delta_rule
from linmix.ops.common import chunk_fn
from linmix.ops.common.utils import Workspace
from tests.ops import test_delta_rule
from tests.ops.test_decay_ops import make_inputs
from tests.ops.utils import assert_close_fwd_bwd, fwd_bwd, rel_err

@pytest.fixture
def tiny_slices(monkeypatch):
    """One chunk per slice (both chunk forms share chunk_fn.SLICE_TOKENS): every carry crosses a slice."""
    monkeypatch.setattr(chunk_fn, "SLICE_TOKENS", 1)


@pytest.mark.parametrize("op", ["linear_attn", "simple_gla", "gla"])
@pytest.mark.parametrize("strength", ["normal", "strong"])
def test_decay_ops_one_chunk_per_slice(tiny_slices, op, strength):
    fn, x = make_inputs(op, T=150, strength=strength, initial_state=True)
    assert_close_fwd_bwd(fn, x, output_final_state=True, chunk_size=16)


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_delta_rule_one_chunk_per_slice(tiny_slices, gated):
    inputs = test_delta_rule.make_inputs(2, 150, 2, 16, 24, dtype=torch.float64, gated=gated, initial_state=True)
    assert_close_fwd_bwd(delta_rule, inputs, output_final_state=True, chunk_size=16)


def _grads_of(fn, x, use_output, use_state, backend):
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    o, s = fn(**leaves, output_final_state=True, chunk_size=16, backend=backend)
    loss = (o.sin().sum() if use_output else 0) + (s.cos().sum() if use_state else 0)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves.values())]


@pytest.mark.parametrize("op", ["simple_gla", "gla", "delta_rule"])
@pytest.mark.parametrize("use_output, use_state", [(True, False), (False, True)], ids=["output_only", "state_only"])
def test_gradient_from_one_output_only(op, use_output, use_state):
    """The Functions get None for an output's gradient that nothing depends on."""
    if op == "delta_rule":
        fn, x = delta_rule, test_delta_rule.make_inputs(2, 70, 2, 16, 24, dtype=torch.float64, initial_state=True)
    else:
        fn, x = make_inputs(op, T=70, initial_state=True)
    got = _grads_of(fn, x, use_output, use_state, "torch")
    ref = _grads_of(fn, x, use_output, use_state, "reference")
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-10 if b.any() else not a.any()


@pytest.mark.parametrize("op", ["gla", "delta_rule"])
def test_scratch_reuse_across_shapes(op):
    """Scratch buffers kept between calls: a large call, then a small one, both still exact."""
    Workspace.release()
    for T, K in [(300, 32), (20, 8), (130, 16)]:
        if op == "delta_rule":
            fn, x = delta_rule, test_delta_rule.make_inputs(2, T, 2, K, 24, dtype=torch.float64, initial_state=True)
        else:
            fn, x = make_inputs(op, T=T, K=K, initial_state=True)
        assert_close_fwd_bwd(fn, x, output_final_state=True)


@pytest.mark.parametrize("chunk_size", [20, 40])
def test_gla_sub_chunk_not_dividing(chunk_size):
    """chunk 20: no sub-chunks of 8 fit, the whole chunk is one diagonal block; 40: five of them."""
    fn, x = make_inputs("gla", T=150, initial_state=True)
    assert_close_fwd_bwd(fn, x, output_final_state=True, chunk_size=chunk_size)


def test_gla_float32_many_slices_matches_one_slice(monkeypatch):
    fn, x = make_inputs("gla", T=300, dtype=torch.float32, initial_state=True)
    go, gs = torch.randn(2, 300, 3, 24), torch.randn(2, 3, 16, 24)
    o1, s1, g1 = fwd_bwd(fn, x, go, gs, output_final_state=True, backend="torch")
    monkeypatch.setattr(chunk_fn, "SLICE_TOKENS", 100)
    o2, s2, g2 = fwd_bwd(fn, x, go, gs, output_final_state=True, backend="torch")
    assert rel_err(o2, o1) < 1e-6 and rel_err(s2, s1) < 1e-6
    assert all(rel_err(g2[n], g1[n]) < 1e-6 for n in g1)


def test_scratch_buffers_survive_inference_mode():
    """A kept CPU scratch buffer first allocated under inference_mode is reused by a later training call."""
    Workspace.release()
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, 40, 2, 16))
    with torch.inference_mode():
        linmix.ops.gla(q, k, v, g, backend="torch")
    qg = q.clone().requires_grad_()
    o, _ = linmix.ops.gla(qg, k, v, g, backend="torch")
    o.sum().backward()
    o_ref, _ = linmix.ops.gla(q, k, v, g, backend="reference")
    assert torch.allclose(o.detach(), o_ref, atol=1e-5, rtol=1e-5)
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
