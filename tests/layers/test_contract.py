"""The token-mixer contract, checked for every registered mixer (linmix.layers.MIXERS).

decode == prefill, padded batch == sequences alone, packed varlen == sequences alone, gradients
to every parameter, state size, input checks. A new mixer gets these tests by registering.
"""

from __future__ import annotations

import pytest
import torch

import linmix.layers  # noqa: F401  (registers every mixer)
from linmix.layers import MIXERS
from tests.layers.utils import perturbed
from tests.ops.utils import rel_err

D = 64
TOL = 1e-9  # float64 throughout


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    # Perturb every parameter so zero-initialised parts (biases, output gates) are exercised.
    return perturbed(MIXERS[name](hidden_size=D, layer_idx=0), scale=0.05)


def run_alone(mixer, x, state=None):
    y, new_state = mixer(x, state=state, use_cache=True)
    return y, new_state


@pytest.fixture(params=sorted(MIXERS))
def name(request):
    return request.param


def test_decode_equals_prefill(name):
    mixer = make(name)
    x = torch.randn(2, 23, D, dtype=torch.float64)
    y_full, _ = mixer(x)
    y_pre, state = mixer(x[:, :9], use_cache=True)
    ys = [y_pre]
    for t in range(9, 23):
        y_t, state = mixer(x[:, t:t + 1], state=state, use_cache=True)
        ys.append(y_t)
    assert rel_err(torch.cat(ys, 1), y_full) < TOL
    # prefill in two chunks with the state carried
    y_a, st = mixer(x[:, :14], use_cache=True)
    y_b, _ = mixer(x[:, 14:], state=st, use_cache=True)
    assert rel_err(torch.cat([y_a, y_b], 1), y_full) < TOL


def test_left_padded_batch_equals_sequences_alone(name):
    mixer = make(name)
    lengths, T = [12, 5, 1], 12
    x = torch.randn(3, T, D, dtype=torch.float64)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    y, state = mixer(x, attention_mask=mask, use_cache=True)
    x_next = torch.randn(3, 1, D, dtype=torch.float64)
    y_next, _ = mixer(x_next, state=state, use_cache=True, attention_mask=torch.ones(3, 1, dtype=torch.long))
    for b, n in enumerate(lengths):
        y_b, st_b = run_alone(mixer, x[b:b + 1, T - n:])
        assert rel_err(y[b:b + 1, T - n:], y_b) < TOL, f"row {b}: prefill"
        y_nb, _ = run_alone(mixer, x_next[b:b + 1], st_b)
        assert rel_err(y_next[b:b + 1], y_nb) < TOL, f"row {b}: decode after padded prefill"


def test_right_padded_batch_equals_sequences_alone(name):
    mixer = make(name)
    lengths, T = [4, 10], 10
    x = torch.randn(2, T, D, dtype=torch.float64)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    y, _ = mixer(x, attention_mask=mask)
    for b, n in enumerate(lengths):
        y_b, _ = run_alone(mixer, x[b:b + 1, :n])
        assert rel_err(y[b:b + 1, :n], y_b) < TOL


def test_packed_varlen_equals_sequences_alone(name):
    mixer = make(name)
    lengths = [7, 1, 15, 3]
    cu = torch.tensor([0, 7, 8, 23, 26], dtype=torch.int32)
    x = torch.randn(1, 26, D, dtype=torch.float64)
    y, state = mixer(x, cu_seqlens=cu, use_cache=True)
    x_next = torch.randn(len(lengths), 1, D, dtype=torch.float64)
    y_next, _ = mixer(x_next, state=state, use_cache=True)  # decode the N sequences as a batch
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_n, st_n = run_alone(mixer, x[:, a:b])
        assert rel_err(y[:, a:b], y_n) < TOL, f"sequence {n}"
        y_nn, _ = run_alone(mixer, x_next[n:n + 1], st_n)
        assert rel_err(y_next[n:n + 1], y_nn) < TOL, f"sequence {n}: decode after packed prefill"


def test_gradients_reach_every_parameter(name):
    mixer = make(name).float()
    x = torch.randn(2, 20, D, requires_grad=True)
    y, _ = mixer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * torch.randn_like(y)).sum().backward()
    missing = [n for n, p in mixer.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient for {missing}"
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bf16_forward(name):
    mixer = make(name).float()
    x = torch.randn(2, 33, D)
    y32, _ = mixer(x)
    y16, _ = mixer.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert rel_err(y16, y32) < 5e-2


def test_state_bytes(name):
    mixer = make(name).float()
    small, large = mixer.state_bytes(16), mixer.state_bytes(4096)
    assert isinstance(small, int) and small > 0
    assert large >= small
    # the reported size matches the floating tensors of a real state (float32 module and input)
    _, state = mixer(torch.randn(1, 16, D), use_cache=True)
    real = sum(t.numel() * t.element_size() for t in state.values() if t.is_floating_point())
    assert real == small, f"state_bytes(16)={small} but the state holds {real} bytes"


def test_bad_input(name):
    mixer = make(name)
    with pytest.raises(ValueError, match="hidden_size"):
        mixer(torch.randn(2, 5, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="attention_mask"):
        mixer(torch.randn(2, 5, D, dtype=torch.float64), attention_mask=torch.ones(2, 4))


def test_bf16_autocast(name):
    """Under bf16 autocast (the trainer's CUDA setting; here on the CPU) the mixer runs and backpropagates.

    Mixed dtypes meet inside the layers there (float32 inputs, bf16 projections): a layer must hand
    the ops one dtype (mamba2 once passed float32 values with bf16 B and C).
    """
    m = make(name).float()
    x = torch.randn(2, 12, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(x)
    assert torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
