"""Launchers and ``torch.library`` operators around the Triton kernels.

Public entry point: :func:`conv_bn_act`. It validates its inputs, applies
autocast, and calls the ``aru::conv_bn_act`` custom operator, which
``torch.compile`` traces as one opaque node. The operator packs the weight
once per weight version (see :class:`VersionedCache`), picks block sizes, and
launches :func:`aru_kernels.conv.conv_bn_act_kernel`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import batchnorm as _bn
from . import conv as _conv
from .runtime import interpreting, kernel_device_error

__all__ = [
    "conv_bn_act",
    "conv_bn_train",
    "bn_add_relu",
    "conv_bn_act_into",
    "conv_input_grad",
    "conv_weight_grad",
    "fold_bn",
    "pack_factor",
    "pack_weight",
    "plan_conv",
    "ConvPlan",
    "VersionedCache",
    "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tensor-core dots need K and N of at least 16 (16-bit operands).
_MIN_DOT = 16


# --------------------------------------------------------------------------
# Caching derived tensors per source-tensor version
# --------------------------------------------------------------------------


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None


class VersionedCache:
    """Values derived from a tensor, kept until the tensor changes or dies.

    An entry is keyed on the source tensor's identity (held weakly, so a
    freed tensor's entry goes with it) plus a caller key that should hold the
    version counters of everything the value depends on. In-place updates
    (``load_state_dict``, optimizer steps, running-statistics updates) bump
    the version, so a stale value is never returned. Tensors without a
    version counter (made under ``torch.inference_mode``) are not cached.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, object, object]] = {}

    def get(self, source: Tensor, key: tuple, make: Callable[[], object]):
        if any(k is None or (isinstance(k, tuple) and None in k) for k in key):
            return make()
        entry = self._entries.get(id(source))
        if entry is not None and entry[0]() is source and entry[1] == key:
            return entry[2]
        value = make()
        ident = id(source)
        ref = weakref.ref(source, lambda _r, i=ident: self._entries.pop(i, None))
        self._entries[ident] = (ref, key, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_packed_weights = VersionedCache()
_packed_weights_t = VersionedCache()
_folded_bn = VersionedCache()


def fold_bn(
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    conv_bias: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm (after a conv with optional ``conv_bias``) as the
    fp32 epilogue pair ``(scale, shift)``.

    Cached until any of the tensors changes in place (``load_state_dict``, an
    optimizer step); computed afresh while ``torch.compile`` traces, where it
    fuses into the graph. ``nn.BatchNorm2d``'s training-mode forward updates
    the running statistics without bumping their version counters, but it
    increments ``num_batches_tracked`` in place: pass that too, and such
    updates invalidate the cache as well.
    """
    def make():
        scale = torch.rsqrt(running_var.float() + eps)
        if weight is not None:
            scale = scale * weight.float()
        shift = -running_mean.float() * scale
        if conv_bias is not None:
            shift = shift + conv_bias.float() * scale
        if bias is not None:
            shift = shift + bias.float()
        return scale.detach(), shift.detach()

    if torch.compiler.is_compiling():
        return make()
    tensors = (weight, bias, running_mean, running_var, conv_bias, num_batches_tracked)
    key = tuple((id(t), _version(t)) for t in tensors if t is not None) + (eps,)
    return _folded_bn.get(running_var, key, make)


# --------------------------------------------------------------------------
# Weight packing
# --------------------------------------------------------------------------


def pack_factor(groups: int, cin_per_group: int, cout_per_group: int) -> int:
    """How many neighbouring groups share one block-diagonal pack.

    The smallest divisor ``d`` of ``groups`` with ``d * width >= 16`` (width =
    the narrower of the per-group input and output widths), so that one pack
    fills a tensor-core dot with the least zero padding; all groups in one
    pack when even that is too narrow.
    """
    width = min(cin_per_group, cout_per_group)
    for d in range(1, groups + 1):
        if groups % d == 0 and d * width >= _MIN_DOT:
            return d
    return groups


def _pack(weight: Tensor, groups: int, gp: int, dtype: torch.dtype) -> Tensor:
    cout, cin_g, kh, kw = weight.shape
    cout_g = cout // groups
    packs = groups // gp
    w = weight.detach().to(dtype).reshape(packs, gp, cout_g, cin_g, kh, kw)
    # [packs, KH, KW, gp (input side), cin_g, gp (output side), cout_g], block-diagonal in gp.
    out = weight.new_zeros((packs, kh, kw, gp, cin_g, gp, cout_g), dtype=dtype)
    for g in range(gp):
        out[:, :, :, g, :, g, :] = w[:, g].permute(0, 3, 4, 2, 1)
    return out.reshape(packs, kh * kw * gp * cin_g, gp * cout_g).contiguous()


def _transpose_groups(weight: Tensor, groups: int) -> Tensor:
    """[C_out, C_in/g, KH, KW] -> [C_in, C_out/g, KH, KW], group by group: the
    weight of the input-gradient convolution (taps are not flipped: the
    kernel's transposed tap map accounts for them)."""
    cout, cin_g, kh, kw = weight.shape
    w = weight.reshape(groups, cout // groups, cin_g, kh, kw).transpose(1, 2)
    return w.reshape(groups * cin_g, cout // groups, kh, kw)


def pack_weight(weight: Tensor, groups: int, dtype: torch.dtype, transposed: bool = False) -> Tensor:
    """``weight`` [C_out, C_in/groups, KH, KW] as the kernel's packed layout
    ``[packs, KH*KW*CIN_P, COUT_P]`` in ``dtype`` (of the transposed
    convolution when ``transposed``); cached per weight version."""
    key = (_version(weight), dtype, groups, tuple(weight.shape), weight.device, transposed)

    def make():
        w = _transpose_groups(weight.detach(), groups) if transposed else weight
        cout, cin_g, _, _ = w.shape
        return _pack(w, groups, pack_factor(groups, cin_g, cout // groups), dtype)

    cache = _packed_weights_t if transposed else _packed_weights
    return cache.get(weight, key, make)


# --------------------------------------------------------------------------
# Launch plan: block sizes and the kernel's compile-time arguments
# --------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _block_n(cout_p: int) -> int:
    return min(128, max(_MIN_DOT, _next_pow2(cout_p)))


def _block_k(cin_p: int, fold_taps: bool) -> int:
    if fold_taps:
        return 32
    return min(128 if interpreting() else 64, max(_MIN_DOT, _next_pow2(cin_p)))


def _block_m(block_n: int) -> int:
    # Bounds the fp32 accumulator at 8192 elements per program.
    return 128 if block_n <= 64 else 64


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch.get_float32_matmul_precision(): TF32 unless "highest"."""
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def _out_size(size: int, k: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvPlan:
    """Everything that fixes one compiled specialization of the conv kernel."""

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
    pro_relu: bool = False
    has_scale: bool = False
    has_shift: bool = False
    has_residual: bool = False
    relu: bool = False
    transposed: bool = False  # input-gradient launch (see the kernel's docstring)
    stats: bool = False
    pro_bwd: bool = False

    @property
    def cin_p(self) -> int:
        return self.gp * self.c_in // self.groups

    @property
    def cout_p(self) -> int:
        return self.gp * self.c_out // self.groups

    @property
    def packs(self) -> int:
        return self.groups // self.gp

    @property
    def m(self) -> int:
        return self.n * self.p * self.q

    @property
    def fold_taps(self) -> bool:
        return self.cin_p < _MIN_DOT and self.kh * self.kw > 1

    @property
    def block_n(self) -> int:
        return _block_n(self.cout_p)

    @property
    def block_m(self) -> int:
        return _block_m(self.block_n)

    @property
    def block_k(self) -> int:
        return _block_k(self.cin_p, self.fold_taps)

    @property
    def m_tiles(self) -> int:
        return -(-self.m // self.block_m)

    @property
    def grid(self) -> tuple[int]:
        n_blocks = -(-self.cout_p // self.block_n)
        return (self.packs * n_blocks * self.m_tiles,)

    num_stages: int = 3

    @property
    def num_warps(self) -> int:
        # 8 warps from 128x32 tiles up: at 4 the pointer tensors of the tiles
        # alone push past 255 registers and spill (cubin resource counts).
        return 8 if self.block_m * self.block_n >= 4096 else 4

    def constexprs(self) -> dict:
        return dict(
            KH=self.kh, KW=self.kw, STRIDE=self.stride, PAD=self.padding, DIL=self.dilation,
            CIN_P=self.cin_p, COUT_P=self.cout_p, FOLD_TAPS=self.fold_taps,
            HAS_PROLOGUE=self.has_prologue, PRO_RELU=self.pro_relu,
            HAS_SCALE=self.has_scale, HAS_SHIFT=self.has_shift,
            HAS_RESIDUAL=self.has_residual, RELU=self.relu,
            TRANSPOSED=self.transposed, STATS=self.stats, PRO_BWD=self.pro_bwd,
            DOT_F32=interpreting(),
            INPUT_PRECISION=_input_precision(self.dtype),
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
        )

    def runtime_args(self) -> dict:
        return dict(M=self.m, H=self.h, W=self.w, P=self.p, Q=self.q, C_IN=self.c_in, C_OUT=self.c_out)


def plan_conv(
    x_shape, w_shape, dtype: torch.dtype, *, stride: int = 1, padding: int = 0, dilation: int = 1,
    groups: int = 1, has_prologue: bool = False, pro_relu: bool = False, has_scale: bool = False,
    has_shift: bool = False, has_residual: bool = False, relu: bool = False, stats: bool = False,
    transposed_out_hw: tuple[int, int] | None = None, pro_bwd: bool = False,
) -> ConvPlan:
    """The launch plan for input ``x_shape`` [N, C, H, W] and (packed-side)
    weight ``w_shape`` [C_out, C_in/groups, KH, KW].

    ``transposed_out_hw`` makes it an input-gradient launch producing that
    spatial size; ``x_shape`` is then dL/dy's and ``w_shape`` the transposed weight's.
    """
    n, c_in, h, w = (int(s) for s in x_shape)
    c_out, cin_g, kh, kw = (int(s) for s in w_shape)
    if transposed_out_hw is None:
        p, q = _out_size(h, kh, stride, padding, dilation), _out_size(w, kw, stride, padding, dilation)
    else:
        p, q = (int(s) for s in transposed_out_hw)
    return ConvPlan(
        n=n, h=h, w=w, c_in=c_in, c_out=c_out, kh=kh, kw=kw, p=p, q=q,
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        gp=pack_factor(groups, cin_g, c_out // groups), dtype=dtype,
        has_prologue=has_prologue, pro_relu=pro_relu, has_scale=has_scale, has_shift=has_shift,
        has_residual=has_residual, relu=relu, transposed=transposed_out_hw is not None,
        stats=stats, pro_bwd=pro_bwd,
    )


# --------------------------------------------------------------------------
# Input checks (shared by the real and the fake implementation)
# --------------------------------------------------------------------------


def _check_vector(v: Optional[Tensor], name: str, length: int, what: str) -> None:
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(f"conv_bn_act: {name} must be a 1-D tensor of {length} ({what}); "
                         f"got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"conv_bn_act: {name} must be floating point; got {v.dtype}")


def _check_inputs(x, weight, scale, shift, residual, in_scale, in_shift, stride, padding, dilation,
                  groups) -> tuple[int, int]:
    """Raise a clear error for anything the kernel cannot take; return the output size (P, Q)."""
    if x.dim() != 4:
        raise ValueError(f"conv_bn_act: input must be 4-D [N, C, H, W]; got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"conv_bn_act: weight must be 4-D [C_out, C_in/groups, KH, KW]; "
                         f"got shape {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"conv_bn_act: input dtype must be one of float32, float16, bfloat16; got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"conv_bn_act: weight must be floating point; got {weight.dtype}")
    if stride < 1 or padding < 0 or dilation < 1:
        raise ValueError(f"conv_bn_act: need stride >= 1, padding >= 0, dilation >= 1; "
                         f"got stride={stride}, padding={padding}, dilation={dilation}")
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"conv_bn_act: groups={groups} must divide both in_channels={c_in} "
                         f"and out_channels={c_out}")
    if cin_g * groups != c_in:
        raise ValueError(f"conv_bn_act: weight of shape {tuple(weight.shape)} with groups={groups} "
                         f"expects {cin_g * groups} input channels; input has {c_in}")
    p = _out_size(h, kh, stride, padding, dilation)
    q = _out_size(w, kw, stride, padding, dilation)
    if p < 1 or q < 1:
        raise ValueError(f"conv_bn_act: input of spatial size {h}x{w} is too small for a {kh}x{kw} "
                         f"kernel (padding={padding}, dilation={dilation})")
    _check_vector(scale, "scale", c_out, "one per output channel")
    _check_vector(shift, "shift", c_out, "one per output channel")
    _check_vector(in_scale, "in_scale", c_in, "one per input channel")
    _check_vector(in_shift, "in_shift", c_in, "one per input channel")
    if (in_scale is None) != (in_shift is None):
        raise ValueError("conv_bn_act: in_scale and in_shift come together (the prologue applies both)")
    if residual is not None:
        if tuple(residual.shape) != (n, c_out, p, q):
            raise ValueError(f"conv_bn_act: residual must have the output's shape {(n, c_out, p, q)}; "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"conv_bn_act: residual dtype {residual.dtype} differs from input dtype {x.dtype}")
    named = [("input", x), ("weight", weight), ("scale", scale), ("shift", shift),
             ("residual", residual), ("in_scale", in_scale), ("in_shift", in_shift)]
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"conv_bn_act: {name} is on {t.device} but input is on {x.device}")
    for name, t in (("input", x), ("residual", residual)):
        if t is not None and not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(
                f"conv_bn_act: {name} must be channels_last (NHWC) contiguous; got strides "
                f"{tuple(t.stride())} for shape {tuple(t.shape)}. Convert with "
                f"t.contiguous(memory_format=torch.channels_last)")
    return p, q


# --------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------


def conv_bn_act_into(
    out: Optional[Tensor],
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    relu: bool = False,
    in_relu: bool = False,
    stats: bool = False,
):
    """Launch the forward kernel, writing into ``out`` (allocated when None).

    Returns ``out``, or with ``stats`` the triple ``(out, tile_mean, tile_m2)``:
    per-tile batch statistics ``[M tiles, C_out]`` for :func:`bn_finalize`.
    No autocast and no autograd: this is the plain launcher under the
    operator. Arguments as in :func:`conv_bn_act`.
    """
    p, q = _check_inputs(x, weight, scale, shift, residual, in_scale, in_shift, stride, padding,
                         dilation, groups)
    for name, t in (("input", x), ("weight", weight)):
        err = kernel_device_error(t, name)
        if err:
            raise RuntimeError("conv_bn_act: " + err)
    n, c_out = x.shape[0], weight.shape[0]
    if out is None:
        out = _nhwc_empty((n, c_out, p, q), x)
    elif (tuple(out.shape) != (n, c_out, p, q) or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"conv_bn_act: out must be a channels_last {x.dtype} tensor of shape "
                         f"{(n, c_out, p, q)} on {x.device}")
    plan = plan_conv(
        x.shape, weight.shape, x.dtype, stride=stride, padding=padding, dilation=dilation,
        groups=groups, has_prologue=in_scale is not None, pro_relu=in_relu,
        has_scale=scale is not None, has_shift=shift is not None,
        has_residual=residual is not None, relu=relu, stats=stats,
    )
    parts = _tile_partials(plan, x) if stats else (None, None)
    if out.numel():
        _launch(plan, x, pack_weight(weight, groups, x.dtype), out, scale, shift, residual,
                in_scale, in_shift, *parts)
    return (out, *parts) if stats else out


def _input_grad_buffers(dy, weight, x, stride, padding, dilation, groups, pro, in_relu):
    n, c_in, h, w = x.shape
    wt_shape = (c_in, weight.shape[0] // groups, weight.shape[2], weight.shape[3])
    plan = plan_conv(dy.shape, wt_shape, dy.dtype, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, transposed_out_hw=(h, w), pro_bwd=pro, pro_relu=in_relu)
    dx = _nhwc_empty((n, c_in, h, w), dy)
    if pro:
        return plan, dx, _tile_partials(plan, dy)
    empty = torch.empty(0, dtype=torch.float32, device=dy.device)
    return plan, dx, (empty, empty.clone())


@torch.library.custom_op("aru::conv_input_grad", mutates_args=())
def conv_input_grad(
    dy: Tensor,
    weight: Tensor,
    x: Tensor,
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    in_relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """dL/dx of ``y = conv(relu?(in_scale*x + in_shift), weight)`` from ``dy`` = dL/dy.

    Returns ``dx`` (channels_last, ``dy``'s dtype) and, when the forward had
    a prologue, per-tile partial sums ``[M tiles, C_in]`` of dL/d(in_shift)
    and dL/d(in_scale) (sum them over tiles); empty tensors otherwise.
    """
    pro = in_scale is not None
    plan, dx, parts = _input_grad_buffers(dy, weight, x, stride, padding, dilation, groups, pro, in_relu)
    if dx.numel():
        _launch(plan, dy, pack_weight(weight, groups, dy.dtype, transposed=True), dx, in_scale, in_shift,
                x if pro else None, None, None, *(parts if pro else (None, None)))
    return dx, parts[0], parts[1]


@conv_input_grad.register_fake
def _conv_input_grad_fake(dy, weight, x, in_scale, in_shift, stride, padding, dilation, groups, in_relu):
    _, dx, parts = _input_grad_buffers(dy, weight, x, stride, padding, dilation, groups, in_scale is not None,
                                       in_relu)
    return dx, parts[0], parts[1]


@torch.library.custom_op("aru::conv_weight_grad", mutates_args=())
def conv_weight_grad(
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    in_relu: bool,
) -> Tensor:
    """dL/dW (fp32, ``weight``'s shape) of ``y = conv(relu?(in_scale*x + in_shift), weight)``."""
    cout, cin_g, kh, kw = weight.shape
    plan = plan_conv(x.shape, weight.shape, dy.dtype, stride=stride, padding=padding,
                     dilation=dilation, groups=groups)
    gp, packs, taps = plan.gp, plan.packs, kh * kw
    block_ci, block_co = _block_wgrad(plan.cin_p), _block_wgrad(plan.cout_p)
    block_m = 256 if interpreting() else 64
    tiles = packs * taps * -(-plan.cin_p // block_ci) * -(-plan.cout_p // block_co)
    splits = _wgrad_splits(tiles, -(-plan.m // block_m), x.device)
    m_per_split = -(-plan.m // (splits * block_m)) * block_m
    part = torch.zeros((splits, packs, taps, plan.cin_p, plan.cout_p), dtype=torch.float32, device=x.device)
    if plan.m:
        _conv.conv_wgrad_kernel[(tiles, splits)](
            x, dy, part, _f32_or(in_scale, part), _f32_or(in_shift, part),
            plan.m, plan.h, plan.w, plan.p, plan.q, plan.c_in, plan.c_out, m_per_split,
            KH=kh, KW=kw, STRIDE=stride, PAD=padding, DIL=dilation, CIN_P=plan.cin_p, COUT_P=plan.cout_p,
            HAS_PROLOGUE=in_scale is not None, PRO_RELU=in_relu, DOT_F32=interpreting(),
            INPUT_PRECISION=_input_precision(dy.dtype),
            BLOCK_M=block_m, BLOCK_CI=block_ci, BLOCK_CO=block_co, num_warps=4,
        )
    full = part.sum(0).reshape(packs, taps, gp, cin_g, gp, cout // groups)
    diag = torch.diagonal(full, dim1=2, dim2=4)  # [packs, taps, cin_g, cout_g, gp]
    return diag.permute(0, 4, 3, 2, 1).reshape(cout, cin_g, kh, kw).contiguous()


@conv_weight_grad.register_fake
def _conv_weight_grad_fake(x, dy, weight, in_scale, in_shift, stride, padding, dilation, groups, in_relu):
    return torch.empty(weight.shape, dtype=torch.float32, device=weight.device)


def _block_wgrad(width: int) -> int:
    # The interpreter pays per program, not per element: fewer, larger tiles there.
    return min(256 if interpreting() else 64, max(_MIN_DOT, _next_pow2(width)))


def _wgrad_splits(tiles: int, m_blocks: int, device: torch.device) -> int:
    """Splits of the pixel sum so that about four programs per multiprocessor run."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2
    return max(1, min(m_blocks, -(-4 * sms // tiles)))


def _nhwc_empty(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _tile_partials(plan: ConvPlan, like: Tensor) -> tuple[Tensor, Tensor]:
    shape = (plan.m_tiles, plan.c_out)
    return (torch.empty(shape, dtype=torch.float32, device=like.device),
            torch.empty(shape, dtype=torch.float32, device=like.device))


def _f32_or(v: Optional[Tensor], fallback: Tensor) -> Tensor:
    return fallback if v is None else v.float()


def _launch(plan: ConvPlan, x, packed, out, scale, shift, residual, in_scale, in_shift,
            part_a=None, part_b=None) -> None:
    _conv.conv_bn_act_kernel[plan.grid](
        **_kernel_arguments(plan, x, packed, out, scale, shift, residual, in_scale, in_shift, part_a, part_b),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )


def _kernel_arguments(plan: ConvPlan, x, packed, out, scale, shift, residual, in_scale, in_shift,
                      part_a=None, part_b=None) -> dict:
    """The kernel's arguments by name; absent optional tensors point at ``out`` (never read)."""
    return dict(
        x_ptr=x, w_ptr=packed, out_ptr=out, scale_ptr=_f32_or(scale, out), shift_ptr=_f32_or(shift, out),
        res_ptr=out if residual is None else residual, in_scale_ptr=_f32_or(in_scale, out),
        in_shift_ptr=_f32_or(in_shift, out), part_a_ptr=out if part_a is None else part_a,
        part_b_ptr=out if part_b is None else part_b,
        **plan.runtime_args(), **plan.constexprs(),
    )


# --------------------------------------------------------------------------
# torch.library operator
# --------------------------------------------------------------------------


@torch.library.custom_op("aru::conv_bn_act", mutates_args=())
def _conv_bn_act_op(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    relu: bool,
    in_relu: bool,
) -> Tensor:
    return conv_bn_act_into(None, x, weight, scale, shift, residual, in_scale, in_shift, stride,
                            padding, dilation, groups, relu, in_relu)


@_conv_bn_act_op.register_fake
def _conv_bn_act_fake(x, weight, scale, shift, residual, in_scale, in_shift, stride, padding,
                      dilation, groups, relu, in_relu):
    p, q = _check_inputs(x, weight, scale, shift, residual, in_scale, in_shift, stride, padding,
                         dilation, groups)
    return torch.empty((x.shape[0], weight.shape[0], p, q), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _conv_input_and_weight_grads(ctx, g: Tensor, x, weight, in_scale, in_shift):
    """(dx, dW, d_in_scale, d_in_shift) of conv(relu?(in_scale*x + in_shift), W) from g = dL/dy."""
    stride, padding, dilation, groups, in_relu = ctx.conv_cfg
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_pro = in_scale is not None and any(ctx.needs_input_grad[i] for i in ctx.pro_slots)
    dx = dw = d_in_scale = d_in_shift = None
    if need_x or need_pro:
        dx, part_shift, part_scale = torch.ops.aru.conv_input_grad(g, weight, x, in_scale, in_shift, stride,
                                                                   padding, dilation, groups, in_relu)
        if in_scale is not None:
            d_in_shift, d_in_scale = part_shift.sum(0), part_scale.sum(0)
    if need_w:
        dw = torch.ops.aru.conv_weight_grad(x, g, weight, in_scale, in_shift, stride, padding, dilation,
                                            groups, in_relu).to(weight.dtype)
    return dx, dw, d_in_scale, d_in_shift


def _conv_bn_act_setup(ctx, inputs, output):
    x, weight, scale, shift, residual, in_scale, in_shift, stride, padding, dilation, groups, relu, in_relu = inputs
    ctx.conv_cfg = (stride, padding, dilation, groups, in_relu)
    ctx.epilogue = (relu, residual is not None)
    ctx.pro_slots = (5, 6)
    ctx.save_for_backward(x, weight, scale, shift, in_scale, in_shift, output if relu else None)


def _conv_bn_act_backward(ctx, dout):
    x, weight, scale, shift, in_scale, in_shift, out = ctx.saved_tensors
    relu, has_residual = ctx.epilogue
    g = torch.where(out > 0, dout, 0) if relu else dout
    d_residual = _nhwc(g) if has_residual else None
    d_shift = g.float().sum((0, 2, 3)) if shift is not None and ctx.needs_input_grad[3] else None
    d_scale = None
    if scale is not None:
        if ctx.needs_input_grad[2]:
            stride, padding, dilation, groups, in_relu = ctx.conv_cfg
            acc = torch.ops.aru.conv_bn_act(x, weight, None, None, None, in_scale, in_shift, stride, padding,
                                            dilation, groups, False, in_relu)
            d_scale = (g.float() * acc.float()).sum((0, 2, 3))
        g = g.float() * scale.view(1, -1, 1, 1)
    g = _nhwc(g.to(x.dtype))
    dx, dw, d_in_scale, d_in_shift = _conv_input_and_weight_grads(ctx, g, x, weight, in_scale, in_shift)
    return (dx, dw, d_scale, d_shift, d_residual, d_in_scale, d_in_shift,
            None, None, None, None, None, None)


_conv_bn_act_op.register_autograd(_conv_bn_act_backward, setup_context=_conv_bn_act_setup)


@torch.library.custom_op("aru::conv_stats", mutates_args=())
def _conv_stats_op(
    x: Tensor,
    weight: Tensor,
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    in_relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return conv_bn_act_into(None, x, weight, None, None, None, in_scale, in_shift, stride, padding,
                            dilation, groups, False, in_relu, stats=True)


@_conv_stats_op.register_fake
def _conv_stats_fake(x, weight, in_scale, in_shift, stride, padding, dilation, groups, in_relu):
    p, q = _check_inputs(x, weight, None, None, None, in_scale, in_shift, stride, padding, dilation, groups)
    plan = plan_conv(x.shape, weight.shape, x.dtype, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, stats=True)
    y = torch.empty((x.shape[0], weight.shape[0], p, q), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    return (y, *_tile_partials(plan, x))


def _conv_stats_setup(ctx, inputs, output):
    x, weight, in_scale, in_shift, stride, padding, dilation, groups, in_relu = inputs
    ctx.conv_cfg = (stride, padding, dilation, groups, in_relu)
    ctx.pro_slots = (2, 3)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, in_scale, in_shift)


def _conv_stats_backward(ctx, dy, _d_tile_mean, _d_tile_m2):
    x, weight, in_scale, in_shift = ctx.saved_tensors
    dx, dw, d_in_scale, d_in_shift = _conv_input_and_weight_grads(ctx, _nhwc(dy.to(x.dtype)), x, weight,
                                                                  in_scale, in_shift)
    return dx, dw, d_in_scale, d_in_shift, None, None, None, None, None


_conv_stats_op.register_autograd(_conv_stats_backward, setup_context=_conv_stats_setup)


def _rows(t: Tensor) -> int:
    return t.numel() // t.shape[1]


@torch.library.custom_op("aru::bn_stats", mutates_args=())
def _bn_stats_op(
    y: Tensor,
    tile_mean: Tensor,
    tile_m2: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    tile_rows: int,
    momentum: Optional[float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, new running mean, new running var); the last two are
    empty without running statistics. ``y`` is only differentiated through."""
    c = y.shape[1]
    mean, invstd, new_rm, new_rv = _bn_stats_fake(y, tile_mean, tile_m2, running_mean, running_var,
                                                   num_batches_tracked, tile_rows, momentum, eps)
    has_running = running_mean is not None
    block_c = 256 if interpreting() else 32
    _bn.bn_finalize_kernel[(-(-c // block_c),)](
        tile_mean, tile_m2, mean, invstd,
        running_mean if has_running else mean, running_var if has_running else mean,
        new_rm if has_running else mean, new_rv if has_running else mean,
        num_batches_tracked if num_batches_tracked is not None else mean,
        _rows(y), tile_mean.shape[0], c, tile_rows, 0.0 if momentum is None else momentum, eps,
        HAS_RUNNING=has_running, CUMULATIVE=momentum is None, BLOCK_T=64, BLOCK_C=block_c,
    )
    return mean, invstd, new_rm, new_rv


@_bn_stats_op.register_fake
def _bn_stats_fake(y, tile_mean, tile_m2, running_mean, running_var, num_batches_tracked, tile_rows,
                   momentum, eps):
    c = y.shape[1]
    vec = torch.empty(c, dtype=torch.float32, device=y.device)
    if running_mean is None:
        return vec, torch.empty_like(vec), vec.new_empty(0), vec.new_empty(0)
    return vec, torch.empty_like(vec), torch.empty_like(running_mean), torch.empty_like(running_var)


def _bn_stats_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.save_for_backward(inputs[0], output[0], output[1])


@torch.library.custom_op("aru::bn_stats_backward", mutates_args=())
def _bn_stats_backward_op(y: Tensor, dmean: Tensor, dinvstd: Tensor, mean: Tensor, invstd: Tensor,
                          count: int) -> Tensor:
    """dL/dy through batch statistics taken over ``count`` values per channel."""
    m, c = _rows(y), y.shape[1]
    dy = torch.empty_like(y, memory_format=torch.channels_last)
    block_m, block_c = _elementwise_blocks(c)
    _bn.bn_stats_backward_kernel[(-(-m // block_m), -(-c // block_c))](
        y, dmean, dinvstd, mean, invstd, dy, m, c, 1.0 / count, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return dy


@_bn_stats_backward_op.register_fake
def _bn_stats_backward_fake(y, dmean, dinvstd, mean, invstd, count):
    return torch.empty_like(y, memory_format=torch.channels_last)


def _stats_grads(dmean, dinvstd, mean) -> tuple[Tensor, Tensor]:
    zero = torch.zeros_like(mean)
    return (zero if dmean is None else dmean.float().contiguous(),
            zero if dinvstd is None else dinvstd.float().contiguous())


def _bn_stats_backward(ctx, dmean, dinvstd, _d_running_mean, _d_running_var):
    y, mean, invstd = ctx.saved_tensors
    dmean, dinvstd = _stats_grads(dmean, dinvstd, mean)
    dy = torch.ops.aru.bn_stats_backward(_nhwc(y), dmean, dinvstd, mean, invstd, _rows(y))
    return dy, None, None, None, None, None, None, None, None


_bn_stats_op.register_autograd(_bn_stats_backward, setup_context=_bn_stats_setup)


def _elementwise_blocks(c: int) -> tuple[int, int]:
    block_c = min(128, max(16, _next_pow2(c)))
    return (65536 if interpreting() else 8192) // block_c, block_c


@torch.library.custom_op("aru::bn_add_relu", mutates_args=())
def _bn_add_relu_op(
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    identity: Optional[Tensor],
    id_scale: Optional[Tensor],
    id_shift: Optional[Tensor],
) -> Tensor:
    out = torch.empty_like(y, memory_format=torch.channels_last)
    m, c = _rows(y), y.shape[1]
    block_m, block_c = _elementwise_blocks(c)
    affine = id_scale is not None
    _bn.bn_add_relu_kernel[(-(-m // block_m), -(-c // block_c))](
        y, scale, shift, y if identity is None else identity,
        id_scale if affine else scale, id_shift if affine else shift, out, m, c,
        HAS_IDENTITY=identity is not None, ID_AFFINE=affine, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


@_bn_add_relu_op.register_fake
def _bn_add_relu_fake(y, scale, shift, identity, id_scale, id_shift):
    return torch.empty_like(y, memory_format=torch.channels_last)


def _bn_add_relu_setup(ctx, inputs, output):
    y, scale, shift, identity, id_scale, id_shift = inputs
    ctx.has_identity = identity is not None
    ctx.save_for_backward(y, scale, identity, id_scale, output)


@torch.library.custom_op("aru::bn_add_relu_backward", mutates_args=())
def _bn_add_relu_backward_op(
    dout: Tensor,
    out: Tensor,
    y: Tensor,
    scale: Tensor,
    identity: Optional[Tensor],
    id_scale: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dy, dL/didentity (empty without identity), per-channel sums [3, C] of dz, dz*y, dz*identity)."""
    m, c = _rows(y), y.shape[1]
    block_m, block_c = _elementwise_blocks(c)
    tiles = -(-m // block_m)
    dy, did, _ = _bn_add_relu_backward_fake(dout, out, y, scale, identity, id_scale)
    part = torch.zeros((3, tiles, c), dtype=torch.float32, device=y.device)
    affine = id_scale is not None
    _bn.bn_add_relu_backward_kernel[(tiles, -(-c // block_c))](
        dout, out, y, scale, y if identity is None else identity, id_scale if affine else scale,
        dy, dy if identity is None else did, part, m, c, tiles,
        HAS_IDENTITY=identity is not None, ID_AFFINE=affine, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return dy, did, part.sum(1)  # fixed-order reduction over tiles


@_bn_add_relu_backward_op.register_fake
def _bn_add_relu_backward_fake(dout, out, y, scale, identity, id_scale):
    dy = torch.empty_like(y, memory_format=torch.channels_last)
    did = (torch.empty_like(identity, memory_format=torch.channels_last) if identity is not None
           else y.new_empty(0))
    return dy, did, torch.empty((3, y.shape[1]), dtype=torch.float32, device=y.device)


def _bn_add_relu_backward(ctx, dout):
    y, scale, identity, id_scale, out = ctx.saved_tensors
    dy, did, sums = torch.ops.aru.bn_add_relu_backward(_nhwc(dout), out, y, scale, identity, id_scale)
    affine = id_scale is not None
    d_shift = sums[0]
    return (dy, sums[1], d_shift, did if ctx.has_identity else None, sums[2] if affine else None,
            d_shift if affine else None)


_bn_add_relu_op.register_autograd(_bn_add_relu_backward, setup_context=_bn_add_relu_setup)


def _autocast_on(x: Tensor) -> bool:
    return x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)


def _autocast(x: Tensor, *others: Optional[Tensor]):
    """Cast activations to the autocast dtype when autocast is on for their device."""
    if _autocast_on(x):
        dtype = torch.get_autocast_dtype(x.device.type)
        return (x.to(dtype), *(o.to(dtype) if o is not None else None for o in others))
    return (x, *others)


def _single(v, name: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"conv_bn_act: {name} must be an int or a pair of equal ints; got {v}")
        v = v[0]
    return int(v)


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
    in_relu: bool = False,
) -> Tensor:
    """Fused convolution: ``relu?(scale * conv(relu?(in_scale*x + in_shift), weight) + shift + residual)``.

    Args:
        x: input ``[N, C_in, H, W]``, channels_last (NHWC) contiguous,
            float32 / float16 / bfloat16, on a CUDA device (or on the CPU when
            Triton runs in its interpreter).
        weight: ``[C_out, C_in / groups, KH, KW]``, any floating dtype; it is
            packed once per weight version into ``x``'s dtype and cached.
        stride, padding, dilation: ints (or pairs of equal ints).
        groups: number of channel groups; must divide ``C_in`` and ``C_out``.
        scale, shift: optional fp32 ``[C_out]`` epilogue vectors (a bias, or an
            eval-mode batch norm folded by :func:`aru_kernels.fold_bn`).
        residual: optional ``[N, C_out, P, Q]`` tensor added before the ReLU,
            channels_last contiguous, ``x``'s dtype.
        relu: apply ReLU last.
        in_scale, in_shift, in_relu: optional prologue on the input, per input
            channel (a batch norm + ReLU applied lazily on load; zero padding
            applies after it).

    Returns:
        ``[N, C_out, P, Q]`` in channels_last memory format and ``x``'s dtype;
        accumulation is fp32. Under autocast, ``x`` and ``residual`` are cast
        to the autocast dtype first, as autocast does for ``F.conv2d``.

    Raises:
        ValueError / TypeError / RuntimeError with what was expected and what
        came: wrong rank, channel counts, groups that do not divide, dtypes
        that do not match (outside autocast), tensors on different or
        unsupported devices, non-channels_last input.
    """
    stride, padding, dilation = (_single(v, n) for v, n in
                                 ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("conv_bn_act: x and weight must be tensors")
    if _autocast_on(x):
        x, residual = _autocast(x, residual)
    elif weight.dtype != x.dtype:
        raise TypeError(f"conv_bn_act: input dtype {x.dtype} and weight dtype {weight.dtype} differ "
                        f"(outside autocast they must match, as for F.conv2d)")
    return torch.ops.aru.conv_bn_act(x, weight, scale, shift, residual, in_scale, in_shift, stride,
                                     padding, dilation, groups, relu, in_relu)


class _SyncBatchStats(torch.autograd.Function):
    """Batch mean and 1/std over the images of every process in ``group``.

    Each process reduces its tiles to (mean, M2) per channel, the processes
    exchange those 2*C numbers (plus their counts) with one all-gather, and
    each combines them in the same order (Chan et al.): no cancellation, the
    same result everywhere. Backward sums dL/dmean and dL/dinvstd over the
    processes (one all-reduce of 2*C numbers) and applies them to the local y.
    """

    @staticmethod
    def forward(ctx, y, tile_mean, tile_m2, tile_rows: int, eps: float, group):
        import torch.distributed as dist

        rows = _rows(y)
        starts = torch.arange(tile_mean.shape[0], device=y.device) * tile_rows
        counts = (rows - starts).clamp(max=tile_rows).to(torch.float32).unsqueeze(1)
        mean_r = (counts * tile_mean).sum(0) / rows
        m2_r = (tile_m2 + counts * (tile_mean - mean_r).square()).sum(0)
        local = torch.stack([mean_r, m2_r, torch.full_like(mean_r, rows)])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        g = torch.stack(gathered)  # [world, 3, C]
        n = g[:, 2]
        total = n.sum(0)
        mean = (n * g[:, 0]).sum(0) / total
        m2 = (g[:, 1] + n * (g[:, 0] - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / total + eps)
        ctx.count = int(total[0].item()) if total.numel() else 0
        ctx.group = group
        ctx.save_for_backward(y, mean, invstd)
        unbiased = m2 / (total - 1).clamp(min=1)
        ctx.mark_non_differentiable(unbiased)
        return mean, invstd, unbiased

    @staticmethod
    def backward(ctx, dmean, dinvstd, _d_unbiased):
        import torch.distributed as dist

        y, mean, invstd = ctx.saved_tensors
        d = torch.stack(_stats_grads(dmean, dinvstd, mean))
        dist.all_reduce(d, group=ctx.group)
        dy = torch.ops.aru.bn_stats_backward(_nhwc(y), d[0].contiguous(), d[1].contiguous(), mean, invstd,
                                             ctx.count)
        return dy, None, None, None, None, None


def _synchronized(process_group) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def conv_bn_train(
    x: Tensor,
    weight: Tensor,
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    *,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
    in_relu: bool = False,
    sync_stats: bool = False,
    process_group=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode convolution + batch norm, the normalization left to the consumer.

    Runs ``y = conv(relu?(in_scale*x + in_shift), weight)`` with the batch
    statistics of ``y`` computed in the conv's epilogue, then updates the
    running statistics exactly as ``nn.BatchNorm2d`` does (momentum, or the
    cumulative average for ``momentum=None``; unbiased running variance;
    ``num_batches_tracked``; nothing when ``running_mean`` is None).

    Returns ``(y, scale, shift)``: the raw conv output (channels_last) and
    fp32 per-channel vectors with ``bn(y) == scale*y + shift``. Pass them as
    the next conv's ``in_scale``/``in_shift`` (with ``in_relu``) or to
    :func:`bn_add_relu`; the normalized activation is never written. All of it
    is differentiable; backward recomputes what it needs from ``x`` and ``y``.
    With ``sync_stats`` (and a ``torch.distributed`` group of more than one
    process) the statistics are those of all processes' images, as
    ``nn.SyncBatchNorm`` computes them: 2*C numbers per process travel
    forward, 2*C back. Inputs and errors as :func:`conv_bn_act`.
    """
    stride, padding, dilation = (_single(v, n) for v, n in
                                 ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    if _autocast_on(x):
        (x,) = _autocast(x)
    elif weight.dtype != x.dtype:
        raise TypeError(f"conv_bn_train: input dtype {x.dtype} and weight dtype {weight.dtype} differ "
                        f"(outside autocast they must match, as for F.conv2d)")
    y, tile_mean, tile_m2 = torch.ops.aru.conv_stats(x, weight, in_scale, in_shift, stride, padding,
                                                     dilation, groups, in_relu)
    plan = plan_conv(x.shape, weight.shape, x.dtype, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, stats=True)
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if sync_stats and _synchronized(process_group):
        mean, invstd, unbiased = _SyncBatchStats.apply(y, tile_mean, tile_m2, plan.block_m, float(eps),
                                                       process_group)
        if running_mean is not None:
            with torch.no_grad():
                factor = (1.0 / float(num_batches_tracked)) if momentum is None else momentum
                running_mean.lerp_(mean.to(running_mean.dtype), factor)
                running_var.lerp_(unbiased.to(running_var.dtype), factor)
        return y, *_scale_shift(mean, invstd, bn_weight, bn_bias)
    mean, invstd, new_running_mean, new_running_var = torch.ops.aru.bn_stats(
        y, tile_mean, tile_m2, running_mean, running_var, num_batches_tracked, plan.block_m,
        None if momentum is None else float(momentum), float(eps))
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_running_mean)
            running_var.copy_(new_running_var)
    return y, *_scale_shift(mean, invstd, bn_weight, bn_bias)


def _scale_shift(mean, invstd, bn_weight, bn_bias) -> tuple[Tensor, Tensor]:
    scale = invstd if bn_weight is None else bn_weight.float() * invstd
    shift = -mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias.float()
    return scale, shift


def bn_add_relu(
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    identity: Optional[Tensor] = None,
    id_scale: Optional[Tensor] = None,
    id_shift: Optional[Tensor] = None,
) -> Tensor:
    """``relu(scale*y + shift + identity')`` in one pass, the end of a residual block.

    ``identity' = id_scale*identity + id_shift`` when the downsample branch's
    batch norm is applied here too, ``identity`` itself otherwise, nothing when
    None. ``y`` and ``identity`` are ``[N, C, H, W]`` channels_last tensors of
    one dtype; the vectors are fp32 ``[C]``. Differentiable in every tensor.
    """
    y, identity = _autocast(y, identity)
    c = y.shape[1] if y.dim() == 4 else -1
    if y.dim() != 4:
        raise ValueError(f"bn_add_relu: y must be 4-D [N, C, H, W]; got shape {tuple(y.shape)}")
    for name, v in (("scale", scale), ("shift", shift), ("id_scale", id_scale), ("id_shift", id_shift)):
        _check_vector(v, name, c, "one per channel")
    if (id_scale is None) != (id_shift is None) or (id_scale is not None and identity is None):
        raise ValueError("bn_add_relu: id_scale and id_shift come together, with an identity")
    for name, t in (("y", y), ("identity", identity)):
        if t is None:
            continue
        if t is identity and (t.shape != y.shape or t.dtype != y.dtype):
            raise ValueError(f"bn_add_relu: identity must match y ({tuple(y.shape)}, {y.dtype}); "
                             f"got {tuple(t.shape)}, {t.dtype}")
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"bn_add_relu: {name} must be channels_last (NHWC) contiguous")
        err = kernel_device_error(t, name)
        if err:
            raise RuntimeError("bn_add_relu: " + err)
    return torch.ops.aru.bn_add_relu(y, scale.float(), shift.float(), identity,
                                     None if id_scale is None else id_scale.float(),
                                     None if id_shift is None else id_shift.float())
