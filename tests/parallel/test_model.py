"""A hybrid LinmixForCausalLM trained sequence-parallel: loss and every parameter gradient equal the
single-process run (float64, gloo), packed and unpacked, both strategies, with activation checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from linmix.models import LinmixConfig, LinmixForCausalLM
from linmix.parallel import SequenceParallel
from tests.parallel.test_ops import PACKED, T_LOCAL
from tests.parallel.utils import all_reduce_sum, check_close, shard

VOCAB = 29


def hybrid_model(seed: int) -> LinmixForCausalLM:
    torch.manual_seed(seed)
    config = LinmixConfig(vocab_size=VOCAB, hidden_size=16, num_layers=4, num_heads=2,
                          layers=["gated_deltanet", "attention", "gla", "swa"],
                          mixer_kwargs={"gated_deltanet": {"head_dim": 8, "conv_size": 3},
                                        "attention": {"num_kv_heads": 1},
                                        "gla": {"use_short_conv": True},
                                        "swa": {"window_size": T_LOCAL + 2}})
    model = LinmixForCausalLM(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.train()


def _check_model(seed, cu, strategy, checkpointing, use_context):
    W = dist.get_world_size()
    T = T_LOCAL * W
    B = 2 if cu is None else 1
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    model = hybrid_model(seed)
    ids = torch.randint(0, VOCAB, (B, T))
    labels = ids.clone()
    labels[0, 3] = -100  # an ignored target
    ref = model(ids, labels=labels, cu_seqlens=cu_t)
    ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sp = SequenceParallel(strategy=strategy)
    kwargs = dict(labels=shard(labels), cu_seqlens=cu_t)
    if use_context:
        with sp:
            out = model(shard(ids), **kwargs)
    else:
        out = model(shard(ids), sequence_parallel=sp, **kwargs)
    where = f"model {strategy} cu={cu} checkpointing={checkpointing}"
    check_close(f"{where}: logits", out.logits, shard(ref.logits))
    check_close(f"{where}: loss", out.loss, ref.loss)  # the value is the global loss on every rank
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    for (name, p), g, r in zip(model.named_parameters(), grads, ref_grads):
        g = torch.zeros_like(p) if g is None else g
        check_close(f"{where}: d{name} (summed over ranks)", all_reduce_sum(g), r)


def task_model(seed: int) -> None:
    torch.manual_seed(seed)
    W = dist.get_world_size()
    _check_model(seed, None, "allgather", checkpointing=False, use_context=False)
    _check_model(seed, PACKED[W][0], "scan", checkpointing=False, use_context=True)
    _check_model(seed, PACKED[W][1], "allgather", checkpointing=True, use_context=False)


@pytest.mark.parametrize("world_size", [2, 3])
def test_hybrid_model_equals_single_process(groups, seed, world_size):
    groups(world_size).run(task_model, seed=seed)
