"""The ``linmix`` command: recall benchmarks, kernel benchmarks, generation, model conversion.

    linmix recall --preset quick                      # MQAR recall of every mixer, a few CPU minutes
    linmix bench ops --quick                          # op timings (fwd, fwd+bwd) next to SDPA
    linmix generate --model DIR --prompt-ids 1,2,3    # load a saved model and generate
    linmix convert ...                                # linearize a pretrained transformer

``main(argv)`` returns the exit status: 0 on success, 2 on a usage error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_MISSING, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, not printed + exit) and whose help keeps
    the examples' layout."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# -- argument types -----------------------------------------------------------------------------------

def _comma_list(kind: Callable[[str], object], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{mixer: {{argument: value}}}}, got {text!r}")
    return value


# -- linmix recall ------------------------------------------------------------------------------------

RECALL_EPILOG = """\
Trains, for each mixer, the 2-layer MQAR probe (short convolution, then the mixer; no MLP) over a
learning-rate sweep, and prints accuracy per (length, kv pairs) test slice (best over the sweep)
next to each model's recurrent state size. Writes results.json, per-run JSONL logs and (with
matplotlib) recall.png to --out.

presets:
  quick    CPU, a few minutes; separates the mixers already (d_model 64, 800 steps, lr 1e-2)
  zoology  Zoology Figure 2 (3 train/test lengths, d_model 64-512, 4 lrs, 64 epochs): GPU
  based    Based Figure 2 (train mix to 256 tokens, tests to 1024, d_model 64-256, 4 lrs, 32 epochs): GPU
  micro    seconds; a smoke test (accuracies mean nothing)

examples:
  linmix recall --preset quick                     # about 5 minutes on one core
  linmix recall --preset quick --jobs 2            # two trainings at once: about 3.5 minutes on 2 cores
  linmix recall --preset quick --mixers attention,gla,deltanet --out /tmp/recall
  linmix recall --preset based --device cuda --jobs 8 --d-models 128 --lrs 1e-3,3e-3,1e-2 --epochs 3
  linmix recall --preset micro --mixers based --mixer-kwargs '{"based": {"feature_dim": 8}}'
  linmix recall --preset based --device cuda --jobs 12 --resume   # continue an interrupted run
"""


def _add_recall(sub) -> None:
    from linmix.bench.recall import PRESETS

    p = sub.add_parser("recall", help="MQAR recall benchmark of the token mixers", epilog=RECALL_EPILOG,
                       description="MQAR recall benchmark: accuracy per test slice against recurrent state size.")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="benchmark configuration (default: quick)")
    p.add_argument("--mixers", type=_comma_list(str, "mixer names"), metavar="A,B,C",
                   help="mixers to compare (default: the preset's; quick: attention, based, gated_deltanet, "
                        "deltanet, gla, linear_attn; zoology and based add mamba2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="trainings run at once, one process each (default: 1; try 8-16 on one H200)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: ./recall-<preset>)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="data and init seed (default: 0)")
    p.add_argument("--d-models", type=_comma_list(_positive_int, "positive ints"), metavar="D,D",
                   help="override the preset's model widths")
    p.add_argument("--lrs", type=_comma_list(float, "numbers"), metavar="LR,LR",
                   help="override the preset's learning rates")
    p.add_argument("--epochs", type=_positive_int, metavar="N", help="override the preset's epochs")
    p.add_argument("--mixer-kwargs", type=_json_object, metavar="JSON",
                   help='extra mixer arguments, e.g. \'{"gla": {"expand_k": 1.0}}\'')
    p.add_argument("--resume", action="store_true",
                   help="keep the runs an earlier call with the same --out and settings finished (each run's "
                        "record is saved in DIR/runs/ as it ends); train only the others")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads per training process (default: 1 on the CPU: the probe models are "
                        "tiny, intra-op threads cost more than they give; use --jobs to fill the cores)")
    p.set_defaults(run=_run_recall)


def _run_recall(args: argparse.Namespace) -> int:
    import torch

    from linmix.bench.recall import check_run, get_preset, run_recall

    if args.threads or args.device == "cpu":
        torch.set_num_threads((args.threads or 1) * (args.jobs if args.device == "cpu" else 1))
    preset = get_preset(args.preset)
    changes = {}
    if args.d_models:
        changes["d_models"] = tuple(args.d_models)
    if args.lrs:
        if any(not lr > 0 for lr in args.lrs):
            raise UsageError(f"linmix recall: error: --lrs must be positive, got {args.lrs}")
        changes["lrs"] = tuple(args.lrs)
    if args.epochs:
        changes["epochs"] = args.epochs
    if args.mixer_kwargs:
        merged = {k: dict(v) for k, v in preset.mixer_kwargs.items()}
        for name, kwargs in args.mixer_kwargs.items():
            merged.setdefault(name, {}).update(kwargs)
        changes["mixer_kwargs"] = merged
    preset = preset.replace(**changes)
    out = args.out or f"recall-{preset.name}"
    mixers = check_run(preset, args.mixers, args.device, args.jobs)
    num_runs = len(mixers) * len(preset.d_models) * len(preset.tasks) * len(preset.lrs)

    from tqdm.auto import tqdm

    bar = tqdm(total=num_runs, desc=f"recall {preset.name}", unit="run", dynamic_ncols=True)

    def on_result(record: dict) -> None:
        bar.set_postfix_str(f"{record['mixer']} d={record['d_model']} lr={record['lr']:.1e} "
                            f"acc={record['overall_accuracy']:.3f}")
        bar.update(1)

    try:
        results = run_recall(preset, mixers=mixers, device=args.device, jobs=args.jobs, seed=args.seed, out_dir=out,
                             progress=args.jobs == 1 and sys.stderr.isatty(), on_result=on_result,
                             resume=args.resume)
    finally:
        bar.close()
    meta = results.meta
    print(f"# linmix recall --preset {preset.name}: {num_runs} runs in {meta['wall_time_s']:.0f} s on "
          f"{meta['device']} (jobs={meta['jobs']}, threads per job={meta['threads_per_job']}, seed={meta['seed']}, "
          f"torch {meta['torch']})\n")
    print(results.table())
    print(f"\nresults: {out}/results.json" + (f", plot: {out}/recall.png" if (_has_matplotlib()) else ""))
    return EXIT_OK


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# -- linmix bench ---------------------------------------------------------------------------------------

BENCH_OPS_EPILOG = """\
examples:
  linmix bench ops --quick                        # CPU: T in {512, 2048}, B=1, H=4, K=V=64, float32
  linmix bench ops --ops gla delta_rule --seq-lens 1024
  linmix bench ops --device cuda                  # GPU: bf16, B*T = 65,536, H=16, K=V=128
