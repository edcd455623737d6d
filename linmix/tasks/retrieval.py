"""Retrieval from a long haystack of filler: passkey retrieval and needle in a haystack.

Passkey (Mohtashami & Jaggi 2023, as used in long-context evaluations): "the pass key is 7 1 4 0 9"
hidden at some depth of a context of filler, and at the end "what is the pass key?", after which the
model must say the digits::

    filler ... [KEY] d1 d2 ... dn  filler ...  [QUERY] d1 d2 ... d(n-1)
    labels:                                      d1     d2 d3 ...  dn

Needle: one (key, value) pair at some depth of the filler; the last token is the key again and its
label the value::

    filler ... key value filler ...  key
    labels:                          value

``depth`` is the fraction of the context where the hidden block starts: 0 = first token, 1 = as late
as it fits (right before the query), ``None`` = uniform per example. Filler tokens never equal a
marker, digit, key or value, so the answer is always unambiguous.
"""

from __future__ import annotations

import torch

from linmix.tasks.base import (
    IGNORE_INDEX,
    Batch,
    check_depth,
    check_int,
    make_generator,
    sample_starts,
)

PASSKEY_MARKER = 1
"""Token that opens the hidden passkey ("the pass key is")."""

PASSKEY_QUERY = 2
"""Token that asks for the passkey at the end ("what is the pass key?")."""

NUM_DIGITS = 10
DIGIT_TOKENS = range(3, 3 + NUM_DIGITS)
"""The ten digit-like tokens of a passkey, 3..12; filler is 13..vocab_size-1."""

_FIRST_FILLER = DIGIT_TOKENS.stop


def _place(input_ids: torch.Tensor, starts: torch.Tensor, block: torch.Tensor) -> None:
    """Write ``block`` [N, B] into ``input_ids`` [N, L] at columns starts[i] .. starts[i] + B - 1."""
    columns = starts[:, None] + torch.arange(block.shape[1])
    input_ids.scatter_(1, columns, block)


def passkey(
    num_examples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 512,
    passkey_len: int = 5,
    depth: float | None = None,
    seed: int = 0,
) -> Batch:
    """Passkey retrieval: find ``passkey_len`` digits hidden at ``depth`` of random filler.

    Token layout: 0 blank (unused), 1 = passkey marker, 2 = query marker, 3..12 = digits,
    13..vocab_size-1 = filler (uniform). The last ``passkey_len`` positions are the query marker and
    the first passkey_len - 1 digits (teacher forcing); their labels are the passkey digits.

    Args:
        num_examples: N.
        vocab_size: V >= 14.
        seq_len: L >= 2 * passkey_len + 1 (the hidden block and the query).
        passkey_len: digits of the passkey.
        depth: where the hidden block starts, a fraction of the context in [0, 1]; None = random.
        seed: seed of the private random generator.

    Returns:
        A :class:`~linmix.tasks.base.Batch` [N, L] with N * passkey_len scored positions.

    Example:
        >>> batch = passkey(2, vocab_size=32, seq_len=20, passkey_len=3, depth=0.0)
        >>> batch.input_ids[0, 0].item(), batch.input_ids[0, -3].item()  # passkey marker, query marker
        (1, 2)
        >>> torch.equal(batch.input_ids[:, 1:4], batch.labels[:, -3:])  # the hidden digits are the answer
        True
    """
    num_examples = check_int("num_examples", num_examples, minimum=1)
    passkey_len = check_int("passkey_len", passkey_len, minimum=1)
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    depth = check_depth(depth)
    if vocab_size <= _FIRST_FILLER:
        raise ValueError(
            f"vocab_size must be >= {_FIRST_FILLER + 1} for passkey (0 blank, 2 markers, "
            f"{NUM_DIGITS} digits, at least one filler token), got {vocab_size}"
        )
    block_len = passkey_len + 1
    min_seq_len = block_len + passkey_len
    if seq_len < min_seq_len:
        raise ValueError(
            f"seq_len={seq_len} is too short for passkey_len={passkey_len}: the hidden block takes "
            f"{block_len} tokens and the query {passkey_len}, so seq_len must be >= {min_seq_len}"
        )
    generator = make_generator(seed)
    haystack_len = seq_len - passkey_len
    digits = torch.randint(DIGIT_TOKENS.start, DIGIT_TOKENS.stop, (num_examples, passkey_len), generator=generator)
    starts = sample_starts(num_examples, haystack_len - block_len + 1, depth, generator)
    input_ids = torch.randint(_FIRST_FILLER, vocab_size, (num_examples, seq_len), generator=generator)

    marker = torch.full((num_examples, 1), PASSKEY_MARKER, dtype=torch.int64)
    _place(input_ids, starts, torch.cat([marker, digits], dim=1))
    input_ids[:, haystack_len] = PASSKEY_QUERY
    input_ids[:, haystack_len + 1 :] = digits[:, :-1]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, haystack_len:] = digits
    return Batch(input_ids, labels)


def needle(
    num_examples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 512,
    depth: float | None = None,
    seed: int = 0,
) -> Batch:
    """Needle in a haystack: a (key, value) pair at ``depth`` of random filler, queried at the end.

    Token layout: with m = (vocab_size - 1) // 3, keys are [1, 1 + m), values [1 + m, 1 + 2m) and
    filler [1 + 2m, vocab_size); token 0 is unused. The last token is the key; its label the value.

    Args:
        num_examples: N.
        vocab_size: V >= 4.
        seq_len: L >= 3 (the pair and the query).
        depth: where the pair starts, a fraction of the context in [0, 1]; None = random.
        seed: seed of the private random generator.

    Returns:
        A :class:`~linmix.tasks.base.Batch` [N, L] with one scored position per example (the last).

    Example:
        >>> batch = needle(2, vocab_size=64, seq_len=10, depth=1.0)
        >>> torch.equal(batch.input_ids[:, -3], batch.input_ids[:, -1])  # the query repeats the key
        True
        >>> torch.equal(batch.labels[:, -1], batch.input_ids[:, -2])  # and asks for its value
        True
    """
    num_examples = check_int("num_examples", num_examples, minimum=1)
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    depth = check_depth(depth)
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 for needle (0 blank, keys, values, filler), got {vocab_size}")
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 for needle (key, value, query), got {seq_len}")
    generator = make_generator(seed)
    third = (vocab_size - 1) // 3
    key_low, value_low, filler_low = 1, 1 + third, 1 + 2 * third
    keys = torch.randint(key_low, value_low, (num_examples,), generator=generator)
    values = torch.randint(value_low, filler_low, (num_examples,), generator=generator)
    haystack_len = seq_len - 1
    starts = sample_starts(num_examples, haystack_len - 1, depth, generator)
    input_ids = torch.randint(filler_low, vocab_size, (num_examples, seq_len), generator=generator)

    _place(input_ids, starts, torch.stack([keys, values], dim=1))
    input_ids[:, -1] = keys
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -1] = values
    return Batch(input_ids, labels)
