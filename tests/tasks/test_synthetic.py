"""Selective copying and induction heads (Mamba §4.1) checked per example; the contract every task in
TASKS keeps (shapes, dtypes, vocabulary, seeds); the registry."""

from __future__ import annotations

import pytest
import torch

from linmix.tasks import IGNORE_INDEX, TASKS, induction_heads, make_task, selective_copying
from linmix.tasks.synthetic import SEPARATOR_TOKEN, SPECIAL_TOKEN


def fresh_seed() -> int:
    return int(torch.randint(0, 2**30, ()))


def check_selective_copying_example(ids: list[int], labels: list[int], *, vocab_size: int,
                                    num_tokens_to_copy: int) -> list[int]:
    """Check one example token by token; return the positions of its data tokens."""
    context_len = len(ids) - num_tokens_to_copy
    data_positions = [t for t in range(context_len) if ids[t] != 0]
    assert len(data_positions) == num_tokens_to_copy
    data = [ids[t] for t in data_positions]
    assert all(2 <= token < vocab_size for token in data)
    assert ids[context_len:] == [SEPARATOR_TOKEN] * num_tokens_to_copy
    assert labels[context_len:] == data, "the data tokens, in order of appearance"
    assert labels[:context_len] == [IGNORE_INDEX] * context_len
    return data_positions


@pytest.mark.parametrize("vocab_size, seq_len, num_tokens_to_copy", [(16, 256, 16), (3, 8, 4), (50, 40, 3)])
def test_selective_copying_layout(vocab_size, seq_len, num_tokens_to_copy):
    batch = selective_copying(30, vocab_size=vocab_size, seq_len=seq_len, num_tokens_to_copy=num_tokens_to_copy,
                              seed=fresh_seed())
    assert batch.input_ids.shape == batch.labels.shape == (30, seq_len)
    assert batch.num_scored == 30 * num_tokens_to_copy
    layouts = {tuple(check_selective_copying_example(batch.input_ids[i].tolist(), batch.labels[i].tolist(),
                                                     vocab_size=vocab_size, num_tokens_to_copy=num_tokens_to_copy))
               for i in range(30)}
    if seq_len - num_tokens_to_copy > num_tokens_to_copy:
        assert len(layouts) > 1, "data positions are drawn per example"


def test_selective_copying_positions_are_uniform():
    batch = selective_copying(3000, vocab_size=16, seq_len=40, num_tokens_to_copy=4, seed=fresh_seed())
    positions = (batch.input_ids[:, :36] != 0).nonzero()[:, 1]
    frequency = torch.bincount(positions, minlength=36).double() / positions.numel()
    assert (frequency - 1 / 36).abs().max() < 0.3 / 36


def check_induction_example(ids: list[int], labels: list[int], *, vocab_size: int) -> int:
    """Check one example token by token; return where the first special token is."""
    assert ids.count(SPECIAL_TOKEN) == 2 and ids[-1] == SPECIAL_TOKEN
    first = ids.index(SPECIAL_TOKEN)
    assert first <= len(ids) - 3
    assert labels[-1] == ids[first + 1] and labels[:-1] == [IGNORE_INDEX] * (len(ids) - 1)
    assert all(2 <= token < vocab_size for t, token in enumerate(ids[:-1]) if t != first)
    return first


@pytest.mark.parametrize("vocab_size, seq_len", [(16, 256), (4, 3), (100, 20)])
def test_induction_heads_layout(vocab_size, seq_len):
    batch = induction_heads(40, vocab_size=vocab_size, seq_len=seq_len, seed=fresh_seed())
    assert batch.input_ids.shape == batch.labels.shape == (40, seq_len)
    assert batch.num_scored == 40
    firsts = [check_induction_example(batch.input_ids[i].tolist(), batch.labels[i].tolist(), vocab_size=vocab_size)
              for i in range(40)]
    if seq_len > 3:
        assert len(set(firsts)) > 1


def test_induction_heads_targets_and_positions_are_spread():
    batch = induction_heads(4000, vocab_size=8, seq_len=12, seed=fresh_seed())
    targets = torch.bincount(batch.labels[:, -1], minlength=8)[2:].double() / 4000
    assert (targets - 1 / 6).abs().max() < 0.03  # uniform over the 6 content tokens
    firsts = (batch.input_ids[:, :-1] == SPECIAL_TOKEN).nonzero()[:, 1]
    assert firsts.min() == 0 and firsts.max() == 9


@pytest.mark.parametrize(
    "task, kwargs, message",
    [
        (selective_copying, dict(seq_len=31, num_tokens_to_copy=16), "seq_len must be >= 32"),
        (selective_copying, dict(vocab_size=2), "vocab_size must be >= 3"),
        (selective_copying, dict(num_tokens_to_copy=0), "num_tokens_to_copy"),
        (induction_heads, dict(seq_len=2), "seq_len must be >= 3"),
        (induction_heads, dict(vocab_size=3), "vocab_size must be >= 4"),
    ],
)
def test_synthetic_rejects_impossible_configs(task, kwargs, message):
    with pytest.raises(ValueError, match=message):
        task(2, **kwargs)


# ----------------------------------------------------------------------------------------------------
# the contract of every registered task


SMALL = {
    "mqar": dict(vocab_size=64, seq_len=32, num_kv_pairs=4),
    "passkey": dict(vocab_size=64, seq_len=32),
    "needle": dict(vocab_size=64, seq_len=32),
    "selective_copying": dict(vocab_size=16, seq_len=32, num_tokens_to_copy=4),
    "induction_heads": dict(vocab_size=16, seq_len=32),
}


def test_every_task_has_a_small_config():
    assert set(SMALL) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_contract(name):
    kwargs = SMALL[name]
    seed = fresh_seed()
    batch = make_task(name, 12, seed=seed, **kwargs)
    assert batch.input_ids.shape == batch.labels.shape == (12, kwargs["seq_len"])
    assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
    assert 0 <= batch.input_ids.min() and batch.input_ids.max() < kwargs["vocab_size"]
    scored = batch.labels != IGNORE_INDEX
    assert scored.any(dim=1).all(), "every example is scored somewhere"
    assert (batch.labels[scored] > 0).all() and (batch.labels[scored] < kwargs["vocab_size"]).all()
    again = TASKS[name](12, seed=seed, **kwargs)
    assert torch.equal(batch.input_ids, again.input_ids) and torch.equal(batch.labels, again.labels)
    other = TASKS[name](12, seed=seed + 1, **kwargs)
    assert not torch.equal(batch.input_ids, other.input_ids)
    with pytest.raises(ValueError, match="num_examples"):
        TASKS[name](0, **kwargs)
    with pytest.raises(ValueError, match="seed"):
        TASKS[name](1, seed=-1, **kwargs)


def test_make_task_unknown_name():
    with pytest.raises(ValueError, match=r"unknown task 'mqr'; available: \['induction_heads'"):
        make_task("mqr", 4)
    with pytest.raises(TypeError):
        make_task("mqar", 4, num_kv_pair=3)  # a misspelt keyword is not swallowed
