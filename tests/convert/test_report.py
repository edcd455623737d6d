"""Report metrics against independent computations, retrieval prompts, the report table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linmix.convert import build_student, get_adapter, layer_targets
from linmix.convert.report import (RetrievalExample, compare_language_models, decode_tokens_per_second, evaluate,
                                   format_report, measured_state_bytes, needle_examples, passkey_examples,
                                   retrieval_accuracy, student_state_bytes)
from tests.convert.conftest import tiny_llama


class _Output:
    def __init__(self, logits):
        self.logits = logits


class _Oracle(torch.nn.Module):
    """Predicts from a table: next token of ``sequence`` at each position (one-hot logits), shifted by ``miss``."""

    def __init__(self, sequence: torch.Tensor, vocab: int, miss: int = 0):
        super().__init__()
        self.sequence, self.vocab, self.miss = sequence, vocab, miss
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        T = input_ids.shape[1]
        nxt = (self.sequence[1:T + 1] + self.miss) % self.vocab
        return _Output(F.one_hot(nxt, self.vocab).float()[None].expand(input_ids.shape[0], -1, -1) * 10)


@torch.no_grad()
def test_language_model_statistics():
    teacher = tiny_llama()
    student = build_student(teacher, layer_targets(2, "hedgehog", keep=[0]))
    chunks = torch.randint(0, 300, (3, 20))
    stats = compare_language_models(student, teacher, chunks, batch_size=2)
    s, t = student(chunks).logits[:, :-1], teacher(chunks).logits[:, :-1]
    targets = chunks[:, 1:].flatten()
    assert math.isclose(stats["student_ppl"], math.exp(F.cross_entropy(s.flatten(0, 1), targets)), rel_tol=1e-4)
    assert math.isclose(stats["teacher_ppl"], math.exp(F.cross_entropy(t.flatten(0, 1), targets)), rel_tol=1e-4)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    assert math.isclose(stats["kl"], float(kl), rel_tol=1e-4) and stats["kl"] > 0
    agree = (s.argmax(-1) == t.argmax(-1)).float().mean()
    assert math.isclose(stats["top1_agreement"], float(agree), rel_tol=1e-6) and stats["positions"] == 57
    same = compare_language_models(teacher, teacher, chunks)
    assert same["top1_agreement"] == 1.0 and abs(same["kl"]) < 1e-6 and same["ppl_ratio"] == 1.0


@pytest.mark.parametrize("length", [300, 700])
def test_retrieval_prompts(tiny_tokenizer, length):
    passkeys = passkey_examples(tiny_tokenizer, length, 3, seed=1)
    haystack = torch.randint(0, 300, (5000,))
    needles = needle_examples(tiny_tokenizer, haystack, length, 3, seed=1)
    # the answer appears where it is hidden (twice in a passkey prompt, once as a needle) and as the answer; the
    # kind is known from the list, not searched for in the text (random filler can spell "pass key")
    for ex, count in [(ex, 3) for ex in passkeys] + [(ex, 2) for ex in needles]:
        assert ex.input_ids.numel() == length
        text = tiny_tokenizer.decode(ex.input_ids)
        answer = tiny_tokenizer.decode(ex.input_ids[-ex.answer_len:]).strip()
        assert answer.isdigit() and text.count(answer) == count
    assert len({tiny_tokenizer.decode(ex.input_ids[-ex.answer_len:]) for ex in passkeys}) > 1
    with pytest.raises(ValueError, match="no room for filler"):
        passkey_examples(tiny_tokenizer, 50, 1)


def test_retrieval_accuracy_is_teacher_forced_exact_match():
    seq = torch.randint(0, 50, (41,))
    examples = [RetrievalExample(seq[:40], 3), RetrievalExample(seq[:30], 5)]
    assert retrieval_accuracy(_Oracle(seq, 50), examples) == 1.0
    assert retrieval_accuracy(_Oracle(seq, 50, miss=1), examples) == 0.0


def test_evaluate_and_format(tiny_tokenizer):
    teacher = tiny_llama()
    student = build_student(teacher, layer_targets(2, "lolcats", keep=[0]), window_size=8)
    heldout = torch.randint(0, 300, (2, 32))
    sections = []
    report = evaluate(student, teacher, tiny_tokenizer, heldout=heldout, heldout_stream=torch.randint(0, 300, (3000,)),
                      retrieval_lengths=[300], retrieval_examples=2, memory_lengths=[16, 1024],
                      decode_prompt_len=8, decode_new_tokens=3,
                      on_section=lambda name, so_far: sections.append((name, sorted(so_far))))
    assert set(report) == {"lm", "retrieval", "decode", "memory", "memory_measured", "eval_seconds"}
    # each section is reported as soon as it is measured, with everything measured before it
    assert [name for name, _ in sections] == ["lm", "memory", "retrieval", "decode"]
    assert sections[0][1] == ["eval_seconds", "lm"] and sections[2][1] == sorted(set(report) - {"decode"})
    assert set(report["eval_seconds"]) == {"lm", "memory", "retrieval", "decode"}
    adapter = get_adapter(teacher)
    assert report["memory"]["1024"]["teacher_kv_bytes"] == adapter.kv_cache_bytes(1024) == 2 * 2 * 1024 * 2 * 16 * 4
    # measured after real prefills of 8 and 32 tokens: as computed (the kept attention layer's cache grows)
    measured = report["memory_measured"]
    assert [m["context_len"] for m in measured] == [8, 32]
    assert all(m["student_cache_bytes"] == m["student_state_bytes"] for m in measured)
    assert measured[1]["student_cache_bytes"] > measured[0]["student_cache_bytes"]
    assert report["decode"]["student_tokens_per_s"] > 0
    table = format_report(report)
    assert "passkey accuracy @ 300 tokens" in table and "decoding state @ 1,024 tokens" in table
    assert "student cache measured after a 32-token prefill" in table
    assert decode_tokens_per_second(student, vocab_size=300, prompt_len=4, new_tokens=3) > 0


def test_measured_cache_of_a_linear_student_does_not_grow():
    teacher = tiny_llama()
    student = build_student(teacher, layer_targets(2, "lolcats"), window_size=8)
    sizes = [measured_state_bytes(student, n, vocab_size=300) for n in (8, 32, 128)]
    assert sizes[0] == sizes[1] == sizes[2] == student_state_bytes(student, 128) > 0
