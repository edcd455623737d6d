"""benchmarks/gpu.py on the CPU: its argument handling and launch-table edits, so that a device call is not spent
on an error the CPU can find (the GPU work itself needs CUDA: ``main`` says so and returns 2)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="benchmarks/gpu.py drives the Triton backends")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("linmix_gpu_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restored(gpu):
    restore = gpu._launch_state()
    yield
    restore()


def test_head_dims(gpu):
    assert gpu.head_dims("16:32") == (16, 32)
    assert gpu.head_dims("64") == (64, 64)


def test_gla_launch_edits_kernels_and_config_fields(gpu, restored):
    launch = importlib.import_module("linmix.ops.gla.triton").LAUNCH
    gpu.apply_gla_launch(json.dumps({"dv": {"num_warps": 2}, "chunk_size": 32}))
    assert (launch.kernels["dv"].num_warps, launch.chunk_size) == (2, 32)
    for bad in ({"nope": {"num_warps": 2}}, {"dv": {"nope": 1}}, {"nope": True}, {"kernels": 1}):
        with pytest.raises(SystemExit):
            gpu.apply_gla_launch(json.dumps(bad))


def test_delta_launch_edits_and_restores(gpu):
    launch = importlib.import_module("linmix.ops.delta_rule.triton").LAUNCH
    before = launch.wy_precompute
    restore = gpu._launch_state()
    gpu.apply_delta_launch(json.dumps({"wy_precompute": not before}))
    assert launch.wy_precompute is (not before)
    restore()
    assert launch.wy_precompute is before
    with pytest.raises(SystemExit):
        gpu.apply_delta_launch('{"nope": 1}')


def test_variant_overlap_switch_for_every_op(gpu):
    """'overlap' (the backward's side-stream scan) applies to any op; the rest goes to the op's launch table."""
    streams = importlib.import_module("linmix.ops.common.streams")
    delta = importlib.import_module("linmix.ops.delta_rule.triton").LAUNCH
    before = streams.OVERLAP, delta.warps_scan
    restore = gpu._launch_state()
    gpu.apply_variant("simple_gla", json.dumps({"overlap": not before[0]}))
    assert streams.OVERLAP is (not before[0])
    gpu.apply_variant("delta_rule", json.dumps({"overlap": before[0], "warps_scan": 2}))
    assert (streams.OVERLAP, delta.warps_scan) == (before[0], 2)
    with pytest.raises(SystemExit):
        gpu.apply_variant("linear_attn", '{"warps_scan": 2}')
    gpu.apply_variant("gated_delta_rule", json.dumps({"overlap": not before[0]}))
    restore()
    assert (streams.OVERLAP, delta.warps_scan) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
@pytest.mark.parametrize("argv", [
    ["check", "--isolate", "--force-kernels", "--head-dims", "16:32", "64", "--shapes", "2x4096"],
    ["tune", "--isolate", "--ops", "gla", "--tune-shape", "2x32768", "--variants", "{}", '{"chunk_size": 32}'],
    ["profile", "--ops", "gla", "delta_rule"],
    ["bench", "--fla", "--seq-lens", "2048"],
])
def test_arguments_parse_and_cpu_is_refused(gpu, argv, capsys):
    assert gpu.main(argv) == 2  # parsed (argparse would raise SystemExit), then refused: no CUDA
    assert "needs a CUDA device" in capsys.readouterr().err
