"""What a conversion is worth: the student against its teacher.

* language modelling on held-out text: perplexities, top-1 next-token agreement, KL(teacher || student);
* retrieval at several context lengths, text-level (the prompts are built with the teacher's
  tokenizer, as real models are tested; the token-level generators of :mod:`linmix.tasks` suit
  models trained on them):
  - passkey (Mohtashami & Jaggi 2023): a 5-digit key in repetitive filler
    ("The grass is green. The sky is blue. ..."), then "What is the pass key? The pass key is";
  - needle in a haystack: "The special magic number for <city> is <7 digits>." inside held-out
    Shakespeare, then the question;
  scored by teacher forcing: correct when every answer token is the model's top-1 prediction,
  which is exactly when greedy decoding would produce the answer;
* decoding speed (greedy ``generate``, tokens/s after a prompt) and the decoding state's memory
  against the teacher's KV cache at several context lengths.

:func:`format_report` renders the dict of :func:`evaluate` (also written as JSON by the CLI) as
Markdown tables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from linmix.convert.distill import kl_per_token

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it later.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE_KEYS = ("Paris", "Lisbon", "Cairo", "Oslo", "Lima", "Kyoto", "Quebec", "Nairobi", "Dublin", "Sydney",
               "Havana", "Vienna")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def compare_language_models(student: nn.Module, teacher: nn.Module | None, chunks: torch.Tensor, *,
                            batch_size: int = 4) -> dict[str, float]:
    """Next-token statistics on token chunks [N, L] (e.g. held-out text).

    Returns:
        ``student_ppl`` (exp of the mean next-token cross-entropy over N (L - 1) positions) and,
        with a teacher, ``teacher_ppl``, ``ppl_ratio`` (student / teacher), ``top1_agreement``
        (fraction of positions where both predict the same next token) and ``kl`` (mean
        KL(teacher || student) in nats per position).
    """
    sums = {"student": 0.0, "teacher": 0.0, "agree": 0.0, "kl": 0.0}
    positions = 0
    device = _device(student)
    for batch in chunks.split(batch_size):
        ids = batch.to(device)
        targets = ids[:, 1:].flatten()
        logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
        sums["student"] += float(F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum"))
        if teacher is not None:
            t_logits = teacher(input_ids=ids.to(_device(teacher)), use_cache=False).logits[:, :-1].float()
            t_logits = t_logits.to(device)
            sums["teacher"] += float(F.cross_entropy(t_logits.flatten(0, 1), targets, reduction="sum"))
            sums["agree"] += float((logits.argmax(-1) == t_logits.argmax(-1)).sum())
            sums["kl"] += float(kl_per_token(logits, t_logits).sum())
        positions += targets.numel()
    out = {"student_ppl": math.exp(sums["student"] / positions), "positions": positions}
    if teacher is not None:
        out.update(teacher_ppl=math.exp(sums["teacher"] / positions), top1_agreement=sums["agree"] / positions,
                   kl=sums["kl"] / positions)
        out["ppl_ratio"] = out["student_ppl"] / out["teacher_ppl"]
    return out


@dataclass
class RetrievalExample:
    """A prompt whose last ``answer_len`` tokens are the answer: input_ids [L] (int64)."""

    input_ids: torch.Tensor
    answer_len: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_examples(tokenizer: Any, context_len: int, num_examples: int, *, seed: int = 0,
                     depth: float | None = None, digits: int = 5) -> list[RetrievalExample]:
    """Text-level passkey prompts of exactly ``context_len`` tokens (answer included).

    Layout: intro, filler up to the key sentence (at ``depth`` of the filler, a fraction; None =
    uniform per example, rounded to a whole filler sentence group), the key sentence
    "The pass key is N. Remember it. N is the pass key.", filler, then
    "What is the pass key? The pass key is" and the answer " N".
    """
    generator = torch.Generator().manual_seed(seed)
    intro, filler = _encode(tokenizer, PASSKEY_INTRO), _encode(tokenizer, PASSKEY_FILLER)
    query = _encode(tokenizer, " What is the pass key? The pass key is")
    examples = []
    for _ in range(num_examples):
        key = "".join(str(int(d)) for d in torch.randint(1, 10, (digits,), generator=generator))
        key_ids = _encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.")
        answer = _encode(tokenizer, f" {key}")
        budget = context_len - len(intro) - len(key_ids) - len(query) - len(answer)
        if budget < len(filler):
            raise ValueError(f"passkey_examples: context_len={context_len} leaves no room for filler")
        stream = (filler * (budget // len(filler) + 1))[:budget]
        units = budget // len(filler)
        frac = float(torch.rand((), generator=generator)) if depth is None else depth
        cut = round(frac * units) * len(filler)
        ids = intro + stream[:cut] + key_ids + stream[cut:] + query + answer
        examples.append(RetrievalExample(torch.tensor(ids, dtype=torch.long), len(answer)))
    return examples


def needle_examples(tokenizer: Any, haystack: torch.Tensor, context_len: int, num_examples: int, *,
                    seed: int = 0) -> list[RetrievalExample]:
    """Needle-in-a-haystack prompts of exactly ``context_len`` tokens.

    A random slice of ``haystack`` (a token stream of held-out text, [N]) with
    "The special magic number for <city> is <7 digits>." inserted at a random depth, then
    "What is the special magic number for <city>? The special magic number for <city> is" and the
    answer " <digits>".
    """
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(num_examples):
        city = NEEDLE_KEYS[int(torch.randint(len(NEEDLE_KEYS), (), generator=generator))]
        number = "".join(str(int(d)) for d in torch.randint(1, 10, (7,), generator=generator))
        needle = _encode(tokenizer, f" The special magic number for {city} is {number}.")
        query = _encode(tokenizer, f" What is the special magic number for {city}? "
                                   f"The special magic number for {city} is")
        answer = _encode(tokenizer, f" {number}")
        budget = context_len - len(needle) - len(query) - len(answer)
        if budget < 1 or haystack.numel() <= budget:
            raise ValueError(f"needle_examples: context_len={context_len} does not fit a needle in a haystack of "
                             f"{haystack.numel()} tokens")
        start = int(torch.randint(0, haystack.numel() - budget, (), generator=generator))
        hay = haystack[start:start + budget].tolist()
        cut = int(torch.randint(0, budget + 1, (), generator=generator))
        ids = hay[:cut] + needle + hay[cut:] + query + answer
        examples.append(RetrievalExample(torch.tensor(ids, dtype=torch.long), len(answer)))
    return examples


@torch.no_grad()
def retrieval_accuracy(model: nn.Module, examples: Sequence[RetrievalExample], *, batch_size: int = 4) -> float:
    """Fraction of examples whose whole answer is predicted top-1 under teacher forcing."""
    device = _device(model)
    correct = 0
    by_length: dict[tuple[int, int], list[RetrievalExample]] = {}
    for ex in examples:
        by_length.setdefault((ex.input_ids.numel(), ex.answer_len), []).append(ex)
    for (length, answer_len), group in by_length.items():
        for start in range(0, len(group), batch_size):
            ids = torch.stack([ex.input_ids for ex in group[start:start + batch_size]]).to(device)
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits[:, -answer_len:]
            correct += int((logits.argmax(-1) == ids[:, -answer_len:]).all(-1).sum())
    return correct / max(len(examples), 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_tokens_per_second(model: nn.Module, *, vocab_size: int, prompt_len: int = 512, new_tokens: int = 64,
                             batch_size: int = 1, seed: int = 0) -> float:
    """Greedy ``generate()`` speed after a random prompt: batch_size * (new_tokens - 1) tokens over
    the time of generating new_tokens minus the time of generating 1 (the prefill)."""
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, prompt_len), generator=generator).to(device)
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        _sync(device)
        return time.perf_counter() - start

    timed(2)  # warm-up
    prefill = timed(1)
    total = timed(new_tokens)
    return batch_size * (new_tokens - 1) / max(total - prefill, 1e-9)


def student_state_bytes(student: nn.Module, context_len: int, batch_size: int = 1) -> int:
    """Bytes of the student's decoding state after ``context_len`` tokens (every mixer's ``state_bytes``)."""
    return sum(block.mixer.state_bytes(context_len, batch_size) for block in student.model.layers)


@torch.no_grad()
def measured_state_bytes(student: nn.Module, context_len: int, *, vocab_size: int) -> int:
    """Bytes held by the student's cache after a real prefill of ``context_len`` random tokens."""
    device = _device(student)
    ids = torch.randint(0, vocab_size, (1, context_len), device=device)
    from linmix.models import hf_compat

    out = student(input_ids=ids, use_cache=True, logits_to_keep=1)
    return int(hf_compat.output_cache(out).state_bytes())


