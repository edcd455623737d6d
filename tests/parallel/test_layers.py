"""Mixer layers run on shards of the sequence (inside ShardLayout.activate()) against the whole sequence.

Attention (grouped KV heads, RoPE: the all-gather of keys/values and global positions), sliding
windows shorter and longer than a shard (halo exchanges over one and several ranks), and layers
with short convolutions, position-dependent parts and every recurrence family.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from linmix.layers import get_mixer_class
from linmix.parallel import SequenceParallel, sp_softmax_attn
from linmix.ops import softmax_attn
from tests.parallel.test_ops import PACKED, T_LOCAL
from tests.parallel.utils import all_reduce_sum, check_close, shard

D = 16
LAYERS = [
    ("attention", {"num_heads": 4, "num_kv_heads": 2}),
    ("swa", {"window_size": 3, "num_heads": 2}),
    ("swa", {"window_size": 2 * T_LOCAL + 2, "num_heads": 2, "num_kv_heads": 1}),  # reaches 3 ranks back
    ("gla", {"num_heads": 2, "use_short_conv": True}),
    ("retnet", {"num_heads": 2}),
    ("mamba2", {"d_state": 4, "headdim": 8}),
    ("deltanet", {"num_heads": 2, "conv_size": 3}),
    ("based", {"num_heads": 2, "feature_dim": 4, "window_size": 4}),
]


def _perturbed_layer(name, kwargs):
    layer = get_mixer_class(name)(hidden_size=D, **kwargs).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _check_layer(name, kwargs, cu, strategy):
    W = dist.get_world_size()
    T = T_LOCAL * W
    B = 2 if cu is None else 1
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    layer = _perturbed_layer(name, kwargs)
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    y_ref, _ = layer(x, cu_seqlens=cu_t)
    w = torch.randn_like(y_ref)
    ref_grads = torch.autograd.grad((y_ref * w).sum(), [x] + params)

    sp = SequenceParallel(strategy=strategy)
    layout = sp.layout(B, T_LOCAL, cu_t)
    x_local = shard(x).detach().requires_grad_(True)
    with layout.activate():
        y, state = layer(x_local, cu_seqlens=layout.cu_seqlens())
    assert state is None
    where = f"{name} {kwargs} {strategy} cu={cu}"
    check_close(f"{where}: y", y, shard(y_ref))
    grads = torch.autograd.grad((y * shard(w)).sum(), [x_local] + params, allow_unused=True)
    check_close(f"{where}: dx", grads[0], shard(ref_grads[0]))
    for (pname, p), g, ref in zip([(n, p) for n, p in layer.named_parameters() if p.requires_grad], grads[1:],
                                  ref_grads[1:]):
        g = torch.zeros_like(p) if g is None else g
        if ref.norm() > 0:
            check_close(f"{where}: d{pname} (summed over ranks)", all_reduce_sum(g), ref)


def task_layers(seed: int) -> None:
    torch.manual_seed(seed)
    W = dist.get_world_size()
    for i, (name, kwargs) in enumerate(LAYERS):
        strategy = ("allgather", "scan")[i % 2]
        _check_layer(name, kwargs, None, strategy)
        _check_layer(name, kwargs, PACKED[W][i % 2], strategy)


def task_softmax_op(seed: int) -> None:
    """sp_softmax_attn against softmax_attn on the whole sequence: full and windowed, dense and packed."""
    torch.manual_seed(seed)
    W = dist.get_world_size()
    T = T_LOCAL * W
    sp = SequenceParallel()
    for window in (None, 2, 4, 3 * T_LOCAL):
        for cu in (None, PACKED[W][0], PACKED[W][1]):
            B = 2 if cu is None else 1
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
            q = torch.randn(B, T, 4, 5, dtype=torch.float64, requires_grad=True)
            k = torch.randn(B, T, 2, 5, dtype=torch.float64, requires_grad=True)
            v = torch.randn(B, T, 2, 3, dtype=torch.float64, requires_grad=True)
            o_ref, _ = softmax_attn(q, k, v, window=window, cu_seqlens=cu_t, backend="reference")
            w = torch.randn_like(o_ref)
            refs = torch.autograd.grad((o_ref * w).sum(), [q, k, v])
            local = [shard(t).detach().requires_grad_(True) for t in (q, k, v)]
            o = sp_softmax_attn(*local, window=window, cu_seqlens=cu_t, sp=sp)
            where = f"softmax_attn window={window} cu={cu}"
            check_close(f"{where}: o", o, shard(o_ref))
            grads = torch.autograd.grad((o * shard(w)).sum(), local)
            for name, g, ref in zip("qkv", grads, refs):
                check_close(f"{where}: d{name}", g, shard(ref))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sp_softmax_attn(groups, seed, world_size):
    groups(world_size).run(task_softmax_op, seed=seed)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_layers_on_shards(groups, seed, world_size):
    groups(world_size).run(task_layers, seed=seed)
