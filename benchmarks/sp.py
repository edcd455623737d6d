"""Sequence parallelism: timing, bytes communicated and a bf16 check against one device.

    torchrun --nproc_per_node 2 benchmarks/sp.py --out DIR                        # 2 GPUs: NCCL, bf16
    torchrun --nproc_per_node 2 benchmarks/sp.py --out DIR --device cpu --heads 2 --dim 16 \\
        --seq-lens 512 1024 --check-len 256                                        # gloo smoke test

For each op (gla, gated delta rule) and global length T (default 64K and 256K; B = 1, H = 16,
K = V = 128, bf16) it times forward + backward of

* the op on one device holding the whole sequence (every rank runs it alone; rank 0's time),
* the sequence-parallel op (``sp_gla`` / ``sp_delta_rule``) with T / W tokens per rank, for both
  strategies (``allgather``: LASP-2, ``scan``: ZeCO All-Scan; the slowest rank's time),

and records the bytes each rank sends and receives for the state passing (independent of T) and
the peak memory. With ``--layers`` the same for the GLA and Gated DeltaNet mixer layers (with
their projections; hidden size 2048). Then a correctness check at T = ``--check-len``: the
sequence-parallel op in bf16 (and in float32) against the op in float32 on the whole sequence on
one device: relative L2 error of the output and of every input gradient (max over ranks; bf16 must
stay under 1e-2, DESIGN.md section 4).

Rank 0 prints the tables and writes them to DIR/sp.md and the rows to DIR/sp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import linmix
from linmix.bench.tables import markdown_table, rel_l2
from linmix.parallel import SequenceParallel, sp_delta_rule, sp_gla

OPS = ("gla", "gated_delta_rule")
BF16_TOL = 1e-2


def make_inputs(op: str, T: int, H: int, K: int, V: int, dtype: torch.dtype, device, seed: int) -> list:
    """Full-sequence leaf inputs [1, T, ...] of ``op`` in its argument order (the same on every rank)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    q, k, v = randn(1, T, H, K), randn(1, T, H, K), randn(1, T, H, V)
    if op == "gla":
        return [t.to(dtype) for t in (q, k, v)] + [F.logsigmoid(randn(1, T, H, K)) / 16]
    k = F.normalize(k, dim=-1)
    beta, g = randn(1, T, H).sigmoid(), F.logsigmoid(randn(1, T, H))
    return [t.to(dtype) for t in (q, k, v, beta)] + [g]


