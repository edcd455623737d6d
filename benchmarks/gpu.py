"""GPU evidence for the Triton backends: bf16 accuracy, timing next to fla and SDPA with the floor, decode steps.

    python benchmarks/gpu.py check  --out DIR   # bf16 Triton vs float32 reference: rel. L2 error of o, state, grads
    python benchmarks/gpu.py bench  --out DIR [--fla] [--seq-lens 2048 8192 32768] [--ops ...]
    python benchmarks/gpu.py decode --out DIR [--fla]   # one token, B=64, state carried
    python benchmarks/gpu.py compile --out DIR  # torch.compile'd layers against eager (bf16)
    python benchmarks/gpu.py crossover --out DIR  # fused recurrent vs chunk kernels at short T
    python benchmarks/gpu.py profile --out DIR [--ops ...]  # per-kernel CUDA time of fwd+bwd (B=8, T=8192)
    python benchmarks/gpu.py tune --isolate --ops gla --variants JSON ... --out DIR  # launch variants: error, time

Every sub-command prints a markdown table and writes it (and a JSON of the rows) under --out.
Standard shapes (DESIGN.md section 5): bf16, B*T = 65,536, H = 16, K = V = 128.

Finding launch settings that Triton compiles correctly (each case in its own process, so a fault
ends one case; the first variant right everywhere goes to OUT/best_launch.json):

    python benchmarks/gpu.py check --isolate --force-kernels --workers 8 --ops delta_rule gated_delta_rule \
        --head-dims 32 64 128 256 --shapes 2x4096 --variants '{"warps_scan": 4}' '{"warps_scan": 2}' --out DIR
    python benchmarks/gpu.py check --isolate --force-kernels --ops gla --head-dims 32 --shapes 1x4096 \
        --gla-launch '{"dv": {"num_warps": 4}, "dqk": {"num_warps": 4}}' --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import linmix
from linmix.bench.fla import fla_decode_ops, fla_ops, fla_version
from linmix.bench.floor import attention_floor, decode_floor, measure_rates, op_floor
from linmix.bench.tables import markdown_table, rel_l2
from linmix.ops.common import streams

OPS = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule")


def make_inputs(op: str, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, *, state: bool = False):
    """Leaf tensors (q, k, v, extra gates / beta, initial state) for one op, in the op's argument order."""
    dev = "cuda"
    q = torch.randn(B, T, H, K, device=dev, dtype=dtype)
    k = torch.randn(B, T, H, K, device=dev, dtype=dtype)
    v = torch.randn(B, T, H, V, device=dev, dtype=dtype)
    extra: dict[str, torch.Tensor] = {}
    if op in ("delta_rule", "gated_delta_rule"):
        k = F.normalize(k.float(), dim=-1).to(dtype)
        extra["beta"] = torch.rand(B, T, H, device=dev).sigmoid().to(dtype)
    if op in ("simple_gla", "gated_delta_rule"):
        extra["g"] = F.logsigmoid(torch.randn(B, T, H, device=dev))
    if op == "gla":
        extra["g"] = F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16
    h0 = torch.randn(B, H, K, V, device=dev) if state else None
    return q, k, v, extra, h0


def call(op: str, backend: str, q, k, v, extra, **kw):
    fn = getattr(linmix.ops, "delta_rule" if op == "gated_delta_rule" else op)
    return fn(q, k, v, **extra, backend=backend, **kw)


