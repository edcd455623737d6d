"""Synthetic recall benchmarks: seeded, vectorised generators of token sequences and shifted labels.

Every generator is ``task(num_examples, *, ..., seed=0) -> Batch`` (see :mod:`linmix.tasks.base` for
the conventions: labels already shifted, -100 where nothing is scored, token 0 blank, disjoint train
and test seed ranges).

- :func:`mqar`: multi-query associative recall (Zoology), with JRT repeats (``num_passes``).
- :func:`passkey`, :func:`needle`: retrieval of a hidden passkey / key-value pair at a given depth.
- :func:`selective_copying`, :func:`induction_heads`: the synthetic tasks of Mamba §4.1.
- :data:`TASKS` and :func:`make_task`: the generators by name.

Example:
    >>> import torch
    >>> from linmix.tasks import make_task, train_seed, test_seed
    >>> train = make_task("mqar", 8, seq_len=32, num_kv_pairs=4, seed=train_seed(0))
    >>> test = make_task("mqar", 8, seq_len=32, num_kv_pairs=4, seed=test_seed(0))
    >>> train.input_ids.shape, torch.equal(train.input_ids, test.input_ids)
    (torch.Size([8, 32]), False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from linmix.tasks.base import (
    BLANK_TOKEN,
    IGNORE_INDEX,
    TEST_SEEDS,
    TRAIN_SEEDS,
    Batch,
    test_seed,
    train_seed,
)
from linmix.tasks.mqar import mqar
from linmix.tasks.retrieval import needle, passkey
from linmix.tasks.synthetic import induction_heads, selective_copying

TASKS: dict[str, Callable[..., Batch]] = {
    "mqar": mqar,
    "passkey": passkey,
    "needle": needle,
    "selective_copying": selective_copying,
    "induction_heads": induction_heads,
}
"""The task generators by name."""


def make_task(name: str, num_examples: int, **kwargs: Any) -> Batch:
    """``TASKS[name](num_examples, **kwargs)``, with a clear error for an unknown name.

    Example:
        >>> len(make_task("induction_heads", 3, seq_len=16))
        3
    """
    try:
        task = TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}") from None
    return task(num_examples, **kwargs)


__all__ = [
    "Batch",
    "IGNORE_INDEX",
    "BLANK_TOKEN",
    "TRAIN_SEEDS",
    "TEST_SEEDS",
    "train_seed",
    "test_seed",
    "mqar",
    "passkey",
    "needle",
    "selective_copying",
    "induction_heads",
    "TASKS",
    "make_task",
]
