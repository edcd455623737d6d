"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", §3), with JRT repeats.

An example of ``seq_len`` tokens is a key-value block followed by queries::

    k1 v1 k2 v2 ... kP vP | [the block again, num_passes - 1 times] | q . q . . . q . . .
                          labels:                                     v     v       v

* keys are drawn from the lower half of the vocabulary [1, vocab_size // 2), values from the upper
  half [vocab_size // 2, vocab_size); within an example the P = ``num_kv_pairs`` keys are distinct
  (and so are the values); token 0 is reserved.
* After the block (and its repeats) come ``space = (seq_len - 2 P num_passes) // 2`` query slots at
  even offsets 0, 2, 4, ... of the query region. Every key is queried exactly once, at slot
  ``gap - 1`` where gap in {1, ..., space} is drawn with p(gap) ~ gap ** (power_a - 1), without
  replacement (power_a = 1: uniform; small power_a: queries crowd right after the block, like the
  power law of repeated bigrams in text). As in Zoology the i-th pair of the block takes the i-th
  slot drawn, so early pairs tend to be queried early.
* The label at a query position is the value of its key; nothing else is scored.
* The other positions of the query region are random tokens of [1, vocab_size)
  (``random_non_queries=True``) or 0.
* ``num_passes > 1`` is JRT ("Just read twice", Arora et al. 2024): the block is shown that many
  times before the queries; only the queries are scored.

The shortest sequence that holds every query is ``seq_len = 2 P (num_passes + 1)``.
"""

from __future__ import annotations

import math

import torch

from linmix.tasks.base import (
    BLANK_TOKEN,
    IGNORE_INDEX,
    Batch,
    check_int,
    make_generator,
    sample_distinct,
    sample_without_replacement,
)


def mqar(
    num_examples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 64,
    num_kv_pairs: int = 4,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    num_passes: int = 1,
    seed: int = 0,
) -> Batch:
    """Multi-query associative recall examples (see the module docstring for the layout).

    Args:
        num_examples: N, the number of examples.
        vocab_size: V; keys come from [1, V // 2), values from [V // 2, V).
        seq_len: L, tokens per example; at least ``2 * num_kv_pairs * (num_passes + 1)``.
        num_kv_pairs: P, key-value pairs per example, each queried once.
        power_a: exponent of the query-gap law p(gap) ~ gap ** (power_a - 1); 1 is uniform.
        random_non_queries: fill the non-query positions after the block with random tokens (else 0).
        num_passes: how many times the key-value block is shown before the queries (JRT).
        seed: seed of the private random generator (see :func:`~linmix.tasks.base.train_seed`).

    Returns:
        A :class:`~linmix.tasks.base.Batch` with input_ids and labels [N, L]; N * P positions scored.

    Example:
        >>> batch = mqar(2, vocab_size=16, seq_len=16, num_kv_pairs=2, random_non_queries=False)
        >>> batch.input_ids.shape, batch.num_scored
        (torch.Size([2, 16]), 4)
        >>> keys, values = batch.input_ids[:, 0:4:2], batch.input_ids[:, 1:4:2]
        >>> bool((keys < 8).all() and (values >= 8).all())
        True
        >>> scored = batch.labels[0] != -100  # the queries: each key once, labelled with its value
        >>> sorted(zip(batch.input_ids[0, scored].tolist(), batch.labels[0, scored].tolist())) == sorted(
        ...     zip(keys[0].tolist(), values[0].tolist()))
        True
    """
    num_examples = check_int("num_examples", num_examples, minimum=1)
    num_kv_pairs = check_int("num_kv_pairs", num_kv_pairs, minimum=1)
    num_passes = check_int("num_passes", num_passes, minimum=1)
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not 0 < power_a < math.inf:
        raise ValueError(f"power_a must be a finite float > 0 (1.0 = uniform gaps), got {power_a!r}")
    key_low, key_high = 1, vocab_size // 2
    value_low, value_high = vocab_size // 2, vocab_size
    if key_high - key_low < num_kv_pairs:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for num_kv_pairs={num_kv_pairs}: the keys [1, vocab_size // 2) "
            f"must hold {num_kv_pairs} distinct tokens, so vocab_size must be >= {2 * (num_kv_pairs + 1)}"
        )
    block_len = 2 * num_kv_pairs
    min_seq_len = block_len * (num_passes + 1)
    if seq_len < min_seq_len:
        raise ValueError(
            f"seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs} with num_passes={num_passes}: "
            f"the key-value block takes 2 * {num_kv_pairs} * {num_passes} tokens and the {num_kv_pairs} queries "
            f"one slot of 2 tokens each, so seq_len must be >= {min_seq_len}"
        )
    generator = make_generator(seed)

    keys = sample_distinct(num_examples, num_kv_pairs, key_low, key_high, generator)  # [N, P]
    values = sample_distinct(num_examples, num_kv_pairs, value_low, value_high, generator)  # [N, P]
    context_len = block_len * num_passes
    num_slots = (seq_len - context_len) // 2
    gap_weights = torch.arange(1, num_slots + 1, dtype=torch.float64) ** (power_a - 1)
    slots = sample_without_replacement(gap_weights, num_examples, num_kv_pairs, generator)  # [N, P]
    query_positions = context_len + 2 * slots

    if random_non_queries:
        input_ids = torch.randint(1, vocab_size, (num_examples, seq_len), generator=generator)
    else:
        input_ids = torch.full((num_examples, seq_len), BLANK_TOKEN, dtype=torch.int64)
    block = torch.stack([keys, values], dim=2).flatten(1)  # k1 v1 k2 v2 ...  [N, 2P]
    input_ids[:, :context_len] = block.repeat(1, num_passes)
    input_ids.scatter_(1, query_positions, keys)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels.scatter_(1, query_positions, values)
    return Batch(input_ids, labels)