def check(args) -> list[dict]:
    """bf16 Triton vs the float32 torch chunk form on the same (bf16-rounded) inputs, all gradients.

    With ``--isolate`` every (op, head dim, shape) case runs in its own process with
    ``CUDA_LAUNCH_BLOCKING=1``, so a kernel that faults is reported (with its failing launch) and
    the other cases still run.
    """
    if args.isolate:
        return _check_isolated(args)
    if args.force_kernels:  # run the Triton chunk kernels where linmix's GPU gates would route to PyTorch
        import importlib

        # (``import linmix.ops.gla.triton as m`` would fail: linmix.ops.gla is also the op's name there)
        delta_triton = importlib.import_module("linmix.ops.delta_rule.triton")
        delta_triton.CHUNK_KERNELS_ON_GPU = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for op, D, (B, T) in ((op, D, shape) for op in args.ops for D in args.head_dims for shape in args.shapes):
        torch.manual_seed(0)
        q, k, v, extra, h0 = make_inputs(op, B, T, 16, *head_dims(D), torch.bfloat16, state=True)
        leaves = {"q": q, "k": k, "v": v, **extra, "initial_state": h0}
        do = torch.randn_like(v)
        dht = torch.randn_like(h0)
        results = {}
        for name, backend, cast in (("triton", "triton", None), ("ref", "torch", torch.float32)):
            xs = {n: (t.to(cast) if cast is not None and n != "initial_state" else t).detach().requires_grad_()
                  for n, t in leaves.items()}
            e = {n: xs[n] for n in extra}
            o, ht = call(op, backend, xs["q"], xs["k"], xs["v"], e, initial_state=xs["initial_state"],
                         output_final_state=True)
            grads = torch.autograd.grad((o, ht), list(xs.values()), (do.to(o.dtype), dht))
            results[name] = {"o": o, "final_state": ht, **{f"d{n}": g for n, g in zip(xs, grads)}}
            del o, ht, grads
        row = {"op": op, "K=V": D, "B": B, "T": T}
        row.update({n: rel_l2(results["triton"][n], results["ref"][n]) for n in results["ref"]})
        row["max"] = max(v for n, v in row.items() if n not in ("op", "K=V", "B", "T"))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del results
        torch.cuda.empty_cache()
    return rows


def head_dims(text: str) -> tuple[int, int]:
    """(K, V) from "D" (K = V = D) or "K:V"."""
    K, _, V = str(text).partition(":")
    return int(K), int(V or K)


def _in_subprocess(what: str, argv: list[str], timeout: float, env: dict | None = None) -> tuple[list[dict], str]:
    """Run ``gpu.py <what> <argv>`` in its own process: (its rows, "") or ([], why it failed). The failing
    frames of linmix are in the error (with CUDA_LAUNCH_BLOCKING, the launch that faulted)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, what, *argv, "--out", tmp]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [], "timeout"
        result = Path(tmp) / f"{what}.json"
        if proc.returncode == 0 and result.exists():
            return json.loads(result.read_text()), ""
    frames = [line.strip() for line in proc.stderr.splitlines() if "File " in line and "linmix" in line]
    last = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    return [], f"rc {proc.returncode}: " + " <- ".join(frames[-3:] + last)[-600:]


def _check_isolated(args) -> list[dict]:
    import os
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}

    def one(case) -> list[dict]:
        op, D, (B, T), launch = case
        tag = {"op": op, "K=V": D, "B": B, "T": T} | ({"launch": launch} if launch else {})
        argv = ["--ops", op, "--head-dims", str(D), "--shapes", f"{B}x{T}"]
        argv += (["--force-kernels"] if args.force_kernels else []) + (["--delta-launch", launch] if launch else [])
        argv += ["--gla-launch", args.gla_launch] if args.gla_launch else []
        found, error = _in_subprocess("check", argv, args.case_timeout, env)
        rows = [{**row, **tag} for row in found] if not error else [{**tag, "max": float("nan"), "error": error}]
        for row in rows:
            print(json.dumps(row), file=sys.stderr, flush=True)
        return rows

    launches = args.variants or [args.delta_launch]
    cases = [(op, D, shape, launch) for launch in launches for op in args.ops for D in args.head_dims
             for shape in args.shapes]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        rows = [row for rows in pool.map(one, cases) for row in rows]
    if args.variants:  # the first variant whose every case is within the bf16 budget
        passing = [v for v in args.variants
                   if all(r["max"] < 1e-2 for r in rows if r.get("launch") == v)]  # NaN fails
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "best_launch.json").write_text(passing[0] if passing else "")
        print(f"passing variants: {passing}", file=sys.stderr)
    return rows


def apply_gla_launch(text: str | None) -> None:
    """Set fields of gla's launch table from JSON: per kernel, e.g. '{"dv": {"num_warps": 4}}', or a field of
    the LaunchConfig itself, e.g. '{"chunk_size": 32}'."""
    if not text:
        return
    import importlib

    launch = importlib.import_module("linmix.ops.gla.triton").LAUNCH
    kernels = launch.kernels
    for kernel, fields in json.loads(text).items():
        if not isinstance(fields, dict):
            if kernel == "kernels" or not hasattr(launch, kernel):
                raise SystemExit(f"error: --gla-launch: LaunchConfig has no field {kernel!r}")
            setattr(launch, kernel, fields)
            continue
        if kernel not in kernels:
            raise SystemExit(f"error: --gla-launch: no kernel {kernel!r} (have {sorted(kernels)})")
        for name, value in fields.items():
            if not hasattr(kernels[kernel], name):
                raise SystemExit(f"error: --gla-launch: KernelLaunch has no field {name!r}")
            setattr(kernels[kernel], name, value)


def apply_delta_launch(text: str | None) -> None:
    """Set fields of the delta rule's Triton LaunchConfig from a JSON object (e.g. '{"warps_scan": 4}')."""
    if not text:
        return
    import importlib

    launch = importlib.import_module("linmix.ops.delta_rule.triton").LAUNCH
    for name, value in json.loads(text).items():
        if not hasattr(launch, name):
            raise SystemExit(f"error: --delta-launch: LaunchConfig has no field {name!r}")
        setattr(launch, name, value)


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, quantiles=[0.5])


