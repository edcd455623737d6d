"""Time every op (fwd and fwd+bwd) per backend next to causal SDPA; print a markdown table.

    python benchmarks/ops.py                 # CPU: T in {512, 2048, 8192}, B=1, H=4, K=V=64, float32
    python benchmarks/ops.py --quick         # CPU: T in {512, 2048} (what `make demo` runs)
    python benchmarks/ops.py --device cuda   # GPU: bf16, B*T = 65,536, H=16, K=V=128
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date

import torch

from linmix.bench.ops import default_cases, format_table, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--quick", action="store_true", help="shorter CPU run: T in {512, 2048}")
    p.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths T")
    p.add_argument("--ops", nargs="+", help="ops to time (default: all)")
    p.add_argument("--backends", nargs="+", help="backends (default: torch reference on CPU, triton torch on CUDA)")
    p.add_argument("--reference-max-len", type=int, default=2048, help="skip the reference loop above this T")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    cases = default_cases()
    if args.ops:
        unknown = set(args.ops) - {c.name for c in cases}
        if unknown:
            print(f"error: unknown ops {sorted(unknown)}; choose from {[c.name for c in cases]}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.name in args.ops]
    if cuda:
        seq_lens = args.seq_lens or [2048, 8192, 32768]
        rows = run(cases, args.backends or ["triton", "torch"], seq_lens, tokens=65536, heads=16, head_dim=128,
                   device=args.device, dtype=torch.bfloat16, reference_max_len=0,
                   progress=lambda s: print(s, file=sys.stderr, flush=True))
        where = torch.cuda.get_device_name()
    else:
        seq_lens = args.seq_lens or ([512, 2048] if args.quick else [512, 2048, 8192])
        rows = run(cases, args.backends or ["torch", "reference"], seq_lens, batch=1, heads=4, head_dim=64,
                   reference_max_len=args.reference_max_len,
                   progress=lambda s: print(s, file=sys.stderr, flush=True))
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# linmix op benchmark, {date.today()}, {where}, torch {torch.__version__}\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
