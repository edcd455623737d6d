"""MQAR against an independent per-example check, its gap law, JRT repeats; the shared Batch / seed /
sampling machinery of linmix.tasks.base."""

from __future__ import annotations

import itertools

import pytest
import torch

from linmix.tasks import IGNORE_INDEX, TEST_SEEDS, TRAIN_SEEDS, Batch, mqar, test_seed, train_seed
from linmix.tasks.base import sample_distinct, sample_without_replacement


def fresh_seed() -> int:
    """A seed drawn from the global RNG (which the test conftest seeds per test, and reports)."""
    return int(torch.randint(0, 2**30, ()))


def check_mqar_example(ids: list[int], labels: list[int], *, vocab_size: int, num_kv_pairs: int,
                       num_passes: int, random_non_queries: bool) -> None:
    """The MQAR layout, checked token by token for one example."""
    block_len = 2 * num_kv_pairs
    keys, values = ids[0:block_len:2], ids[1:block_len:2]
    assert len(set(keys)) == num_kv_pairs, "keys of an example must be distinct"
    assert len(set(values)) == num_kv_pairs
    assert all(1 <= k < vocab_size // 2 for k in keys)
    assert all(vocab_size // 2 <= v < vocab_size for v in values)
    for p in range(1, num_passes):
        assert ids[p * block_len:(p + 1) * block_len] == ids[:block_len], "JRT repeats the whole block"
    value_of = dict(zip(keys, values))
    context_len = block_len * num_passes
    queried = []
    for t, (token, label) in enumerate(zip(ids, labels)):
        if label == IGNORE_INDEX:
            assert t < context_len or random_non_queries or token == 0
            continue
        assert t >= context_len and (t - context_len) % 2 == 0, f"query at {t} outside the even query slots"
        assert token in value_of and label == value_of[token]
        queried.append(token)
    assert sorted(queried) == sorted(keys), "each key is queried exactly once"


@pytest.mark.parametrize(
    "vocab_size, seq_len, num_kv_pairs, num_passes, random_non_queries",
    [(8192, 64, 4, 1, True), (64, 64, 16, 1, False), (20, 40, 4, 2, True), (128, 100, 8, 3, False),
     (10, 16, 4, 1, True)],  # last: the minimum vocabulary and length for 4 pairs (dense key draws)
)
def test_mqar_layout(vocab_size, seq_len, num_kv_pairs, num_passes, random_non_queries):
    kwargs = dict(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs, num_passes=num_passes,
                  random_non_queries=random_non_queries, seed=fresh_seed())
    batch = mqar(50, **kwargs)
    assert batch.input_ids.shape == batch.labels.shape == (50, seq_len)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.int64
    assert 0 <= batch.input_ids.min() and batch.input_ids.max() < vocab_size
    assert batch.num_scored == 50 * num_kv_pairs
    for i in range(50):
        check_mqar_example(batch.input_ids[i].tolist(), batch.labels[i].tolist(), vocab_size=vocab_size,
                           num_kv_pairs=num_kv_pairs, num_passes=num_passes, random_non_queries=random_non_queries)
    if random_non_queries:  # filler is random, not blank
        assert (batch.input_ids[:, 2 * num_kv_pairs * num_passes:] != 0).all()


def test_mqar_deterministic_per_seed():
    seed = fresh_seed()
    a, b = mqar(16, seed=seed), mqar(16, seed=seed)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    c = mqar(16, seed=seed + 1)
    assert not torch.equal(a.input_ids, c.input_ids)
    # the global RNG plays no part
    torch.manual_seed(0)
    d = mqar(16, seed=seed)
    assert torch.equal(a.input_ids, d.input_ids)


def gap_slots(batch: Batch, context_len: int) -> torch.Tensor:
    """Query slot index (0-based) of every scored position."""
    positions = (batch.labels != IGNORE_INDEX).nonzero()[:, 1]
    return (positions - context_len) // 2


def test_mqar_gap_law_single_pair():
    """With one pair the query slot follows p(gap) ~ gap ** (power_a - 1) exactly (gap = slot + 1)."""
    for power_a in (0.01, 0.5, 1.0):
        batch = mqar(20000, vocab_size=64, seq_len=64, num_kv_pairs=1, power_a=power_a, seed=fresh_seed())
        slots = gap_slots(batch, context_len=2)
        space = 31
        empirical = torch.bincount(slots, minlength=space).double() / slots.numel()
        target = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
        target /= target.sum()
        total_variation = 0.5 * (empirical - target).abs().sum().item()
        assert total_variation < 0.03, (power_a, total_variation)


def test_mqar_small_power_a_concentrates_queries_near_the_block():
    kwargs = dict(vocab_size=256, seq_len=128, num_kv_pairs=8)
    space = (128 - 16) // 2
    skewed = gap_slots(mqar(2000, power_a=0.01, seed=fresh_seed(), **kwargs), context_len=16).double()
    uniform = gap_slots(mqar(2000, power_a=1.0, seed=fresh_seed(), **kwargs), context_len=16).double()
    uniform_mean = (space - 1) / 2  # mean slot of a uniform draw without replacement
    assert abs(uniform.mean().item() - uniform_mean) < 0.05 * uniform_mean
    assert skewed.mean().item() < 0.6 * uniform_mean
    assert skewed.median().item() < uniform.median().item()


def test_mqar_num_passes_repeats_the_block_and_scores_only_queries():
    batch = mqar(8, vocab_size=128, seq_len=96, num_kv_pairs=6, num_passes=3, seed=fresh_seed())
    block = batch.input_ids[:, :12]
    assert torch.equal(batch.input_ids[:, 12:24], block) and torch.equal(batch.input_ids[:, 24:36], block)
    assert (batch.labels[:, :36] == IGNORE_INDEX).all()
    assert batch.num_scored == 8 * 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=15, num_kv_pairs=4), "seq_len must be >= 16"),
        (dict(seq_len=23, num_kv_pairs=4, num_passes=2), "seq_len must be >= 24"),
        (dict(vocab_size=9, num_kv_pairs=4), "vocab_size must be >= 10"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(num_passes=0), "num_passes"),
        (dict(power_a=0.0), "power_a"),
        (dict(power_a=float("nan")), "power_a"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_mqar_rejects_impossible_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mqar(2, **kwargs)
    with pytest.raises(ValueError, match="num_examples"):
        mqar(0)


# ----------------------------------------------------------------------------------------------------
# shared machinery: seeds, Batch, sampling


def test_train_and_test_seed_ranges_are_disjoint():
    assert TRAIN_SEEDS.stop <= TEST_SEEDS.start
    assert not any(seed in TEST_SEEDS for seed in range(TRAIN_SEEDS.stop - 5, TRAIN_SEEDS.stop))
    index = int(torch.randint(0, 2**30, ()))
    assert train_seed(index) in TRAIN_SEEDS and train_seed(index) not in TEST_SEEDS
    assert test_seed(index) in TEST_SEEDS and test_seed(index) not in TRAIN_SEEDS
    assert train_seed(2**30 - 1) < test_seed(0) and test_seed(2**30 - 1) < 2**31
    for bad in (-1, 2**30, True, 1.0):
        with pytest.raises(ValueError, match="seed index"):
            train_seed(bad)
        with pytest.raises(ValueError, match="seed index"):
            test_seed(bad)
    a, b = mqar(8, seed=train_seed(index)), mqar(8, seed=test_seed(index))
    assert not torch.equal(a.input_ids, b.input_ids)


def random_batch(n: int, length: int) -> Batch:
    ids = torch.randint(0, 100, (n, length))
    labels = torch.where(torch.rand(n, length) < 0.3, ids, IGNORE_INDEX)
    return Batch(ids, labels)


def test_batch_split_cat_index_to():
    batch = random_batch(10, 7)
    parts = list(batch.split(4))
    assert [len(p) for p in parts] == [4, 4, 2]
    joined = Batch.cat(parts)
    assert torch.equal(joined.input_ids, batch.input_ids) and torch.equal(joined.labels, batch.labels)
    assert torch.equal(batch[3].input_ids, batch.input_ids[3:4]) and len(batch[-1]) == 1
    assert torch.equal(batch[-1].labels, batch.labels[-1:])
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids)
    assert batch.seq_len == 7 and batch.num_scored == int((batch.labels != IGNORE_INDEX).sum())
    with pytest.raises(ValueError, match="batch_size"):
        next(batch.split(0))


