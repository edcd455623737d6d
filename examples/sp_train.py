"""Train a small hybrid LinmixForCausalLM with its sequence sharded over ranks (sequence parallelism),
composed with data parallelism (DDP or FSDP2) over the batch.

    torchrun --nproc_per_node 2 examples/sp_train.py                          # CPU, gloo
    torchrun --nproc_per_node 2 examples/sp_train.py --device cuda --dtype bfloat16 --seq-len 65536
    torchrun --nproc_per_node 4 examples/sp_train.py --sp-size 2 --packed      # 2 (data) x 2 (sequence)

The world of W ranks is split into W / sp_size groups of sp_size consecutive ranks; each group
shares one batch of sequences, every rank holding seq_len / sp_size consecutive tokens of it. The
model's loss has the value of the group's global loss and this rank's share as its gradient, so
the parameter gradients must be *summed* over a sequence-parallel group and *averaged* over the
data-parallel groups: DDP / FSDP2 over all W ranks average, hence the loss is multiplied by sp_size
before backward.

The data is synthetic and learnable: x_{t+1} = x_t + 7 mod V, except that with probability 0.1
a token is drawn at random (so the loss falls from ln V towards about 0.75). With ``--check`` the
first step is also run on the whole sequence in one process (every rank) and the loss and
gradients are compared.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from linmix.models import LinmixConfig, LinmixForCausalLM
from linmix.parallel import SequenceParallel


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: gloo; cuda: NCCL")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float64"], default="float32")
    p.add_argument("--sp-size", type=int, default=None, help="ranks per sequence (default: all)")
    p.add_argument("--strategy", choices=["allgather", "scan"], default="allgather")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="data parallelism over the batch")
    p.add_argument("--seq-len", type=int, default=512, help="global tokens per sequence (a multiple of sp-size)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per data-parallel group")
    p.add_argument("--packed", action="store_true", help="pack batch-size sequences of random lengths in one row")
    p.add_argument("--layers", default="gated_deltanet,attention,gla,swa", help="mixers, repeated cyclically")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--check", action="store_true", help="compare the first step with a single-process run")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_batch(args, step: int, dp_rank: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The global batch of data-parallel group ``dp_rank`` at ``step`` (identical on its sp ranks)."""
    gen = torch.Generator().manual_seed(args.seed * 100_003 + step * 1_009 + dp_rank)
    B, T, V = args.batch_size, args.seq_len, args.vocab_size
    if args.packed:  # B sequences of random lengths packed in one row of T tokens
        cuts = torch.randperm(T - 1, generator=gen)[:B - 1].add(1).sort().values
        cu = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([T])])
        lengths = (cu[1:] - cu[:-1]).tolist()
        rows = [_progression(n, V, gen) for n in lengths]
        return torch.cat(rows)[None].to(device), cu.to(device=device, dtype=torch.int32)
    return torch.stack([_progression(T, V, gen) for _ in range(B)]).to(device), None


def _progression(n: int, V: int, gen: torch.Generator, step: int = 7, noise: float = 0.1) -> torch.Tensor:
    """x_{t+1} = x_t + step mod V, restarted at a random token with probability ``noise`` (vectorised)."""
    idx = torch.arange(n)
    restart = torch.rand(n, generator=gen) < noise
    restart[0] = True
    last = torch.where(restart, idx, torch.zeros_like(idx)).cummax(0).values  # the last restart at or before t
    start = torch.randint(0, V, (n,), generator=gen)
    return (start[last] + step * (idx - last)) % V


def build_model(args, device, dtype) -> LinmixForCausalLM:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    config = LinmixConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
                          num_heads=args.num_heads, layers=args.layers.split(","),
                          mixer_kwargs={"gla": {"use_short_conv": True}, "swa": {"window_size": 64},
                                        "attention": {"num_kv_heads": max(1, args.num_heads // 2)}})
    model = LinmixForCausalLM(config).to(device=device, dtype=dtype)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def check_first_step(model, ids, labels, cu, sp, loss, log) -> None:
    """Loss and gradients of the sharded step against the whole sequence in this process."""
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    for g in grads:
        if g is not None:
            dist.all_reduce(g, group=sp.group)  # sum of the shares over the sequence-parallel group
    model.zero_grad(set_to_none=True)
    ref = model(ids, labels=labels, cu_seqlens=cu)
    ref.loss.backward()
    worst = 0.0
    for p, g in zip(model.parameters(), grads):
        if p.grad is not None and g is not None and p.grad.norm() > 0:
            worst = max(worst, float((g - p.grad).norm() / p.grad.norm()))
    model.zero_grad(set_to_none=True)
    log(f"check: loss sharded {loss:.6f} vs whole {ref.loss.item():.6f}; "
        f"worst relative gradient error {worst:.2e}")


def main() -> None:
    args = parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    sp_size = args.sp_size or world
    if world % sp_size or args.seq_len % sp_size:
        raise SystemExit(f"--sp-size {sp_size} must divide the world size {world} and --seq-len {args.seq_len}")
    dp_size, dp_rank = world // sp_size, rank // sp_size
    # every rank creates every group (torch.distributed requires it), then keeps its own
    sp_groups = [dist.new_group(list(range(i * sp_size, (i + 1) * sp_size))) for i in range(dp_size)]
    sp = SequenceParallel(sp_groups[dp_rank], strategy=args.strategy)

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    model = build_model(args, device, dtype)
    log(f"world {world} = {dp_size} (data) x {sp_size} (sequence), {backend}, {args.strategy}; "
        f"{sum(p.numel() for p in model.parameters())} parameters, layers {args.layers}; "
        f"{args.seq_len // sp_size} of {args.seq_len} tokens per rank")
    if args.check:
        ids, cu = make_batch(args, 0, dp_rank, device)
        out = model(sp.shard(ids), labels=sp.shard(ids), cu_seqlens=cu, sequence_parallel=sp)
        out.loss.backward()
        check_first_step(model, ids, ids, cu, sp, out.loss.item(), log)

    if args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        wrapped = model
    else:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if args.device == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = time.perf_counter()
    for step in range(args.steps):
        ids, cu = make_batch(args, step, dp_rank, device)
        ids_local = sp.shard(ids)
        out = wrapped(ids_local, labels=ids_local, cu_seqlens=cu, sequence_parallel=sp)
        # DDP / FSDP average the gradients over all ranks; the shares of one sequence must add up
        (out.loss * sp_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)  # the mean over the data-parallel groups (each value is its group's loss)
            elapsed = time.perf_counter() - start
            tokens = (step + 1) * args.batch_size * args.seq_len * dp_size
            log(f"step {step:4d}  loss {loss.item() / world:.4f}  {tokens / elapsed:,.0f} tokens/s")
    sent, received = sp.stats.total()
    log(f"sequence-parallel traffic of rank 0: {sent / 2**20:.2f} MiB sent, {received / 2**20:.2f} MiB received "
        f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in sorted(sp.stats.received.items()))} MiB received)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
