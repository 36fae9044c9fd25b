"""Training-mode convolution + batch statistics as one differentiable operator.

``aru::conv_bn_stats`` runs the conv with its batch statistics taken in the
epilogue, then the batch-norm finalize: ``(y, mean, invstd)`` and the
running-statistics update. ``aru::block_end_conv_bn_stats`` is the same for a
residual block's first 1x1 convolution whose input is the previous block's
end, computed as the conv loads it (and written once, with its ReLU mask
bits): for :mod:`aru_kernels.block_ops`, which owns the backward. Because the conv and its statistics are one
autograd node, its backward receives dL/dy of the data path together with
dL/dmean and dL/dinvstd, and folds the statistics' term ``a + b*(y - mean)``
(:func:`aru_kernels.bn_ops.stats_term`) into the input- and weight-gradient
kernels as they load dL/dy: no gradient tensor of the statistics path is
written, and autograd adds nothing over the activation.
:class:`aru_kernels.sync_bn.SyncConvBatchStats` is the same with the
statistics of every process of a ``torch.distributed`` group
(``nn.SyncBatchNorm``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .bn_ops import bn_add_relu_mask, finalize_stats, normalize, relu_mask_shape, rows, stats_term
from .checks import check_activation, check_conv_inputs, check_vector
from .conv_ops import conv_bn_act_into, conv_grads, image_statistics, nhwc, nhwc_empty, stats_plan
from .plans import END_PROLOGUE_MAX_N_BLOCKS, block_end_fuses, normalizes_ahead, tap_grads_fuse
from .tap_ops import tap_forward_stats

__all__ = ["conv_bn_stats_grads", "conv_with_stats", "normalized_input", "block_end_conv_bn_stats"]


def _ahead(weight: Tensor, in_scale: Optional[Tensor]) -> bool:
    """Whether the conv's prologue runs in a pass of its own (:func:`aru_kernels.plans.normalizes_ahead`)."""
    return normalizes_ahead(weight.shape[2], weight.shape[3], in_scale is not None)


def _tap_forward(weight: Tensor, in_scale: Optional[Tensor], in_shift: Optional[Tensor], stride: int, padding: int,
                 dilation: int, groups: int, squeeze: bool) -> bool:
    """Whether the conv runs as ``tap_forward_kernel`` (:func:`aru_kernels.tap_ops.tap_forward_stats`):
    a grouped 3x3 behind a batch norm that :func:`aru_kernels.plans.tap_grads_fuse` takes,
    its input normalized once inside the launch and not kept (its backward,
    :func:`aru_kernels.conv_ops.conv_grads`, recomputes it in ``aru::tap_conv_grads``)."""
    return (not squeeze and in_scale is not None and in_shift is not None and
            tap_grads_fuse(weight.shape[2], weight.shape[3], stride, padding, dilation, groups,
                           weight.shape[1] * groups, weight.shape[0]))


def normalized_input(x: Tensor, weight: Tensor, in_mean, in_scale, in_shift, in_relu: bool) -> Optional[Tensor]:
    """The prologue applied once, into a buffer, where the plans say so; None where
    the conv applies it on load."""
    if not _ahead(weight, in_scale):
        return None
    return normalize(x, in_mean, in_scale, in_shift, in_relu)


def conv_with_stats(x, weight, in_mean, in_scale, in_shift, stride, padding, dilation, groups, in_relu,
                    squeeze: bool = False):
    """``(y, tile_mean, tile_m2, tile_rows, a)``: the training conv with its per-tile
    statistics; ``a`` is the normalized input it read when normalized ahead, else None.
    With ``squeeze`` the tiles are whole images (``tile_mean`` is then each image's
    mean, squeeze-excitation's squeeze, and ``tile_rows`` the pixels of an image).
    A grouped 3x3 that :func:`aru_kernels.plans.tap_grads_fuse` takes normalizes its
    input inside the launch, and ``a`` is None."""
    if _tap_forward(weight, in_scale, in_shift, stride, padding, dilation, groups, squeeze):
        return (*tap_forward_stats(x, weight, in_mean, in_scale, in_shift, in_relu, padding, dilation, groups), None)
    a = normalized_input(x, weight, in_mean, in_scale, in_shift, in_relu)
    src, pro = (x, (in_mean, in_scale, in_shift, in_relu)) if a is None else (a, (None, None, None, False))
    y, tile_mean, tile_m2 = conv_bn_act_into(None, src, weight, in_mean=pro[0], in_scale=pro[1], in_shift=pro[2],
                                             stride=stride, padding=padding, dilation=dilation, groups=groups,
                                             in_relu=pro[3], stats=True, squeeze=squeeze)
    block_m = stats_plan(src, weight, *pro[:2], pro[3], stride, padding, dilation, groups, squeeze=squeeze).block_m
    if squeeze:
        pq = y.shape[2] * y.shape[3]
        return (y, *image_statistics(tile_mean, tile_m2, y.shape[0], pq, block_m), pq, a)
    return y, tile_mean, tile_m2, block_m, a


