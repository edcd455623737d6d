"""Passkey and needle retrieval: layout checked by an independent per-example loop, depth, errors."""

from __future__ import annotations

import pytest
import torch

from linmix.tasks import IGNORE_INDEX, needle, passkey
from linmix.tasks.retrieval import DIGIT_TOKENS, PASSKEY_MARKER, PASSKEY_QUERY


def fresh_seed() -> int:
    return int(torch.randint(0, 2**30, ()))


def passkey_start(ids: list[int], labels: list[int], *, vocab_size: int, passkey_len: int) -> int:
    """Check one passkey example token by token; return where its hidden block starts."""
    seq_len = len(ids)
    query_at = seq_len - passkey_len
    assert ids.count(PASSKEY_MARKER) == 1 and ids.count(PASSKEY_QUERY) == 1
    start = ids.index(PASSKEY_MARKER)
    assert ids[query_at] == PASSKEY_QUERY
    digits = ids[start + 1:start + 1 + passkey_len]
    assert len(digits) == passkey_len and all(d in DIGIT_TOKENS for d in digits)
    assert start + passkey_len < query_at, "the hidden block lies before the query"
    for t in range(seq_len):
        if t >= query_at:
            assert labels[t] == digits[t - query_at]
            if t > query_at:
                assert ids[t] == digits[t - query_at - 1], "teacher forcing: the answer so far"
        else:
            assert labels[t] == IGNORE_INDEX
            if not start <= t <= start + passkey_len:
                assert DIGIT_TOKENS.stop <= ids[t] < vocab_size, "filler is never a marker or a digit"
    return start


@pytest.mark.parametrize("vocab_size, seq_len, passkey_len", [(8192, 128, 5), (14, 40, 1), (100, 11, 5)])
@pytest.mark.parametrize("depth", [None, 0.0, 0.3, 1.0])
def test_passkey_layout(vocab_size, seq_len, passkey_len, depth):
    batch = passkey(40, vocab_size=vocab_size, seq_len=seq_len, passkey_len=passkey_len, depth=depth,
                    seed=fresh_seed())
    assert batch.input_ids.shape == batch.labels.shape == (40, seq_len)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
    assert batch.num_scored == 40 * passkey_len
    starts = [passkey_start(batch.input_ids[i].tolist(), batch.labels[i].tolist(), vocab_size=vocab_size,
                            passkey_len=passkey_len) for i in range(40)]
    last_start = seq_len - 2 * passkey_len - 1  # the block ends right before the query
    if depth is None:
        assert min(starts) >= 0 and max(starts) <= last_start
        if last_start > 0:
            assert len(set(starts)) > 1, "random depths differ between examples"
    else:
        assert set(starts) == {int(depth * last_start + 0.5)}


def test_passkey_depth_is_monotone_and_random_depth_covers_the_context():
    seed = fresh_seed()
    starts = [passkey(1, seq_len=200, depth=d, seed=seed).input_ids[0].tolist().index(PASSKEY_MARKER)
              for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] == 200 - 11
    batch = passkey(2000, vocab_size=64, seq_len=64, passkey_len=2, seed=seed)
    random_starts = (batch.input_ids == PASSKEY_MARKER).nonzero()[:, 1].double()
    assert abs(random_starts.mean().item() - (64 - 5) / 2) < 2.0  # uniform over [0, 59]


def needle_start(ids: list[int], labels: list[int], *, vocab_size: int) -> int:
    """Check one needle example token by token; return where its (key, value) pair starts."""
    third = (vocab_size - 1) // 3
    key, value = ids[-1], labels[-1]
    assert 1 <= key < 1 + third and 1 + third <= value < 1 + 2 * third
    assert ids.count(key) == 2 and ids.count(value) == 1
    start = ids.index(key)
    assert ids[start + 1] == value and start + 1 < len(ids) - 1
    assert all(label == IGNORE_INDEX for label in labels[:-1])
    assert all(1 + 2 * third <= token < vocab_size for t, token in enumerate(ids[:-1]) if t not in (start, start + 1))
    return start


@pytest.mark.parametrize("vocab_size, seq_len", [(8192, 64), (4, 3), (30, 17)])
@pytest.mark.parametrize("depth", [None, 0.0, 0.5, 1.0])
def test_needle_layout(vocab_size, seq_len, depth):
    batch = needle(40, vocab_size=vocab_size, seq_len=seq_len, depth=depth, seed=fresh_seed())
    assert batch.input_ids.shape == batch.labels.shape == (40, seq_len)
    assert batch.num_scored == 40
    starts = [needle_start(batch.input_ids[i].tolist(), batch.labels[i].tolist(), vocab_size=vocab_size)
              for i in range(40)]
    last_start = seq_len - 3
    if depth is None:
        assert max(starts) <= last_start and (last_start == 0 or len(set(starts)) > 1)
    else:
        assert set(starts) == {int(depth * last_start + 0.5)}


@pytest.mark.parametrize("task", [passkey, needle])
def test_retrieval_deterministic_per_seed(task):
    seed = fresh_seed()
    a, b, c = task(8, seq_len=64, seed=seed), task(8, seq_len=64, seed=seed), task(8, seq_len=64, seed=seed + 1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize(
    "task, kwargs, message",
    [
        (passkey, dict(seq_len=10, passkey_len=5), "seq_len must be >= 11"),
        (passkey, dict(vocab_size=13), "vocab_size must be >= 14"),
        (passkey, dict(passkey_len=0), "passkey_len"),
        (passkey, dict(depth=1.5), "depth"),
        (passkey, dict(depth=-0.1), "depth"),
        (needle, dict(seq_len=2), "seq_len must be >= 3"),
        (needle, dict(vocab_size=3), "vocab_size must be >= 4"),
        (needle, dict(depth=True), "depth"),
        (needle, dict(seed=-3), "seed"),
    ],
)
def test_retrieval_rejects_impossible_configs(task, kwargs, message):
    with pytest.raises(ValueError, match=message):
        task(2, **kwargs)
