"""A pool of forked worker processes joined in one gloo process group, reused by many tests.

Starting a process that imports torch and linmix costs seconds, so each world size W gets one
group of W workers for the whole session: the workers are forked from the test process (all
modules already imported) and run task functions -- module-level functions, sent by reference --
on every rank. A task's return values come back per rank; an exception on any rank fails the
test with every rank's traceback, and a group that failed or hung is torn down and re-created
for the next test.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import linmix

TASK_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    linmix.set_debug(True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TASK_TIMEOUT_S / 2))
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, kwargs = item
        try:
            results.put((rank, True, fn(**kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the test process
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerGroup:
    """W forked worker processes in one gloo group; ``run(fn, **kwargs)`` calls fn on every rank."""

    def __init__(self, world_size: int):
        ctx = mp.get_context("fork")  # forked: no re-import of torch / linmix / transformers per worker
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.broken = False

    def run(self, fn: Callable[..., Any], **kwargs) -> list[Any]:
        """fn(**kwargs) on every rank; returns the per-rank results (raises AssertionError on any failure)."""
        for q in self.tasks:
            q.put((fn, kwargs))
        out: dict[int, Any] = {}
        errors: list[str] = []
        try:
            while len(out) + len(errors) < self.world_size:
                # once a rank failed, the others may wait forever in a collective: do not wait long
                rank, ok, value = self.results.get(timeout=5.0 if errors else TASK_TIMEOUT_S)
                if ok:
                    out[rank] = value
                else:
                    errors.append(f"--- rank {rank} ---\n{value}")
        except queue.Empty:
            self.broken = True
            self.close()
            if not errors:
                raise AssertionError(f"{fn.__name__}: no answer from some rank within {TASK_TIMEOUT_S} s") from None
        if errors:
            self.broken = True
            self.close()
            raise AssertionError(f"{fn.__name__} failed:\n" + "\n".join(errors))
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5.0 if not self.broken else 0.5)
            if p.is_alive():  # stuck in a collective of a failed task: end this worker (ours, by pid)
                os.kill(p.pid, 9)
                p.join(timeout=5.0)
