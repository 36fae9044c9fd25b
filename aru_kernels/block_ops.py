"""A training-mode residual block as one autograd node.

``relu(bn_n(conv_n(... relu(bn_1(conv_1(x))) ...)) + identity)``, identity
``x`` or ``bn_d(conv_d(x))``, batch norms with batch statistics: the
forward is the same operators as one conv at a time
(``aru::conv_bn_stats`` per conv, ``aru::bn_add_relu`` at the end); what a
node of its own buys is the backward. With one node per conv, autograd holds
two gradients of the block input (the residual branch's and the first
conv's) and adds them in a pass of their own, and the end of the block writes
dL/dy of the last conv and dL/didentity as two tensors. Here:

* ``aru::bn_add_relu_grad_sums`` writes the gradient behind the final ReLU,
  ``dz``, once; the last conv's and the downsample conv's weight-gradient
  kernels scale it by their batch norm's scale as they load it (together
  with the statistics term they add anyway);
* the first conv's input-gradient kernel adds the residual gradient (``dz``,
  or the downsample conv's input gradient) in its epilogue.

Batch-norm vector gradients are formed here from the kernels' per-channel
sums, by the formulas autograd applies on the one-conv-at-a-time path.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .bn_ops import rows, stats_term
from .conv_ops import nhwc

__all__ = ["ConvBN", "ResidualBlockTrain", "PER_CONV"]

PER_CONV = 6  # tensors per conv: weight, bn weight, bn bias, running mean, running var, num_batches_tracked


class ConvBN(NamedTuple):
    """A convolution (no bias) and the batch norm after it, as a residual block holds them."""

    weight: Tensor
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    num_batches_tracked: Optional[Tensor] = None
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    momentum: Optional[float] = 0.1
    eps: float = 1e-5

    def tensors(self) -> tuple:
        return (self.weight, self.bn_weight, self.bn_bias, self.running_mean, self.running_var,
                self.num_batches_tracked)

    def config(self) -> tuple:
        return (self.stride, self.padding, self.dilation, self.groups, self.momentum, self.eps)


def _affine(bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], invstd: Tensor) -> tuple[Tensor, Tensor]:
    """The batch norm as ``scale*(y - mean) + shift``: (scale, shift) in fp32."""
    scale = invstd if bn_weight is None else bn_weight.float() * invstd
    shift = torch.zeros_like(invstd) if bn_bias is None else bn_bias.float()
    return scale, shift


def _bn_grads(d_shift: Tensor, d_scale: Tensor, invstd: Tensor, scale: Tensor, bn_weight: Optional[Tensor],
              count: int):
    """From sum(dL/dz) and sum(dL/dz * (y - mean)) over a batch norm's outputs z =
    scale*(y - mean) + shift: (dL/dweight, dL/dbias, a, b), with ``a + b*(y - mean)``
    the gradient through the batch mean and 1/std."""
    d_invstd = d_scale if bn_weight is None else d_scale * bn_weight.float()
    a, b = stats_term(-scale * d_shift, d_invstd, invstd, count)
    d_weight = None if bn_weight is None else (d_scale * invstd).to(bn_weight.dtype)
    return d_weight, d_shift, a, b


class ResidualBlockTrain(torch.autograd.Function):
    """``forward(ctx, configs, has_downsample, x, *tensors)``: ``configs`` holds each
    conv's :meth:`ConvBN.config`, the chain first and the downsample last;
    ``tensors`` their :meth:`ConvBN.tensors`, :data:`PER_CONV` each, in the same
    order. Returns the block output, then each batch norm's new running mean and
    variance (empty without running statistics; ``num_batches_tracked`` must
    already count this batch), not differentiable."""

    @staticmethod
    def forward(ctx, configs, has_downsample: bool, x, *tensors):
        convs = [tensors[i * PER_CONV:(i + 1) * PER_CONV] for i in range(len(configs))]
        chain = len(configs) - has_downsample
        running, saved, stats = [], [], []
        h, prologue = x, (None, None, None)
        for k in range(len(configs)):
            if k == chain:  # the downsample branch reads the block input
                h, prologue = x, (None, None, None)
            weight, bn_weight, bn_bias, rm, rv, nbt = convs[k]
            stride, padding, dilation, groups, momentum, eps = configs[k]
            y, mean, invstd, new_rm, new_rv, a, _ = torch.ops.aru.conv_bn_stats(
                h, weight, *prologue, rm, rv, nbt, stride, padding, dilation, groups,
                prologue[0] is not None, momentum, eps)
            scale, shift = _affine(bn_weight, bn_bias, invstd)
            running += [new_rm, new_rv]
            saved += [y, mean, invstd, scale, shift, a]
            stats.append((y, mean, scale, shift))
            h, prologue = y, (mean, scale, shift)
        y, mean, scale, shift = stats[chain - 1]
        if has_downsample:
            yd, md, sd, bd = stats[chain]
            out, relu_mask = torch.ops.aru.bn_add_relu_mask(y, mean, scale, shift, yd, md, sd, bd)
        else:
            out, relu_mask = torch.ops.aru.bn_add_relu_mask(y, mean, scale, shift, x, None, None, None)
        ctx.configs, ctx.has_downsample = configs, has_downsample
        ctx.save_for_backward(x, relu_mask, *(c[0] for c in convs), *(c[1] for c in convs), *(c[2] for c in convs),
                              *saved)
        ctx.mark_non_differentiable(*running)
        return (out, *running)

    @staticmethod
    def backward(ctx, dout, *_running):
        configs, has_ds = ctx.configs, ctx.has_downsample
        n_convs = len(configs)
        chain = n_convs - has_ds
        x, relu_mask, *rest = ctx.saved_tensors
        weights, bn_weights, bn_biases = rest[:n_convs], rest[n_convs:2 * n_convs], rest[2 * n_convs:3 * n_convs]
        per = [rest[3 * n_convs + 6 * k: 3 * n_convs + 6 * (k + 1)] for k in range(n_convs)]
        grads = [[None] * PER_CONV for _ in range(n_convs)]
        needs_x = ctx.needs_input_grad[2]

        y_last, m_last = per[chain - 1][0], per[chain - 1][1]
        yd, md = (per[chain][0], per[chain][1]) if has_ds else (None, None)
        dz, sums = torch.ops.aru.bn_add_relu_grad_sums(nhwc(dout.to(y_last.dtype)), relu_mask, y_last, m_last,
                                                       yd, md)

        def conv_backward(k: int, g: Tensor, d_shift: Tensor, d_scale: Tensor, scaled: bool,
                          residual: Optional[Tensor], need_dx: bool):
            """Gradients of conv k from ``g`` (dL/dz behind its batch norm when ``scaled``,
            else dL/dy without the statistics term) and the batch norm's sums; returns
            dL/d(conv k's input) and, for k > 0, the sums of batch norm k - 1."""
            y, mean, invstd, scale, shift, a = per[k]
            stride, padding, dilation, groups, _, _ = configs[k]
            d_w, d_b, st_a, st_b = _bn_grads(d_shift, d_scale, invstd, scale, bn_weights[k], rows(y))
            grads[k][1] = d_w
            grads[k][2] = None if bn_biases[k] is None else d_b.to(bn_biases[k].dtype)
            inner = 0 < k < chain  # its input is the previous conv's output, normalized on the way in
            src = per[k - 1][0] if inner else x
            pro = (per[k - 1][1], per[k - 1][3], per[k - 1][4]) if inner else (None, None, None)
            ahead = a.numel() > 0
            dw, g = torch.ops.aru.conv_weight_grad(
                a if ahead else src, g, weights[k], *((None, None, None) if ahead else pro), stride, padding,
                dilation, groups, inner and not ahead, y, mean, st_a, st_b, scale if scaled else None)
            grads[k][0] = dw.to(weights[k].dtype)
            if not need_dx:
                return None, None
            dx, part_shift, part_scale = torch.ops.aru.conv_input_grad(
                g, weights[k], src, *pro, stride, padding, dilation, groups, inner, None if inner else residual)
            return dx, ((part_shift.sum(0), part_scale.sum(0)) if inner else None)

        g, d_shift, d_scale, scaled = dz, sums[0], sums[1], True
        dx = None
        for k in reversed(range(chain)):
            residual = dz if (k == 0 and not has_ds) else None
            dx_k, nxt = conv_backward(k, g, d_shift, d_scale, scaled, residual, k > 0 or needs_x)
            if k > 0:
                g, (d_shift, d_scale), scaled = dx_k, nxt, False
            else:
                dx = dx_k
        if has_ds:
            dx, _ = conv_backward(chain, dz, sums[0], sums[2], True, dx, needs_x)
        flat = [t for conv in grads for t in conv]
        return (None, None, dx if needs_x else None, *flat)
