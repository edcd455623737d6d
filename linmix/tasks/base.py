"""What every synthetic task shares: the :class:`Batch`, the seed ranges, argument checks, sampling.

Conventions of every generator in :mod:`linmix.tasks`:

* A generator is a pure function ``task(num_examples, *, ..., seed=0) -> Batch``: the same arguments
  give the same tensors (a private ``torch.Generator`` on the CPU; the global RNG is never touched).
* ``labels`` are already shifted: ``labels[i, t]`` is the token to predict from the prefix
  ``input_ids[i, :t + 1]``, and :data:`IGNORE_INDEX` (-100) where nothing is scored. A causal LM's
  logits ``[N, L, V]`` therefore compare with ``labels`` position by position, with no shift.
* Token 0 (:data:`BLANK_TOKEN`) is the blank / padding token of every task: it is never a key, a value
  or a scored answer, so :meth:`Batch.cat` can right-pad with it.
* Train and test data come from disjoint seed ranges: :func:`train_seed` gives seeds in
  :data:`TRAIN_SEEDS` = [0, 2**30) and :func:`test_seed` seeds in :data:`TEST_SEEDS` = [2**30, 2**31),
  so a train set and a test set are never drawn from the same random stream. (Two streams may still
  produce one identical example by chance; outside tiny vocabularies and lengths that is negligible.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""Label of the positions that are not scored (the default ``ignore_index`` of ``F.cross_entropy``)."""

BLANK_TOKEN = 0
"""Token 0: blank / padding in every task; never a key, a value or an answer."""

TRAIN_SEEDS = range(0, 2**30)
"""Seeds of training data (use :func:`train_seed`)."""

TEST_SEEDS = range(2**30, 2**31)
"""Seeds of test data (use :func:`test_seed`); disjoint from :data:`TRAIN_SEEDS`."""


def _check_seed_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**30:
        raise ValueError(f"seed index must be an int in [0, 2**30), got {index!r}")
    return index


def train_seed(index: int) -> int:
    """The ``index``-th training seed, in :data:`TRAIN_SEEDS` = [0, 2**30).

    Example:
        >>> train_seed(0), train_seed(7)
        (0, 7)
        >>> train_seed(3) in TEST_SEEDS
        False
    """
    return TRAIN_SEEDS[_check_seed_index(index)]


def test_seed(index: int) -> int:
    """The ``index``-th test seed, in :data:`TEST_SEEDS` = [2**30, 2**31); never a training seed.

    Example:
        >>> test_seed(0) == 2**30
        True
        >>> test_seed(3) in TRAIN_SEEDS
        False
    """
    return TEST_SEEDS[_check_seed_index(index)]


test_seed.__test__ = False  # a seed helper, not a test: keep pytest from collecting it where imported


@dataclass
class Batch:
    """Token sequences of a synthetic task and their (already shifted) labels.

    Attributes:
        input_ids: [N, L] int64 tokens.
        labels: [N, L] int64; ``labels[:, t]`` is the target predicted at position t (from
            ``input_ids[:, :t + 1]``), :data:`IGNORE_INDEX` (-100) where nothing is scored.

    Example:
        >>> import torch
        >>> batch = Batch(torch.arange(12).view(3, 4), torch.full((3, 4), -100))
        >>> len(batch), [len(b) for b in batch.split(2)], batch.num_scored
        (3, [2, 1], 0)
        >>> len(Batch.cat([batch, batch[:1]]))
        4
    """

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("input_ids", "labels"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"Batch: {name} must be an int64 tensor of shape [N, L], got {got}")
            if value.dim() != 2:
                raise ValueError(f"Batch: {name} must have shape [N, L], got {list(value.shape)}")
        if self.input_ids.shape != self.labels.shape:
            raise ValueError(
                f"Batch: labels must have the shape of input_ids {list(self.input_ids.shape)}, "
                f"got {list(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> Batch:
        """Examples ``index`` (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return Batch(self.input_ids[index], self.labels[index])

    @property
    def seq_len(self) -> int:
        """L, the length of every sequence."""
        return self.input_ids.shape[1]

    @property
    def num_scored(self) -> int:
        """How many positions carry a label (are not :data:`IGNORE_INDEX`)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with both tensors on ``device``."""
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
        )

    def split(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive minibatches of ``batch_size`` examples, in order (the last may be smaller)."""
        batch_size = check_int("batch_size", batch_size, minimum=1)
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]

    def shuffled(self, seed: int) -> Batch:
        """The examples in a random order drawn from ``seed`` (the same seed, the same order)."""
        order = torch.randperm(len(self), generator=make_generator(seed))
        return self[order.to(self.input_ids.device)]

    @staticmethod
    def cat(batches: Sequence[Batch], *, pad_id: int | None = None) -> Batch:
        """Concatenate batches along N.

        Args:
            batches: one or more batches.
            pad_id: ``None`` (default): every batch must have the same L. An int (usually
                :data:`BLANK_TOKEN`): right-pad shorter sequences to the longest L with ``pad_id`` and
                unscored labels; a causal model's outputs at the real positions are unchanged.

        Returns:
            A batch of ``sum(len(b) for b in batches)`` examples.
        """
        batches = list(batches)
        if not batches:
            raise ValueError("Batch.cat: batches must hold at least one Batch, got none")
        for i, batch in enumerate(batches):
            if not isinstance(batch, Batch):
                raise TypeError(f"Batch.cat: batches[{i}] must be a Batch, got {type(batch).__name__}")
        lengths = [batch.seq_len for batch in batches]
        max_len = max(lengths)
        if pad_id is None:
            if len(set(lengths)) > 1:
                raise ValueError(
                    f"Batch.cat: all batches must have the same sequence length L, got {lengths}; "
                    "pass pad_id (e.g. pad_id=0) to right-pad them to the longest"
                )
        else:
            pad_id = check_int("pad_id", pad_id, minimum=0)
            batches = [batch._right_pad(max_len, pad_id) for batch in batches]
        return Batch(
            torch.cat([batch.input_ids for batch in batches]),
            torch.cat([batch.labels for batch in batches]),
        )

    def _right_pad(self, length: int, pad_id: int) -> Batch:
        extra = length - self.seq_len
        if extra == 0:
            return self
        pad = self.input_ids.new_full((len(self), extra), pad_id)
        return Batch(
            torch.cat([self.input_ids, pad], dim=1),
            torch.cat([self.labels, torch.full_like(pad, IGNORE_INDEX)], dim=1),
        )


