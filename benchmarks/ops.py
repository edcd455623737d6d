"""Time every op (fwd and fwd+bwd) per backend next to causal SDPA; print a markdown table.

    python benchmarks/ops.py                 # CPU: T in {512, 2048, 8192}, B=1, H=4, K=V=64, float32
    python benchmarks/ops.py --quick         # CPU: T in {512, 2048}
    python benchmarks/ops.py --device cuda   # GPU: bf16, B*T = 65,536, H=16, K=V=128

Same options as ``linmix bench ops`` (both use linmix.bench.ops.add_arguments / run_from_args).
"""

from __future__ import annotations

import argparse
import sys

from linmix.bench.ops import add_arguments, run_from_args


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        report = run_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
