"""Every kernel launch of the operators goes through :func:`launch`, so that
the static cost model (:mod:`aru_kernels.aot`) can see what a model would
launch without running it: under :func:`recording`, launches are recorded
(kernel, grid, arguments by name, warps, stages) instead of run, and the
operators can be driven with meta tensors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

__all__ = ["Launch", "launch", "recording"]


@dataclass
class Launch:
    kernel: object  # the @triton.jit function
    grid: tuple[int, ...]
    args: dict  # argument name -> tensor, int, float or constexpr value; and a register cap, ``maxnreg``
    num_warps: int
    num_stages: int
    role: str = ""  # what the launch computes: "fwd", "dgrad", "wgrad", "bn_finalize", ...
    meta: dict = field(default_factory=dict)  # e.g. the convolution's geometry

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


_records: list[Launch] | None = None


@contextlib.contextmanager
def recording():
    """Collect the launches made inside this context instead of running them."""
    global _records
    previous, _records = _records, []
    try:
        yield _records
    finally:
        _records = previous


def launch(kernel, grid, *args, role: str, meta: dict | None = None, num_warps: int = 4, num_stages: int = 3,
           **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or a record of it under :func:`recording`."""
    grid = tuple(int(g) for g in grid)
    if _records is not None:
        named = dict(zip(kernel.arg_names, args))
        named.update(kwargs)
        _records.append(Launch(kernel, grid, named, num_warps, num_stages, role, meta or {}))
        return
    if min(grid) == 0 or any(getattr(a, "is_meta", False) for a in (*args, *kwargs.values())):
        return  # nothing to run (meta tensors only trace)
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **kwargs)