def call(op: str, inputs: list, sp: SequenceParallel | None) -> torch.Tensor:
    if sp is None:
        fn = linmix.ops.gla if op == "gla" else linmix.ops.delta_rule
        return fn(*inputs)[0]
    return (sp_gla if op == "gla" else sp_delta_rule)(*inputs, sp=sp)[0]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(step, device, warmup: int, iters: int) -> float:
    """Median ms of ``step()`` (forward + backward); every rank runs the same number of calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def slowest(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_ops(args, device, dtype) -> list[dict]:
    rows = []
    for op in args.ops:
        for T in args.seq_lens:
            rows += _bench_op(op, T, args, device, dtype)
            if dist.get_rank() == 0:
                print(f"  timed {op} T={T}", flush=True)
    return rows


def _bench_op(op: str, T: int, args, device, dtype) -> list[dict]:
    W, rank = dist.get_world_size(), dist.get_rank()
    full = make_inputs(op, T, args.heads, args.dim, args.dim, dtype, device, seed=T)
    do_full = torch.randn(1, T, args.heads, args.dim, device=device, dtype=dtype)
    # one device, the whole sequence (each rank alone)
    leaves = [x.detach().requires_grad_(True) for x in full]
    reset_peak(device)
    t1 = slowest(time_fwd_bwd(lambda: call(op, leaves, None).backward(do_full), device, args.warmup, args.iters),
                 device)
    rows = [{"op": op, "T": T, "tokens/rank": T, "setup": "1 device", "fwd+bwd ms": t1, "speedup": 1.0,
             "state MiB sent/rank": 0.0, "state MiB recv/rank": 0.0, "peak GiB": slowest(peak_gb(device), device)}]
    leaves = None  # free the whole-sequence copies before the sharded runs
    Tl = T // W
    local = [x[:, rank * Tl:(rank + 1) * Tl].detach().clone().requires_grad_(True) for x in full]
    do_local = do_full[:, rank * Tl:(rank + 1) * Tl].clone()
    full = do_full = None
    for strategy in ("allgather", "scan"):
        sp = SequenceParallel(strategy=strategy)

        def step():
            call(op, local, sp).backward(do_local)

        reset_peak(device)
        t = slowest(time_fwd_bwd(step, device, args.warmup, args.iters), device)
        peak = slowest(peak_gb(device), device)
        sp.stats.reset()
        step()
        sync(device)
        sent = slowest(sp.stats.sent.get("state", 0), device)
        recv = slowest(sp.stats.received.get("state", 0), device)
        rows.append({"op": op, "T": T, "tokens/rank": Tl, "setup": f"{W} devices, {strategy}", "fwd+bwd ms": t,
                     "speedup": t1 / t, "state MiB sent/rank": sent / 2**20, "state MiB recv/rank": recv / 2**20,
                     "peak GiB": peak})
        for x in local:
            x.grad = None
    return rows


def bench_layers(args, device, dtype) -> list[dict]:
    """The GLA and Gated DeltaNet mixers (projections included) on one device vs sharded."""
    from linmix.layers import get_mixer_class

    rows = []
    for name in ("gla", "gated_deltanet"):
        torch.manual_seed(0)
        layer = get_mixer_class(name)(hidden_size=args.hidden, num_heads=args.heads).to(device=device, dtype=dtype)
        for T in args.seq_lens:
            rows += _bench_layer(name, layer, T, args, device, dtype)
    return rows


def _bench_layer(name, layer, T: int, args, device, dtype) -> list[dict]:
    W, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(1, T, args.hidden, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    reset_peak(device)
    t1 = slowest(time_fwd_bwd(lambda: layer(x)[0].backward(dy), device, args.warmup, args.iters), device)
    rows = [{"layer": name, "T": T, "setup": "1 device", "fwd+bwd ms": t1, "speedup": 1.0,
             "peak GiB": slowest(peak_gb(device), device)}]
    Tl = T // W
    x_local = x[:, rank * Tl:(rank + 1) * Tl].detach().clone().requires_grad_(True)
    dy_local = dy[:, rank * Tl:(rank + 1) * Tl].clone()
    x = dy = None
    for strategy in ("allgather", "scan"):
        layout = SequenceParallel(strategy=strategy).layout(1, Tl)

        def step():
            with layout.activate():
                y = layer(x_local)[0]
            y.backward(dy_local)

        reset_peak(device)
        t = slowest(time_fwd_bwd(step, device, args.warmup, args.iters), device)
        rows.append({"layer": name, "T": T, "setup": f"{W} devices, {strategy}", "fwd+bwd ms": t,
                     "speedup": t1 / t, "peak GiB": slowest(peak_gb(device), device)})
    layer.zero_grad(set_to_none=True)
    return rows


def check(args, device) -> list[dict]:
    """The sequence-parallel op (bf16 and float32) vs the op in float32 on the whole sequence."""
    W, rank = dist.get_world_size(), dist.get_rank()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    T, Tl = args.check_len, args.check_len // W
    rows = []
    for op in args.ops:
        for dtype in (torch.bfloat16, torch.float32):
            names = ["q", "k", "v", "g"] if op == "gla" else ["q", "k", "v", "beta", "g"]
            full = make_inputs(op, T, args.heads, args.dim, args.dim, dtype, device, seed=1)
            ref_in = [x.detach().float().requires_grad_(True) for x in full]  # the same (rounded) values
            do = torch.randn(1, T, args.heads, args.dim, device=device,
                             generator=torch.Generator(device=device).manual_seed(2))
            o_ref = call(op, ref_in, None)
            o_ref.backward(do)
            for strategy in ("allgather", "scan"):
                sp = SequenceParallel(strategy=strategy)
                local = [x[:, rank * Tl:(rank + 1) * Tl].detach().clone().requires_grad_(True) for x in full]
                o = call(op, local, sp)
                o.backward(do[:, rank * Tl:(rank + 1) * Tl].to(o.dtype))
                errs = {"o": rel_l2(o, o_ref[:, rank * Tl:(rank + 1) * Tl])}
                for n, x, r in zip(names, local, ref_in):
                    errs[f"d{n}"] = rel_l2(x.grad, r.grad[:, rank * Tl:(rank + 1) * Tl])
                errs = {k: slowest(v, device) for k, v in errs.items()}
                worst = max(errs.values())
                ok = worst < BF16_TOL if dtype == torch.bfloat16 else worst < 1e-4
                rows.append({"op": op, "T": T, "dtype": str(dtype).replace("torch.", ""), "strategy": strategy,
                             **errs, "ok": "yes" if ok else "NO"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for sp.md (tables) and sp.json (rows)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda: NCCL; cpu: gloo (smoke test)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[65536, 262144], help="global T")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128, help="K = V per head")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size of the --layers benchmark")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--check-len", type=int, default=16384, help="T of the correctness check (0: skip it)")
    p.add_argument("--layers", action="store_true", help="also time the GLA / Gated DeltaNet mixer layers")
    p.add_argument("--skip-bench", action="store_true", help="only the correctness check")
    args = p.parse_args(argv)

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
        where = f"{W} x {torch.cuda.get_device_name()}"
    else:
        device = torch.device("cpu")
        where = f"{W} CPU processes (gloo)"
    bad = [T for T in args.seq_lens + [args.check_len] if T % W]
    if bad:
        print(f"error: sequence lengths {bad} are not divisible by the world size {W}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)  # the same random tensors on every rank
    sections = []
    if args.check_len:
        rows = check(args, device)
        sections.append(("Correctness: sequence-parallel vs one device (float32 reference), relative L2 error, "
                         f"max over ranks (bf16 must be < {BF16_TOL})", rows))
    if not args.skip_bench:
        sections.append((f"Ops, forward + backward, B = 1, H = {args.heads}, K = V = {args.dim}, {args.dtype} "
                         "(1 device: the whole sequence on one device; state MiB: per rank per fwd+bwd)",
                         bench_ops(args, device, dtype)))
        if args.layers:
            sections.append((f"Mixer layers (projections included), hidden {args.hidden}, {args.heads} heads, "
                             f"{args.dtype}", bench_layers(args, device, dtype)))
    if rank == 0:
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "-"
        head = (f"# Sequence parallelism: {date.today()}, {where}, torch {torch.__version__}, "
                f"triton {triton_version}\n\ncommand: torchrun --nproc_per_node {W} benchmarks/sp.py "
                f"{' '.join(argv if argv is not None else sys.argv[1:])}\n")
        text = head + "".join(f"\n## {title}\n\n{markdown_table(rows)}\n" for title, rows in sections)
        print(text)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sp.md").write_text(text)
        (out / "sp.json").write_text(json.dumps({title: rows for title, rows in sections}, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
