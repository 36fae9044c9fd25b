"""The convolution operators: launchers, ``torch.library`` custom ops and their autograd.

* ``aru::conv_bn_act``: the fused forward (prologue, conv, epilogue);
  ``aru::conv_bn_squeeze``: the same with the per-(image, channel) means of
  its output (squeeze-excitation's squeeze) taken in the epilogue.
* ``aru::conv_stats``: the training forward, the conv output plus its
  per-tile batch statistics.
* ``aru::conv_input_grad`` and ``aru::conv_weight_grad``: the backward
  kernels, as operators of their own so that ``torch.compile`` traces the
  backward graph too.

Every operator reads the weight in the caller's own tensor, whatever its
strides and dtype (the cast to the compute dtype happens on load): nothing is
derived from the weight ahead of the launch, so nothing can go stale when the
weight changes, however it changes (``.data`` included).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from . import conv as _conv
from .checks import check_conv_inputs, check_prologue, check_runnable, first_derivatives_only
from .bn_ops import relu_mask_shape
from .launch import launch
from .maxpool import stride_blocks
from .plans import WGRAD_GRAM_MAX_CHANNELS, ConvPlan, plan_conv, plan_wgrad, slab_sum_blocks, tap_grads_fuse
from .runtime import interpreting

__all__ = ["conv_bn_act_into", "image_statistics", "kernel_arguments", "conv_geometry", "stats_plan", "conv_input_grad",
           "conv_input_grad_block_end", "conv_weight_grad", "conv_grads", "nhwc", "nhwc_empty", "tile_partials",
           "block_end_sums", "sum_slabs"]


def nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def nhwc_empty(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def tile_partials(plan: ConvPlan, like: Tensor) -> tuple[Tensor, Tensor]:
    """Two ``[M tiles, C_out]`` fp32 buffers for per-tile statistics or partial sums."""
    shape = (plan.partial_tiles, plan.c_out)
    return (torch.empty(shape, dtype=torch.float32, device=like.device),
            torch.empty(shape, dtype=torch.float32, device=like.device))


def block_end_sums(sums: Tensor) -> Tensor:
    """A block end's ``[3, C]`` sums from the reduced planes: without a downsample
    branch only two were taken, and the third, dz*(end_id - end_id_mean), is zero."""
    return sums if sums.shape[0] == 3 else torch.cat((sums, sums.new_zeros((1, sums.shape[1]))))


def _f32(v: Optional[Tensor], fallback: Tensor) -> Tensor:
    return fallback if v is None else v.float().contiguous()


def kernel_arguments(plan: ConvPlan, x, weight, out, *, mean=None, var=None, scale=None, shift=None,
                     residual=None, in_mean=None, in_scale=None, in_shift=None, part_a=None, part_b=None,
                     part_c=None, end_mask=None, end_y=None, end_mean=None, end_id=None, end_id_mean=None,
                     gram=None, gram_mean=None, acc_bias=None, pro_id=None, pro_id_mean=None, pro_id_scale=None,
                     pro_id_shift=None, pro_out=None, pro_mask=None, eps: float = 0.0) -> dict:
    """The conv kernel's arguments by name; absent optional tensors point at ``out`` (never read)."""
    sw = weight.stride()

    def t(v):
        return out if v is None else v
    return dict(
        x_ptr=x, w_ptr=weight, out_ptr=out,
        mean_ptr=_f32(mean, out), var_ptr=_f32(var, out), scale_ptr=_f32(scale, out),
        shift_ptr=_f32(shift, out), res_ptr=t(residual),
        in_mean_ptr=_f32(in_mean, out), in_scale_ptr=_f32(in_scale, out), in_shift_ptr=_f32(in_shift, out),
        part_a_ptr=t(part_a), part_b_ptr=t(part_b),
        sw_o=sw[0], sw_i=sw[1], sw_h=sw[2], sw_w=sw[3], eps=float(eps),
        **plan.runtime_args(), **plan.constexprs(),
        end_mask_ptr=t(end_mask), end_y_ptr=t(end_y), end_mean_ptr=_f32(end_mean, out), end_id_ptr=t(end_id),
        end_id_mean_ptr=_f32(end_id_mean, out), part_c_ptr=t(part_c),
        gram_ptr=t(gram), gram_mean_ptr=_f32(gram_mean, out), acc_bias_ptr=_f32(acc_bias, out),
        pro_id_ptr=t(pro_id), pro_id_mean_ptr=_f32(pro_id_mean, out), pro_id_scale_ptr=_f32(pro_id_scale, out),
        pro_id_shift_ptr=_f32(pro_id_shift, out), pro_out_ptr=t(pro_out), pro_mask_ptr=t(pro_mask),
    )


def conv_geometry(plan: ConvPlan) -> dict:
    """The forward convolution a plan belongs to, as the static model reports it."""
    if plan.transposed:
        return dict(c_in=plan.c_out, c_out=plan.c_in, kh=plan.kh, kw=plan.kw, stride=plan.stride,
                    groups=plan.groups, h=plan.p, w=plan.q)
    return dict(c_in=plan.c_in, c_out=plan.c_out, kh=plan.kh, kw=plan.kw, stride=plan.stride,
                groups=plan.groups, h=plan.h, w=plan.w)


def _phase_share(plan: ConvPlan, phase: ConvPlan) -> dict:
    """What one output phase of a strided input gradient touches (for the static
    model): its share of dx and of what the epilogue reads per output row; all of
    dL/dy when a tap reaches it."""
    if phase is plan:
        return {}
    rows = phase.m / max(1, plan.m)
    per_row = ("out_ptr", "res_ptr", "end_mask_ptr", "end_y_ptr", "end_id_ptr")  # read or written at its rows
    return {**dict.fromkeys(per_row, rows), "x_ptr": 1.0 if phase.k_steps else 0.0}