def evaluate(student: nn.Module, teacher: nn.Module, tokenizer: Any, *, heldout: torch.Tensor,
             heldout_stream: torch.Tensor | None = None, adapter=None, retrieval_lengths: Sequence[int] = (),
             retrieval_examples: int = 10, memory_lengths: Sequence[int] = (1024, 8192, 32768, 131072),
             decode_prompt_len: int = 512, decode_new_tokens: int = 32, batch_size: int = 4,
             seed: int = 0, on_section: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The full report of a student against its teacher (see the module docstring).

    Sections, in order (cheapest and most wanted first): ``lm``, ``memory`` / ``memory_measured``,
    ``retrieval``, ``decode``; ``eval_seconds`` holds the wall time of each.

    Args:
        heldout: held-out token chunks [N, L] for the language-model statistics.
        heldout_stream: held-out token stream [M], the haystack of the needle prompts (default the
            chunks flattened).
        adapter: the teacher's adapter (for the KV-cache size); default looked up.
        retrieval_lengths: context lengths of the passkey / needle prompts (none: skipped).
        retrieval_examples: prompts per length and task.
        memory_lengths: context lengths of the memory table.
        decode_prompt_len, decode_new_tokens: the decoding-speed probe (new_tokens < 2: skipped).
        on_section: called as ``on_section(name, report so far)`` after each section (e.g. to write
            a partial report to disk, so that a run stopped later keeps what was measured).
    """
    from linmix.convert.adapters import get_adapter

    adapter = adapter or get_adapter(teacher)
    vocab_size = student.config.vocab_size
    report: dict[str, Any] = {"eval_seconds": {}}
    clock = time.perf_counter()

    def done(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report["eval_seconds"][name] = now - clock
        clock = now
        if on_section is not None:
            on_section(name, report)

    report["lm"] = compare_language_models(student, teacher, heldout, batch_size=batch_size)
    done("lm")
    itemsize = next(student.parameters()).element_size()
    report["memory"] = {str(n): {"teacher_kv_bytes": adapter.kv_cache_bytes(n, itemsize=itemsize),
                                 "student_state_bytes": student_state_bytes(student, n)} for n in memory_lengths}
    # the cache a real prefill leaves, at two lengths 4x apart: equal for a recurrent student, and equal
    # to the computed size (kept attention layers and windows grow / saturate as computed)
    probe_len = max(1, min(decode_prompt_len, 256))
    report["memory_measured"] = [
        {"context_len": n, "student_cache_bytes": measured_state_bytes(student, n, vocab_size=vocab_size),
         "student_state_bytes": student_state_bytes(student, n)} for n in (probe_len, 4 * probe_len)]
    done("memory")
    if retrieval_lengths:
        if tokenizer is None:
            raise ValueError("evaluate: retrieval prompts need the teacher's tokenizer")
        haystack = heldout.flatten() if heldout_stream is None else heldout_stream
        retrieval: dict[str, dict[str, dict[str, float]]] = {"passkey": {}, "needle": {}}
        for length in retrieval_lengths:
            tasks = {"passkey": passkey_examples(tokenizer, length, retrieval_examples, seed=seed),
                     "needle": needle_examples(tokenizer, haystack, length, retrieval_examples, seed=seed)}
            for task, examples in tasks.items():
                retrieval[task][str(length)] = {
                    "teacher": retrieval_accuracy(teacher, examples, batch_size=batch_size),
                    "student": retrieval_accuracy(student, examples, batch_size=batch_size)}
        report["retrieval"] = retrieval
        done("retrieval")
    if decode_new_tokens >= 2:
        probe = dict(vocab_size=vocab_size, prompt_len=decode_prompt_len, new_tokens=decode_new_tokens, seed=seed)
        report["decode"] = {"prompt_len": decode_prompt_len, "new_tokens": decode_new_tokens,
                            "teacher_tokens_per_s": decode_tokens_per_second(teacher, **probe),
                            "student_tokens_per_s": decode_tokens_per_second(student, **probe)}
        done("decode")
    return report


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a report dict (:func:`evaluate`, plus ``stage1`` / ``stage2`` / ``setup``
    entries the CLI adds).

    Example:
        >>> print(format_report({"lm": {"student_ppl": 12.0, "teacher_ppl": 10.0, "ppl_ratio": 1.2,
        ...                             "top1_agreement": 0.8, "kl": 0.1, "positions": 100}}))
        | metric | teacher | student |
        |---|---|---|
        | held-out perplexity (100 positions) | 10.00 | 12.00 (+20.0%) |
        | top-1 next-token agreement | | 0.800 |
        | KL(teacher ‖ student), nats/token | | 0.1000 |
    """
    lines = ["| metric | teacher | student |", "|---|---|---|"]
    lm = report.get("lm", {})
    if lm:
        teacher_ppl = f"{lm['teacher_ppl']:.2f}" if "teacher_ppl" in lm else ""
        ratio = f" ({(lm['ppl_ratio'] - 1) * 100:+.1f}%)" if "ppl_ratio" in lm else ""
        lines.append(f"| held-out perplexity ({lm['positions']} positions) | {teacher_ppl} | "
                     f"{lm['student_ppl']:.2f}{ratio} |")
        if "top1_agreement" in lm:
            lines.append(f"| top-1 next-token agreement | | {lm['top1_agreement']:.3f} |")
            lines.append(f"| KL(teacher ‖ student), nats/token | | {lm['kl']:.4f} |")
    for task, by_length in report.get("retrieval", {}).items():
        for length, acc in by_length.items():
            lines.append(f"| {task} accuracy @ {length} tokens | {acc['teacher']:.2f} | {acc['student']:.2f} |")
    if "decode" in report:
        d = report["decode"]
        lines.append(f"| decode tokens/s (prompt {d['prompt_len']}, {d['new_tokens']} new) | "
                     f"{d['teacher_tokens_per_s']:.1f} | {d['student_tokens_per_s']:.1f} |")
    for length, m in report.get("memory", {}).items():
        lines.append(f"| decoding state @ {int(length):,} tokens | {_bytes(m['teacher_kv_bytes'])} | "
                     f"{_bytes(m['student_state_bytes'])} |")
    for m in report.get("memory_measured", []):
        lines.append(f"| student cache measured after a {m['context_len']:,}-token prefill | | "
                     f"{_bytes(m['student_cache_bytes'])} |")
    out = "\n".join(lines) if len(lines) > 2 else ""
    stage1 = report.get("stage1")
    if stage1 and stage1.get("after"):
        rows = ["| layer | rel. MSE before | after |", "|---|---|---|"]
        for layer, after in stage1["after"].items():
            rows.append(f"| {layer} | {stage1['before'].get(layer, float('nan')):.4f} | {after:.4f} |")
        out += "\n\nStage 1 (attention transfer), held-out relative MSE per converted layer:\n\n" + "\n".join(rows)
    stages = [(name, report[key]) for key, name in (("stage1", "1 (attention transfer)"), ("stage2", "2 (distillation)"))
              if report.get(key)]
    if stages:
        rows = ["| stage | steps (planned) | tokens seen | wall s | tokens/s (after step 1) | first step s "
                "| stopped by budget |", "|---|---|---|---|---|---|---|"]
        for name, stage in stages:
            rate, steady = stage.get("tokens_per_s"), stage.get("tokens_per_s_after_first")
            budget = stage.get("max_seconds")
            stopped = "yes" if stage.get("stopped_by_budget") else "no"
            rows.append(f"| {name} | {stage.get('steps')} ({stage.get('planned_steps', stage.get('steps'))}) | "
                        f"{_count(stage.get('tokens'))} | {_seconds(stage.get('wall_s'))} | "
                        f"{_count(rate)} ({_count(steady)}) | {_seconds(stage.get('first_step_s'))} | "
                        f"{stopped}{f' ({budget:g} s budget)' if budget is not None else ''} |")
        out += "\n\nTraining:\n\n" + "\n".join(rows)
    timings = report.get("timings")
    if timings:
        out += "\n\nWall time: " + ", ".join(f"{key.removesuffix('_s').replace('_', ' ')} {value:.1f} s"
                                             for key, value in timings.items())
    return out.lstrip("\n")


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
