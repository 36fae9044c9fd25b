"""Shared test helpers: the per-dtype tolerance table, a comparison that says what differs,
and a log of the operators a call dispatches."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Relative tolerance per dtype of the tensors under test, applied as
# |actual - expected| <= tol * (|expected| + max|expected|): relative for large
# elements, scaled-absolute for elements near zero. Inputs of a low-precision
# case are rounded to that dtype first and the float64 reference sees the same
# rounded values, so the budget covers accumulation order and output rounding.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

POISON = float("nan")


def static_model():
    """``benchmarks/aot_check.py`` as a module: the static model's recorder and counts."""
    import importlib
    import os
    import sys

    benchmarks = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    return importlib.import_module("aot_check")


def launch_signatures(launches) -> list:
    """What fixes each launch's compiled code and work, in launch order: kernel, role, grid,
    warps, stages, and each argument's dtype, shape and strides (tensors) or value."""
    return [(l.kernel.fn.__name__, l.role, l.grid, l.num_warps, l.num_stages,
             tuple((k, (v.dtype, tuple(v.shape), v.stride()) if isinstance(v, torch.Tensor) else repr(v))
                   for k, v in l.args.items())) for l in launches]


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 *, tol: float | None = None, what: str = "output") -> None:
    """Fail with a message naming how many elements differ, and the worst one."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    if tol is None:
        tol = tolerance(dtype if dtype is not None else actual.dtype)
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs()
    bad = ~(err <= tol * (e.abs() + scale))  # NaN counts as bad
    if bad.any():
        n_bad = int(bad.sum())
        nan = int(torch.isnan(a).sum())
        worst = torch.nan_to_num(err, nan=float("inf")).argmax().item()
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{what}: {n_bad} of {a.numel()} elements differ beyond tol={tol:g} "
            f"({nan} NaN, i.e. unwritten or invalid); worst at {idx}: got {a[idx].item():.6g}, "
            f"expected {e[idx].item():.6g}; max |expected| = {scale:.4g}"
        )


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_as_accurate(actual: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor, *,
                       factor: float = 3.0, floor: float = 1e-5, what: str = "output") -> None:
    """``actual`` is at most ``factor`` times farther from ``reference`` (float64)
    than ``baseline`` (PyTorch's own result in the same precision) is, plus ``floor``.

    For quantities whose conditioning, not the kernels, sets the error: a
    batch-norm gradient over few pixels, a loss near zero.
    """
    err, base = rel_error(actual, reference), rel_error(baseline, reference)
    assert err <= factor * base + floor, (
        f"{what}: relative error {err:.3e} vs float64, PyTorch's {base:.3e} (allowed {factor}x + {floor:g})")


class OpLog(TorchDispatchMode):
    """Every dispatched op's name (``aten.add``, ``aru.conv_bn_act``, ...), and with it the
    shapes of the tensors it produced."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        results = out if isinstance(out, (tuple, list)) else (out,)
        self.shapes.append([tuple(t.shape) for t in results if isinstance(t, torch.Tensor)])
        return out
