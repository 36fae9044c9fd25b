"""Test-suite setup: interpreter selection, seeding, GPU marker handling.

Triton reads ``TRITON_INTERPRET`` when a kernel module is imported, so it is
set here, before any test module imports :mod:`aru_kernels`: on a machine
without CUDA every kernel runs on CPU tensors through Triton's interpreter.
"""

import os
import random

import torch

if not torch.cuda.is_available():
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
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """Where kernels run in this session: CUDA if present, else CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
