"""The static cost model: every kernel a model launches, compiled for a GPU
target exactly as Triton's JIT compiles it at launch, and read from its SASS.

No GPU is needed. The launches come from running the operators under
:func:`aru_kernels.launch.recording` on meta tensors (their ``data_ptr()`` is
0, aligned like the caching allocator's). Each one is specialized by
Triton's own binder (``triton.runtime.jit``): pointers and ints divisible by
16 get the divisibility hint, ints equal to 1 become constants, just as at
launch. The cubin's SASS then gives registers, spills, shared memory,
tensor-core instruction counts, the widths of global loads and stores, and
the dynamic instruction count per warp (each loop's body times its trip
count, which the launch knows), and the same for the multiply-adds of its
tensor-core instructions (each ``HGMMA.MxNxK`` or ``HMMA.MNK`` by its shape).
From those:

* issue-slot floor = the instructions of the busiest warp scheduler / clock:
  the programs spread over the SMs, the busiest SM runs ``ceil(programs /
  SMs)`` of them (128 programs leave 4 of 132 SMs idle; 133 take a second
  round on one), its warps shared by its 4 schedulers; the time the
  instructions alone need at full issue rate;
* DRAM floor = the bytes of the launch's distinct tensors / copy bandwidth;
* tensor floor = the busiest SM's tensor-core FLOPs / its share of the
  measured dense matrix-multiply rate: what the compiled code multiplies,
  padded blocks and masked tiles included (a TF32 FLOP counts two, at half
  the rate); ``mma.sync`` is charged at ``wgmma``'s rate, so for it the floor
  is optimistic;

and a kernel's floor is the largest of the three. Triton must not be in
interpreter mode in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, replace

import torch

from .launch import Launch

__all__ = ["GpuProfile", "H200", "KernelReport", "cache_dir", "compile_launch", "analyze", "launch_bytes", "launch_key",
           "loop_extra", "mma_flops", "resident_warps"]


@dataclass(frozen=True)
class GpuProfile:
    name: str
    sms: int
    clock_GHz: float
    copy_TBps: float  # measured device-to-device copy bandwidth (read + write)
    max_shared_bytes: int  # shared memory one block may have (opt-in); a kernel needing more does not launch
    mm_TFLOPs: float  # measured dense bf16 matrix-multiply rate (a large torch.mm)

    def to_json(self) -> dict:
        return {"sms": self.sms, "clock_GHz": self.clock_GHz, "copy_TBps": self.copy_TBps,
                "max_shared_bytes": self.max_shared_bytes, "mm_TFLOPs": self.mm_TFLOPs}


# shared/anchors of this project: copy and matrix rates measured on an H200 (benchmarks/NOTES.md)
H200 = GpuProfile("NVIDIA H200", sms=132, clock_GHz=1.98, copy_TBps=4.144, max_shared_bytes=232448,  # 227 KiB
                  mm_TFLOPs=714.8)

_SCHEDULERS_PER_SM = 4
# sm_90's per-multiprocessor limits (CUDA occupancy rules): registers, allocated per warp in
# units of 256 (8 a thread); resident warps and blocks; shared memory, 1 KiB of it reserved a block
_REGISTERS_PER_SM, _REGISTER_UNIT = 65536, 8
_WARPS_PER_SM, _BLOCKS_PER_SM = 64, 32
_SHARED_PER_SM, _SHARED_PER_BLOCK_RESERVED = 233472, 1024


def resident_warps(registers: int, shared_bytes: int, num_warps: int, programs: int, sms: int) -> int:
    """The warps a multiprocessor holds at once running a launch of ``programs`` programs of
    ``num_warps`` warps on ``sms`` multiprocessors, each thread holding ``registers`` and each
    program ``shared_bytes``: what hides its latency (the issue floor assumes it is hidden).
    The least of what the registers, the shared memory, the warp and block limits, and the
    busiest multiprocessor's share of the programs allow."""
    per_warp = -(-max(registers, 1) // _REGISTER_UNIT) * _REGISTER_UNIT * 32
    blocks = min(_REGISTERS_PER_SM // per_warp // num_warps,
                 _SHARED_PER_SM // (shared_bytes + _SHARED_PER_BLOCK_RESERVED),
                 _WARPS_PER_SM // num_warps, _BLOCKS_PER_SM, -(-programs // sms))
    return blocks * num_warps


@dataclass
class KernelReport:
    """What the compiled code of one launch says (per launch, not per step)."""

    registers: int | None
    spill_bytes: int | None
    shared_bytes: int
    hgmma: int
    hmma: int
    loads: dict  # global load opcode (e.g. "LDG.E.128", "LDGSTS.E.BYPASS.128") -> static count
    stores: dict
    static_instr: int
    loops: int  # loops found in the SASS
    dyn_instr_per_warp: int
    loop_sizes: tuple = ()  # instructions in each outer loop's body, in program order
    nested_sizes: tuple = ()  # of those, the instructions in loops nested inside each
    # the same three counts for tensor-core FLOPs a warp issues (bf16 rate: a TF32 FLOP counts two)
    static_mma_flops: int = 0
    loop_mma_flops: tuple = ()
    nested_mma_flops: tuple = ()
    mma_flops_per_warp: int = 0  # dynamic, at the launch's trips

    def with_trips(self, loop_trips: list) -> "KernelReport":
        """The same compiled code at other loop trip counts (another launch of it).

        An entry per outer loop: its trip count, or ``(trips, inner)`` for a loop with
        loops nested inside, ``inner`` the trips of those summed over the outer loop's.
        """
        def dynamic(static, sizes, nested):
            sizes = sizes or (0,) * len(self.loop_sizes)
            return static + loop_extra(sizes, nested or (0,) * len(sizes), loop_trips)

        return replace(self, dyn_instr_per_warp=dynamic(self.static_instr, self.loop_sizes, self.nested_sizes),
                       mma_flops_per_warp=dynamic(self.static_mma_flops, self.loop_mma_flops,
                                                  self.nested_mma_flops))

    def floors(self, launch: Launch, gpu: GpuProfile) -> tuple[float, float, float]:
        """(issue-slot floor, DRAM floor, tensor floor) of one launch, in microseconds."""
        per_sm = -(-launch.programs // gpu.sms)  # the busiest multiprocessor's programs
        per_scheduler = -(-per_sm * launch.num_warps // _SCHEDULERS_PER_SM)  # its busiest scheduler's warps
        issue = per_scheduler * self.dyn_instr_per_warp / (gpu.clock_GHz * 1e3)
        dram = launch_bytes(launch) / (gpu.copy_TBps * 1e6)
        tensor = per_sm * launch.num_warps * self.mma_flops_per_warp / (gpu.mm_TFLOPs * 1e6 / gpu.sms)
        return issue, dram, tensor


def loop_extra(loop_sizes, nested_sizes, loop_trips) -> int:
    """Instructions a warp runs beyond the straight-line count, from each outer loop's body
    size, the size of the loops nested in it and its trips (as :meth:`KernelReport.with_trips`);
    a loop run at most once counts its body once."""
    extra = 0
    for n, inner, t in zip(loop_sizes, nested_sizes, loop_trips):
        if isinstance(t, int):  # its whole body, nested loops and all, repeats t times
            extra += (max(1, t) - 1) * n
        else:
            t_out, t_in = t
            extra += (max(1, t_out) - 1) * (n - inner) + (max(1, t_in) - 1) * inner
    return extra


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _jit_function(kernel):
    import triton

    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("the static model compiles kernels: TRITON_INTERPRET must be unset when "
                           "aru_kernels is imported")
    return kernel


def _bind(launch: Launch, arch: int):
    """Triton's own binder applied to the launch's arguments, as at a launch on ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = _jit_function(launch.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.args, num_warps=launch.num_warps, num_stages=launch.num_stages, **_jit_options(kernel))
    return kernel, target, backend, kwargs, binder(**kwargs)


def _jit_options(kernel) -> dict:
    """The options ``JITFunction.run`` adds to a launch's own before it binds them (its
    debug switch, the instrumentation mode), so the compile options, and with them the
    cache key, are the JIT's."""
    from triton import knobs

    options = {"debug": kernel.debug or knobs.runtime.debug}
    if hasattr(knobs.compilation, "instrumentation_mode"):
        options["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    return options


def compile_launch(launch: Launch, arch: int = 90):
    """Compile the kernel of ``launch`` for ``sm_<arch>`` as the JIT would at that launch."""
    import triton
    from triton.compiler import ASTSource

    kernel, target, backend, kwargs, (bound_args, specialization, options) = _bind(launch, arch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def cache_dir() -> str:
    """Triton's on-disk kernel cache, where :func:`compile_launch` and the JIT put what they compile."""
    import triton

    cache = getattr(getattr(triton, "knobs", None), "cache", None)  # triton >= 3.4
    return str(getattr(cache, "dir", None) or os.environ.get("TRITON_CACHE_DIR")
               or os.path.join(os.path.expanduser("~"), ".triton", "cache"))


def launch_key(launch: Launch, arch: int) -> tuple:
    """What fixes the compiled code of a launch: kernel, specialization, compile options
    (warps, stages, a register cap; not the grid)."""
    kernel, _, _, _, (_, specialization, options) = _bind(launch, arch)
    return (kernel.fn.__name__, str(specialization), tuple(sorted(options.items())), arch)


def launch_bytes(launch: Launch) -> int:
    """Ideal DRAM bytes of a launch: each distinct tensor argument read or written once,
    or the share of it that the launcher says the launch touches (``meta["byte_share"]``,
    by argument name: one output phase of a strided input gradient writes a quarter of
    dx). Arguments a launch does not use point at one it does, so they count once."""
    share = launch.meta.get("byte_share", {})
    size, fraction = {}, {}
    for name, v in launch.args.items():
        if isinstance(v, torch.Tensor):
            size[id(v)] = v.numel() * v.element_size()
            fraction[id(v)] = min(fraction.get(id(v), 1.0), share.get(name, 1.0))
    return int(sum(fraction[k] * n for k, n in size.items()))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
# warpgroup MMA: "HGMMA.64x128x16.F32.BF16" (the opcode pattern above stops at the "x"); warp MMA: "HMMA.16816.F32.BF16"
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\.\w+\.(\w+)")
_HMMA_SHAPE = re.compile(r"^HMMA\.16(8)(\d+)\.\w+\.(\w+)")
_RATE = {"BF16": 1, "F16": 1, "TF32": 2, "E4M3": 0.5, "E5M2": 0.5}  # FLOP cost against a bf16 FLOP


def mma_flops(text: str) -> int:
    """The FLOPs (2 per multiply-add, at the bf16 rate) that one warp's issue of the SASS
    instruction ``text`` (opcode and operands) computes: a ``wgmma`` tile is the 4 warps of its
    warpgroup's together; 0 for anything else (``HFMA2.MMA`` is not a tensor-core op)."""
    m = _HGMMA_SHAPE.match(text)
    if m:
        return int(2 * int(m[1]) * int(m[2]) * int(m[3]) * _RATE.get(m[4], 1) // 4)
    m = _HMMA_SHAPE.match(text)
    if m:
        return int(2 * 16 * int(m[1]) * int(m[2]) * _RATE.get(m[3], 1))
    return 0


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None)


def analyze(compiled, loop_trips: list[int]) -> KernelReport:
    """Read the SASS of ``compiled``; ``loop_trips`` are the trip counts of the
    kernel's loops in program order (loops the SASS has beyond them count once)."""
    cubin = compiled.asm["cubin"]
    sass = _sass(cubin)
    instrs: list[tuple[int, str, str]] = []  # (address, opcode, operands)
    for line in sass.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            instrs.append((int(m.group(1), 16), m.group(3), m.group(4)))
    flops = [mma_flops(op + rest) for _, op, rest in instrs if op != "NOP"]
    body = [(a, op, rest) for a, op, rest in instrs if op != "NOP"]
    index = {a: i for i, (a, _, _) in enumerate(body)}
    loops = []  # (first, last) instruction index of each backward branch's range
    for i, (addr, op, rest) in enumerate(body):
        t = _BRANCH_TARGET.search(rest) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < addr and int(t.group(1), 16) in index:
            loops.append((index[int(t.group(1), 16)], i))
    loops.sort()
    def inside(lp, o):
        return o != lp and o[0] <= lp[0] and lp[1] <= o[1]

    # the outermost loops, and for each the loops directly inside it
    outer = [lp for lp in loops if not any(inside(lp, o) for o in loops)]
    nested = [[lp for lp in loops if inside(lp, o) and not any(inside(lp, m) and inside(m, o) for m in loops)]
              for o in outer]
    ops = Counter(op for _, op, _ in body)
    regs, spills = _resource_usage(cubin)
    report = KernelReport(
        registers=regs, spill_bytes=spills, shared_bytes=compiled.metadata.shared,
        hgmma=sum(n for op, n in ops.items() if op.startswith("HGMMA")),
        hmma=sum(n for op, n in ops.items() if op.startswith("HMMA")),
        loads={op: n for op, n in sorted(ops.items()) if op.startswith(("LDG", "LDGSTS"))},
        stores={op: n for op, n in sorted(ops.items()) if op.startswith("STG")},
        static_instr=len(body), loops=len(outer), dyn_instr_per_warp=len(body),
        loop_sizes=tuple(end - start + 1 for start, end in outer),
        nested_sizes=tuple(sum(end - start + 1 for start, end in inner) for inner in nested),
        static_mma_flops=sum(flops),
        loop_mma_flops=tuple(sum(flops[start:end + 1]) for start, end in outer),
        nested_mma_flops=tuple(sum(sum(flops[start:end + 1]) for start, end in inner) for inner in nested),
    )
    return report.with_trips(loop_trips)
