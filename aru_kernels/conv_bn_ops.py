"""Training-mode convolution + batch statistics as one differentiable operator.

``aru::conv_bn_stats`` runs the conv with its batch statistics taken in the
epilogue, then the batch-norm finalize: ``(y, mean, invstd)`` and the
running-statistics update. Because the conv and its statistics are one
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

from .bn_ops import finalize_stats, normalize, rows, stats_term
from .checks import check_conv_inputs
from .conv_ops import conv_bn_act_into, conv_grads, image_statistics, nhwc, stats_plan
from .plans import normalizes_ahead

__all__ = ["conv_bn_stats_grads", "conv_with_stats", "normalized_input"]


def _ahead(weight: Tensor, in_scale: Optional[Tensor]) -> bool:
    """Whether the conv's prologue runs in a pass of its own (:func:`aru_kernels.plans.normalizes_ahead`)."""
    return normalizes_ahead(weight.shape[2], weight.shape[3], in_scale is not None)


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
    mean, squeeze-excitation's squeeze, and ``tile_rows`` the pixels of an image)."""
    a = normalized_input(x, weight, in_mean, in_scale, in_shift, in_relu)
    src, pro = (x, (in_mean, in_scale, in_shift, in_relu)) if a is None else (a, (None, None, None, False))
    y, tile_mean, tile_m2 = conv_bn_act_into(None, src, weight, in_mean=pro[0], in_scale=pro[1], in_shift=pro[2],
                                             stride=stride, padding=padding, dilation=dilation, groups=groups,
                                             in_relu=pro[3], stats=True, squeeze=squeeze)
    block_m = stats_plan(src, weight, *pro[:2], pro[3], stride, padding, dilation, groups).block_m
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
    of y (squeeze-excitation's squeeze, from the same epilogue), else empty."""
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
    a = torch.empty_like(x, memory_format=torch.channels_last) if _ahead(weight, in_scale) else x.new_empty(0)
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
    ctx.ahead = _ahead(weight, in_scale)
    ctx.save_for_backward(x, weight, in_mean, in_scale, in_shift, y, mean, invstd, output[5])


def conv_bn_stats_grads(ctx, dy, dmean, dinvstd, count: int, d_squeeze=None):
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
