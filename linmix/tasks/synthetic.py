"""Selective copying and induction heads, the synthetic tasks of Mamba (Gu & Dao 2023, §4.1).

Selective copying: a few data tokens scattered at random among blank (noise) tokens; then one
separator per data token, and at the separators the model must output the data tokens in order
(it has to skip the blanks: content-aware, not a fixed shift)::

    . . a . . . b . c . . . d .  | S S S S
    labels:                        a b c d

Induction heads: random tokens with one special token followed by a target somewhere; at the end the
special token again, labelled with the target (recall the token that followed it)::

    x x x * t x x x x x x x x *
    labels:                   t
"""

from __future__ import annotations

import torch

from linmix.tasks.base import BLANK_TOKEN, IGNORE_INDEX, Batch, check_int, make_generator, sample_distinct

SEPARATOR_TOKEN = 1
"""Selective copying: the token at which the copied tokens are output."""

SPECIAL_TOKEN = 1
"""Induction heads: the special token whose successor must be recalled."""

_FIRST_CONTENT = 2  # both tasks: 0 is blank, 1 the separator / special token, data from 2 on


def selective_copying(
    num_examples: int,
    *,
    vocab_size: int = 16,
    seq_len: int = 4096,
    num_tokens_to_copy: int = 16,
    seed: int = 0,
) -> Batch:
    """Selective copying (Mamba §4.1; defaults are the paper's: vocabulary 16, 16 tokens, length 4096).

    Token layout: 0 = blank (noise), 1 = separator, data tokens uniform in [2, vocab_size). The first
    ``seq_len - num_tokens_to_copy`` positions hold the data tokens at distinct random positions and
    blanks elsewhere; the last ``num_tokens_to_copy`` positions are separators labelled with the data
    tokens in their order of appearance.

    Args:
        num_examples: N.
        vocab_size: V >= 3.
        seq_len: L >= 2 * num_tokens_to_copy.
        num_tokens_to_copy: data tokens per example.
        seed: seed of the private random generator.

    Returns:
        A :class:`~linmix.tasks.base.Batch` [N, L] with N * num_tokens_to_copy scored positions.

    Example:
        >>> batch = selective_copying(2, vocab_size=8, seq_len=12, num_tokens_to_copy=3)
        >>> context = batch.input_ids[0, :-3]
        >>> context[context != 0].tolist() == batch.labels[0, -3:].tolist()  # copy the non-blanks in order
        True
        >>> batch.input_ids[0, -3:].tolist()
        [1, 1, 1]
    """
    num_examples = check_int("num_examples", num_examples, minimum=1)
    num_tokens_to_copy = check_int("num_tokens_to_copy", num_tokens_to_copy, minimum=1)
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    if vocab_size <= _FIRST_CONTENT:
        raise ValueError(
            f"vocab_size must be >= {_FIRST_CONTENT + 1} for selective_copying (0 blank, 1 separator, "
            f"data tokens from 2), got {vocab_size}"
        )
    if seq_len < 2 * num_tokens_to_copy:
        raise ValueError(
            f"seq_len={seq_len} is too short for num_tokens_to_copy={num_tokens_to_copy}: the context must hold "
            f"the {num_tokens_to_copy} tokens and be followed by as many separators, so seq_len must be >= "
            f"{2 * num_tokens_to_copy}"
        )
    generator = make_generator(seed)
    context_len = seq_len - num_tokens_to_copy
    positions = sample_distinct(num_examples, num_tokens_to_copy, 0, context_len, generator).sort(dim=1).values
    tokens = torch.randint(_FIRST_CONTENT, vocab_size, (num_examples, num_tokens_to_copy), generator=generator)

    input_ids = torch.full((num_examples, seq_len), BLANK_TOKEN, dtype=torch.int64)
    input_ids.scatter_(1, positions, tokens)
    input_ids[:, context_len:] = SEPARATOR_TOKEN
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, context_len:] = tokens
    return Batch(input_ids, labels)


def induction_heads(
    num_examples: int,
    *,
    vocab_size: int = 16,
    seq_len: int = 256,
    seed: int = 0,
) -> Batch:
    """Induction heads (Mamba §4.1; defaults are the paper's training setting: vocabulary 16, length 256).

    Token layout: 0 unused, 1 = special token, random tokens uniform in [2, vocab_size). The special
    token appears once at a random position p in [0, seq_len - 3], followed by the target at p + 1;
    the last token is the special token again, labelled with the target.

    Args:
        num_examples: N.
        vocab_size: V >= 4 (at least two content tokens).
        seq_len: L >= 3.
        seed: seed of the private random generator.

    Returns:
        A :class:`~linmix.tasks.base.Batch` [N, L] with one scored position per example (the last).

    Example:
        >>> batch = induction_heads(2, vocab_size=8, seq_len=10)
        >>> row = batch.input_ids[0].tolist()
        >>> row[-1], row.count(1), row[row.index(1) + 1] == batch.labels[0, -1].item()
        (1, 2, True)
    """
    num_examples = check_int("num_examples", num_examples, minimum=1)
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    if vocab_size < _FIRST_CONTENT + 2:
        raise ValueError(
            f"vocab_size must be >= {_FIRST_CONTENT + 2} for induction_heads (0 unused, 1 special, at least "
            f"two content tokens), got {vocab_size}"
        )
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 for induction_heads (special, target, special), got {seq_len}")
    generator = make_generator(seed)
    input_ids = torch.randint(_FIRST_CONTENT, vocab_size, (num_examples, seq_len), generator=generator)
    special_positions = torch.randint(0, seq_len - 2, (num_examples, 1), generator=generator)
    targets = input_ids.gather(1, special_positions + 1)  # the random token after the special one

    input_ids.scatter_(1, special_positions, SPECIAL_TOKEN)
    input_ids[:, -1] = SPECIAL_TOKEN
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -1:] = targets
    return Batch(input_ids, labels)