"""


def _add_bench(sub) -> None:
    from linmix.bench.ops import add_arguments

    bench = sub.add_parser("bench", help="kernel benchmarks", description="Kernel benchmarks.",
                           epilog="examples:\n  linmix bench ops --quick\n")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{ops}", required=True)
    ops = bench_sub.add_parser("ops", help="fwd and fwd+bwd time of every op and backend next to SDPA",
                               description="Time every op (fwd and fwd+bwd) per backend next to causal SDPA; "
                                           "print a markdown table.", epilog=BENCH_OPS_EPILOG)
    add_arguments(ops)
    ops.set_defaults(run=_run_bench_ops)


def _run_bench_ops(args: argparse.Namespace) -> int:
    from linmix.bench.ops import run_from_args

    print(run_from_args(args))
    return EXIT_OK


# -- linmix generate ------------------------------------------------------------------------------------

GENERATE_EPILOG = """\
examples:
  linmix generate --model ./my-model --prompt-ids 1,2,3 --max-new-tokens 16
  linmix generate --model ./my-model --prompt "To be, or not to be" --temperature 0.8 --seed 1
  linmix generate --model ./my-model --prompt-ids 5,7 --device cuda --dtype bfloat16

--model is a folder written by save_pretrained() (e.g. Trainer.save); --prompt needs a tokenizer
saved in that folder (tokenizer.save_pretrained(DIR)).
"""


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate from a saved linmix model", epilog=GENERATE_EPILOG,
                       description="Load a saved LinmixForCausalLM, generate from a prompt, print tokens and tokens/s.")
    p.add_argument("--model", required=True, metavar="DIR", help="folder of a saved model (save_pretrained)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", type=_comma_list(int, "token ids"), metavar="1,2,3", help="prompt token ids")
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (needs a tokenizer saved with the model)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N",
                   help="tokens to generate (default: 32)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-k", type=_non_negative_int, default=0, metavar="K", help="sample from the top K (0: all)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: float32)")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"linmix generate: error: --model {args.model}: no saved model there (config.json missing)")
    if args.temperature < 0:
        raise UsageError(f"linmix generate: error: --temperature must be >= 0, got {args.temperature}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("linmix generate: error: --device cuda but no CUDA device is available")

    from transformers.utils import logging as hf_logging

    from linmix.models import LinmixConfig, LinmixForCausalLM

    hf_logging.disable_progress_bar()  # no "Loading weights" bar: the command prints its own lines
    try:
        config = LinmixConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise UsageError(f"linmix generate: error: --model {args.model}: not a linmix model "
                         f"({str(err).splitlines()[0]})") from None
    tokenizer = None
    if args.prompt is not None:
        if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise UsageError(f"linmix generate: error: --prompt needs a tokenizer saved in {args.model} "
                             "(tokenizer.save_pretrained(DIR)); use --prompt-ids otherwise")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as err:
            raise UsageError(f"linmix generate: error: cannot load the tokenizer in {args.model}: "
                             f"{str(err).splitlines()[0]}") from None
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([args.prompt_ids], dtype=torch.long)
    vocab = config.vocab_size
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise UsageError(f"linmix generate: error: prompt token ids must be in [0, {vocab}), got {ids.tolist()[0]}")
    model = LinmixForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    ids = ids.to(args.device)
    sampling = args.temperature > 0
    kwargs = {"do_sample": sampling, "max_new_tokens": args.max_new_tokens}
    if sampling:
        kwargs.update(temperature=args.temperature, top_k=args.top_k or None)
        torch.manual_seed(args.seed)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        kwargs["pad_token_id"] = model.config.eos_token_id if model.config.eos_token_id is not None else 0
    # no_grad rather than inference_mode: the ops keep CPU scratch buffers between calls, and a buffer
    # allocated under inference_mode could not be written outside it later in the same process.
    with torch.no_grad():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    print("tokens: " + ",".join(map(str, new)))
    if tokenizer is not None:
        print("text: " + tokenizer.decode(new, skip_special_tokens=True))
    print(f"{len(new)} new tokens in {seconds:.3f} s: {len(new) / max(seconds, 1e-9):.1f} tokens/s "
          f"(prompt {ids.shape[1]} tokens, {args.device}, {args.dtype})")
    return EXIT_OK


# -- linmix convert (lazy: its module lives in linmix.convert) ---------------------------------------------

CONVERT_HELP = "linearize a pretrained transformer (see 'linmix convert --help')"


def _add_convert(sub) -> None:
    # Registered without options: the real parser comes from linmix.convert.cli when the command runs,
    # so that `linmix` does not import the conversion stack (and works where it is not installed).
    p = sub.add_parser("convert", help=CONVERT_HELP, add_help=False)
    p.set_defaults(run=None)


def _run_convert(rest: Sequence[str]) -> int:
    import importlib

    try:
        convert_cli = importlib.import_module("linmix.convert.cli")
    except ImportError as err:
        missing = getattr(err, "name", None) or "linmix.convert.cli"
        raise UsageError(f"linmix convert: error: model conversion is not available in this install "
                         f"(cannot import {missing}; try: pip install 'linmix[convert]')") from None
    parser = _Parser(prog="linmix convert", description="Linearize a pretrained transformer into a linmix model.")
    convert_cli.add_arguments(parser)
    args = parser.parse_args(list(rest))
    return int(convert_cli.main(args) or 0)


# -- main -------------------------------------------------------------------------------------------

MAIN_EPILOG = """\
examples:
  linmix recall --preset quick                     # which mixer remembers what: a few CPU minutes
  linmix bench ops --quick                         # op timings next to SDPA
  linmix generate --model DIR --prompt-ids 1,2,3   # generate from a saved model
  linmix <command> --help                          # options and examples of a command
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``linmix`` argument parser (the ``convert`` command's options are added when it runs)."""
    parser = _Parser(prog="linmix", description="linmix: linear attention and hybrid models.", epilog=MAIN_EPILOG)
    try:
        from importlib.metadata import version

        parser.add_argument("--version", action="version", version=f"linmix {version('linmix')}")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source tree): no --version
        pass
    sub = parser.add_subparsers(dest="command", metavar="{recall,bench,generate,convert}", required=True)
    _add_recall(sub)
    _add_bench(sub)
    _add_generate(sub)
    _add_convert(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``linmix`` command line; returns the exit status (0 ok, 1 a missing optional dependency, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        if args.command == "convert":
            return _run_convert(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return int(args.run(args))
    except UsageError as err:
        print(str(err).splitlines()[0], file=sys.stderr)
        return EXIT_USAGE
    except ValueError as err:  # the library's answer to a bad value (LINMIX_TRACEBACK=1 shows where)
        if os.environ.get("LINMIX_TRACEBACK"):
            raise
        print(f"linmix: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as err:  # a missing optional dependency: linmix's messages name the extra to install
        if os.environ.get("LINMIX_TRACEBACK"):
            raise
        print(f"linmix: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return EXIT_MISSING
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print("linmix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
