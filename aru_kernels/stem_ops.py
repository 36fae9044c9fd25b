"""A ResNet stem in training as one autograd node: convolution, batch norm with
batch statistics, ReLU, max-pool.

The forward is the operators the stem runs one at a time: ``aru::conv_bn_stats``,
then ``aru::bn_relu_maxpool`` (the pooled output and one int8 code per pooled
element). What a node of its own buys is the backward. One operator at a time,
the pool's backward writes dL/dy at full resolution (the largest activation of
the network) and the convolution's weight gradient reads it back. Here the
pool's backward takes only the batch norm's sums (``write_dy`` off), and the
weight-gradient launch gathers the gradient behind the ReLU from the pooled
gradient and the codes as it loads each tile, scaled and with the statistics
term (``aru::conv_weight_grad``'s ``pool_code``): dL/dy is never written. Where
the convolution allows, both the forward and that launch read the image as 2x2
pixel blocks (:mod:`aru_kernels.space_to_depth`), built once by the forward.
The stem's input, the image, takes no gradient here; a stem whose input needs
one runs its operators one at a time.
"""

from __future__ import annotations

import torch

from . import space_to_depth
from .block_ops import _affine, _bn_grads
from .bn_ops import rows
from .conv_ops import nhwc
from .plans import out_size

__all__ = ["StemTrain"]


class StemTrain(torch.autograd.Function):
    """``forward(ctx, config, x, weight, bn_weight, bn_bias, running_mean, running_var,
    num_batches_tracked)``: ``max_pool2d(relu(bn(conv(x))))``, ``config`` the conv's
    ``(stride, padding, dilation, groups)``, the batch norm's ``(momentum, eps)`` and the
    pool's ``(kernel_size, stride, padding)``. Returns the pooled output, then the new
    running mean and variance (empty without running statistics;
    ``num_batches_tracked`` must already count this batch), not differentiable.
    ``x`` gets no gradient."""

    @staticmethod
    def forward(ctx, config, x, weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked):
        stride, padding, dilation, groups, momentum, eps, window = config
        src, w, s, pad = x, weight, stride, padding
        if space_to_depth.applies(x, weight, stride, dilation, groups, False):  # 2x2 pixel blocks, stride 1
            hw = [out_size(n, weight.shape[2], stride, padding, dilation) for n in x.shape[2:]]
            (src, w), s, pad = space_to_depth.rewrite(x, weight, padding, tuple(hw)), 1, 0
        y, mean, invstd, new_rm, new_rv, _, _ = torch.ops.aru.conv_bn_stats(
            src, w, None, None, None, running_mean, running_var, num_batches_tracked, s, pad, dilation,
            groups, False, momentum, eps)
        scale, shift = _affine(bn_weight, bn_bias, invstd)
        out, code = torch.ops.aru.bn_relu_maxpool(y, mean, scale, shift, *window)
        ctx.config = config
        ctx.rewritten = src is not x  # the weight gradient reads the same X' (kept: 1.4x the image's bytes)
        ctx.save_for_backward(src, weight, bn_weight, bn_bias, y, mean, invstd, scale, code)
        ctx.mark_non_differentiable(new_rm, new_rv)
        return out, new_rm, new_rv

    @staticmethod
    def backward(ctx, dout, *_running):
        x, weight, bn_weight, bn_bias, y, mean, invstd, scale, code = ctx.saved_tensors
        stride, padding, dilation, groups, _, _, window = ctx.config
        dout = nhwc(dout.to(y.dtype))
        _, sums = torch.ops.aru.bn_relu_maxpool_backward(dout, code, y, mean, scale, *window, write_dy=False)
        d_weight, d_shift, st_a, st_b = _bn_grads(sums[0], sums[1], invstd, scale, bn_weight, rows(y))
        w = space_to_depth.rewrite_weight(weight) if ctx.rewritten else weight
        if ctx.rewritten:  # over 2x2 pixel blocks (x is X'): 32-byte rows, not a scalar gather a (tap, channel)
            stride, padding = 1, 0
        dw, _ = torch.ops.aru.conv_weight_grad(
            x, dout, w, None, None, None, stride, padding, dilation, groups, False, y, mean, st_a, st_b, scale,
            write_dy=False, pool_code=code, pool_kernel=window[0], pool_stride=window[1], pool_padding=window[2])
        if ctx.rewritten:
            dw = space_to_depth.weight_grad_back(dw, weight.shape)
        return (None, None, dw.to(weight.dtype), d_weight, None if bn_bias is None else d_shift.to(bn_bias.dtype),
                None, None, None)
