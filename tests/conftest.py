"""Test-suite settings: value checks on, fresh seeds (reported on failure), one intra-op thread."""

import os

import pytest
import torch

import linmix


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Test shapes are tiny: intra-op threads only add synchronisation cost (10-50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _debug_and_seed(request):
    """Value checks on for every device, and a fresh seed per test (set LINMIX_TEST_SEED to replay)."""
    linmix.set_debug(True)
    seed = int(os.environ.get("LINMIX_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with LINMIX_TEST_SEED={seeds[-1]}"))
