"""Pure-PyTorch oracle for every fused operator, in the kernels' vocabulary.

Every function here runs in the dtype it is given, float64 included, on any
device, and is written for clarity, not speed: it is what the parity tests
compare the Triton kernels against.

Vocabulary (NCHW shapes; per-channel vectors have one entry per channel):

* ``conv_bn_act``: optional prologue ``relu?(in_scale * (x - in_mean) +
  in_shift)`` on the input (the previous layer's batch norm applied lazily),
  convolution, then an epilogue
  ``relu?(scale * (y - mean) / sqrt(var + eps) + shift + residual)``.
* ``batch_norm``: ``nn.BatchNorm2d``'s forward, train or eval mode, running
  statistics updated in place exactly as the module does.
* ``bn_add_relu``: the end of a training block,
  ``relu(scale * (y - mean) + shift + (id_scale * (identity - id_mean) + id_shift))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "conv_bn_act",
    "batch_norm",
    "conv_bn",
    "bn_add_relu",
    "update_running_stats",
]


def _channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    in_mean: Tensor | None = None,
    in_scale: Tensor | None = None,
    in_shift: Tensor | None = None,
    in_relu: bool = False,
    mean: Tensor | None = None,
    var: Tensor | None = None,
    eps: float = 1e-5,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Convolution with the fused prologue and epilogue (see module docstring).

    Zero padding applies to the *prologued* input, as it does when a batch
    norm and ReLU precede a padded convolution.
    """
    if in_mean is not None:
        x = x - _channel(in_mean)
    if in_scale is not None:
        x = x * _channel(in_scale)
    if in_shift is not None:
        x = x + _channel(in_shift)
    if in_relu:
        x = torch.relu(x)
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    if mean is not None:
        y = y - _channel(mean)
    if var is not None:
        y = y / torch.sqrt(_channel(var) + eps)
    if scale is not None:
        y = y * _channel(scale)
    if shift is not None:
        y = y + _channel(shift)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    batch_mean: Tensor,
    batch_var: Tensor,
    count: int,
    momentum: float | None,
) -> None:
    """``nn.BatchNorm2d``'s running-statistics update, in place.

    ``batch_var`` is the biased variance of ``count`` values per channel; the
    running estimate takes the unbiased one. ``momentum=None`` is the
    cumulative moving average.
    """
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / float(num_batches_tracked)
    else:
        factor = momentum
    unbiased = batch_var * (count / max(count - 1, 1))
    running_mean.mul_(1 - factor).add_(batch_mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


def batch_norm(
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``nn.BatchNorm2d.forward`` as a function (running statistics updated in place).

    ``training=True`` normalizes with batch statistics (and updates the running
    ones when given); ``training=False`` uses the running statistics.
    """
    if training or running_mean is None:
        dims = (0, 2, 3)
        mean = y.mean(dims)
        var = y.var(dims, unbiased=False)
        if training and running_mean is not None:
            update_running_stats(
                running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(),
                y.numel() // y.shape[1], momentum,
            )
    else:
        mean, var = running_mean, running_var
    y = (y - _channel(mean)) / torch.sqrt(_channel(var) + eps)
    if weight is not None:
        y = y * _channel(weight)
    return y if bias is None else y + _channel(bias)


def conv_bn(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None = None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """Convolution, batch norm (train or eval mode), optional residual add, optional ReLU."""
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    y = batch_norm(
        y, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
        training=training, momentum=momentum, eps=eps,
    )
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def bn_add_relu(
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    identity: Tensor | None = None,
    id_scale: Tensor | None = None,
    id_shift: Tensor | None = None,
    *,
    mean: Tensor | None = None,
    id_mean: Tensor | None = None,
    branch_scale: Tensor | None = None,
) -> Tensor:
    """``relu(e*(scale*(y - mean) + shift) + identity')`` with ``identity' =
    id_scale*(identity - id_mean) + id_shift`` when the downsample branch's
    batch norm is applied in the same pass; ``e`` = ``branch_scale`` [N, C] or 1."""
    if mean is not None:
        y = y - _channel(mean)
    z = y * _channel(scale) + _channel(shift)
    if branch_scale is not None:
        z = z * branch_scale[:, :, None, None]
    if identity is None:
        return torch.relu(z)
    if id_mean is not None:
        identity = identity - _channel(id_mean)
    if id_scale is not None:
        identity = identity * _channel(id_scale)
    if id_shift is not None:
        identity = identity + _channel(id_shift)
    return torch.relu(z + identity)
