"""linmix.ops.common.streams.Fork: the order of its stream operations, and a no-op off the GPU.

The CUDA path is checked here with recording stand-ins for torch.cuda's stream calls (CI has no
GPU; the H200 runs of ``benchmarks/gpu.py check`` exercise the real one in every backward).
"""

import types

import pytest
import torch

from linmix.ops.common import streams
from linmix.ops.common.streams import Fork, on_side


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream calls replaced by stand-ins that log what happens, and a 'CUDA tensor'."""
    log = []
    main = FakeStream("main", log)
    current = [main]

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            log.append(f"enter {self.stream.name}")
            current.append(self.stream)

        def __exit__(self, *exc):
            current.pop()
            log.append(f"leave {self.stream.name}")

    monkeypatch.setattr(streams, "_SIDE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    like = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    return like, log, current


def test_side_waits_at_entry_not_at_construction(fake_cuda):
    """Work given to the current stream between Fork() and side() (e.g. the WY kernel the forward scan reads)
    must be waited for: the wait happens when the side block starts, and the block runs on the side stream."""
    like, log, current = fake_cuda
    fork = Fork(like, enabled=True)
    log.append("launch W on main")
    with fork.side():
        log.append(f"launch scan on {current[-1].name}")
    log.append(f"launch reverse scan on {current[-1].name}")
    fork.join()
    assert log == ["launch W on main", "side waits main", "enter side", "launch scan on side", "leave side",
                   "launch reverse scan on main", "main waits side"]


def test_one_side_stream_per_device(fake_cuda):
    like, _, _ = fake_cuda
    assert Fork(like, enabled=True).stream is Fork(like, enabled=True).stream


def test_switched_off_or_on_cpu_runs_in_place(fake_cuda, monkeypatch):
    """enabled=False, the module switch off, or a CPU tensor: no stream calls, the block runs where it is."""
    like, log, current = fake_cuda
    monkeypatch.setattr(streams, "OVERLAP", False)
    for fork in (Fork(like, enabled=False), Fork(like), Fork(torch.zeros(1), enabled=True)):
        assert not fork.active
        with fork.side():
            log.append(f"launch on {current[-1].name}")
        fork.join()
    with on_side(None):
        log.append(f"launch on {current[-1].name}")
    assert log == ["launch on main"] * 4
