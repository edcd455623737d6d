"""SequenceParallel / ShardLayout: errors, subgroups (data x sequence parallel), communication volume."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from linmix.layers import get_mixer_class
from linmix.models import LinmixConfig, LinmixForCausalLM
from linmix.parallel import SequenceParallel, sp_delta_rule, sp_gla
from tests.parallel.test_ops import _check_one


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        SequenceParallel()


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy 'ring'.*'allgather', 'scan'"):
        SequenceParallel(strategy="ring")


def test_sp_op_without_context():
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match="sp_gla: no sequence-parallel context"):
        sp_gla(q, q, q, F.logsigmoid(q))


def task_errors() -> None:
    W = dist.get_world_size()
    sp = SequenceParallel()
    with pytest.raises(ValueError, match=f"T=5 is not divisible by the sequence-parallel world size W={W}"):
        sp.shard(torch.zeros(1, 5))
    q = torch.randn(1, 4, 2, 3)
    g = F.logsigmoid(q)
    with pytest.raises(ValueError, match=f"must end at W \\* T_local = {W} \\* 4 = {4 * W}, got 9"):
        sp_gla(q, q, q, g, cu_seqlens=torch.tensor([0, 3, 9]), sp=sp)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N=2"):
        sp_gla(q, q, q, g, cu_seqlens=torch.tensor([0, 3, 4 * W]), initial_state=torch.zeros(1, 2, 3, 3), sp=sp)
    layer = get_mixer_class("gla")(hidden_size=8, num_heads=2)
    layout = sp.layout(1, 4, torch.tensor([0, 3, 4 * W]))
    with layout.activate(), pytest.raises(ValueError, match="pass layout.cu_seqlens"):
        layer(torch.randn(1, 4, 8), cu_seqlens=torch.tensor([0, 1, 4], dtype=torch.int32))
    with layout.activate(), pytest.raises(ValueError, match="runs without a decoding state"):
        layer(torch.randn(1, 4, 8), cu_seqlens=layout.cu_seqlens(), use_cache=True)
    with layout.activate(), pytest.raises(ValueError, match="not a padding attention_mask"):
        get_mixer_class("attention")(hidden_size=8)(torch.randn(1, 4, 8), attention_mask=torch.ones(1, 4))
    model = LinmixForCausalLM(LinmixConfig(vocab_size=11, hidden_size=8, num_layers=1, layers=["gla"]))
    with pytest.raises(ValueError, match="without a cache"):
        model(torch.zeros(1, 4, dtype=torch.long), use_cache=True, sequence_parallel=sp)


def task_subgroups(seed: int) -> None:
    """World of 4 = 2 (data) x 2 (sequence): each pair of ranks shares one sequence."""
    torch.manual_seed(seed)
    r = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    group = pairs[r // 2]
    for strategy in ("allgather", "scan"):
        _check_one("delta_rule", strategy, [0, 3, 10, 14], with_h0=True, final=True, group=group)
        _check_one("gla", strategy, None, with_h0=True, final=True, group=group)


def task_volume() -> list[dict]:
    """Bytes of the state passing per call do not depend on T (only on B, H, K, V)."""
    out = []
    for strategy in ("allgather", "scan"):
        for T_local in (4, 32):
            sp = SequenceParallel(strategy=strategy)
            q, v = torch.randn(1, T_local, 2, 8), torch.randn(1, T_local, 2, 4)
            k = F.normalize(torch.randn(1, T_local, 2, 8), dim=-1)
            beta, g = torch.rand(1, T_local, 2), F.logsigmoid(torch.randn(1, T_local, 2))
            for x in (q, k, v, beta, g):
                x.requires_grad_(True)
            o, _ = sp_delta_rule(q, k, v, beta, g, sp=sp)
            o.sum().backward()
            out.append({"strategy": strategy, "T": T_local, "sent": dict(sp.stats.sent),
                        "received": dict(sp.stats.received)})
    return out


def task_shard_and_gather(seed: int) -> None:
    torch.manual_seed(seed)
    W = dist.get_world_size()
    sp = SequenceParallel()
    x = torch.randn(2, 3 * W, 5)
    assert torch.equal(sp.shard(x), x[:, 3 * sp.rank:3 * sp.rank + 3])
    assert torch.equal(sp.gather(sp.shard(x)), x)
    assert torch.equal(sp.gather(sp.shard(x, dim=1).transpose(0, 1), dim=0), x.transpose(0, 1))


def test_shard_and_gather(groups, seed):
    groups(3).run(task_shard_and_gather, seed=seed)


def test_errors(groups):
    groups(2).run(task_errors)


def test_subgroups(groups, seed):
    groups(4).run(task_subgroups, seed=seed)


def test_state_volume_independent_of_length(groups):
    for rank, stats in enumerate(groups(2).run(task_volume)):
        for short, long in zip(stats[0::2], stats[1::2]):
            assert short["sent"] == long["sent"] and short["received"] == long["received"], (rank, short, long)
            # delta rule, float32: one state [1, 2, 8, 4] (plus M [1, 2, 8, 8] with allgather) each way
            state, m = 2 * 8 * 4 * 4, 2 * 8 * 8 * 4
            if short["strategy"] == "allgather":
                assert short["sent"] == {"state": 2 * state + m}, short
            else:
                assert short["sent"] == {"state": state}, short
