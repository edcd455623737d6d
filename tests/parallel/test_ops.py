"""sp_linear_attn / sp_simple_gla / sp_gla / sp_delta_rule on W = 2, 3, 4 gloo ranks (float64).

Every rank draws the same full-sequence inputs, runs the op's ``reference`` backend on the whole
sequence (the single-process oracle) and the sequence-parallel op on its shard, and compares its
shard of the output, the final states, and the gradients of every input (the initial states'
gradients summed over the ranks) for a random loss over outputs and final states.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import linmix
from linmix.parallel import SequenceParallel, sp_delta_rule, sp_gla, sp_linear_attn, sp_simple_gla
from tests.parallel.utils import all_reduce_sum, check_close, shard

SP_FNS = {"linear_attn": sp_linear_attn, "simple_gla": sp_simple_gla, "gla": sp_gla, "delta_rule": sp_delta_rule}
T_LOCAL = 7
# Global cu_seqlens per world size (T = 7 W): boundaries inside a shard, exactly at a shard
# boundary, sequences passing through whole shards, and an empty sequence.
PACKED = {
    2: [[0, 3, 10, 14], [0, 7, 9, 9, 14]],
    3: [[0, 4, 18, 21], [0, 7, 14, 16, 21]],
    4: [[0, 4, 7, 22, 22, 25, 28], [0, 25, 28]],
}


def make_inputs(op: str, B: int, T: int, H: int, K: int, V: int, gated_delta: bool = True) -> list:
    dt = torch.float64
    q, v = torch.randn(B, T, H, K, dtype=dt), torch.randn(B, T, H, V, dtype=dt)
    k = torch.randn(B, T, H, K, dtype=dt)
    if op == "linear_attn":
        return [q, k * 0.5, v]
    if op == "simple_gla":
        return [q, k, v, F.logsigmoid(torch.randn(B, T, H, dtype=dt) + 2)]
    if op == "gla":
        return [q, k, v, F.logsigmoid(torch.randn(B, T, H, K, dtype=dt) + 2)]
    beta = torch.sigmoid(torch.randn(B, T, H, dtype=dt))
    g = F.logsigmoid(torch.randn(B, T, H, dtype=dt) + 2) if gated_delta else None
    return [q, F.normalize(k, dim=-1), v, beta, g]


def _check_one(op, strategy, cu, with_h0, final, gated_delta=True, B=2, H=2, K=4, V=3, group=None):
    W = dist.get_world_size(group)
    T = T_LOCAL * W
    if cu is not None:
        B = 1
    N = B if cu is None else len(cu) - 1
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    inputs = make_inputs(op, B, T, H, K, V, gated_delta)
    h0 = torch.randn(N, H, K, V, dtype=torch.float64) if with_h0 else None
    leaves = [x for x in inputs + [h0] if x is not None]
    for x in leaves:
        x.requires_grad_(True)
    fn = getattr(linmix.ops, op)
    o_ref, S_ref = fn(*inputs, initial_state=h0, output_final_state=True, cu_seqlens=cu_t, backend="reference")
    w_o, w_s = torch.randn_like(o_ref), torch.randn_like(S_ref)
    loss = (o_ref * w_o).sum() + ((S_ref * w_s).sum() if final else 0)
    ref_grads = torch.autograd.grad(loss, leaves)

    local = [None if x is None else shard(x, group=group).detach().requires_grad_(True) for x in inputs]
    h0_local = None if h0 is None else h0.detach().clone().requires_grad_(True)
    sp = SequenceParallel(group, strategy=strategy, scan_blocks=3)
    o, S = SP_FNS[op](*local, initial_state=h0_local, output_final_state=final, cu_seqlens=cu_t, chunk_size=2, sp=sp)
    where = f"{op} {strategy} cu={cu} h0={with_h0} final={final}"
    check_close(f"{where}: o", o, shard(o_ref, group=group))
    local_loss = (o * shard(w_o, group=group)).sum()
    if final:
        check_close(f"{where}: final state", S, S_ref)
        local_loss = local_loss + (S * w_s).sum() / W  # S is replicated: each rank owns 1/W of the term
    else:
        assert S is None
    local_leaves = [x for x in local + [h0_local] if x is not None]
    grads = torch.autograd.grad(local_loss, local_leaves, allow_unused=True)  # a rank may not use initial_state
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, local_leaves)]
    names = ["q", "k", "v", "g" if op != "delta_rule" else "beta", "g"][:len(local)]
    names = [n for n, x in zip(names, local) if x is not None] + (["initial_state"] if h0 is not None else [])
    for name, gr, ref in zip(names, grads, ref_grads):
        if name == "initial_state":
            check_close(f"{where}: d{name} (summed over ranks)", all_reduce_sum(gr, group), ref)
        else:
            check_close(f"{where}: d{name}", gr, shard(ref, group=group))


def task_op(op: str, seed: int) -> None:
    torch.manual_seed(seed)
    W = dist.get_world_size()
    for strategy in ("allgather", "scan"):
        _check_one(op, strategy, None, with_h0=True, final=True)
        _check_one(op, strategy, None, with_h0=False, final=False, gated_delta=False)
        _check_one(op, strategy, PACKED[W][0], with_h0=True, final=True)
        _check_one(op, strategy, PACKED[W][1], with_h0=False, final=True)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("op", list(SP_FNS))
def test_sp_op_equals_single_process(groups, seed, world_size, op):
    groups(world_size).run(task_op, op=op, seed=seed)