def _launch(plan: ConvPlan, x, weight, out, part_a=None, part_b=None, part_c=None, **tensors) -> None:
    """The plan's launches (one per output phase for a strided input gradient, each
    writing its own rows of the partial sums)."""
    if out.numel() == 0:
        return
    first = 0
    for phase in plan.phases():
        if phase.m == 0:
            continue
        rows = slice(first, first + phase.m_tiles)
        first += phase.m_tiles
        parts = {name: None if p is None else p[rows]
                 for name, p in (("part_a", part_a), ("part_b", part_b), ("part_c", part_c))}
        launch(_conv.conv_bn_act_kernel, phase.grid,
               **kernel_arguments(phase, x, weight, out, **parts, **tensors),
               role="dgrad" if plan.transposed else "fwd",
               meta={"conv": conv_geometry(plan), "loop_trips": [phase.k_steps], "plan": phase,
                     "byte_share": _phase_share(plan, phase)},
               num_warps=phase.num_warps, num_stages=phase.num_stages)


def conv_bn_act_into(
    out: Optional[Tensor],
    x: Tensor,
    weight: Tensor,
    *,
    mean: Optional[Tensor] = None,
    var: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    in_mean: Optional[Tensor] = None,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    eps: float = 1e-5,
    relu: bool = False,
    in_relu: bool = False,
    stats: bool = False,
    squeeze: bool = False,
    block_end: Optional[tuple] = None,
):
    """Launch the forward kernel, writing into ``out`` (allocated when None).

    Returns ``out``, or with ``stats`` the triple ``(out, tile_mean, tile_m2)``:
    per-tile batch statistics ``[M tiles, C_out]`` for the batch-norm finalize
    (with ``squeeze`` too, tiles of one image each: :func:`image_statistics`);
    with ``squeeze`` alone the pair ``(out, means)``: the fp32 ``[N, C_out]``
    mean of each image's output channel, from the kernel's per-tile sums.
    With ``block_end = (identity, id_mean, id_scale, id_shift, block_out,
    relu_mask)`` (a stride-1 1x1 convolution, ``groups=1``; the caller checks
    the tensors) the input is a residual block's end computed on load:
    ``relu(in_scale*(x - in_mean) + in_shift + identity')`` (identity' with
    its own batch norm when ``id_scale`` is given), written to ``block_out``
    with its mask bits in ``relu_mask``; ``in_relu`` is then ignored.
    No autocast and no autograd: this is the plain launcher under the
    operators. Arguments as in :func:`aru_kernels.conv_bn_act`.
    """
    p, q = check_conv_inputs(
        x, weight, vectors_out=(("mean", mean), ("var", var), ("scale", scale), ("shift", shift)),
        vectors_in=(("in_mean", in_mean), ("in_scale", in_scale), ("in_shift", in_shift)),
        residual=residual, stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_prologue("conv_bn_act", in_mean, in_scale, in_shift, in_relu and block_end is None)
    check_runnable("conv_bn_act", ("input", x), ("weight", weight))
    n, c_out = x.shape[0], weight.shape[0]
    if out is None:
        out = nhwc_empty((n, c_out, p, q), x)
    elif (tuple(out.shape) != (n, c_out, p, q) or out.dtype != x.dtype or out.device != x.device
          or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"conv_bn_act: out must be a channels_last {x.dtype} tensor of shape "
                         f"{(n, c_out, p, q)} on {x.device}")
    plan = plan_conv(
        x.shape, weight.shape, x.dtype, stride=stride, padding=padding, dilation=dilation,
        groups=groups, has_prologue=in_scale is not None and block_end is None,
        pro_mean=in_mean is not None and block_end is None, pro_relu=in_relu and block_end is None,
        has_mean=mean is not None, has_var=var is not None, has_scale=scale is not None,
        has_shift=shift is not None, has_residual=residual is not None, relu=relu, stats=stats, squeeze=squeeze,
        pro_end=block_end is not None, pro_end_affine=block_end is not None and block_end[2] is not None,
        device=x.device,
    )
    parts = tile_partials(plan, x) if stats or squeeze else (None, None)
    end = dict(zip(("pro_id", "pro_id_mean", "pro_id_scale", "pro_id_shift", "pro_out", "pro_mask"),
                   block_end or ()))
    _launch(plan, x, weight, out, mean=mean, var=var, scale=scale, shift=shift, residual=residual,
            in_mean=in_mean, in_scale=in_scale, in_shift=in_shift, part_a=parts[0], part_b=parts[1], eps=eps,
            **end)
    if squeeze and not stats:
        pq = p * q
        if pq == 0 or n == 0:
            return out, torch.zeros((n, c_out), dtype=torch.float32, device=x.device)
        return out, parts[0].view(n, plan.m_tiles // n, c_out).sum(1) / pq  # fixed-order sum over tiles
    return (out, *parts) if stats else out


# --------------------------------------------------------------------------
# Forward operators
# --------------------------------------------------------------------------


@torch.library.custom_op("aru::conv_bn_act", mutates_args=())
def _conv_bn_act_op(
    x: Tensor,
    weight: Tensor,
    mean: Optional[Tensor],
    var: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    in_mean: Optional[Tensor],
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    eps: float,
    relu: bool,
    in_relu: bool,
) -> Tensor:
    return conv_bn_act_into(None, x, weight, mean=mean, var=var, scale=scale, shift=shift, residual=residual,
                            in_mean=in_mean, in_scale=in_scale, in_shift=in_shift, stride=stride,
                            padding=padding, dilation=dilation, groups=groups, eps=eps, relu=relu,
                            in_relu=in_relu)


@_conv_bn_act_op.register_fake
def _conv_bn_act_fake(x, weight, mean, var, scale, shift, residual, in_mean, in_scale, in_shift, stride,
                      padding, dilation, groups, eps, relu, in_relu):
    p, q = check_conv_inputs(
        x, weight, vectors_out=(("mean", mean), ("var", var), ("scale", scale), ("shift", shift)),
        vectors_in=(("in_mean", in_mean), ("in_scale", in_scale), ("in_shift", in_shift)),
        residual=residual, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return torch.empty((x.shape[0], weight.shape[0], p, q), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op("aru::conv_bn_squeeze", mutates_args=())
def _conv_bn_squeeze_op(
    x: Tensor,
    weight: Tensor,
    mean: Optional[Tensor],
    var: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    residual: Optional[Tensor],
    in_mean: Optional[Tensor],
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    eps: float,
    relu: bool,
    in_relu: bool,
) -> tuple[Tensor, Tensor]:
    """``(y, squeeze)``: ``aru::conv_bn_act``'s output and the fp32 ``[N, C_out]`` mean of
    each image's output channel (squeeze-excitation's squeeze), taken in the epilogue."""
    return conv_bn_act_into(None, x, weight, mean=mean, var=var, scale=scale, shift=shift, residual=residual,
                            in_mean=in_mean, in_scale=in_scale, in_shift=in_shift, stride=stride,
                            padding=padding, dilation=dilation, groups=groups, eps=eps, relu=relu,
                            in_relu=in_relu, squeeze=True)


@_conv_bn_squeeze_op.register_fake
def _conv_bn_squeeze_fake(x, weight, mean, var, scale, shift, residual, in_mean, in_scale, in_shift, stride,
                          padding, dilation, groups, eps, relu, in_relu):
    y = _conv_bn_act_fake(x, weight, mean, var, scale, shift, residual, in_mean, in_scale, in_shift, stride,
                          padding, dilation, groups, eps, relu, in_relu)
    return y, torch.empty((y.shape[0], y.shape[1]), dtype=torch.float32, device=x.device)


@torch.library.custom_op("aru::conv_stats", mutates_args=())
def _conv_stats_op(
    x: Tensor,
    weight: Tensor,
    in_mean: Optional[Tensor],
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    in_relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, tile_mean, tile_m2)``: the conv output and its per-tile batch statistics."""
    return conv_bn_act_into(None, x, weight, in_mean=in_mean, in_scale=in_scale, in_shift=in_shift,
                            stride=stride, padding=padding, dilation=dilation, groups=groups, in_relu=in_relu,
                            stats=True)


def image_statistics(tile_mean: Tensor, tile_m2: Tensor, n: int, rows_per_image: int,
                     block_m: int) -> tuple[Tensor, Tensor]:
    """Per-image ``(mean, M2)`` ``[N, C]`` from per-tile ones whose tiles hold
    ``block_m`` rows of one image each (the last of each image fewer): Chan et
    al.'s merge, in a fixed order."""
    c = tile_mean.shape[1]
    if n == 0 or rows_per_image == 0:
        empty = tile_mean.new_zeros((n, c))
        return empty, empty.clone()
    tiles = tile_mean.shape[0] // n
    if tile_mean.shape[0] != n * -(-rows_per_image // block_m):
        raise RuntimeError(f"image_statistics: {tile_mean.shape[0]} statistics tiles are not {n} images of "
                           f"{rows_per_image} pixels in tiles of {block_m}: the launch wrote other tiles than "
                           f"this merge reads")
    counts = (rows_per_image - torch.arange(tiles, device=tile_mean.device) * block_m).clamp(max=block_m)
    counts = counts.to(torch.float32).view(1, tiles, 1)
    tm, tm2 = tile_mean.view(n, tiles, c), tile_m2.view(n, tiles, c)
    mean = (counts * tm).sum(1) / rows_per_image
    return mean, (tm2 + counts * (tm - mean.unsqueeze(1)).square()).sum(1)


def stats_plan(x, weight, in_mean, in_scale, in_relu, stride, padding, dilation, groups,
               block_end: Optional[bool] = None, squeeze: bool = False) -> ConvPlan:
    """The plan of an ``aru::conv_stats`` launch (``aru::conv_bn_squeeze``'s with
    ``squeeze``: tiles of one image each), which fixes its statistics tiles (the
    batch-norm finalize needs their row count); ``block_end`` (None: no block-end
    prologue) says whether that prologue's identity has a batch norm."""
    pro = in_scale is not None and block_end is None
    return plan_conv(x.shape, weight.shape, x.dtype, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, has_prologue=pro, pro_mean=pro and in_mean is not None, pro_relu=pro and in_relu,
                     stats=True, pro_end=block_end is not None, pro_end_affine=bool(block_end), squeeze=squeeze,
                     device=x.device)


@_conv_stats_op.register_fake
def _conv_stats_fake(x, weight, in_mean, in_scale, in_shift, stride, padding, dilation, groups, in_relu):
    p, q = check_conv_inputs(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    plan = stats_plan(x, weight, in_mean, in_scale, in_relu, stride, padding, dilation, groups)
    y = torch.empty((x.shape[0], weight.shape[0], p, q), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    return (y, *tile_partials(plan, x))


# --------------------------------------------------------------------------
# Backward operators
# --------------------------------------------------------------------------


def _transposed_shape(weight: Tensor, groups: int) -> tuple[int, int, int, int]:
    """Shape of the input-gradient convolution's weight: ``[C_in, C_out/groups, KH, KW]``."""
    c_out, cin_g, kh, kw = weight.shape
    return (cin_g * groups, c_out // groups, kh, kw)


def _input_grad_buffers(dy, weight, x, stride, padding, dilation, groups, pro, pro_mean, in_relu, residual=None,
                        gram=None, gram_mean=None, acc_bias=None):
    n, c_in, h, w = x.shape
    if gram is not None and any(v is None or tuple(v.shape) != (c_in,) for v in (gram_mean, acc_bias)):
        raise ValueError(f"conv_input_grad: gram comes with gram_mean and acc_bias, [{c_in}] each")
    if gram is not None and (not pro or tuple(weight.shape[2:]) != (1, 1) or stride != 1 or padding != 0
                             or groups != 1 or tuple(gram.shape) != (c_in, c_in)):
        raise ValueError(f"conv_input_grad: gram needs a prologue, a stride-1 1x1 convolution without padding "
                         f"with groups=1, and a [{c_in}, {c_in}] matrix; got {tuple(gram.shape)} for a "
                         f"{tuple(weight.shape[2:])} kernel, stride={stride}, padding={padding}, groups={groups}")
    if residual is not None:
        if pro:
            raise ValueError("conv_input_grad: a residual gradient is added only without a prologue")
        if (tuple(residual.shape) != (n, c_in, h, w) or residual.dtype != dy.dtype
                or not residual.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError(f"conv_input_grad: residual must be a channels_last {dy.dtype} tensor of shape "
                             f"{(n, c_in, h, w)}; got {tuple(residual.shape)}, {residual.dtype}")
    plan = plan_conv(dy.shape, _transposed_shape(weight, groups), dy.dtype, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, transposed_out_hw=(h, w), pro_bwd=pro, pro_mean=pro_mean,
                     pro_relu=in_relu, has_residual=residual is not None, gram=gram is not None, device=dy.device)
    dx = nhwc_empty((n, c_in, h, w), dy)
    if pro:
        return plan, dx, tile_partials(plan, dy)
    empty = torch.empty(0, dtype=torch.float32, device=dy.device)
    return plan, dx, (empty, empty.clone())


@torch.library.custom_op("aru::conv_input_grad", mutates_args=())
def conv_input_grad(
    dy: Tensor,
    weight: Tensor,
    x: Tensor,
    in_mean: Optional[Tensor],
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    in_relu: bool,
    residual: Optional[Tensor] = None,
    gram: Optional[Tensor] = None,
    gram_mean: Optional[Tensor] = None,
    acc_bias: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dL/dx of ``y = conv(relu?(in_scale*(x - in_mean) + in_shift), weight)`` from ``dy`` = dL/dy.

    ``residual`` (only without a prologue): another gradient of ``x``, added
    in the epilogue, so that the sum of a residual block's two branches is
    one write.

    ``gram`` (fp32 ``[C_in, C_in]``, with a prologue, for a stride-1 1x1
    convolution with ``groups=1``), ``gram_mean`` and ``acc_bias`` (fp32
    ``[C_in]``): dL/da (a the prologue's output) gets
    ``(a - gram_mean) @ gram + acc_bias`` added before the prologue's
    backward. With ``gram = W^T diag(b) W``, ``gram_mean`` the batch mean of
    a and ``acc_bias = W^T c``, ``dy`` plus that is the input gradient of
    ``dy + c + b*(y - mean(y))``: the batch-norm statistics term of the
    layer after the convolution, folded through it.

    Returns ``dx`` (channels_last, ``dy``'s dtype) and, when the forward had
    a prologue, per-tile partial sums ``[M tiles, C_in]`` of dL/d(in_shift)
    and of dL/d(in_shift) * (x - in_mean), i.e. dL/d(in_scale) (sum them over
    tiles); empty tensors otherwise.
    """
    pro = in_scale is not None
    plan, dx, parts = _input_grad_buffers(dy, weight, x, stride, padding, dilation, groups, pro,
                                          in_mean is not None, in_relu, residual, gram, gram_mean, acc_bias)
    _launch(plan, dy, weight, dx, mean=in_mean, scale=in_scale, shift=in_shift, residual=x if pro else residual,
            part_a=parts[0] if pro else None, part_b=parts[1] if pro else None,
            gram=None if gram is None else gram.to(dy.dtype).contiguous(),  # a dot operand, as dy
            gram_mean=gram_mean, acc_bias=acc_bias)
    return dx, parts[0], parts[1]


@conv_input_grad.register_fake
def _conv_input_grad_fake(dy, weight, x, in_mean, in_scale, in_shift, stride, padding, dilation, groups,
                          in_relu, residual=None, gram=None, gram_mean=None, acc_bias=None):
    _, dx, parts = _input_grad_buffers(dy, weight, x, stride, padding, dilation, groups, in_scale is not None,
                                       in_mean is not None, in_relu, residual, gram, gram_mean, acc_bias)
    return dx, parts[0], parts[1]


def _block_end_grad_buffers(dy, weight, stride, padding, dilation, groups, residual, relu_mask, end_y, end_id):
    n, c, h, w = end_y.shape
    if groups != 1 or weight.shape[1] * groups != c:
        raise ValueError(f"conv_input_grad_block_end: a dense convolution (groups=1) of the block output's "
                         f"{c} channels; got groups={groups}, weight {tuple(weight.shape)}")
    for name, t in (("residual", residual), ("end_id", end_id)):
        if t is not None and (tuple(t.shape) != (n, c, h, w) or t.dtype != dy.dtype
                              or not t.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError(f"conv_input_grad_block_end: {name} must be a channels_last {dy.dtype} tensor of "
                             f"shape {(n, c, h, w)}; got {tuple(t.shape)}, {t.dtype}")
    if relu_mask.dtype != torch.uint8 or tuple(relu_mask.shape) != relu_mask_shape(end_y):
        raise ValueError(f"conv_input_grad_block_end: relu_mask must be uint8 of shape {relu_mask_shape(end_y)}; "
                         f"got {relu_mask.dtype} {tuple(relu_mask.shape)}")
    plan = plan_conv(dy.shape, _transposed_shape(weight, groups), dy.dtype, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, transposed_out_hw=(h, w), has_residual=residual is not None,
                     end_bwd=True, end_id=end_id is not None, device=dy.device)
    return plan, nhwc_empty((n, c, h, w), dy)


@torch.library.custom_op("aru::conv_input_grad_block_end", mutates_args=())
def conv_input_grad_block_end(
    dy: Tensor,
    weight: Tensor,
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    residual: Optional[Tensor],
    relu_mask: Tensor,
    end_y: Tensor,
    end_mean: Tensor,
    end_id: Optional[Tensor],
    end_id_mean: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """The input gradient of a convolution (``groups=1``, no prologue) whose input
    was a residual block's output ``relu(bn(end_y) + identity')``, taken through
    that block end: ``(dz, sums)``, dz = (dL/dx + ``residual``) behind the ReLU
    (mask ``relu_mask``, as ``aru::bn_add_relu_mask`` wrote it), and the
    per-channel sums ``[3, C]`` of dz, dz*(end_y - end_mean) and, with the
    downsample branch's conv output ``end_id``, dz*(end_id - end_id_mean), as
    ``aru::bn_add_relu_grad_sums`` returns them: dL/dx is never written."""
    plan, dz = _block_end_grad_buffers(dy, weight, stride, padding, dilation, groups, residual, relu_mask, end_y,
                                       end_id)
    c = dz.shape[1]
    planes = 3 if end_id is not None else 2  # the third only with end_id (no zero plane written and read)
    part = torch.empty((planes, plan.partial_tiles, c), dtype=torch.float32, device=dy.device)
    _launch(plan, dy, weight, dz, part_a=part[0], part_b=part[1], part_c=part[2] if end_id is not None else None,
            residual=residual, end_mask=relu_mask, end_y=end_y, end_mean=end_mean, end_id=end_id,
            end_id_mean=end_id_mean)
    if dz.numel() == 0:
        return dz, torch.zeros((3, c), dtype=torch.float32, device=dy.device)
    return dz, block_end_sums(part.sum(1))  # fixed-order reduction over tiles


@conv_input_grad_block_end.register_fake
def _conv_input_grad_block_end_fake(dy, weight, stride, padding, dilation, groups, residual, relu_mask, end_y,
                                    end_mean, end_id, end_id_mean):
    _, dz = _block_end_grad_buffers(dy, weight, stride, padding, dilation, groups, residual, relu_mask, end_y,
                                    end_id)
    return dz, torch.empty((3, dz.shape[1]), dtype=torch.float32, device=dy.device)


@torch.library.custom_op("aru::conv_weight_grad", mutates_args=())
def conv_weight_grad(
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    in_mean: Optional[Tensor],
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    in_relu: bool,
    stat_y: Optional[Tensor] = None,
    stat_mean: Optional[Tensor] = None,
    stat_a: Optional[Tensor] = None,
    stat_b: Optional[Tensor] = None,
    stat_c: Optional[Tensor] = None,
    stat_sq: Optional[Tensor] = None,
    input_sums: bool = False,
    write_dy: bool = True,
    pool_code: Optional[Tensor] = None,
    pool_kernel: int = 1,
    pool_stride: int = 1,
    pool_padding: int = 0,
) -> tuple[Tensor, Tensor]:
    """``(dW, dy')``: dL/dW (``weight``'s shape and dtype, summed in fp32) of
    ``y = conv(relu?(in_scale*(x - in_mean) + in_shift), weight)``.

    With ``stat_y`` (the forward output y) and the fp32 ``[C_out]`` vectors
    ``stat_mean``, ``stat_a``, ``stat_b``, dL/dy is taken as
    ``dy + stat_a + stat_b * (y - stat_mean)`` (batch norm's term through the
    batch mean and variance, added as dy is loaded), or with ``stat_c`` as
    ``stat_c * dy + ...`` (``dy`` then the gradient behind the batch norm,
    ``stat_c`` its scale), plus ``stat_sq[n, c]`` (fp32 ``[N, C_out]``: the
    gradient through per-image means of y, already divided by the pixel
    count) when given, and ``dy'`` is that sum,
    in ``dy``'s dtype, for :func:`conv_input_grad`; otherwise ``dy'`` is empty.
    With ``input_sums`` (a stride-1 1x1 convolution, ``groups=1``) dy' is not
    written: the second result is instead the fp32 ``[C_in]`` sums over all
    pixels of the input after its prologue, what :func:`conv_input_grad`'s
    ``gram`` term needs. With ``input_sums``, ``stat_a`` and ``stat_b`` but no
    ``stat_y`` (at most 128 input channels) y is not read either: ``y = W a``,
    so the term ``stat_b * (y - mean)`` reaches dW as
    ``diag(stat_b) W (A^T A - s s^T / M)``, from the input's Gram matrix
    ``A^T A`` and sums ``s``, which the kernel takes on the side (its ``A_GRAM``). Without ``write_dy`` (no input gradient to come) dy' is
    not written either, and the second result is empty.

    With ``pool_code`` (a ResNet stem: ``max_pool2d(relu(bn(y)))`` follows the
    conv, ``aru::bn_relu_maxpool`` wrote the codes) ``dy`` is the pooled output's
    gradient: the gradient behind the ReLU is gathered from it as it is loaded
    (then ``stat_c * g + stat_a + stat_b * (y - stat_mean)``, all three needed,
    and ``stat_y``), and dL/dy is never written (``write_dy`` off).

    Each split of the pixel sum writes its own slab of whole pack blocks; the
    slabs are added in a fixed order (deterministic) and the diagonal blocks,
    the real groups, kept.
    """
    cout, cin_g, kh, kw = weight.shape
    _check_input_sums(input_sums, weight, stride, padding, groups)
    _check_pool_grad(pool_code, dy, stat_y, stat_c, write_dy)
    conv = plan_conv(x.shape, weight.shape, dy.dtype, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, has_prologue=in_scale is not None)
    gram = _gram_term(input_sums, stat_y, stat_a, stat_b, stat_sq, weight)
    folded = stat_y is not None
    dy_out = _weight_grad_second(x, dy, folded and write_dy, input_sums)
    if conv.m == 0 or weight.numel() == 0:
        if input_sums:
            dy_out.zero_()
        elif folded and write_dy and dy.numel():  # no pixel block to write it: the sum, as the kernel takes it
            dy_out.copy_(_stat_sum(dy, stat_y, stat_mean, stat_a, stat_b, stat_c, stat_sq))
        return torch.zeros(weight.shape, dtype=weight.dtype, device=x.device), dy_out
    plan = plan_wgrad(conv, x.device, gram=gram, gathered=pool_code is not None)
    gp, packs = conv.gp, conv.packs
    part = torch.empty((plan.splits, packs, plan.k_total, conv.cout_p), dtype=torch.float32, device=x.device)
    asum = torch.empty((plan.splits, plan.k_total), dtype=torch.float32, device=x.device) if input_sums else part
    gram_part = torch.empty((plan.splits, plan.k_total, plan.k_total), dtype=torch.float32,
                            device=x.device) if gram else part
    m, m_per_split, loops, pool = conv.m, plan.m_per_split, 1, {}
    if pool_code is not None:  # blocks of stride x stride pixels, a loop a stride class (conv_wgrad_kernel)
        # each row of blocks padded to whole steps (conv_wgrad_kernel)
        wl = stride_blocks(conv.q, pool_stride, pool_padding)
        m = conv.n * stride_blocks(conv.p, pool_stride, pool_padding) * (-(-wl // plan.block_m) * plan.block_m)
        m_per_split = -(-m // (plan.splits * plan.block_m)) * plan.block_m
        loops = pool_stride * pool_stride
        pool = dict(PP=dy.shape[2], PQ=dy.shape[3], POOL_K=pool_kernel, POOL_STRIDE=pool_stride,
                    POOL_PAD=pool_padding)
    launch(
        _conv.conv_wgrad_kernel, plan.grid,
        x, dy, part, _f32(in_mean, part), _f32(in_scale, part), _f32(in_shift, part),
        dy if stat_y is None else stat_y, _f32(stat_mean, part), _f32(stat_a, part), _f32(stat_b, part),
        _f32(stat_c, part), _f32(stat_sq, part), dy_out if folded and write_dy and not input_sums else dy,
        m, m_per_split, conv.h, conv.w, conv.p, conv.q, conv.c_in, conv.c_out,
        KH=kh, KW=kw, STRIDE=stride, PAD=padding, DIL=dilation, CIN_P=conv.cin_p, COUT_P=conv.cout_p,
        HAS_PROLOGUE=in_scale is not None, PRO_MEAN=in_mean is not None, PRO_RELU=in_relu,
        GRAD_STATS=folded, STAT_SCALE=folded and stat_c is not None,
        SQ_TERM=folded and stat_sq is not None, DOT_F32=interpreting(), INPUT_PRECISION=conv.constexprs()["INPUT_PRECISION"],
        BLOCK_M=plan.block_m, BLOCK_K=plan.block_k, BLOCK_N=plan.block_n,
        asum_ptr=asum, WRITE_DY=write_dy and not input_sums, A_SUMS=input_sums, gram_ptr=gram_part, A_GRAM=gram,
        role="wgrad", meta={"conv": conv_geometry(conv), "loop_trips": [m_per_split // plan.block_m] * loops},
        num_warps=plan.num_warps, num_stages=plan.num_stages, pool_code_ptr=pool_code, POOL_GRAD=pool_code is not None,
        FULL_STEPS=pool_code is None and m % plan.block_m == 0, **pool,
    )
    if input_sums:
        dy_out = asum.sum(0)  # fixed-order reduction over the splits
    if not gram:
        return sum_slabs(part, weight, gp), dy_out
    # c * dW + a s^T + diag(b) W (A^T A - s s^T / M), all [C_out, C_in] (fixed-order sums)
    s = dy_out
    centred = gram_part.sum(0) - s[:, None] * (s[None, :] / conv.m)
    w2 = weight.to(x.dtype).float().flatten(1)  # the weight as the forward's dot read it
    term = stat_a.float()[:, None] * s[None, :] + stat_b.float()[:, None] * (w2 @ centred)
    return sum_slabs(part, weight, gp, None if stat_c is None else stat_c.float().contiguous(), term), dy_out


def sum_slabs(part: Tensor, weight: Tensor, gp: int, scale: Optional[Tensor] = None,
              term: Optional[Tensor] = None) -> Tensor:
    """dL/dW in ``weight``'s shape and dtype from the weight-gradient kernel's fp32 slabs
    ``part`` (``[splits, packs, taps * gp * C_in/groups, gp * C_out/groups]``): the slabs
    added in split order (bitwise repeatable), each pack's diagonal blocks kept, then
    times ``scale`` (fp32 ``[C_out]``) plus ``term`` (fp32, ``weight``'s element count),
    rounded once. One launch."""
    cout, cin_g, kh, kw = weight.shape
    splits, packs, _, cout_p = part.shape
    taps = kh * kw
    out = torch.empty(weight.shape, dtype=weight.dtype, device=part.device)
    block_r, block_c, num_warps = slab_sum_blocks(out.numel(), taps * cin_g, cout_p)
    grid = (packs, triton.cdiv(cout_p, block_c), triton.cdiv(taps * cin_g, block_r))
    launch(_conv.wgrad_slab_sum_kernel, grid, part, out, part if scale is None else scale,
           part if term is None else term, splits, part[0].numel(), CIN_G=cin_g, COUT_G=cout_p // gp, GP=gp,
           TAPS=taps, HAS_SCALE=scale is not None, HAS_TERM=term is not None, BLOCK_R=block_r, BLOCK_C=block_c,
           role="wgrad_sum", meta={"elements": out.numel(), "splits": splits}, num_warps=num_warps, num_stages=1)
    return out


def _gram_term(input_sums: bool, stat_y, stat_a, stat_b, stat_sq, weight: Tensor) -> bool:
    """Whether :func:`conv_weight_grad` takes the statistics term from the input's Gram
    matrix (``input_sums`` and the term's vectors without ``stat_y``)."""
    if stat_y is not None or stat_b is None:
        if stat_y is None and stat_a is not None:
            raise ValueError("conv_weight_grad: stat_a comes with stat_b (and stat_y, or input_sums)")
        return False
    if not input_sums or stat_a is None or stat_sq is not None or weight.shape[1] > WGRAD_GRAM_MAX_CHANNELS:
        raise ValueError(f"conv_weight_grad: the statistics term without stat_y needs input_sums, stat_a and "
                         f"stat_b, no stat_sq, and at most {WGRAD_GRAM_MAX_CHANNELS} input channels; got "
                         f"input_sums={input_sums}, {weight.shape[1]} input channels")
    return True


def _stat_sum(dy: Tensor, y: Tensor, mean: Tensor, a: Tensor, b: Tensor, c: Optional[Tensor],
              sq: Optional[Tensor] = None) -> Tensor:
    """``c*dy + a + b*(y - mean)`` per channel (c absent: 1) with PyTorch ops, in fp32: for the
    weight gradients with nothing to launch (no input channels); the kernel adds
    it on load otherwise."""
    def v(t):
        return t.float().view(1, -1, 1, 1)
    g = dy.float() if c is None else dy.float() * v(c)
    g = g + v(a) + v(b) * (y.float() - v(mean))
    return g if sq is None else g + sq.float().view(*sq.shape, 1, 1)


def _check_input_sums(input_sums: bool, weight: Tensor, stride: int, padding: int, groups: int) -> None:
    if input_sums and (tuple(weight.shape[2:]) != (1, 1) or stride != 1 or padding != 0 or groups != 1):
        raise ValueError(f"conv_weight_grad: input_sums needs a stride-1 1x1 convolution without padding, "
                         f"groups=1; got a {tuple(weight.shape[2:])} kernel, stride={stride}, padding={padding}, "
                         f"groups={groups}")


def _check_pool_grad(pool_code: Optional[Tensor], dy: Tensor, stat_y: Optional[Tensor], stat_c: Optional[Tensor],
                     write_dy: bool) -> None:
    if pool_code is None:
        return
    if stat_y is None or stat_c is None or write_dy:
        raise ValueError("conv_weight_grad: a pooled gradient (pool_code) needs stat_y, stat_a, stat_b and stat_c, "
                         f"and write_dy=False; got stat_y={'set' if stat_y is not None else None}, "
                         f"stat_c={'set' if stat_c is not None else None}, write_dy={write_dy}")
    n, c = stat_y.shape[:2]
    if (tuple(pool_code.shape) != (n, dy.shape[2], dy.shape[3], c) or pool_code.dtype != torch.int8
            or tuple(dy.shape[:2]) != (n, c)):
        raise ValueError(f"conv_weight_grad: the pooled gradient [N, C, P, Q] and its int8 codes [N, P, Q, C] "
                         f"must match y {tuple(stat_y.shape)}; got {tuple(dy.shape)} and {pool_code.dtype} "
                         f"{tuple(pool_code.shape)}")


def _weight_grad_second(x: Tensor, dy: Tensor, folded: bool, input_sums: bool) -> Tensor:
    """The second result of :func:`conv_weight_grad`, allocated."""
    if input_sums:
        return torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    return torch.empty_like(dy, memory_format=torch.channels_last) if folded else dy.new_empty(0)


@conv_weight_grad.register_fake
def _conv_weight_grad_fake(x, dy, weight, in_mean, in_scale, in_shift, stride, padding, dilation, groups,
                           in_relu, stat_y=None, stat_mean=None, stat_a=None, stat_b=None, stat_c=None,
                           stat_sq=None, input_sums=False, write_dy=True, pool_code=None, pool_kernel=1, pool_stride=1,
                           pool_padding=0):
    _check_input_sums(input_sums, weight, stride, padding, groups)
    _check_pool_grad(pool_code, dy, stat_y, stat_c, write_dy)
    _gram_term(input_sums, stat_y, stat_a, stat_b, stat_sq, weight)
    return (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
            _weight_grad_second(x, dy, stat_y is not None and write_dy, input_sums))


# --------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------


def conv_grads(ctx, g: Tensor, x, weight, in_mean, in_scale, in_shift, stat=(), normalized=None):
    """(dx, dW, d_in_mean, d_in_scale, d_in_shift) of conv(relu?(in_scale*(x - in_mean) + in_shift), W)
    from g = dL/dy; ``ctx.slots`` names the positions of x, W and the prologue vectors among the inputs.
    ``stat`` = (y, mean, a, b): dL/dy is ``g + a + b*(y - mean)`` (see :func:`conv_weight_grad`).
    ``normalized``: the prologue's output, when the forward computed it ahead (the weight
    gradient then reads it as it is)."""
    stride, padding, dilation, groups, in_relu = ctx.conv_cfg
    i_x, i_w, i_pro = ctx.slots
    need_x, need_w = ctx.needs_input_grad[i_x], ctx.needs_input_grad[i_w]
    need_pro = in_scale is not None and any(ctx.needs_input_grad[i] for i in i_pro)
    dx = dw = d_in_mean = d_in_scale = d_in_shift = None
    if (normalized is None and in_scale is not None and in_shift is not None and len(stat) == 4
            and (need_x or need_w or need_pro)
            and tap_grads_fuse(weight.shape[2], weight.shape[3], stride, padding, dilation, groups, x.shape[1],
                               weight.shape[0])):
        # a stride-1 grouped 3x3: both gradients in one launch (aru::tap_conv_grads), dL/dy with
        # the statistics term never written, the normalized input recomputed from x
        dw, dx, sums = torch.ops.aru.tap_conv_grads(x, g, weight, *stat, None, in_mean, in_scale, in_shift, in_relu,
                                                    padding, dilation, groups)
        d_in_shift, d_in_scale = sums[0], sums[1]
        if in_mean is not None:
            d_in_mean = -in_scale.float() * d_in_shift
        return dx if need_x else None, dw.to(weight.dtype) if need_w else None, d_in_mean, d_in_scale, d_in_shift
    if need_w or (stat and (need_x or need_pro)):  # the weight-gradient launch writes dL/dy with the statistics term
        write_dy = bool(stat) and (need_x or need_pro)
        if normalized is None:
            dw, folded = torch.ops.aru.conv_weight_grad(x, g, weight, in_mean, in_scale, in_shift, stride, padding,
                                                        dilation, groups, in_relu, *stat, write_dy=write_dy)
        else:
            dw, folded = torch.ops.aru.conv_weight_grad(normalized, g, weight, None, None, None, stride, padding,
                                                        dilation, groups, False, *stat, write_dy=write_dy)
        dw = dw.to(weight.dtype) if need_w else None
        g = folded if stat else g
    if need_x or need_pro:
        dx, part_shift, part_scale = torch.ops.aru.conv_input_grad(g, weight, x, in_mean, in_scale, in_shift,
                                                                   stride, padding, dilation, groups, in_relu)
        if in_scale is not None:
            d_in_shift, d_in_scale = part_shift.sum(0), part_scale.sum(0)
            if in_mean is not None:
                d_in_mean = -in_scale.float() * d_in_shift
    return dx, dw, d_in_mean, d_in_scale, d_in_shift


def _conv_bn_act_setup(ctx, inputs, output):
    (x, weight, mean, var, scale, shift, residual, in_mean, in_scale, in_shift, stride, padding, dilation,
     groups, eps, relu, in_relu) = inputs
    ctx.conv_cfg = (stride, padding, dilation, groups, in_relu)
    ctx.slots = (0, 1, (7, 8, 9))
    ctx.epilogue = (relu, residual is not None, eps)
    ctx.save_for_backward(x, weight, mean, var, scale, shift, in_mean, in_scale, in_shift,
                          output if relu else None)


def _channel_sum(t: Tensor) -> Tensor:
    return t.float().sum((0, 2, 3))


def _conv_bn_act_backward(ctx, dout):
    x, weight, mean, var, scale, shift, in_mean, in_scale, in_shift, out = ctx.saved_tensors
    relu, has_residual, eps = ctx.epilogue
    needs = ctx.needs_input_grad
    # torch.relu's gradient: zero where the output is <= 0; NaN outputs pass it on.
    g = torch.where(out <= 0, 0, dout) if relu else dout
    d_residual = nhwc(g) if has_residual else None
    d_shift = _channel_sum(g) if shift is not None and needs[5] else None
    # y = (acc - mean) * r * scale + shift + residual, r = 1 / sqrt(var + eps)
    r = None if var is None else torch.rsqrt(var.float() + eps)
    factor = None
    for v in (r, None if scale is None else scale.float()):
        if v is not None:
            factor = v if factor is None else factor * v
    d_mean = d_var = d_scale = None
    if (scale is not None and needs[4]) or (var is not None and needs[3]):
        stride, padding, dilation, groups, in_relu = ctx.conv_cfg
        centred = torch.ops.aru.conv_bn_act(x, weight, mean, None, None, None, None, in_mean, in_scale, in_shift,
                                            stride, padding, dilation, groups, eps, False, in_relu)
        gu = _channel_sum(g.float() * centred.float())  # sum g * (acc - mean)
        if scale is not None and needs[4]:
            d_scale = gu if r is None else gu * r
        if var is not None and needs[3]:
            d_var = gu * (1.0 if scale is None else scale.float()) * (-0.5) * r ** 3
    if factor is not None:
        g = g.float() * factor.view(1, -1, 1, 1)
    if mean is not None and needs[2]:
        d_mean = -_channel_sum(g)
    g = nhwc(g.to(x.dtype))
    dx, dw, d_in_mean, d_in_scale, d_in_shift = conv_grads(ctx, g, x, weight, in_mean, in_scale, in_shift)
    return (dx, dw, d_mean, d_var, d_scale, d_shift, d_residual, d_in_mean, d_in_scale, d_in_shift,
            None, None, None, None, None, None, None)


_conv_bn_act_op.register_autograd(_conv_bn_act_backward, setup_context=_conv_bn_act_setup)


def _conv_bn_squeeze_setup(ctx, inputs, output):
    _conv_bn_act_setup(ctx, inputs, output[0])
    ctx.out_shape = output[0].shape


def _conv_bn_squeeze_backward(ctx, dout, dsqueeze):
    # the squeeze is the mean over each image's pixels: its gradient spreads evenly over them
    n, c, p, q = ctx.out_shape
    spread = (dsqueeze.float() / max(1, p * q)).view(n, c, 1, 1)
    return _conv_bn_act_backward(ctx, dout.float() + spread)


_conv_bn_squeeze_op.register_autograd(_conv_bn_squeeze_backward, setup_context=_conv_bn_squeeze_setup)


def _conv_stats_setup(ctx, inputs, output):
    x, weight, in_mean, in_scale, in_shift, stride, padding, dilation, groups, in_relu = inputs
    ctx.conv_cfg = (stride, padding, dilation, groups, in_relu)
    ctx.slots = (0, 1, (2, 3, 4))
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, weight, in_mean, in_scale, in_shift)


def _conv_stats_backward(ctx, dy, _d_tile_mean, _d_tile_m2):
    x, weight, in_mean, in_scale, in_shift = ctx.saved_tensors
    grads = conv_grads(ctx, nhwc(dy.to(x.dtype)), x, weight, in_mean, in_scale, in_shift)
    return (*grads, None, None, None, None, None)


_conv_stats_op.register_autograd(_conv_stats_backward, setup_context=_conv_stats_setup)


for _op in (conv_input_grad, conv_input_grad_block_end, conv_weight_grad):  # (gradients: no derivative of their own)
    first_derivatives_only(_op)