def _bench_graph(fn) -> float | str:
    """ms per call with ``fn`` replayed from a CUDA graph: the device time alone, without the host's per-call
    Python and launch time (what a graph-captured decoding loop pays); a call that cannot be captured says why."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    except Exception as e:  # noqa: BLE001 -- reported in the row
        return f"{type(e).__name__}: {e}"[:120]


def time_op(fn, q, k, v, extra, do) -> tuple[float, float]:
    leaves = [q, k, v, *extra.values()]
    for t in leaves:
        t.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            fn(q, k, v, **extra)

    def fwd_bwd():
        o = fn(q, k, v, **extra)[0]
        torch.autograd.grad(o, leaves, do)

    return _bench(fwd), _bench(fwd_bwd)


def bench(args) -> list[dict]:
    rates = measure_rates("cuda")
    print(f"measured: matmul {rates.flops / 1e12:.0f} TFLOP/s, copy {rates.bytes / 1e12:.2f} TB/s", file=sys.stderr)
    fla = fla_ops(bypass_hopper_guard=True) if args.fla else {}
    rows = []
    H, K, V = 16, 128, 128
    for T in args.seq_lens:
        B = max(1, 65536 // T)
        q, k, v, _, _ = make_inputs("linear_attn", B, T, H, K, V, torch.bfloat16)
        do = torch.randn_like(v)

        def sdpa(q, k, v):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            return (o.transpose(1, 2),)

        f, fb = time_op(sdpa, q, k, v, {}, do)
        rows.append({"op": "sdpa_causal", "impl": "torch SDPA", "T": T, "B": B, "fwd_ms": f, "fwdbwd_ms": fb,
                     "floor_fwd_ms": attention_floor(B, T, H, K, V, rates, backward=False) * 1e3,
                     "floor_fwdbwd_ms": attention_floor(B, T, H, K, V, rates, backward=True) * 1e3})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        for op in args.ops:
            q, k, v, extra, _ = make_inputs(op, B, T, H, K, V, torch.bfloat16)
            impls = [("linmix", lambda *a, op=op, **e: call(op, "triton", *a, e))]
            if op in fla:
                impls.append(("fla " + (fla_version() or "?"), fla[op]))
            floor = (op_floor(op, B, T, H, K, V, rates, backward=False) * 1e3,
                     op_floor(op, B, T, H, K, V, rates, backward=True) * 1e3)
            for name, fn in impls:
                t0 = time.time()
                try:
                    f, fb = time_op(fn, q, k, v, extra, do)
                except Exception as e:  # noqa: BLE001 -- report and go on with the other rows
                    print(f"{op} {name}: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                rows.append({"op": op, "impl": name, "T": T, "B": B, "fwd_ms": f, "fwdbwd_ms": fb,
                             "floor_fwd_ms": floor[0], "floor_fwdbwd_ms": floor[1],
                             "wall_s": round(time.time() - t0, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del q, k, v, extra
        torch.cuda.empty_cache()
    return rows


def decode(args) -> list[dict]:
    """One decode step per op (one token, state carried): ``step_us`` called from Python as a model's
    eager loop does (the host's per-call time included, which can exceed the kernel's), ``graph_us``
    replayed from a CUDA graph (the device time alone)."""
    rates = measure_rates("cuda")
    fla = fla_decode_ops() if args.fla else {}
    B, H, K, V = 64, 16, 128, 128
    rows = []
    for op in args.ops:
        q, k, v, extra, h0 = make_inputs(op, B, 1, H, K, V, torch.bfloat16, state=True)
        impls = [("linmix", lambda q, k, v, op=op, **kw: call(op, "triton", q, k, v, {}, **kw))]
        if op in fla:
            impls.append(("fla " + (fla_version() or "?"), fla[op]))
        for name, fn in impls:
            def step(fn=fn):
                return fn(q, k, v, **extra, initial_state=h0, output_final_state=True)

            with torch.no_grad():
                us = _bench(step) * 1e3
                graph = _bench_graph(step)
            rows.append({"op": op, "impl": name, "B": B, "step_us": us,
                         "graph_us": graph * 1e3 if isinstance(graph, float) else graph,
                         "floor_us": decode_floor(B, H, K, V, rates) * 1e6})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    # SDPA decoding one token against a KV cache of 1K / 8K / 32K tokens.
    for L in (1024, 8192, 32768):
        qd = torch.randn(B, H, 1, K, device="cuda", dtype=torch.bfloat16)
        kc = torch.randn(B, H, L, K, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn(B, H, L, V, device="cuda", dtype=torch.bfloat16)
        us = _bench(lambda: F.scaled_dot_product_attention(qd, kc, vc)) * 1e3
        rows.append({"op": f"sdpa_kv{L // 1024}k", "impl": "torch SDPA", "B": B, "step_us": us,
                     "floor_us": (2 * B * H * L * K * 2) / rates.bytes * 1e6})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def compile_check(args) -> list[dict]:
    """A layer compiled with torch.compile (inductor) against the same layer in eager mode, bf16."""
    from linmix.layers import get_mixer_class

    rows = []
    for name in args.mixers:
        torch.manual_seed(0)
        layer = get_mixer_class(name)(hidden_size=1024, num_heads=8).cuda().to(torch.bfloat16)
        x = torch.randn(4, 2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)

        def run(fn):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            y = fn(x)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(dy)
            return y.detach(), x.grad.detach(), [p.grad.detach() for p in layer.parameters() if p.grad is not None]

        y_e, dx_e, dp_e = run(layer)
        t0 = time.time()
        compiled = torch.compile(layer)
        y_c, dx_c, dp_c = run(compiled)
        wall = time.time() - t0
        row = {"mixer": name, "o": rel_l2(y_c, y_e), "dx": rel_l2(dx_c, dx_e),
               "dparams_max": max(rel_l2(a, b) for a, b in zip(dp_c, dp_e)), "compile_s": round(wall, 1),
               "eager_ms": _bench(lambda: run(layer)), "compiled_ms": _bench(lambda: run(compiled))}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def crossover(args) -> list[dict]:
    """Short sequences: the fused recurrent kernel against the chunk kernels, inference and training (B=64)."""
    import linmix.ops.common.fused_recurrent as fused

    limits = (fused.FUSED_MAX_TOKENS_INFERENCE, fused.FUSED_MAX_TOKENS_TRAINING)
    rows = []
    for op in args.ops:
        for T in (1, 4, 16, 32, 64, 128, 256):
            q, k, v, extra, h0 = make_inputs(op, 64, T, 16, 128, 128, torch.bfloat16, state=True)
            do = torch.randn_like(v)
            row = {"op": op, "T": T}
            for route, lim in (("fused", (10**9, 10**9)), ("chunk", (0, 0))):
                fused.FUSED_MAX_TOKENS_INFERENCE, fused.FUSED_MAX_TOKENS_TRAINING = lim
                with torch.no_grad():
                    row[f"{route}_inf_us"] = _bench(lambda: call(op, "triton", q, k, v, extra, initial_state=h0)) * 1e3
                if T <= 64:
                    row[f"{route}_train_us"] = time_op(lambda q, k, v, **e: call(op, "triton", q, k, v, e),
                                                       q, k, v, extra, do)[1] * 1e3
            fused.FUSED_MAX_TOKENS_INFERENCE, fused.FUSED_MAX_TOKENS_TRAINING = limits
            for t in (q, k, v, *extra.values()):
                t.requires_grad_(False)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def apply_variant(op: str, text: str) -> None:
    """One --variants launch for ``op``: '"overlap": false' (any op) switches off the backward's side-stream
    scan (linmix.ops.common.streams.OVERLAP); the other fields go to gla's or the delta rule's launch table."""
    fields = json.loads(text or "{}")
    if "overlap" in fields:
        streams.OVERLAP = bool(fields.pop("overlap"))
    if op == "gla":
        apply_gla_launch(json.dumps(fields))
    elif op in ("delta_rule", "gated_delta_rule"):
        apply_delta_launch(json.dumps(fields))
    elif fields:
        raise SystemExit(f"error: --variants: {op} has no launch table; only 'overlap' applies, got {sorted(fields)}")


def _launch_state():
    """Snapshot of both launch tables and the overlap switch, and a function that restores it."""
    import copy
    import importlib

    delta = importlib.import_module("linmix.ops.delta_rule.triton")
    gla = importlib.import_module("linmix.ops.gla.triton")
    saved = copy.deepcopy(delta.LAUNCH), copy.deepcopy(gla.LAUNCH), streams.OVERLAP

    def restore():
        delta.LAUNCH.__dict__.update(copy.deepcopy(saved[0]).__dict__)
        gla.LAUNCH.__dict__.update(copy.deepcopy(saved[1]).__dict__)
        streams.OVERLAP = saved[2]

    return restore


def _max_error(op: str, B: int, T: int) -> float:
    """Max relative L2 error of o, final state and every gradient (bf16 Triton vs float32 torch), H=16, K=V=128."""
    args = argparse.Namespace(isolate=False, force_kernels=False, ops=[op], head_dims=["128"], shapes=[(B, T)])
    return check(args)[0]["max"]


def tune(args) -> list[dict]:
    """Each --variants launch (JSON; a delta-rule LaunchConfig object for the delta ops, a per-kernel
    object for gla, and for any op ``"overlap": false`` to run the backward's recomputing scan on the
    current stream; ``{}`` is the default launch), in one process: max error at 1 x 4096 and
    fwd / fwd+bwd ms at ``--tune-shape`` (B x T, default 8 x 8192).

    Variants run in order and rows are printed as they finish; a Hopper fault ends the process (the
    rows before it are in the log), so run doubtful launches one per process.
    """
    if args.isolate:
        return _tune_isolated(args)
    restore = _launch_state()
    rows = []
    for op in args.ops:
        for variant in args.variants or ["{}"]:
            restore()
            apply_variant(op, variant)
            row = {"op": op, "launch": variant}
            try:
                row["max_err"] = _max_error(op, 1, 4096)
                q, k, v, extra, _ = make_inputs(op, *args.tune_shape, 16, 128, 128, torch.bfloat16)
                row["fwd_ms"], row["fwdbwd_ms"] = time_op(lambda *a, **e: call(op, "triton", *a, e), q, k, v, extra,
                                                          torch.randn_like(v))
            except Exception as e:  # noqa: BLE001 -- a compile error ends this variant only
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    restore()
    return rows


def _tune_isolated(args) -> list[dict]:
    """``tune --isolate``: each (op, variant) in its own process, one after the other (timings must not
    share the GPU); a variant that faults or fails to compile gives an error row, the others still run."""
    rows = []
    for op in args.ops:
        for variant in args.variants or ["{}"]:
            argv = ["--ops", op, "--variants", variant, "--tune-shape", "x".join(map(str, args.tune_shape))]
            found, error = _in_subprocess("tune", argv, args.case_timeout)
            rows += found if not error else [{"op": op, "launch": variant, "error": error}]
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def profile(args) -> list[dict]:
    """Per-kernel CUDA time of one fwd+bwd at ``--tune-shape`` (B x T; H = 16, K = V = 128, bf16), mean of 5 runs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fla = fla_ops(bypass_hopper_guard=True) if args.fla else {}
    rows = []
    for op in args.ops:
        impls = [("linmix", lambda *a, op=op, **e: call(op, "triton", *a, e))]
        if op in fla:
            impls.append(("fla", fla[op]))
        for name, fn in impls:
            q, k, v, extra, _ = make_inputs(op, *args.tune_shape, 16, 128, 128, torch.bfloat16)
            leaves = [q, k, v, *extra.values()]
            for t in leaves:
                t.requires_grad_(True)
            do = torch.randn_like(v)

            def step():
                o = fn(q, k, v, **extra)[0]
                torch.autograd.grad(o, leaves, do)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            kernels = [(e.key, e.device_time_total / 5e3, e.count // 5) for e in prof.key_averages()
                       if e.device_time_total > 0]
            total = sum(ms for _, ms, _ in kernels)
            for kernel, ms, count in sorted(kernels, key=lambda x: -x[1]):
                if ms >= 0.005:
                    rows.append({"op": op, "impl": name, "kernel": kernel[:60], "calls": count, "ms": round(ms, 3),
                                 "share": round(ms / total, 3)})
            rows.append({"op": op, "impl": name, "kernel": "TOTAL", "calls": 0, "ms": round(total, 3), "share": 1.0})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["check", "bench", "decode", "compile", "crossover", "profile", "tune"])
    p.add_argument("--out", default=".", help="directory for the table (.md) and rows (.json)")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--shapes", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                   default=[(2, 8192), (1, 32768)], help="BxT shapes for check (default: 2x8192 1x32768)")
    p.add_argument("--tune-shape", type=lambda s: tuple(int(x) for x in s.split("x")), default=(8, 8192),
                   help="BxT of the tune and profile timings (default: 8x8192)")
    p.add_argument("--head-dims", nargs="+", default=["128"],
                   help="head dims for check: D (K = V = D) or K:V, e.g. 16:32 (default: 128)")
    p.add_argument("--isolate", action="store_true",
                   help="check: each case in its own process with CUDA_LAUNCH_BLOCKING=1 (a fault ends one case only); "
                        "tune: each variant in its own process")
    p.add_argument("--force-kernels", action="store_true",
                   help="check: run the Triton chunk kernels even where linmix gates them off on CUDA")
    p.add_argument("--workers", type=int, default=4, help="isolated check cases run at once (default: 4)")
    p.add_argument("--case-timeout", type=float, default=300.0, help="seconds per isolated check case")
    p.add_argument("--delta-launch", metavar="JSON",
                   help="fields of linmix.ops.delta_rule.triton.LAUNCH for this run, e.g. '{\"warps_scan\": 4}'")
    p.add_argument("--gla-launch", metavar="JSON",
                   help="per-kernel fields of linmix.ops.gla.triton.LAUNCH, e.g. '{\"dv\": {\"num_warps\": 4}}'")
    p.add_argument("--variants", nargs="+", metavar="JSON",
                   help="check --isolate: run every case under each --delta-launch variant; writes the first "
                        "variant that passes everywhere to OUT/best_launch.json. tune: the launches to time (any op: "
                        "'{\"overlap\": false}' runs the backward without the side-stream scan)")
    p.add_argument("--mixers", nargs="+", default=["gla", "gated_deltanet", "linear_attn"],
                   help="layers for the compile check")
    p.add_argument("--fla", action="store_true", help="also time fla-core (its Hopper guard bypassed)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    if not args.isolate:
        apply_delta_launch(args.delta_launch)
        apply_gla_launch(args.gla_launch)
    rows = {"check": check, "bench": bench, "decode": decode, "compile": compile_check,
            "crossover": crossover, "profile": profile, "tune": tune}[args.what](args)
    import triton

    head = (f"# {args.what}: {date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, fla {fla_version() if args.fla else '-'}\n\n")
    text = head + markdown_table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.what}.md").write_text(text + "\n")
    (out / f"{args.what}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
