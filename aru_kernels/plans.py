"""Launch plans: the block sizes, grids and compile-time arguments of every
kernel launch, as short named rules of the shape.

On a GPU the rules aim at tensor-core tiles and enough programs to fill the
multiprocessors. Triton's interpreter pays per program instance rather than
per element, so there the rules pick fewer, larger programs: the same math
in other tiles. Tests that must exercise several tiles, several weight-gradient
splits or several finalize blocks on small shapes run under
:func:`device_block_sizes`, which makes the interpreter use the GPU's rules.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .runtime import interpreting

__all__ = [
    "ConvPlan",
    "TAP_KINDS",
    "TAP_PROGRAMS_PER_SM",
    "Tiles",
    "tap_key",
    "tap_plan",
    "tuned_table",
    "use_tuned_table",
    "gpu_slug",
    "WgradPlan",
    "plan_conv",
    "plan_wgrad",
    "pack_factor",
    "out_size",
    "elementwise_blocks",
    "pool_blocks",
    "max_pool_blocks",
    "normalizes_ahead",
    "block_end_fuses",
    "pointwise_grads_fuse",
    "plan_pointwise_grads",
    "finalize_blocks",
    "slab_sum_blocks",
    "finalize_chunks",
    "device_block_sizes",
    "H200_MULTIPROCESSORS",
]

# Tensor-core dots need K and N of at least 16 (16-bit operands).
MIN_DOT = 16
# What plans on a machine without a GPU assume under device_block_sizes().
H200_MULTIPROCESSORS = 132

_device_rules = False
# The multiprocessors the rules plan for where they cannot ask a device: ConvPlan's tile
# rules (ConvPlan.wide_forward) and, without a GPU, the split counts.
_assumed_multiprocessors = H200_MULTIPROCESSORS


@contextlib.contextmanager
def device_block_sizes(multiprocessors: int = H200_MULTIPROCESSORS):
    """Within this context the interpreter plans launches with the GPU's block
    sizes, for a GPU of ``multiprocessors`` multiprocessors (an H200's 132):
    many small programs, as on a GPU, so that small test shapes span several
    tiles. Fewer multiprocessors let a small shape take the tiles a large one
    takes on the full GPU."""
    global _device_rules, _assumed_multiprocessors
    if int(multiprocessors) < 1:
        raise ValueError(f"device_block_sizes: multiprocessors must be at least 1, got {multiprocessors}")
    previous = _device_rules, _assumed_multiprocessors
    _device_rules, _assumed_multiprocessors = True, int(multiprocessors)
    try:
        yield
    finally:
        _device_rules, _assumed_multiprocessors = previous


def _large_blocks() -> bool:
    return interpreting() and not _device_rules


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2 if _large_blocks() else _assumed_multiprocessors


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pack_factor(groups: int, cin_per_group: int, cout_per_group: int) -> int:
    """How many neighbouring groups share one block-diagonal pack.

    The smallest divisor ``d`` of ``groups`` with ``d * width >= 16`` (width =
    the narrower of the per-group input and output widths), so that one pack
    fills a tensor-core dot with the least zero padding; all groups in one
    pack when even that is too narrow.
    """
    width = min(cin_per_group, cout_per_group)
    for d in range(1, groups + 1):
        if groups % d == 0 and d * width >= MIN_DOT:
            return d
    return groups


def out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one spatial axis (``F.conv2d``'s formula)."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch.get_float32_matmul_precision(): TF32 unless "highest"."""
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def _block_n(cout_p: int, pro_bwd: bool = False) -> int:
    # Up to 256 output channels a program: a 1x1 conv's A tile (and the
    # prologue applied to it) is loaded once per block of N, so wide N tiles
    # cut its cost; 128 for the prologue's backward, whose epilogue would
    # spill at 256 (sm_90 cubin resource counts).
    return min(128 if pro_bwd else 256, max(MIN_DOT, _next_pow2(cout_p)))


# Programs a launch keeps at least when its narrow tiles grow to 256 rows (4 per SM of an H200).
LARGE_TILE_PROGRAMS = 4 * 132


def _block_m(block_n: int, rows: int = 0, column_programs: int = 1) -> int:
    # Bounds the fp32 accumulator at 16384 elements per program (8 warps: 64 registers a thread);
    # ConvPlan.wide_forward is the one exception (32768, 174-230 registers, no spill).
    # The narrowest tiles (16-channel packs of the grouped convs) take 256 rows on 4 warps
    # where the launch still has LARGE_TILE_PROGRAMS programs: the per-tap address and mask
    # work is shared by twice the rows (sm_90 SASS: 25% fewer instructions per output for the
    # grouped forward and input gradient, 87-128 registers).
    # So do tiles of up to 64 columns (on 8 warps): a ResNet stem's 64 outputs, whose 16 taps'
    # waits and statistics epilogue twice the rows share (batch 256, sm_90, triton 3.8: issue
    # 232.5 -> 166.0 us, 64 -> 108 registers), and the 32-channel groups of resnext50_32x4d's
    # stage 4 (the 7x7 grouped 3x3's forward 24.5 -> 17.5 us, input gradient 26.3 -> 19.5; no
    # spill on triton 3.6 or 3.8).
    # 128 rows up to 128 columns: the 1x1 input gradients (128-column blocks) and forwards of
    # 128 outputs (resnext50_32x4d at batch 256, sm_90, triton 3.8: issue 1652 -> 1359 us over
    # the step's 1x1 input gradients, no spill; fewer rows of per-tile statistics).
    if block_n <= 64 and _cdiv(rows, 256) * column_programs >= LARGE_TILE_PROGRAMS:
        return 256
    return 128 if block_n <= 128 else 64


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one conv kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


_TUNED_DIR = Path(__file__).resolve().parent / "tuned"
_table_override: dict | None = None


def gpu_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia_h200"``: the tuned table's file name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def tuned_table_file(gpu_name: str) -> Path:
    """The tuned table of the GPU model ``gpu_name`` (``torch.cuda.get_device_name``):
    ``aru_kernels/tuned/<gpu_slug>.json``, which ``benchmarks/tune.py`` writes."""
    return _TUNED_DIR / f"{gpu_slug(gpu_name)}.json"


@functools.lru_cache(maxsize=None)
def _table_file(gpu_name: str) -> dict:
    path = tuned_table_file(gpu_name)
    return json.loads(path.read_text())["entries"] if path.exists() else {}


def tuned_table(device: torch.device | None) -> dict:
    """The tuned tiles for ``device``'s GPU model (shipped package data, read
    once per process), keyed by :meth:`ConvPlan.key` (a tap kernel's by :func:`tap_key`);
    empty without one."""
    if _table_override is not None:
        return _table_override
    if device is None or device.type != "cuda":
        return {}
    return _table_file(torch.cuda.get_device_name(device))


@contextlib.contextmanager
def use_tuned_table(entries: dict):
    """Plan with ``entries`` (key -> tiles as a dict) instead of the shipped table."""
    global _table_override
    previous, _table_override = _table_override, entries
    try:
        yield
    finally:
        _table_override = previous


@dataclass(frozen=True)
class ConvPlan:
    """Everything that fixes one compiled specialization of the conv kernel
    and its grid. Channel counts are the launch's own: for an input-gradient
    launch (``transposed``) the input is dL/dy and the output dL/dx."""

    n: int
    h: int
    w: int
    c_in: int
    p: int
    q: int
    c_out: int
    kh: int
    kw: int
    stride: int
    padding: int
    dilation: int
    groups: int
    gp: int  # groups per pack
    dtype: torch.dtype
    has_prologue: bool = False
    pro_mean: bool = False
    pro_relu: bool = False
    has_mean: bool = False
    has_var: bool = False
    has_scale: bool = False
    has_shift: bool = False
    has_residual: bool = False
    relu: bool = False
    transposed: bool = False  # input-gradient launch (see the kernel's docstring)
    stats: bool = False
    pro_bwd: bool = False
    end_bwd: bool = False  # input gradient through the previous residual block's end (kernel docstring)
    end_id: bool = False  # ... which had a downsample branch
    gram: bool = False  # input gradient with the next batch norm's variance term folded (kernel docstring)
    pro_end: bool = False  # the input is the previous residual block's end, computed on load (kernel docstring)
    pro_end_affine: bool = False  # ... whose identity has a batch norm of its own
    squeeze: bool = False  # per-(image, channel) sums of the output; row tiles never straddle images
    phase: tuple[int, int] | None = None  # strided input gradient: the output phase (h, w) mod stride
    large_blocks: bool = False  # the interpreter's rules (see the module docstring)
    tiles: Tiles | None = None  # tuned block sizes and options; None: the rules

    def key(self) -> str:
        """What identifies the launch in a tuned table: everything but the tiles."""
        skip = ("tiles", "large_blocks")
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name not in skip)

    def default_tiles(self) -> Tiles:
        return replace(self, tiles=None).current_tiles()

    def current_tiles(self) -> Tiles:
        return Tiles(self.block_m, self.block_n, self.block_k, self.num_warps, self.num_stages)

    @property
    def cin_g(self) -> int:
        return self.c_in // self.groups

    @property
    def cout_g(self) -> int:
        return self.c_out // self.groups

    @property
    def cin_p(self) -> int:
        return self.gp * self.cin_g

    @property
    def cout_p(self) -> int:
        return self.gp * self.cout_g

    @property
    def packs(self) -> int:
        return self.groups // self.gp

    @property
    def m(self) -> int:
        """Output rows of the launch: all N*P*Q, or one phase's."""
        if self.phase is None:
            return self.n * self.p * self.q
        ph, pw = self.phase
        return self.n * _cdiv(self.p - ph, self.stride) * _cdiv(self.q - pw, self.stride)

    @property
    def fold_taps(self) -> bool:
        return self.cin_p < MIN_DOT and self.kh * self.kw > 1

    @property
    def block_n(self) -> int:
        return self.tiles.block_n if self.tiles else _block_n(self.cout_p, self.pro_bwd)

    @property
    def wide_forward(self) -> bool:
        """A training forward 1x1 (statistics epilogue) of 256 outputs a program and at least 256
        inputs, with at most a batch-norm prologue: 128 x 256 tiles, 32 input channels a step.
        Twice the rows share each B tile and the epilogue's per-program work, and the shallower
        k step keeps the 3 stages in 74 KiB (sm_90, triton 3.8: resnext50_32x4d's stage-3
        512 -> 1024 issues 70.5 -> 57.8 us, 165 -> 228 registers; 3.6 compiles it to 224).
        A block-end prologue too (``pro_end``: 213 -> 248 registers, no spill on 3.6 or 3.8;
        stage 3's 1024 -> 512 issues 89.2 -> 78.8 us). Not where halving the programs leaves
        the busiest multiprocessor (of an H200's 132: :func:`device_block_sizes`) more rows than
        64-row tiles do: resnet50's stage-4 2048 -> 512 at 7x7, 392 programs of 64 rows (3 a
        multiprocessor) against 196 of 128 (2, twice the rows): issue 44.4 -> 54.5 us.
        Inference launches (with a residual epilogue, 600+ bytes spilled) keep 64 x 256."""
        if not (not self.tiles and not self.large_blocks and self.kh * self.kw == 1 and self.groups == 1
                and self.stats and not self.has_residual
                and not (self.transposed or self.pro_bwd or self.end_bwd or self.gram)
                and self.block_n == 256 and self.cin_p >= 256):
            return False
        # squeeze tiles stay in one image: no more padded rows than 64-row tiles have
        if self.squeeze and _cdiv(self.p * self.q, 128) * 2 != _cdiv(self.p * self.q, 64):
            return False
        columns, sms = self.packs * _cdiv(self.cout_p, self.block_n), _assumed_multiprocessors
        return 2 * _cdiv(columns * self._row_tiles(128), sms) <= _cdiv(columns * self._row_tiles(64), sms)

    @property
    def block_m(self) -> int:
        if self.tiles:
            return self.tiles.block_m
        if self.wide_forward:
            return 128
        return _block_m(self.block_n, self.n * self.p * self.q, self.packs * _cdiv(self.cout_p, self.block_n))

    @property
    def block_k(self) -> int:
        if self.tiles:
            return self.tiles.block_k
        if self.fold_taps or self.wide_forward:
            return 32
        return min(128 if self.large_blocks else 64, max(MIN_DOT, _next_pow2(self.cin_p)))

    @property
    def k_steps(self) -> int:
        """Iterations of the kernel's K loop."""
        if self.fold_taps:
            return _cdiv(self.kh * self.kw * self.cin_p, self.block_k)
        taps = self.kh * self.kw
        if self.phase is not None:  # the taps that reach the phase
            taps = 1
            for k, ph in ((self.kh, self.phase[0]), (self.kw, self.phase[1])):
                taps *= _cdiv(k - (ph + self.padding) % self.stride, self.stride)
        return taps * _cdiv(self.cin_p, self.block_k)

    def phases(self) -> list["ConvPlan"]:
        """The launches of this plan: one per output phase for a strided input
        gradient (each walks only the taps that reach it; dilation 1), else itself."""
        if not self.transposed or self.stride == 1 or self.dilation != 1 or self.fold_taps:
            return [self]
        return [replace(self, phase=(ph, pw)) for ph in range(self.stride) for pw in range(self.stride)]

    def _row_tiles(self, block_m: int) -> int:
        if self.squeeze:  # tiles never straddle images
            return self.n * _cdiv(self.p * self.q, block_m)
        return _cdiv(self.m, block_m)

    @property
    def m_tiles(self) -> int:
        return self._row_tiles(self.block_m)

    @property
    def partial_tiles(self) -> int:
        """Rows of the per-tile partial sums of all the plan's launches (its phases')."""
        return sum(ph.m_tiles for ph in self.phases())

    @property
    def grid(self) -> tuple[int]:
        return (self.packs * _cdiv(self.cout_p, self.block_n) * self.m_tiles,)

    @property
    def num_stages(self) -> int:
        return self.tiles.num_stages if self.tiles else 3

    @property
    def num_warps(self) -> int:
        if self.tiles:
            return self.tiles.num_warps
        # 8 warps from 128x32 tiles up: at 4 the pointer tensors of the tiles
        # alone push past 255 registers and spill (cubin resource counts);
        # 256x16 tiles fit 4 (see _block_m).
        if self.block_n <= MIN_DOT:
            return 4
        return 8 if self.block_m * self.block_n >= 4096 else 4

    def constexprs(self) -> dict:
        return dict(
            H=self.h, W=self.w, P=self.p, Q=self.q, C_IN=self.c_in, C_OUT=self.c_out,
            KH=self.kh, KW=self.kw, STRIDE=self.stride, PAD=self.padding, DIL=self.dilation,
            # max(1, .): a convolution without input channels never enters the K loop
            CIN_G=max(1, self.cin_g), COUT_G=max(1, self.cout_g),
            CIN_P=self.cin_p, COUT_P=self.cout_p, FOLD_TAPS=self.fold_taps,
            HAS_PROLOGUE=self.has_prologue, PRO_MEAN=self.pro_mean, PRO_RELU=self.pro_relu,
            HAS_MEAN=self.has_mean, HAS_VAR=self.has_var,
            HAS_SCALE=self.has_scale, HAS_SHIFT=self.has_shift,
            HAS_RESIDUAL=self.has_residual, RELU=self.relu,
            TRANSPOSED=self.transposed, STATS=self.stats, PRO_BWD=self.pro_bwd, SQUEEZE=self.squeeze,
            END_BWD=self.end_bwd, END_ID=self.end_id, GRAM=self.gram,
            PRO_END=self.pro_end, PRO_END_AFFINE=self.pro_end_affine,
            PHASED=int(self.phase is not None), PHASE_H=(self.phase or (0, 0))[0], PHASE_W=(self.phase or (0, 0))[1],
            DOT_F32=interpreting(),
            INPUT_PRECISION=input_precision(self.dtype),
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
        )

    def runtime_args(self) -> dict:
        return dict(M=self.m)


