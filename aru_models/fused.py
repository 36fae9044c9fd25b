"""Forward passes of the ResNet models through the fused Triton kernels.

:class:`aru_models.resnet.ResNet` and its blocks call into this module when
their ``impl`` is ``"fused"``; the eager path never imports it.

Eval mode: every convolution runs as one :func:`aru_kernels.conv_bn_act`
launch with its batch norm applied in the epilogue from the module's own
running statistics, weight and bias (read at each call: nothing is cached),
the ReLU fused, and in the last convolution of each block the residual add
fused too.

Training mode (batch norms in training mode): each residual block is one
autograd node (:func:`aru_kernels.residual_block_train`; with
``nn.SyncBatchNorm`` across processes, one conv at a time through
:func:`aru_kernels.conv_bn_train`); each convolution computes the batch statistics in the
conv's epilogue and updates the running statistics; the normalization and
ReLU of conv k are applied in the prologue of conv k+1 (for a 1x1 conv on
load, so that normalized activation is never written; for the grouped 3x3 in
a pass of its own, once per element instead of once per tap), and each block
ends in one
:func:`aru_kernels.bn_add_relu` pass (the downsample branch's batch norm
included). Backward runs through the kernels' autograd formulas; the
block's adds the residual gradient in its first conv's input-gradient kernel.

Activations stay channels_last (NHWC) between kernels. The stem max-pool,
the global average pool and the classifier stay PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aru_kernels import ConvBN, bn_add_relu, conv_bn_act, conv_bn_train, residual_block_train
from aru_kernels.sync_bn import synchronized

__all__ = ["resnet_forward", "block_forward", "conv_bn", "conv_bn_batch_stats"]


def _uses_batch_stats(bn: nn.Module) -> bool:
    return bn.training or bn.running_mean is None


def _check_bn(bn: nn.Module) -> None:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise NotImplementedError(f"impl='fused' fuses BatchNorm2d norm layers; got {type(bn).__name__}")


def _check_conv(conv: nn.Conv2d) -> None:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotImplementedError(f"impl='fused' supports numeric zero padding; got {conv.padding!r}, "
                                  f"padding_mode={conv.padding_mode!r}")


def conv_bn_batch_stats(conv: nn.Conv2d, bn: nn.Module, x: Tensor, prologue=None) -> tuple[Tensor, ...]:
    """Training-mode ``bn(conv(prologue(x)))`` left unapplied: ``(y, mean, scale, shift)``
    with ``bn(y) == scale*(y - mean) + shift``.

    ``prologue`` is the ``(mean, scale, shift)`` of the batch norm producing ``x``,
    applied with a ReLU on load. Running statistics update as the module's would;
    a batch norm with a ``process_group`` attribute (``nn.SyncBatchNorm``) takes
    its statistics over all processes of that group.
    """
    _check_bn(bn)
    _check_conv(conv)
    if conv.bias is not None:
        raise NotImplementedError("impl='fused' in training mode takes convolutions without bias")
    track = bn.training and bn.track_running_stats
    in_mean, in_scale, in_shift = prologue if prologue is not None else (None, None, None)
    return conv_bn_train(
        x, conv.weight, bn.weight, bn.bias,
        bn.running_mean if track else None, bn.running_var if track else None,
        bn.num_batches_tracked if track else None,
        momentum=bn.momentum, eps=bn.eps, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, in_mean=in_mean, in_scale=in_scale, in_shift=in_shift,
        in_relu=prologue is not None,
        sync_stats=bn.training and hasattr(bn, "process_group"), process_group=getattr(bn, "process_group", None),
    )


def _conv_bn_tuple(conv: nn.Conv2d, bn: nn.Module) -> ConvBN:
    """The block-level operator's view of a (conv, training-mode batch norm) pair."""
    _check_bn(bn)
    _check_conv(conv)
    if conv.bias is not None:
        raise NotImplementedError("impl='fused' in training mode takes convolutions without bias")
    track = bn.training and bn.track_running_stats
    return ConvBN(conv.weight, bn.weight, bn.bias, bn.running_mean if track else None,
                  bn.running_var if track else None, bn.num_batches_tracked if track else None,
                  conv.stride, conv.padding, conv.dilation, conv.groups, bn.momentum, bn.eps)