@torch.library.custom_op("aru::conv_bn_stats", mutates_args=())
def _conv_bn_stats_op(
    x: Tensor,
    weight: Tensor,
    in_mean: Optional[Tensor],
    in_scale: Optional[Tensor],
    in_shift: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    in_relu: bool,
    momentum: Optional[float],
    eps: float,
    squeeze: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, invstd, new running mean, new running var, a, squeeze)`` of
    ``y = conv(a, weight)``, ``a = relu?(in_scale*(x - in_mean) + in_shift)``,
    and its batch statistics; the running statistics are empty without
    running statistics (``num_batches_tracked``, when given, already counts
    this batch). ``a`` is the normalized input when the prologue ran ahead of
    the conv (kept for the weight gradient), empty when it ran on load. With
    ``squeeze``, ``squeeze`` is the fp32 ``[N, C]`` mean of each image's channel
    of y (squeeze-excitation's squeeze, from the same epilogue), else empty. A stride-1
    grouped 3x3 (:func:`aru_kernels.plans.tap_grads_fuse`) normalizes its input inside the
    conv's launch and returns ``a`` empty: its backward recomputes it."""
    y, tile_mean, tile_m2, tile_rows, a = conv_with_stats(x, weight, in_mean, in_scale, in_shift, stride, padding,
                                                          dilation, groups, in_relu, squeeze)
    stats = finalize_stats(y.shape[1], rows(y), tile_mean, tile_m2, running_mean, running_var,
                           num_batches_tracked, tile_rows, momentum, eps)
    return (y, *stats, x.new_empty(0) if a is None else a, tile_mean if squeeze else x.new_empty(0))


@_conv_bn_stats_op.register_fake
def _conv_bn_stats_fake(x, weight, in_mean, in_scale, in_shift, running_mean, running_var, num_batches_tracked,
                        stride, padding, dilation, groups, in_relu, momentum, eps, squeeze=False):
    p, q = check_conv_inputs(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    c = weight.shape[0]
    y = torch.empty((x.shape[0], c, p, q), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    vec = torch.empty(c, dtype=torch.float32, device=x.device)
    kept = _ahead(weight, in_scale) and not _tap_forward(weight, in_scale, in_shift, stride, padding, dilation,
                                                         groups, squeeze)
    a = torch.empty_like(x, memory_format=torch.channels_last) if kept else x.new_empty(0)
    sq = vec.new_empty((x.shape[0], c)) if squeeze else x.new_empty(0)
    if running_mean is None:
        return y, vec, torch.empty_like(vec), vec.new_empty(0), vec.new_empty(0), a, sq
    return y, vec, torch.empty_like(vec), torch.empty_like(running_mean), torch.empty_like(running_var), a, sq


def _setup(ctx, inputs, output):
    x, weight, in_mean, in_scale, in_shift, *_ = inputs
    stride, padding, dilation, groups, in_relu = inputs[8:13]
    ctx.conv_cfg = (stride, padding, dilation, groups, in_relu)
    ctx.slots = (0, 1, (2, 3, 4))
    ctx.mark_non_differentiable(output[3], output[4], output[5])
    ctx.set_materialize_grads(False)  # no zero gradients written for the outputs nothing differentiates
    y, mean, invstd = output[:3]
    ctx.ahead = output[5].numel() > 0  # the normalized input, when the forward wrote it
    ctx.save_for_backward(x, weight, in_mean, in_scale, in_shift, y, mean, invstd, output[5])


def conv_bn_stats_grads(ctx, dy, dmean, dinvstd, count: int | torch.Tensor, d_squeeze=None):
    """The conv's input gradients from dL/dy of the data path and dL/d(mean, invstd)
    taken over ``count`` values per channel (and dL/d of each image's mean of y,
    ``d_squeeze`` [N, C]); ``ctx`` saved (x, weight, in_mean, in_scale, in_shift,
    y, mean, invstd, a) and ``ctx.ahead`` says whether ``a`` is the normalized input."""
    x, weight, in_mean, in_scale, in_shift, y, mean, invstd, a = ctx.saved_tensors
    g = torch.zeros_like(y, memory_format=torch.channels_last) if dy is None else nhwc(dy.to(x.dtype))
    stat = ()
    if dmean is not None or dinvstd is not None or d_squeeze is not None:
        stat = (y, mean, *stats_term(dmean, dinvstd, invstd, count))
    if d_squeeze is not None:  # each image's mean: its gradient spreads evenly over the image's pixels
        stat += (None, (d_squeeze.float() / max(1, y.shape[2] * y.shape[3])).contiguous())
    return conv_grads(ctx, g, x, weight, in_mean, in_scale, in_shift, stat, a if ctx.ahead else None)


def _backward(ctx, dy, dmean, dinvstd, _d_running_mean, _d_running_var, _d_a, d_squeeze):
    return (*conv_bn_stats_grads(ctx, dy, dmean, dinvstd, rows(ctx.saved_tensors[5]), d_squeeze),) + (None,) * 11


_conv_bn_stats_op.register_autograd(_backward, setup_context=_setup)


_END_OP = "block_end_conv_bn_stats"


def _check_block_end(y_end, end_mean, end_scale, end_shift, identity, id_mean, id_scale, id_shift, weight,
                     stride, padding, groups) -> None:
    check_activation(y_end, "y_end", _END_OP)
    c = y_end.shape[1]
    if not block_end_fuses(*weight.shape[2:], stride, padding, groups, weight.shape[0]):
        raise ValueError(f"{_END_OP}: needs a stride-1 1x1 convolution without padding, groups=1, of at most "
                         f"{END_PROLOGUE_MAX_N_BLOCKS} blocks of output channels; got a {tuple(weight.shape)} weight, stride={stride}, "
                         f"padding={padding}, groups={groups}")
    if identity is None:
        raise ValueError(f"{_END_OP}: a residual block's end needs its identity")
    check_activation(identity, "identity", _END_OP)
    if identity.shape != y_end.shape or identity.dtype != y_end.dtype:
        raise ValueError(f"{_END_OP}: identity must match y_end ({tuple(y_end.shape)}, {y_end.dtype}); "
                         f"got {tuple(identity.shape)}, {identity.dtype}")
    if (id_scale is None) != (id_shift is None) or (id_mean is None) != (id_scale is None):
        raise ValueError(f"{_END_OP}: id_mean, id_scale and id_shift come together (the identity's batch norm)")
    for name, v in (("end_mean", end_mean), ("end_scale", end_scale), ("end_shift", end_shift),
                    ("id_mean", id_mean), ("id_scale", id_scale), ("id_shift", id_shift)):
        check_vector(v, name, c, "one per channel of the block output", _END_OP)


@torch.library.custom_op("aru::block_end_conv_bn_stats", mutates_args=())
def block_end_conv_bn_stats(
    y_end: Tensor,
    end_mean: Tensor,
    end_scale: Tensor,
    end_shift: Tensor,
    identity: Optional[Tensor],
    id_mean: Optional[Tensor],
    id_scale: Optional[Tensor],
    id_shift: Optional[Tensor],
    weight: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    stride: int,
    padding: int,
    dilation: int,
    groups: int,
    momentum: Optional[float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(x, relu_mask, y, mean, invstd, new running mean, new running var)``:
    ``x, relu_mask = aru::bn_add_relu_mask(y_end, end_mean, end_scale, end_shift,
    identity, id_mean, id_scale, id_shift)``, a residual block's output and its
    ReLU's mask bits, then ``aru::conv_bn_stats(x, weight, ...)`` without a
    prologue, in one launch: the convolution (stride 1, 1x1, ``groups=1``)
    computes x as it loads it. Not differentiable itself: for nodes that own
    their backward."""
    _check_block_end(y_end, end_mean, end_scale, end_shift, identity, id_mean, id_scale, id_shift, weight,
                     stride, padding, groups)
    if weight.shape[0] == 0:  # nothing to convolve: the block end alone
        x, relu_mask = bn_add_relu_mask(y_end, end_mean, end_scale, end_shift, identity, id_mean, id_scale,
                                        id_shift)
        y, tile_mean, tile_m2 = conv_bn_act_into(None, x, weight, stats=True)
        tile_rows = stats_plan(x, weight, None, None, False, stride, padding, dilation, groups).block_m
    else:
        x = nhwc_empty(y_end.shape, y_end)
        relu_mask = torch.empty(relu_mask_shape(y_end), dtype=torch.uint8, device=y_end.device)
        y, tile_mean, tile_m2 = conv_bn_act_into(
            None, y_end, weight, in_mean=end_mean, in_scale=end_scale, in_shift=end_shift, stride=stride,
            padding=padding, dilation=dilation, groups=groups, stats=True,
            block_end=(identity, id_mean, id_scale, id_shift, x, relu_mask))
        tile_rows = stats_plan(y_end, weight, None, None, False, stride, padding, dilation, groups,
                               block_end=id_scale is not None).block_m
    stats = finalize_stats(y.shape[1], rows(y), tile_mean, tile_m2, running_mean, running_var,
                           num_batches_tracked, tile_rows, momentum, eps)
    return (x, relu_mask, y, *stats)


@block_end_conv_bn_stats.register_fake
def _block_end_conv_bn_stats_fake(y_end, end_mean, end_scale, end_shift, identity, id_mean, id_scale, id_shift,
                                  weight, running_mean, running_var, num_batches_tracked, stride, padding, dilation,
                                  groups, momentum, eps):
    _check_block_end(y_end, end_mean, end_scale, end_shift, identity, id_mean, id_scale, id_shift, weight,
                     stride, padding, groups)
    y, mean, invstd, new_rm, new_rv, _, _ = _conv_bn_stats_fake(
        y_end, weight, None, None, None, running_mean, running_var, num_batches_tracked, stride, padding,
        dilation, groups, False, momentum, eps)
    return (torch.empty_like(y_end, memory_format=torch.channels_last),
            torch.empty(relu_mask_shape(y_end), dtype=torch.uint8, device=y_end.device), y, mean, invstd,
            new_rm, new_rv)
