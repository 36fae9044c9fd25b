"""Ahead-of-time compilation of kernel specializations, no GPU needed.

Triton compiles for a named GPU target on any machine. Compiling every
specialization a model uses catches what the interpreter forgives (a dot with
K < 16, shared memory over the limit), and the PTX and cubin say whether
tensor-core instructions were emitted and how many registers each program
needs. Triton must not be in interpreter mode in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from . import conv as _conv
from .conv_ops import kernel_arguments
from .plans import ConvPlan

__all__ = ["AotResult", "compile_plan"]

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class AotResult:
    arch: int
    mma: str  # "wgmma", "mma" or "none": the tensor-core instruction family in the PTX
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int

    @property
    def tensor_cores(self) -> bool:
        return self.mma != "none"


def _signature(plan: ConvPlan) -> tuple[dict, dict]:
    def meta(dtype):
        return torch.empty(0, dtype=dtype, device="meta")

    f32 = meta(torch.float32)
    act = meta(plan.dtype)
    weight = torch.empty((plan.c_out, plan.cin_g, plan.kh, plan.kw), dtype=plan.dtype, device="meta")

    def vec(present):
        return f32 if present else None

    part = vec(plan.stats or plan.pro_bwd)
    args = kernel_arguments(
        plan, act, weight, act, mean=vec(plan.has_mean or plan.pro_mean), var=vec(plan.has_var),
        scale=vec(plan.has_scale or plan.pro_bwd), shift=vec(plan.has_shift or plan.pro_bwd),
        residual=act if plan.has_residual or plan.pro_bwd else None, in_mean=vec(plan.pro_mean),
        in_scale=vec(plan.has_prologue), in_shift=vec(plan.has_prologue), part_a=part, part_b=part,
    )
    constexprs = plan.constexprs()
    signature = {}
    for name in _conv.conv_bn_act_kernel.arg_names:
        value = args[name]
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_DTYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, constexprs


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, spill bytes) read off the cubin with the cuobjdump Triton ships."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    regs = re.search(r"REG:(\d+)", res.stdout)
    stack = re.search(r"STACK:(\d+)", res.stdout)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None)


def compile_plan(plan: ConvPlan, arch: int = 90) -> AotResult:
    """Compile the conv kernel specialization of ``plan`` for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(_conv.conv_bn_act_kernel, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset when aru_kernels is imported")
    signature, constexprs = _signature(plan)
    src = ASTSource(fn=_conv.conv_bn_act_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": plan.num_warps, "num_stages": plan.num_stages})
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    regs, spills = _resource_usage(compiled.asm["cubin"])
    return AotResult(arch=arch, mma=mma, registers=regs, spill_bytes=spills,
                     shared_bytes=compiled.metadata.shared)