# ---------------------------------------------------------------------------------------------------
# argument checks


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_depth(depth: object) -> float | None:
    """``depth``: None (a random depth per example) or a fraction of the context in [0, 1]."""
    if depth is None:
        return None
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be None (random) or a float in [0, 1], got {depth!r}")
    return float(depth)


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (an int in [0, 2**63))."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# sampling, vectorised over examples


def sample_distinct(num_rows: int, k: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """Per row, ``k`` distinct ints of [low, high), uniformly over ordered k-tuples.

    Sparse draws (k <= n / 2 with n = high - low) are sequential draws without replacement: draw a
    row of m tokens with replacement, keep the first k distinct ones in order of drawing (m is the
    expected number of draws needed plus a margin; the rare rows that fall short are drawn again).
    Dense draws take the first k of a random permutation per row (the order of uniform noise). Both
    are vectorised over rows, with O(N k) memory.

    Returns:
        [num_rows, k] int64.

    Example:
        >>> draws = sample_distinct(4, 3, 10, 20, torch.Generator().manual_seed(0))
        >>> draws.shape, bool(((draws >= 10) & (draws < 20)).all())
        (torch.Size([4, 3]), True)
        >>> all(len(set(row.tolist())) == 3 for row in draws)
        True
    """
    n = high - low
    if k > n:
        raise ValueError(f"cannot draw {k} distinct values from the {n} ints of [{low}, {high})")
    if 2 * k > n:
        noise = torch.rand(num_rows, n, generator=generator)
        return noise.argsort(dim=1)[:, :k] + low
    # Draws needed to see k distinct values: a sum of geometric waits with success rates (n - i) / n.
    success = 1.0 - torch.arange(k, dtype=torch.float64) / n
    mean, var = (1 / success).sum().item(), ((1 - success) / success**2).sum().item()
    num_draws = math.ceil(mean + 4 * math.sqrt(var)) + 4
    out = torch.empty(num_rows, k, dtype=torch.int64)
    todo = torch.arange(num_rows)
    while todo.numel() > 0:
        draws = torch.randint(low, high, (todo.numel(), num_draws), generator=generator)
        sorted_draws, order = draws.sort(dim=1, stable=True)
        first_sorted = torch.ones_like(draws, dtype=torch.bool)
        first_sorted[:, 1:] = sorted_draws[:, 1:] != sorted_draws[:, :-1]
        # Back to drawing order: True at the first occurrence of each value.
        first = torch.zeros_like(first_sorted).scatter_(1, order, first_sorted)
        rank = first.cumsum(dim=1)
        done = rank[:, -1] >= k
        keep = first & (rank <= k) & done[:, None]  # exactly k per finished row, in drawing order
        out[todo[done]] = draws.masked_select(keep).view(-1, k)
        todo = todo[~done]
    return out


def sample_without_replacement(weights: torch.Tensor, num_rows: int, k: int,
                               generator: torch.Generator) -> torch.Tensor:
    """Per row, ``k`` distinct indices of ``weights`` [n], drawn one after another with p ~ weights.

    The indices come in the order of successive draws without replacement (like
    ``numpy.random.choice(n, k, replace=False, p=weights / weights.sum())``), computed for all rows at
    once as an exponential race: index i arrives at time E_i / w_i with E_i ~ Exp(1); the k earliest
    arrivals, in order of arrival.

    Returns:
        [num_rows, k] int64 in [0, n).
    """
    arrival = torch.empty(num_rows, weights.numel(), dtype=torch.float64).exponential_(generator=generator)
    arrival /= weights.to(torch.float64)
    return arrival.topk(k, dim=1, largest=False, sorted=True).indices


def sample_starts(num_rows: int, num_starts: int, depth: float | None, generator: torch.Generator) -> torch.Tensor:
    """Start positions in [0, num_starts) of a block placed at ``depth`` of the context.

    ``depth`` 0 puts the block first, 1 as late as possible, ``None`` draws a uniform start per row.

    Returns:
        [num_rows] int64.
    """
    if depth is None:
        return torch.randint(0, num_starts, (num_rows,), generator=generator)
    # round half up, identical on every platform (Python's round() rounds half to even)
    return torch.full((num_rows,), math.floor(depth * (num_starts - 1) + 0.5), dtype=torch.int64)