def plan_conv(
    x_shape, w_shape, dtype: torch.dtype, *, stride: int = 1, padding: int = 0, dilation: int = 1,
    groups: int = 1, has_prologue: bool = False, pro_mean: bool = False, pro_relu: bool = False,
    has_mean: bool = False, has_var: bool = False, has_scale: bool = False, has_shift: bool = False,
    has_residual: bool = False, relu: bool = False, stats: bool = False,
    transposed_out_hw: tuple[int, int] | None = None, pro_bwd: bool = False, squeeze: bool = False,
    end_bwd: bool = False, end_id: bool = False, gram: bool = False, pro_end: bool = False,
    pro_end_affine: bool = False, device: torch.device | None = None,
) -> ConvPlan:
    """The launch plan for input ``x_shape`` [N, C, H, W] and weight
    ``w_shape`` [C_out, C_in/groups, KH, KW], both as the launch sees them:
    the tuned tiles of ``device``'s GPU where its table has this launch
    (exact match), the rules otherwise.

    ``transposed_out_hw`` makes it an input-gradient launch producing that
    spatial size; ``x_shape`` is then dL/dy's and ``w_shape`` the shape of
    the transposed weight, ``[C_in, C_out/groups, KH, KW]`` of the forward.
    """
    n, c_in, h, w = (int(s) for s in x_shape)
    c_out, cin_g, kh, kw = (int(s) for s in w_shape)
    if transposed_out_hw is None:
        p, q = out_size(h, kh, stride, padding, dilation), out_size(w, kw, stride, padding, dilation)
    else:
        p, q = (int(s) for s in transposed_out_hw)
    plan = ConvPlan(
        n=n, h=h, w=w, c_in=c_in, c_out=c_out, kh=kh, kw=kw, p=p, q=q,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        gp=pack_factor(groups, cin_g, c_out // groups), dtype=dtype,
        has_prologue=has_prologue, pro_mean=pro_mean, pro_relu=pro_relu, has_mean=has_mean,
        has_var=has_var, has_scale=has_scale, has_shift=has_shift, has_residual=has_residual, relu=relu,
        transposed=transposed_out_hw is not None, stats=stats, pro_bwd=pro_bwd, squeeze=squeeze,
        end_bwd=end_bwd, end_id=end_id, gram=gram, pro_end=pro_end, pro_end_affine=pro_end_affine,
        large_blocks=_large_blocks(),
    )
    entry = tuned_table(device).get(plan.key())
    return replace(plan, tiles=Tiles(**entry["tiles"])) if entry else plan


@dataclass(frozen=True)
class WgradPlan:
    """Tiles and splits of the weight-gradient kernel for one convolution:
    its GEMM is ``[K, M] x [M, N]`` per pack, ``K = KH*KW*CIN_P`` (tap, input
    channel) and ``N = COUT_P``, summed over the output pixels ``M``."""

    conv: ConvPlan
    block_m: int
    block_k: int
    block_n: int
    splits: int  # splits of the pixel sum, each written to its own slab
    num_warps: int
    gram: bool = False  # one more column of programs takes A^T A (the kernel's A_GRAM)
    num_stages: int = 3  # software-pipeline depth of the pixel loop (shared memory scales with it)
    maxnreg: int | None = None  # registers a thread may hold (ptxas's .maxnreg), None: ptxas's choice

    @property
    def launch_options(self) -> dict:
        """The compile options of the launch: warps, stages and, where set, the register cap."""
        cap = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, **cap)

    @property
    def k_total(self) -> int:
        c = self.conv
        return c.kh * c.kw * c.cin_p

    @property
    def tiles(self) -> int:
        c = self.conv
        return c.packs * _cdiv(self.k_total, self.block_k) * (_cdiv(c.cout_p, self.block_n) + self.gram)

    @property
    def m_per_split(self) -> int:
        return _cdiv(self.conv.m, self.splits * self.block_m) * self.block_m

    @property
    def grid(self) -> tuple[int, int]:
        return (self.tiles, self.splits)


