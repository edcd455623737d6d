"""Fixtures of the sequence-parallel tests: one reusable gloo group of forked workers per world size."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.harness import WorkerGroup


@pytest.fixture(scope="session")
def groups():
    """``groups(W)``: a live :class:`WorkerGroup` of W ranks (re-created after a failure)."""
    live: dict[int, WorkerGroup] = {}

    def get(world_size: int) -> WorkerGroup:
        group = live.get(world_size)
        if group is None or group.broken:
            live[world_size] = group = WorkerGroup(world_size)
        return group

    yield get
    for group in live.values():
        group.close()


@pytest.fixture
def seed() -> int:
    """A seed drawn from the test's (reported, replayable) seed, shared by every rank of a task."""
    return int(torch.randint(0, 2**31 - 1, ()))
