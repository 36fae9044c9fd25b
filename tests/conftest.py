"""Test-suite setup: interpreter selection, seeding, GPU marker handling.

Triton reads ``TRITON_INTERPRET`` when a kernel module is imported, so it is
set here, before any test module imports :mod:`aru_kernels`: on a machine
without CUDA every kernel runs on CPU tensors through Triton's interpreter.
"""

import dataclasses
import os
import random

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # run every kernel on CPU tensors through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _interpret_without_overflow_checks():
    """The interpreter checks every 32-bit integer add, subtract and multiply for overflow: it
    casts both operands to 64 bits, computes again, compares with the limits and asserts, about
    half of its time in this suite (cProfile of the whole-model training test). A compiled kernel
    has no such check (it is a device assert, compiled in only in debug mode), and no test shape
    comes near 32-bit limits, so the suite runs without it. Triton offers no switch for this:
    where its interpreter's builder does not look as expected, the checks stay on."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and "sanitize_overflow" in {f.name for f in dataclasses.fields(options)}:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


if not HAS_CUDA:
    _interpret_without_overflow_checks()


def _interpreter_runs_loops_over_program_ids() -> str | None:
    """A loop whose bounds come from ``tl.program_id`` (every kernel here has one) through the
    interpreter; what went wrong, or None. Triton 3.6's interpreter turns such a bound into an
    int with ``int(array)`` of a one-element array, which numpy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"): without this check, every
    kernel test fails with that message."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, STEP: tl.constexpr):
        start = tl.program_id(0) * STEP
        total = 0
        for i in range(start, start + STEP):
            total += i
        tl.store(out_ptr + tl.program_id(0), total)

    out = torch.zeros(2, dtype=torch.int32)
    try:
        probe[(2,)](out, 3)
    except Exception as exc:  # the interpreter wraps what failed
        return f"{type(exc).__name__}: {exc}"
    return None if out.tolist() == [3, 12] else f"the probe computed {out.tolist()}, not [3, 12]"


def pytest_configure(config):
    if HAS_CUDA:
        return
    failure = _interpreter_runs_loops_over_program_ids()
    if failure:
        import triton

        pytest.exit(f"Triton {triton.__version__}'s interpreter cannot run this package's kernels with numpy "
                    f"{np.__version__}: {failure}. Install numpy<2.4 or triton>=3.8.", returncode=4)


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
