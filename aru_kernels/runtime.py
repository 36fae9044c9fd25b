"""Where the kernels can run: CUDA devices, or CPU tensors under Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel module is imported, so the
interpreter must be chosen before :mod:`aru_kernels` is imported (the test
suite does this in ``tests/conftest.py``).
"""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "fused_available", "default_impl", "kernel_device_error"]


def interpreting() -> bool:
    """True when this package's Triton kernels run in the interpreter (on CPU tensors):
    when ``TRITON_INTERPRET=1`` was set as they were imported. Triton decides it then,
    so the variable's value now does not change it."""
    global _interpreted
    if _interpreted is None:  # (asked at every launch: found once, as it is fixed once the kernels are imported)
        _interpreted = _kernels_interpreted()
    return _interpreted


_interpreted: bool | None = None


def _kernels_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    from . import relu_bits  # any kernel module: Triton made all of them the same way

    return isinstance(relu_bits.store_relu_mask, InterpretedFunction)


def _interpret_set_late() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and not interpreting()


def fused_available() -> bool:
    """True when the fused kernels can run somewhere on this machine."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


def default_impl() -> str:
    """The implementation models pick when none is named: ``"fused"`` on a CUDA
    machine with Triton, ``"eager"`` elsewhere (the interpreter is for testing)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "eager"
    return "fused" if torch.cuda.is_available() else "eager"


def kernel_device_error(t: torch.Tensor, name: str) -> str | None:
    """Why tensor ``t`` cannot be fed to a kernel, or None if it can."""
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu" and interpreting():
        return None
    where = "a CUDA device" + (" (or a CPU tensor with TRITON_INTERPRET=1 set before import)"
                               if t.device.type == "cpu" else "")
    late = (" (TRITON_INTERPRET=1 is set, but only after aru_kernels was imported: Triton reads it as the "
            "kernels are imported, so set it before)" if t.device.type == "cpu" and _interpret_set_late() else "")
    return f"{name} must be on {where}; got a tensor on {t.device}{late}"
