"""Test-suite setup: interpreter selection, seeding, GPU marker handling.

Triton reads ``TRITON_INTERPRET`` when a kernel module is imported, so it is
set here, before any test module imports :mod:`aru_kernels`: on a machine
without CUDA every kernel runs on CPU tensors through Triton's interpreter.
"""

import os
import random

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # run every kernel on CPU tensors through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def poisoned():
    """While the test runs, every ``torch.empty`` float tensor starts as NaN
    (PyTorch's deterministic mode fills uninitialized memory), the buffers
    the operators allocate for their outputs included: an element a kernel
    fails to write reads NaN and fails the comparison."""
    was_on, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def device():
    """Where kernels run in this test run: CUDA if present, else CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
