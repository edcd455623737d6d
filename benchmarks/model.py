"""Model-level benchmark: training throughput and generation cost of linear, hybrid and attention LMs.

    python benchmarks/model.py --device cuda                 # ~350M params: 24 layers, hidden 1024
    python benchmarks/model.py --device cpu --tiny           # a smoke run of the same code on the CPU

Three configs share one code path: all Gated DeltaNet, Gated DeltaNet : attention 3:1, and all
attention (SDPA). Training: fwd+bwd tokens/s at T = 2K and 16K (bf16 autocast on CUDA). Generation:
per-token decode latency and peak memory after a prefill of 1K / 8K / 32K tokens at batch 1 and 16.
Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from datetime import date

import torch

import linmix
from linmix.models import LinmixConfig, LinmixForCausalLM

CONFIGS = {
    "gated_deltanet": ["gated_deltanet"],
    "hybrid 3:1": ["gated_deltanet"] * 3 + ["attention"],
    "attention": ["attention"],
}


def build(layers: list[str], args, device, dtype) -> LinmixForCausalLM:
    cfg = LinmixConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.num_layers, layers=layers,
                       num_heads=args.heads)
    return LinmixForCausalLM(cfg).to(device=device, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(model, B, T, device, steps) -> float:
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for i in range(steps + 1):
        if i == 1:
            sync(device)
            t0 = time.perf_counter()
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    sync(device)
    return B * T * steps / (time.perf_counter() - t0)


@torch.no_grad()
def decode_cost(model, B, context, device, steps, prefill_chunk) -> tuple[float, float]:
    """(ms per decoded token, peak GiB) after a prefill of `context` tokens."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (B, context), device=device)
    cache = None
    for a in range(0, context, prefill_chunk):
        out = model(input_ids=ids[:, a:a + prefill_chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    for i in range(steps + 2):
        if i == 2:
            sync(device)
            t0 = time.perf_counter()
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
    sync(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return ms, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small model and shapes (smoke test)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        args.hidden, args.num_layers, args.heads, args.vocab = 128, 4, 4, 1000
        train_shapes, contexts, batches, steps, chunk = [(2, 256)], [128, 512], [1, 4], 4, 256
    else:
        args.hidden, args.num_layers, args.heads, args.vocab = 1024, 24, 16, 32000
        train_shapes, contexts, batches, steps, chunk = [(4, 2048), (1, 16384)], [1024, 8192, 32768], [1, 16], 16, 4096
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# linmix model benchmark, {date.today()}, {where}, torch {torch.__version__}, linmix {linmix.__version__}")
    train_rows, decode_rows = [], []
    for name in args.configs:
        model = build(CONFIGS[name], args, device, torch.float32 if not args.skip_train else dtype)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name}: {params:.0f}M parameters", file=sys.stderr, flush=True)
        if not args.skip_train:
            for B, T in train_shapes:
                try:
                    tps = train_throughput(model, B, T, device, steps=max(2, steps // 4))
                    train_rows.append(f"| {name} | {params:.0f}M | {B} x {T} | {tps / 1e3:.1f}k |")
                except torch.OutOfMemoryError:
                    train_rows.append(f"| {name} | {params:.0f}M | {B} x {T} | OOM |")
                print(train_rows[-1], file=sys.stderr, flush=True)
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
        if not args.skip_decode:
            model = model.to(dtype).eval()
            for B in batches:
                for ctx in contexts:
                    try:
                        ms, peak = decode_cost(model, B, ctx, device, steps, chunk)
                        decode_rows.append(f"| {name} | {B} | {ctx} | {ms:.2f} | {peak:.2f} |")
                    except torch.OutOfMemoryError:
                        decode_rows.append(f"| {name} | {B} | {ctx} | OOM | - |")
                    print(decode_rows[-1], file=sys.stderr, flush=True)
        del model
        gc.collect()
    if train_rows:
        print("\n| model | params | batch x T | train tokens/s (fwd+bwd) |\n|---|---|---|---|")
        print("\n".join(train_rows))
    if decode_rows:
        print("\n| model | batch | context | ms / decoded token | peak GiB |\n|---|---|---|---|---|")
        print("\n".join(decode_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