def _synced(bn: nn.Module) -> bool:
    """A SyncBatchNorm whose statistics span several processes."""
    return bn.training and hasattr(bn, "process_group") and synchronized(bn.process_group)


def conv_bn(conv: nn.Conv2d, bn: nn.Module, x: Tensor, *, residual: Tensor | None = None,
            relu: bool = False) -> Tensor:
    """``relu?(bn(conv(x)) + residual)`` as one kernel launch, ``bn`` in eval mode
    with running statistics (folded into the epilogue)."""
    _check_bn(bn)
    _check_conv(conv)
    mean = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
    return conv_bn_act(x, conv.weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                       groups=conv.groups, mean=mean, var=bn.running_var, eps=bn.eps, scale=bn.weight,
                       shift=bn.bias, residual=residual, relu=relu)


def _block_eval(block: nn.Module, x: Tensor) -> Tensor:
    identity = x  # under autocast, conv_bn_act casts the residual as it casts its input
    if block.downsample is not None:
        identity = conv_bn(block.downsample[0], block.downsample[1], x)
    out = conv_bn(block.conv1, block.bn1, x, relu=True)
    if hasattr(block, "conv3"):  # Bottleneck: 1x1 -> 3x3 (grouped: the ARU) -> 1x1
        out = conv_bn(block.conv2, block.bn2, out, relu=True)
        return conv_bn(block.conv3, block.bn3, out, residual=identity, relu=True)
    return conv_bn(block.conv2, block.bn2, out, residual=identity, relu=True)


def _block_train(block: nn.Module, x: Tensor) -> Tensor:
    convs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        convs.append((block.conv3, block.bn3))
    if not any(_synced(m) for m in block.modules()):  # the whole block as one autograd node
        ds = block.downsample
        return residual_block_train(x, [_conv_bn_tuple(c, b) for c, b in convs],
                                    None if ds is None else _conv_bn_tuple(ds[0], ds[1]))
    y, prologue = x, None
    for conv, bn in convs:
        y, *prologue = conv_bn_batch_stats(conv, bn, y, prologue)
    mean, scale, shift = prologue
    if block.downsample is None:
        return bn_add_relu(y, scale, shift, x, mean=mean)
    yd, md, sd, bd = conv_bn_batch_stats(block.downsample[0], block.downsample[1], x)
    return bn_add_relu(y, scale, shift, yd, sd, bd, mean=mean, id_mean=md)


def _training(block: nn.Module) -> bool:
    """Whether the block's batch norms normalize with batch statistics (all or none)."""
    bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = {_uses_batch_stats(bn) for bn in bns}
    if len(modes) > 1:
        raise NotImplementedError("impl='fused' needs a block's batch norms all in training or all "
                                  "in eval mode")
    return modes == {True}


def block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """Output of a residual ``block`` (BasicBlock or Bottleneck) for activations ``x``.

    Returns a channels_last tensor whatever the input's memory format.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    return _block_train(block, x) if _training(block) else _block_eval(block, x)


def resnet_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of ``model`` (an :class:`aru_models.resnet.ResNet`, or a network
    with its ``conv1``/``bn1``/[``maxpool``]/``layer*``/``avgpool``/``fc`` layout
    such as :class:`aru_models.cifar.CifarResNeXt`)
    for images ``x``, in any memory format (made channels_last once, here)."""
    x = x.contiguous(memory_format=torch.channels_last)
    if _uses_batch_stats(model.bn1):
        y, mean, scale, shift = conv_bn_batch_stats(model.conv1, model.bn1, x)
        x = bn_add_relu(y, scale, shift, mean=mean)
    else:
        x = conv_bn(model.conv1, model.bn1, x, relu=True)
    if hasattr(model, "maxpool"):  # the CIFAR networks have none
        x = model.maxpool(x)
    for layer in _stages(model):
        for block in layer:
            x = block_forward(block, x)
    x = model.avgpool(x)
    return model.fc(torch.flatten(x, 1))


def _stages(model: nn.Module) -> list[nn.Module]:
    return [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