def test_batch_shuffled_is_a_seeded_permutation():
    batch = random_batch(20, 5)
    seed = fresh_seed()
    a, b = batch.shuffled(seed), batch.shuffled(seed)
    assert torch.equal(a.input_ids, b.input_ids)
    rows = {tuple(r) for r in batch.input_ids.tolist()}
    assert {tuple(r) for r in a.input_ids.tolist()} == rows
    # rows stay paired with their labels
    pairs = {(tuple(i), tuple(l)) for i, l in zip(batch.input_ids.tolist(), batch.labels.tolist())}
    assert {(tuple(i), tuple(l)) for i, l in zip(a.input_ids.tolist(), a.labels.tolist())} == pairs


def test_batch_cat_lengths():
    short, long = random_batch(3, 5), random_batch(2, 8)
    with pytest.raises(ValueError, match=r"same sequence length L, got \[5, 8\]"):
        Batch.cat([short, long])
    with pytest.raises(ValueError, match="at least one"):
        Batch.cat([])
    with pytest.raises(TypeError, match=r"batches\[1\]"):
        Batch.cat([short, short.input_ids])
    padded = Batch.cat([short, long], pad_id=0)
    assert padded.input_ids.shape == (5, 8)
    assert torch.equal(padded.input_ids[:3, :5], short.input_ids) and (padded.input_ids[:3, 5:] == 0).all()
    assert (padded.labels[:3, 5:] == IGNORE_INDEX).all() and padded.num_scored == short.num_scored + long.num_scored


