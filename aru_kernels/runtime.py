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
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    return f"{name} must be on {where}; got a tensor on {t.device}"