# The most input channels of a weight gradient that computes A^T A on the side (plan_wgrad's gram).
WGRAD_GRAM_MAX_CHANNELS = 128


# Rows of k a program of a wide weight gradient takes (plan_wgrad).
WIDE_WGRAD_BLOCK_K = 256


def plan_wgrad(conv: ConvPlan, device: torch.device, gram: bool = False, gathered: bool = False) -> WgradPlan:
    """Weight-gradient tiles of ``conv`` (a forward plan): tensor-core tiles
    (up to 128 rows of k and 128 output channels; :data:`WIDE_WGRAD_BLOCK_K` rows
    where they divide k), the pixel sum split as :func:`_wgrad_splits` says.
    With ``gram`` (a 1x1 convolution of at most :data:`WGRAD_GRAM_MAX_CHANNELS` inputs
    per pack) all of k is one block and the blocks of N are as wide, for the column of programs
    that computes ``A^T A``. With ``gathered`` (dL/dy gathered from a max-pool's
    gradient as it is loaded) all of k is one block where it fits: the gather runs
    once per pixel block, not once per block of k."""
    k_total = conv.kh * conv.kw * conv.cin_p
    cap = 256 if _large_blocks() else 128
    block_k = min(cap, max(MIN_DOT, _next_pow2(k_total)))
    if gram:
        if k_total > WGRAD_GRAM_MAX_CHANNELS or conv.kh * conv.kw != 1:
            raise ValueError(f"plan_wgrad: A^T A is taken for 1x1 convolutions of at most "
                             f"{WGRAD_GRAM_MAX_CHANNELS} input channels; got {conv.kh}x{conv.kw}, {k_total}")
        block_k = max(MIN_DOT, _next_pow2(k_total))
        plan = WgradPlan(conv, 256 if _large_blocks() else 64, block_k, block_k, 1,
                         8 if block_k >= 128 else 4, gram=True)
        return replace(plan, splits=_wgrad_splits(plan, device))
    taps = conv.kh * conv.kw > 1
    if not _large_blocks() and not gathered and (
            (k_total % WIDE_WGRAD_BLOCK_K == 0 and conv.cout_p >= 128)
            or (taps and k_total >= 2 * WIDE_WGRAD_BLOCK_K and conv.cout_p >= 64)):
        # Wide: 256 rows of k, so that dL/dy' (dL/dy and the batch norm's statistics term) is
        # formed for half as many blocks of k; 32 pixels a step and two stages keep the 256 x 128
        # fp32 accumulator (128 registers a thread on 8 warps) from spilling (64 pixels for 64
        # outputs). A 1x1 whose k it divides, or taps over at least two blocks of it: resnet50's
        # 3x3s (batch 256, sm_90, triton 3.6 and 3.8, 152-220 registers, no spill), issue a launch
        # 256 and 512 channels 111.6 -> 74.5 and 135.7 -> 91.0 us, under their tensor floors, 86.8
        # and 101.5; 128 channels (k = 1152 padded to 1280) 108.5 -> 80.6, tensor 93.7; 64
        # channels (576 padded to 768) 154.2 -> 130.1.
        block_n = 128 if conv.cout_p >= 128 else 64
        plan = WgradPlan(conv, 32 if block_n == 128 else 64, WIDE_WGRAD_BLOCK_K, block_n, 1, 8, num_stages=2)
        return replace(plan, splits=_wgrad_splits(plan, device))
    # (128 rows of k also where they pad k more than 64 would: resnext50_32x4d's stage-4 grouped
    # 3x3s, k = 9 x 32 padded to 384 rather than 320, issue 51.9 -> 38.8 us; sm_90, triton 3.8,
    # batch 256, no spill)
    block_n = min(cap, max(MIN_DOT, _next_pow2(conv.cout_p)))
    if (not conv.has_prologue and (conv.cin_p >= MIN_DOT or gathered) and k_total <= 256
            and _next_pow2(k_total) * block_n <= 16384):
        # All of k in one block: each dy tile (and the statistics term added to it) is
        # loaded once per pixel block. With the input read by asynchronous copies the
        # padding costs little: ResNeXt-50's stage-1 grouped 3x3 (k = 9 x 16 padded to
        # 256), sm_90 issue floor 340 -> 190 us against blocks of 64.
        block_k = _next_pow2(k_total)
    # A gathered dL/dy (a max-pool's, a ResNet stem) steps along one row of pooled blocks at a
    # time (conv_wgrad_kernel): 64 of them hold a 112-pixel row's 57 (sm_90, 255 registers,
    # no spill on triton 3.6 or 3.8). The interpreter's 256 would pad a small test image's rows
    # twentyfold.
    block_m = (32 if gathered else 256) if _large_blocks() else 64
    warps = 8 if block_k * block_n >= 128 * 128 else 4
    # A two-deep pipeline where the A tile is gathered over taps: fewer registers, instructions
    # and buffers than three, the loads' latency left to the per-pixel address and mask work and
    # the other programs of the multiprocessor to hide (batch 256, sm_90, triton 3.6 and 3.8, no
    # spill: the ResNet stem's, gathered from the pool, issue 339.6 -> 327.4 us, 110 -> 64 KiB of
    # shared memory; resnext50_32x4d's stage-4 grouped 3x3 38.8 -> 36.6; resnet50's 3x3s in
    # 128 x 128 tiles 6-8% fewer)
    stages = 2 if conv.kh * conv.kw > 1 else 3
    plan = WgradPlan(conv, block_m, block_k, block_n, 1, warps, num_stages=stages)
    return replace(plan, splits=_wgrad_splits(plan, device))