def test_batch_validates_its_tensors():
    ids = torch.randint(0, 10, (2, 4))
    with pytest.raises(TypeError, match="int64"):
        Batch(ids.int(), ids)
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        Batch(ids[0], ids[0])
    with pytest.raises(ValueError, match="shape of input_ids"):
        Batch(ids, ids[:, :3])


@pytest.mark.parametrize("k, n", [(2, 5), (3, 4), (1, 3)])  # sparse path, dense path, single draws
def test_sample_distinct_is_uniform_over_ordered_tuples(k, n):
    generator = torch.Generator().manual_seed(fresh_seed())
    tuples = list(itertools.permutations(range(n), k))
    draws = sample_distinct(400 * len(tuples), k, 10, 10 + n, generator) - 10
    codes = (draws * n ** torch.arange(k)).sum(1)
    counts = torch.bincount(codes, minlength=n**k).double()
    valid = torch.tensor([sum(t[i] * n**i for i in range(k)) for t in tuples])
    assert counts.sum() == counts[valid].sum(), "repeated values in a row"
    assert ((counts[valid] - 400).abs() < 400 * 0.25).all(), counts[valid]


def test_sample_distinct_at_scale_has_no_repeats():
    generator = torch.Generator().manual_seed(fresh_seed())
    for k, n in [(64, 200), (64, 100), (100, 100)]:
        draws = sample_distinct(300, k, 0, n, generator)
        ordered = draws.sort(dim=1).values
        assert (ordered[:, 1:] != ordered[:, :-1]).all() and draws.min() >= 0 and draws.max() < n
    with pytest.raises(ValueError, match="cannot draw 5 distinct"):
        sample_distinct(1, 5, 0, 4, generator)


def test_sample_without_replacement_follows_sequential_draws():
    """P(first = i, second = j) = w_i / W * w_j / (W - w_i), like numpy.random.choice(replace=False, p=w/W)."""
    weights = torch.tensor([1.0, 2.0, 5.0])
    generator = torch.Generator().manual_seed(fresh_seed())
    draws = sample_without_replacement(weights, 30000, 2, generator)
    total = weights.sum().item()
    for i, j in itertools.permutations(range(3), 2):
        want = weights[i].item() / total * weights[j].item() / (total - weights[i].item())
        got = ((draws[:, 0] == i) & (draws[:, 1] == j)).double().mean().item()
        assert abs(got - want) < 0.015, (i, j, got, want)
