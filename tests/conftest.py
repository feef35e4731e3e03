"""Test-wide fixtures: a fixed seed per test, and NaN-filled fresh tensors (deterministic mode
fills ``torch.empty`` with NaN, so an output an op forgot to write cannot pass by accident),
and a derandomized hypothesis profile under CI (a red run must be reproducible; locally
hypothesis keeps exploring new examples and stores the failures it finds)."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_and_nan_fill():
    torch.manual_seed(0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def single_thread():
    """One intra-op thread, for modules of tiny tensors: on a shared 2-core machine a busy
    neighbour made OpenMP's spinning threads ~50x slower per op (24 ms vs 0.5 ms measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