# How much later than the soonest a launch of equal splits may finish, to take fewer of them (and
# fewer fp32 slabs): up to 4 of 132 multiprocessors idle for one wave.
WGRAD_SPLIT_SLACK = 1.035


def _even_splits(tiles: int, sms: int, resident: int, near: int, cap: int) -> int:
    """Splits of each of ``tiles`` tiles of work: s of them put ``ceil(s * tiles / SMs)``
    programs of ``1 / s`` of a tile's work on the busiest multiprocessor, whose time the
    launch takes (its programs share its issue slots). Of the counts up to two fills of
    the ``resident`` programs a multiprocessor holds (four where the tiles alone more than
    fill them; at most ``cap``), those that finish within :data:`WGRAD_SPLIT_SLACK` of the
    soonest; of them the nearest ``near``, the fewer on a tie. (resnet50's stage-4 3x3s in
    128 x 128 tiles, 144 of 8 warps on 132 multiprocessors: 1 split left 12 of them a second
    whole tile; 3 splits, 4 programs of a third of a tile: issue 199.2 -> 135.7 us at batch
    256, for 9.4 MB more of slabs a split. Their wide tiles since, 72, take 3 splits anyway.)"""
    def finish(s: int) -> float:
        return _cdiv(s * tiles, sms) / s

    slots = resident * sms
    fills = 2 if tiles <= slots else 4
    most = max(1, min(cap, max(_cdiv(slots, tiles), fills * slots // tiles)))
    near = min(near, cap)
    best = min(finish(s) for s in range(1, most + 1))
    return min((s for s in range(1, most + 1) if finish(s) <= best * WGRAD_SPLIT_SLACK),
               key=lambda s: (abs(s - near), s))


def _wgrad_splits(plan: WgradPlan, device: torch.device) -> int:
    """Splits of the pixel sum; at least four pixel blocks a split.

    Every split writes an fp32 slab of its tiles that a fixed-order sum reads again,
    so the splits cost memory traffic. A program of 8 warps (more than 128 registers a
    thread) runs alone on its multiprocessor: one wave, or two where two finish sooner
    by more than :data:`WGRAD_SPLIT_SLACK` (:func:`_even_splits`). 16 tiles take 8 splits
    (one wave of 128 programs), not 16 (two waves): the same time, half the slabs; 8 tiles
    take 16 rather than 33 (two waves, 3% sooner, twice the slabs). Programs of 4 warps
    (the grouped 3x3s': about 109 KiB of shared memory and 128 registers) run two a
    multiprocessor: one program each where the tiles divide the multiprocessors, else as
    many as fill two, unless a count near it leaves fewer programs on the busiest
    multiprocessor (160 tiles: 3 splits, 4 programs of a third of a tile, not 1 split
    and 2 whole tiles). resnext50_32x4d, batch 256: the step's slabs 1.39 -> 0.58 GB with
    that rule for all, each written once and read once."""
    sms, tiles = _multiprocessors(device), max(1, plan.tiles)
    cap = _cdiv(plan.conv.m, 4 * plan.block_m)
    if plan.num_warps < 8:
        near = sms // tiles if sms % tiles == 0 else max(_cdiv(sms, tiles), 2 * sms // tiles)
        return _even_splits(tiles, sms, 2, near, cap)
    return _even_splits(tiles, sms, 1, max(1, sms // tiles), cap)


# The most output channels of a 1x1 convolution whose weight and input gradients are one
# launch (plan_pointwise_grads): all of them are one block of N, the weight gradient's
# accumulator [BLOCK_K, BLOCK_N] (64 x 256 fp32: 64 registers a thread on 8 warps).
POINTWISE_GRADS_MAX_N = 256


def pointwise_grads_fuse(kh: int, kw: int, stride: int, padding: int, groups: int, c_out: int) -> bool:
    """Whether a convolution's weight and input gradients run as one launch
    (``aru::pointwise_conv_grads``): a stride-1 1x1 convolution without padding,
    ``groups=1``, of at most :data:`POINTWISE_GRADS_MAX_N` output channels."""
    return (kh, kw, stride, padding, groups) == (1, 1, 1, 0, 1) and c_out <= POINTWISE_GRADS_MAX_N


def plan_pointwise_grads(conv: ConvPlan, device: torch.device) -> WgradPlan:
    """Tiles of the weight-gradient kernel that also takes the input gradient
    (its ``DGRAD``): all output channels in one block of N, 64 pixels a step,
    and 128 input channels a program (64 with 256 outputs), whose input-gradient
    tile is as wide. Each program forms the dy' tiles of its pixels again, so
    wider k blocks cost fewer instructions; the accumulator [BLOCK_K, BLOCK_N]
    stays at 16384 fp32 (sm_90, resnext50_32x4d at batch 256: stage 1's first
    convs, 128 outputs, 373 -> 245 us of issue with 128 inputs a program instead
    of 64; with 256 outputs, 128 inputs on 16 warps spill)."""
    block_n = max(MIN_DOT, _next_pow2(conv.cout_p))
    large = _large_blocks()
    block_k = min(256 if large else (128 if block_n <= 128 else 64), max(MIN_DOT, _next_pow2(conv.cin_p)))
    # 256 outputs a block need a two-deep pipeline to launch: sm_90, triton 3.6 and 3.8, three
    # stages take 254-258 KiB of shared memory, over the 227 KiB a block may have; two take 179-181
    # KiB (and 4-7% fewer instructions: resnext50_32x4d's stage-1 128->256, 260 -> 251 us of issue)
    stages = 2 if block_n > 128 else 3
    plan = WgradPlan(conv, 256 if large else 64, block_k, block_n, 1, 8 if block_k * block_n >= 8192 else 4,
                     num_stages=stages)
    return replace(plan, splits=_wgrad_splits(plan, device))


def normalizes_ahead(kh: int, kw: int, has_prologue: bool) -> bool:
    """Whether a training conv applies its batch-norm prologue in a pass of its
    own (once per element, into a buffer) rather than on load: where it reads
    each input element KH*KW times. On load, a prologue costs its instructions
    once per tap and takes the input off the asynchronous-copy path; ahead,
    it costs a read and a write of the input, and the weight gradient reads
    the normalized input as it is. ResNeXt-50's stage-1 grouped 3x3 (batch
    256, bf16, sm_90 issue-slot floors): forward 415 -> 174 us and weight
    gradient 590 -> 357 us, for a pass of 99 us at the DRAM floor. Strided
    3x3s too: on load, the three stride-2 grouped 3x3s of resnext50_32x4d
    would save 1.45 GB a step but turn bound by instructions (forward and weight
    gradient 124 + 175 -> 178 + 291 us at stage 2), about what the passes cost."""
    return has_prologue and kh * kw > 1


# The most blocks of output channels a convolution may take the previous residual
# block's end on load with: each block of N recomputes it from two reads (the last
# conv output and the identity). Static model, sm_90, resnext50_32x4d at batch 256:
# stage 4's 1x1 convs (1024 outputs, 4 blocks of 256) are bound by their multiply-adds
# (74.4 us), and the end's recomputation stays nearly under them (issue 74.2 us at 7x7,
# 157.5 against 148.7 at 14x14), where a pass of its own costs 38-76 us.
END_PROLOGUE_MAX_N_BLOCKS = 4


def block_end_fuses(kh: int, kw: int, stride: int, padding: int, groups: int, c_out: int) -> bool:
    """Whether a residual block's first convolution computes the previous block's
    end as it loads its input (the conv kernel's ``PRO_END``): a stride-1 1x1
    convolution without padding, ``groups=1``, of at most
    :data:`END_PROLOGUE_MAX_N_BLOCKS` blocks of output channels."""
    return ((kh, kw, stride, padding, groups) == (1, 1, 1, 0, 1)
            and _cdiv(c_out, _block_n(c_out)) <= END_PROLOGUE_MAX_N_BLOCKS)


def elementwise_blocks(c: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) of the per-pixel batch-norm kernels over ``c`` channels."""
    block_c = min(128, max(16, _next_pow2(c)))
    return (65536 if _large_blocks() else 8192) // block_c, block_c


def slab_sum_blocks(elements: int, rows: int, cout_p: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the weight-gradient slab sum over a weight of
    ``elements``; each pack is ``rows`` (taps x input channels of a group) by ``cout_p``
    (its output channels).

    On a GPU, at least two programs an SM where the weight has 16 elements for each (the
    split loop's latency, not bandwidth, sets a small weight's time), at most 2048
    elements each, and 8 output channels a row at least, so that the fp32 slabs are read
    in whole 32-byte sectors; a warp per 128 elements, up to 4. The interpreter takes
    a whole pack (up to 256K elements) a program: its cost is per program, not per element."""
    if _large_blocks():
        block_c = min(_next_pow2(cout_p), 512)
        return min(_next_pow2(rows), max(16, (1 << 18) // block_c)), block_c, 4
    tile = max(16, min(2048, 1 << (max(1, elements // (2 * H200_MULTIPROCESSORS)).bit_length() - 1)))
    block_r = min(_next_pow2(rows), 32, max(1, tile // 8))
    block_c = min(_next_pow2(cout_p), max(tile // block_r, 8))
    return block_r, block_c, min(4, max(1, block_r * block_c // 128))


def pool_blocks(c: int, hw: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) of a block end with the global average pool after it
    (pixels of one image per step, channels per program): a 7x7 image in one step."""
    return min(64, max(16, _next_pow2(hw))), elementwise_blocks(c)[1]


def max_pool_blocks(p: int, q: int, c: int) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_Q, BLOCK_C, num_warps) of the batch-norm, ReLU and max-pool forward
    over a ``p`` x ``q`` pooled image of ``c`` channels: a program walks ``ROWS``
    pooled rows down a strip of ``BLOCK_Q`` columns, 512 elements a row (8 columns of
    64 channels for a ResNet stem), 8 a thread (16-byte loads of a 16-bit input).
    Eight rows: the first window's extra row costs 1/8 of the 2 a pooled row reads
    where windows overlap by one row (the row-walk's saving), and a ResNet stem at
    batch 256 still launches 12,544 programs."""
    block_c = elementwise_blocks(c)[1]
    block_q = min(_next_pow2(q), max(1, 512 // block_c))
    return min(8, p), block_q, block_c, max(1, min(4, block_q * block_c // 256))


def finalize_blocks(c: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) of the batch-norm finalize over ``c`` channels."""
    return 64, 256 if _large_blocks() else 32


# The fewest statistics tiles one program of the parallel finalize's first pass combines.
FINALIZE_MIN_CHUNK = 8


def finalize_chunks(tiles: int, c: int, device: torch.device) -> int:
    """Tiles per chunk of the parallel finalize: enough chunks that the first
    pass runs at most two programs a multiprocessor (its ``c / BLOCK_C`` columns
    of programs times the chunks), each of at least :data:`FINALIZE_MIN_CHUNK`
    tiles; ``tiles`` itself (one chunk: a single pass, the finalize's own
    columns of programs) where those chunks would not fill the multiprocessors."""
    sms, columns = _multiprocessors(device), _cdiv(c, finalize_blocks(c)[1])
    per_chunk = max(FINALIZE_MIN_CHUNK, _cdiv(tiles, max(1, 2 * sms // columns)))
    return tiles if _cdiv(tiles, per_chunk) * columns < sms else per_chunk


# The widest pack whose both gradients a stride-1 3x3 convolution takes in one launch
# (tap_grads_fuse): nine fp32 weight-gradient accumulators [CIN_P, COUT_P] a program and
# nine weight tiles. Static model, sm_90, triton 3.8: packs of 32 (resnext50_32x4d's stage 4)
# spill 376-1936 bytes at every tile and warp count tried.
TAP_GRADS_MAX_PACK = 16


def tap_grads_fuse(kh: int, kw: int, stride: int, padding: int, dilation: int, groups: int, c_in: int,
                   c_out: int) -> bool:
    """Whether a convolution with a batch-norm prologue takes its weight and input gradients
    as one launch (``aru::tap_conv_grads``): 3x3, stride 1, the output as large as the
    input (padding = dilation), packs (:func:`pack_factor`) of :data:`MIN_DOT` to
    :data:`TAP_GRADS_MAX_PACK` channels each way."""
    if (kh, kw, stride) != (3, 3, 1) or padding != dilation or groups < 1 or c_in % groups or c_out % groups:
        return False
    gp = pack_factor(groups, c_in // groups, c_out // groups)
    return all(MIN_DOT <= gp * c // groups <= TAP_GRADS_MAX_PACK for c in (c_in, c_out))


TAP_PROGRAMS_PER_SM = 4  # the tap kernels' programs a multiprocessor, unless a tuned entry says otherwise


def tap_plan(conv: ConvPlan, device: torch.device, block_m: int, num_warps: int, maxnreg: int | None,
              per_sm: int) -> tuple[WgradPlan, int]:
    """The grid of the two tap kernels: splits for about ``per_sm`` programs a multiprocessor
    (:func:`_even_splits`: at four, 32 packs take 16 splits, 512 programs, not 17 and a fifth
    program on 16 multiprocessors), each of at least four steps of ``block_m`` pixels;
    and the rows of the program's ring, which holds two steps and the taps' reach either way.
    The programs a multiprocessor gets bound the warps it holds as its registers do
    (:func:`aru_kernels.aot.resident_warps`), so a tuned entry raising one raises the other."""
    sms = _multiprocessors(device)
    cap = _cdiv(conv.m, 4 * block_m)
    splits = _even_splits(conv.packs, sms, per_sm, _cdiv(per_sm * sms, conv.packs), cap)
    reach = 2 * (conv.padding * conv.w + conv.padding)
    plan = WgradPlan(conv, block_m, conv.kh * conv.kw * conv.cin_p, conv.cout_p, splits, num_warps, num_stages=1,
                     maxnreg=maxnreg)
    return plan, _next_pow2(2 * block_m + reach)


TAP_KINDS = ("tap_forward", "tap_grads")


def tap_key(kind: str, conv: ConvPlan) -> str:
    """What identifies a launch of a tap kernel (``kind``: one of :data:`TAP_KINDS`) in a
    tuned table: the kind and its convolution's :meth:`ConvPlan.key`."""
    if kind not in TAP_KINDS:
        raise ValueError(f"tap_key: kind is one of {TAP_KINDS}; got {kind!r}")
    return f"{kind}|{conv.key()}"


def _tap_tiles(kind: str, conv: ConvPlan, device: torch.device,
               rule: tuple[int, int]) -> tuple[int, int, int | None, int]:
    """``(pixels a step, warps, register cap, programs a multiprocessor)`` of a tap kernel:
    the tuned table's for ``device`` where it has this launch (its entry's ``tiles``:
    ``block_m``, ``num_warps`` and optionally ``maxnreg`` and ``programs_per_sm``: fewer
    registers a thread and more programs, for more warps a multiprocessor), else ``rule``
    with no cap and :data:`TAP_PROGRAMS_PER_SM`."""
    entry = tuned_table(device).get(tap_key(kind, conv))
    if entry is None:
        return (*rule, None, TAP_PROGRAMS_PER_SM)
    tiles = entry["tiles"]
    return (tiles["block_m"], tiles["num_warps"], tiles.get("maxnreg"),
            tiles.get("programs_per_sm") or TAP_PROGRAMS_PER_SM)


def plan_tap_grads(conv: ConvPlan, device: torch.device) -> tuple[WgradPlan, int]:
    """Tiles of ``tap_grads_kernel`` and the rows of its dy' ring: 64 pixels a step on
    2 warps (the interpreter: 256), or the tuned table's. Static model, sm_90, triton 3.8,
    resnext50_32x4d's stage-1 grouped 3x3 at batch 256: issue floor 182 us (255 registers,
    8 bytes spilled) against 223 us at 128 pixels on 4 warps (48 bytes spilled) and 300 us
    on 8; the launch is bound by its DRAM floor (201 us) either way. Every such tile takes
    254-255 registers, 8 warps a multiprocessor; a tuned entry may cap them (``maxnreg``)."""
    rule = (256, 4) if _large_blocks() else (64, 2)
    return tap_plan(conv, device, *_tap_tiles("tap_grads", conv, device, rule))


def plan_tap_forward(conv: ConvPlan, device: torch.device) -> tuple[WgradPlan, int]:
    """Tiles of ``tap_forward_kernel`` and the rows of its ring of normalized input rows:
    256 pixels a step on 4 warps, one warpgroup's wgmma. Static model, sm_90, triton 3.8,
    resnext50_32x4d at batch 256, issue floors of stages 1, 2, 3: 112.0, 56.5, 29.6 us
    (138 registers, DRAM floors 104.1, 54.2, 29.4); 128 pixels on 2 warps (mma.sync,
    190 registers) 107.5, 54.1, 28.1; 128 on 4 warps 127.2, 64.1, 33.4; 64 on 2 warps
    118.1, 59.5, 30.2. Or the tuned table's."""
    return tap_plan(conv, device, *_tap_tiles("tap_forward", conv, device, (256, 4)))
