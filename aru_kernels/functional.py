"""The public functions: argument handling, autocast, and the operators they call.

* :func:`conv_bn_act`: fused convolution with a batch-norm/bias epilogue,
  residual and ReLU, and an optional batch-norm + ReLU prologue.
* :func:`conv_bn_train`: training-mode convolution + batch norm; the
  normalization is left to the consumer (the next conv's prologue, or
  :func:`bn_add_relu`).
* :func:`bn_add_relu`: the end of a residual block in one pass.
* :func:`residual_block_train`: a whole training-mode residual block, one
  autograd node (:mod:`aru_kernels.block_ops`).
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor

# (imported to register the aru:: operators)
from . import bn_ops, conv_bn_ops, conv_ops, maxpool, pointwise_ops, space_to_depth, tap_ops  # noqa: F401
from .block_ops import ConvBN, ResidualBlocksTrain, recompute_normalized_inputs
from .checks import (check_activation, check_batch_norm, check_conv_inputs, check_no_empty_images, check_pixels,
                     check_prologue, check_runnable, check_untransformed, check_vector, shared_memory, single)
from .plans import out_size
from .stem_ops import StemTrain
from .sync_bn import SyncConvBatchStats, synchronized

__all__ = ["conv_bn_act", "conv_bn_train", "bn_add_relu", "bn_relu_maxpool", "residual_block_train",
           "residual_blocks_train", "recompute_normalized_inputs", "ConvBN"]


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives the operators' activations on ``x``'s device; None where it is off.
    (The only place the operators read autocast's state.)"""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _autocast_on(x: Tensor) -> bool:
    return _autocast_dtype(x) is not None


def _autocast(x: Tensor, *others: Optional[Tensor]):
    """Cast activations to the autocast dtype when autocast is on for their device."""
    dtype = _autocast_dtype(x)
    if dtype is not None:
        return (x.to(dtype), *(o.to(dtype) if o is not None else None for o in others))
    return (x, *others)


def _conv_args(op: str, x, weight, stride, padding, dilation):
    """Autocast, dtype agreement and int geometry, as ``F.conv2d`` takes them."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{op}: x and weight must be tensors")
    geometry = tuple(single(v, n, op) for v, n in ((stride, "stride"), (padding, "padding"),
                                                   (dilation, "dilation")))
    if not _autocast_on(x) and weight.dtype != x.dtype:
        raise TypeError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} differ "
                        f"(outside autocast they must match, as for F.conv2d)")
    return geometry


def _pool_window(op: str, kernel_size, stride, padding) -> tuple[int, int, int]:
    """A max-pool window's ints as ``F.max_pool2d`` takes them (``stride=None``: ``kernel_size``)."""
    stride = kernel_size if stride is None else stride
    return tuple(single(v, name, op) for v, name in ((kernel_size, "kernel_size"), (stride, "stride"),
                                                      (padding, "padding")))


def _strided_few_channels(x: Tensor, weight: Tensor, stride: int) -> bool:
    """A cheap first test for :func:`space_to_depth.applies` (before the inputs are checked)."""
    return stride == 2 and x.dim() == 4 and weight.dim() == 4 and 0 < x.shape[1] <= space_to_depth.CHANNELS // 4


def _space_to_depth(x, weight, stride, padding, dilation, groups, prologue: bool, p: int, q: int):
    """``(x, weight, stride, padding)`` of the convolution to run: rewritten over 2x2
    pixel blocks where :func:`space_to_depth.applies`, else as given."""
    if space_to_depth.applies(x, weight, stride, dilation, groups, prologue):
        x, weight = space_to_depth.rewrite(x, weight, padding, (p, q))
        return x, weight, 1, 0
    return x, weight, stride, padding


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    mean: Optional[Tensor] = None,
    var: Optional[Tensor] = None,
    eps: float = 1e-5,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    in_mean: Optional[Tensor] = None,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
    in_relu: bool = False,
    squeeze: bool = False,
):
    """Fused convolution::

        a = relu?(in_scale * (x - in_mean) + in_shift)                 # prologue, per input channel
        y = relu?(scale * (conv(a, weight) - mean) / sqrt(var + eps) + shift + residual)

    Every term is optional. An eval-mode batch norm is ``mean``/``var`` =
    its running statistics, ``scale``/``shift`` = its weight and bias, read
    as they are at each call (nothing is cached); a bias is ``shift`` alone.

    Args:
        x: input ``[N, C_in, H, W]``, channels_last (NHWC) contiguous,
            float32 / float16 / bfloat16, on a CUDA device (or on the CPU when
            Triton runs in its interpreter).
        weight: ``[C_out, C_in / groups, KH, KW]``, any strides (channels_last
            weights load fastest); read as it is at each call, cast to ``x``'s
            dtype on load.
        stride, padding, dilation: ints (or pairs of equal ints).
        groups: number of channel groups; must divide ``C_in`` and ``C_out``.
        mean, var, scale, shift: optional ``[C_out]`` epilogue vectors, any
            floating dtype (used in fp32).
        eps: added to ``var``.
        residual: optional ``[N, C_out, P, Q]`` tensor added before the ReLU,
            channels_last contiguous, ``x``'s dtype.
        relu: apply ReLU last. ReLUs keep NaN, as ``torch.relu`` does.
        in_mean, in_scale, in_shift, in_relu: optional prologue on the input,
            per input channel (a batch norm + ReLU applied lazily on load; zero
            padding applies after it). ``in_scale`` and ``in_shift`` come
            together; ``in_mean`` only with them.

        squeeze: also return the fp32 ``[N, C_out]`` mean of each image's
            output channel (squeeze-excitation's squeeze), taken in the
            epilogue from the stored values; differentiable.

    Returns:
        ``[N, C_out, P, Q]`` in channels_last memory format and ``x``'s dtype;
        accumulation is fp32. Under autocast, ``x`` and ``residual`` are cast
        to the autocast dtype first, as autocast does for ``F.conv2d``. With
        ``squeeze``, the pair (output, means).

    Non-finite inputs: small groups are computed in block-diagonal packs of
    16 channels, so an inf or NaN input of one group turns the other groups
    of its pack NaN (``0 * inf``) where ``F.conv2d`` confines it to its group;
    a strided conv over few channels (the stem, run as a conv of 2x2 pixel
    blocks with an odd kernel padded by zero taps) turns NaN the outputs
    whose window ends just before such a pixel too. A non-finite input never
    yields a finite output where ``F.conv2d``'s is non-finite.

    Raises:
        ValueError / TypeError / RuntimeError with what was expected and what
        came: wrong rank, channel counts, groups that do not divide, dtypes
        that do not match (outside autocast), tensors on different or
        unsupported devices, non-channels_last input.
    """
    check_untransformed("conv_bn_act", (x, weight, mean, var, scale, shift, residual, in_mean, in_scale, in_shift))
    stride, padding, dilation = _conv_args("conv_bn_act", x, weight, stride, padding, dilation)
    check_prologue("conv_bn_act", in_mean, in_scale, in_shift, in_relu)
    if var is not None and not eps >= 0:
        raise ValueError(f"conv_bn_act: eps must be non-negative, but got {eps}")
    x, residual = _autocast(x, residual)
    if _strided_few_channels(x, weight, stride):  # the stem: rewritten as a stride-1 conv of 2x2 blocks
        p, q = check_conv_inputs(
            x, weight, vectors_out=(("mean", mean), ("var", var), ("scale", scale), ("shift", shift)),
            vectors_in=(("in_mean", in_mean), ("in_scale", in_scale), ("in_shift", in_shift)),
            residual=residual, stride=stride, padding=padding, dilation=dilation, groups=groups)
        check_runnable("conv_bn_act", ("input", x), ("weight", weight))  # before the rewrite's own launch
        x, weight, stride, padding = _space_to_depth(x, weight, stride, padding, dilation, groups,
                                                     in_scale is not None, p, q)
    op = torch.ops.aru.conv_bn_squeeze if squeeze else torch.ops.aru.conv_bn_act
    return op(x, weight, mean, var, scale, shift, residual, in_mean, in_scale, in_shift,
              stride, padding, dilation, groups, float(eps), relu, in_relu)


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
    in_mean: Optional[Tensor] = None,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
    in_relu: bool = False,
    sync_stats: bool = False,
    process_group=None,
    squeeze: bool = False,
) -> tuple[Tensor, ...]:
    """Training-mode convolution + batch norm, the normalization left to the consumer.

    Runs ``y = conv(relu?(in_scale*(x - in_mean) + in_shift), weight)`` with
    the batch statistics of ``y`` computed in the conv's epilogue, then
    updates the running statistics exactly as ``nn.BatchNorm2d`` does
    (momentum, or the cumulative average for ``momentum=None``; unbiased
    running variance; ``num_batches_tracked``; nothing when ``running_mean``
    is None; an empty batch leaves them as they are).

    Returns ``(y, mean, scale, shift)``: the raw conv output (channels_last)
    and fp32 per-channel vectors with ``bn(y) == scale*(y - mean) + shift``
    (``scale`` = weight / std, ``shift`` = bias, zeros without one; an fp32
    ``bn_bias`` is returned itself, not a copy, so modify neither in place). Pass
    them as the next conv's ``in_mean``/``in_scale``/``in_shift`` (with
    ``in_relu``) or to :func:`bn_add_relu`; the normalized activation is never
    written (except for kernels of 3x3 and up with a prologue, which
    normalize their input in a pass of their own, once per element rather
    than once per tap, and keep it for the weight gradient). All of it is
    differentiable; backward recomputes what else it needs from ``x`` and
    ``y``. With ``sync_stats`` (and a ``torch.distributed``
    group of more than one process) the statistics are those of all
    processes' images, as ``nn.SyncBatchNorm`` computes them: 2*C numbers per
    process travel forward, 2*C back. With ``squeeze``, a fifth result: the
    fp32 ``[N, C]`` mean of each image's channel of ``y`` (squeeze-excitation's
    squeeze), taken in the same epilogue; differentiable (not with
    synchronized statistics). Inputs and errors as :func:`conv_bn_act`;
    besides, like ``nn.BatchNorm2d``, a batch of one value per channel raises
    ``ValueError``, and so do ``momentum=None`` with running statistics but
    no ``num_batches_tracked`` (the cumulative average needs the count), an
    ``eps`` that is not positive, and affine parameters or running statistics
    that are not 1-D floating-point tensors of ``C_out`` on the input's device.
    """
    check_untransformed("conv_bn_train", (x, weight, bn_weight, bn_bias, in_mean, in_scale, in_shift))
    stride, padding, dilation = _conv_args("conv_bn_train", x, weight, stride, padding, dilation)
    (x,) = _autocast(x)
    sync = sync_stats and synchronized(process_group)
    n, c_out = x.shape[0], weight.shape[0]
    p, q = check_conv_inputs(x, weight, vectors_in=(("in_mean", in_mean), ("in_scale", in_scale),
                                                     ("in_shift", in_shift)),
                             stride=stride, padding=padding, dilation=dilation, groups=groups,
                             op="conv_bn_train")
    check_prologue("conv_bn_train", in_mean, in_scale, in_shift, in_relu)
    check_batch_norm("conv_bn_train", c_out, x.device, bn_weight=bn_weight, bn_bias=bn_bias,
                     running_mean=running_mean, running_var=running_var, num_batches_tracked=num_batches_tracked,
                     momentum=momentum, eps=eps)
    if n * p * q == 1 and not sync:
        _one_value_per_channel((n, c_out, p, q))
    if sync and squeeze:
        raise NotImplementedError("conv_bn_train: squeeze with statistics synchronized across processes")
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    sq = None
    if sync:
        y, mean, invstd, unbiased, count = SyncConvBatchStats.apply(
            x, weight, in_mean, in_scale, in_shift, stride, padding, dilation, groups, in_relu, float(eps),
            process_group)
        if running_mean is not None:
            with torch.no_grad():
                factor = (1.0 / float(num_batches_tracked)) if momentum is None else momentum
                weight_ = (count > 0).to(torch.float32) * factor  # an empty global batch changes nothing
                running_mean.lerp_(mean.to(running_mean.dtype), weight_.to(running_mean.dtype))
                running_var.lerp_(unbiased.to(running_var.dtype), weight_.to(running_var.dtype))
    else:
        y, mean, invstd, new_running_mean, new_running_var, _, sq = torch.ops.aru.conv_bn_stats(
            x, weight, in_mean, in_scale, in_shift, running_mean, running_var, num_batches_tracked, stride,
            padding, dilation, groups, in_relu, None if momentum is None else float(momentum), float(eps), squeeze)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(new_running_mean)
                running_var.copy_(new_running_var)
    scale = invstd if bn_weight is None else bn_weight.float() * invstd
    shift = torch.zeros_like(mean) if bn_bias is None else bn_bias.float()
    return (y, mean, scale, shift, sq) if squeeze else (y, mean, scale, shift)


def _check_conv_bn(op: str, c: ConvBN, device: torch.device) -> None:
    """A :class:`ConvBN`'s batch norm against its conv's output channels (:func:`check_batch_norm`)."""
    check_batch_norm(op, c.weight.shape[0], device, bn_weight=c.bn_weight, bn_bias=c.bn_bias,
                     running_mean=c.running_mean, running_var=c.running_var,
                     num_batches_tracked=c.num_batches_tracked, momentum=c.momentum, eps=c.eps)


def _one_value_per_channel(size) -> None:
    raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(size)}")


def residual_block_train(x: Tensor, chain, downsample: Optional[ConvBN] = None) -> Tensor:
    """A training-mode residual block as one autograd node::

        h = x;  h = relu(bn_k(conv_k(h))) for each ConvBN k of ``chain`` but the last
        out = relu(bn_n(conv_n(h)) + identity),  identity = x, or bn_d(conv_d(x)) with ``downsample``

    each batch norm with the statistics of the batch, updating its running
    statistics as ``nn.BatchNorm2d`` does (as :func:`conv_bn_train`).
    ``chain`` and ``downsample`` are :class:`ConvBN` tuples. The result and
    its gradients are those of :func:`conv_bn_train` x n + :func:`bn_add_relu`;
    backward writes fewer activation-sized tensors (no separate addition of
    the residual gradient; see :mod:`aru_kernels.block_ops`). Inputs and
    errors as :func:`conv_bn_train`; besides, each conv must take the channels
    the one before it gives, the identity must have the chain output's
    shape, and no two batch norms may share running statistics (one module
    applied twice: ``ValueError`` otherwise). Returns a channels_last tensor.
    """
    return residual_blocks_train(x, [(chain, downsample)], op="residual_block_train")


def residual_blocks_train(x: Tensor, blocks, *, pool: bool = False, op: str = "residual_blocks_train") -> Tensor:
    """Training-mode residual blocks applied one after the other, as one autograd node:
    ``blocks`` is a sequence of ``(chain, downsample)`` pairs, each as
    :func:`residual_block_train` takes them. Same result, gradients and running
    statistics as those blocks one by one; between two blocks the backward
    writes no gradient of the block output (the next block's input-gradient
    kernel applies the block end's ReLU and takes its sums:
    :mod:`aru_kernels.block_ops`). Returns a channels_last tensor; with ``pool``,
    its mean over each image's pixels, ``[N, C, 1, 1]`` (``adaptive_avg_pool2d(out, 1)``),
    and the blocks' output itself is never written."""
    blocks = [([ConvBN(*c) for c in chain], None if ds is None else ConvBN(*ds)) for chain, ds in blocks]
    if not blocks:
        raise ValueError(f"{op}: needs at least one block")
    check_untransformed(op, itertools.chain((x,), (t for chain, ds in blocks for c in (*chain, ds) if c is not None
                                                  for t in c.tensors())))
    (x,) = _autocast(x)
    check_activation(x, "x", op)
    check_no_empty_images(op, x)
    n, c_in, h, w = x.shape
    layout, everything = [], []
    for b, (chain, downsample) in enumerate(blocks):
        if not chain:
            raise ValueError(f"{op}: chain needs at least one ConvBN")
        where = f"{op}: block {b}" if len(blocks) > 1 else op
        convs = chain + ([downsample] if downsample is not None else [])
        for i, c in enumerate(convs):  # each conv takes its input's channels: the block's or the last conv's
            if not isinstance(c.weight, Tensor) or c.weight.dim() != 4:
                shape = tuple(c.weight.shape) if isinstance(c.weight, Tensor) else type(c.weight).__name__
                raise ValueError(f"{where}: a conv weight must be 4-D [C_out, C_in/groups, KH, KW]; got {shape}")
            takes = c.weight.shape[1] * c.groups
            given = c_in if i in (0, len(chain)) else chain[i - 1].weight.shape[0]
            name = "its downsample" if i == len(chain) else f"its conv {i}"
            if c.groups < 1 or given % c.groups or c.weight.shape[0] % c.groups:
                raise ValueError(f"{where}: {name}'s groups={c.groups!r} must divide its in_channels={given} "
                                 f"and out_channels={c.weight.shape[0]}")
            if takes != given:
                source = "the block input has" if i in (0, len(chain)) else f"conv {i - 1} gives"
                raise ValueError(f"{where}: {name} takes {takes} input channels (weight of shape "
                                 f"{tuple(c.weight.shape)}, groups={c.groups}); {source} {given}")
        configs = []
        for c in convs:
            geometry = _conv_args(op, x, c.weight, c.stride, c.padding, c.dilation)
            _check_conv_bn(where, c, x.device)
            configs.append((*geometry, int(c.groups), None if c.momentum is None else float(c.momentum),
                            float(c.eps)))
        h_in, w_in = h, w
        for i, (c, cfg) in enumerate(zip(convs, configs)):
            if i == len(chain):
                h, w = h_in, w_in
            kh, kw = c.weight.shape[2:]
            h, w = out_size(h, kh, *cfg[:3]), out_size(w, kw, *cfg[:3])
            if h < 1 or w < 1:
                raise ValueError(f"{where}: conv {i} makes an empty output of {h}x{w} pixels")
            check_pixels(where, f"conv {i}'s output", n, h, w)
            if n * h * w == 1:
                _one_value_per_channel((n, c.weight.shape[0], h, w))
            if i == len(chain) - 1:
                h_out, w_out = h, w
        out_shape = (chain[-1].weight.shape[0], h_out, w_out)
        identity = (c_in, h_in, w_in) if downsample is None else (downsample.weight.shape[0], h, w)
        if identity != out_shape:  # relu(h + identity) adds the two as they are
            raise ValueError(f"{where}: the chain gives [C, H, W] = {list(out_shape)} but the identity "
                             f"({'the block input' if downsample is None else 'its downsample'}) is "
                             f"{list(identity)}; they are added")
        h, w, c_in = h_out, w_out, chain[-1].weight.shape[0]
        layout.append((tuple(configs), downsample is not None))
        everything += convs
    _check_running_unshared(op, everything)
    _count_batch(everything)
    out, *running = ResidualBlocksTrain.apply(tuple(layout), bool(pool), x,
                                              *(t for c in everything for t in c.tensors()))
    _update_running(everything, running)
    return out


def _check_running_unshared(op: str, convs) -> None:
    """``ValueError`` where two batch norms of one node keep their running statistics in
    the same memory (one ``nn.BatchNorm2d`` used twice): the node updates each from the
    values before the call, where PyTorch updates them once a use, in order. Not under
    ``torch.compile``, which cannot trace storage addresses (the models' forwards never
    give one node a batch norm twice: ``aru_models.fused``)."""
    if torch.compiler.is_compiling() or not convs or convs[0].weight.is_meta:  # (meta: no memory to share)
        return
    shared = shared_memory((i, t) for i, c in enumerate(convs) for t in (c.running_mean, c.running_var)
                           if t is not None)
    if shared is not None:
        i, j = sorted(shared)
        raise ValueError(f"{op}: the batch norms of convs {i} and {j} (counted over the blocks' "
                         "chains and downsamples) share running statistics; a node updates each "
                         "once from the values before it, so use one per call (conv_bn_train) "
                         "for a batch norm applied twice")


def _count_batch(convs) -> None:
    """``num_batches_tracked += 1`` for each batch norm that keeps running statistics."""
    for c in convs:
        if c.running_mean is not None and c.num_batches_tracked is not None:
            c.num_batches_tracked.add_(1)


def _update_running(convs, running) -> None:
    """Copy a node's new running means and variances (``running``: mean, var per conv) in place."""
    with torch.no_grad():
        for c, new_mean, new_var in zip(convs, running[0::2], running[1::2]):
            if c.running_mean is not None:
                c.running_mean.copy_(new_mean)
                c.running_var.copy_(new_var)


def stem_train(x: Tensor, conv: ConvBN, *, kernel_size=3, stride=2, padding=1,
               op: str = "stem_train") -> Tensor:
    """A ResNet stem in training, ``max_pool2d(relu(bn(conv(x))), kernel_size, stride,
    padding)`` (``conv`` a :class:`ConvBN`, its batch norm with batch statistics), as one
    autograd node whose backward never writes the full-resolution dL/dy: the conv's
    weight gradient gathers it from the pooled gradient (:mod:`aru_kernels.stem_ops`).
    Same result, gradients and running statistics as :func:`conv_bn_train` followed by
    :func:`bn_relu_maxpool`; ``x`` (the images) takes no gradient and must not need one.
    Returns a channels_last tensor."""
    conv = ConvBN(*conv)
    check_untransformed(op, (x, *conv.tensors()))
    (x,) = _autocast(x)
    check_activation(x, "x", op)
    if x.requires_grad:
        raise ValueError(f"{op}: x takes no gradient here (the images); it requires one")
    geometry = _conv_args(op, x, conv.weight, conv.stride, conv.padding, conv.dilation)
    check_conv_inputs(x, conv.weight, stride=geometry[0], padding=geometry[1], dilation=geometry[2],
                      groups=int(conv.groups), op=op)
    _check_conv_bn(op, conv, x.device)
    check_runnable(op, ("x", x), ("weight", conv.weight))
    window = _pool_window(op, kernel_size, stride, padding)
    n, _, h, w = x.shape
    kh, kw = conv.weight.shape[2:]
    if n * out_size(h, kh, *geometry) * out_size(w, kw, *geometry) == 1:
        _one_value_per_channel((n, conv.weight.shape[0], 1, 1))
    _count_batch([conv])
    config = (*geometry, int(conv.groups), None if conv.momentum is None else float(conv.momentum), float(conv.eps),
              window)
    out, *running = StemTrain.apply(config, x, *conv.tensors())
    _update_running([conv], running)
    return out


def bn_add_relu(
    y: Tensor,
    scale: Tensor,
    shift: Tensor,
    identity: Optional[Tensor] = None,
    id_scale: Optional[Tensor] = None,
    id_shift: Optional[Tensor] = None,
    *,
    mean: Optional[Tensor] = None,
    id_mean: Optional[Tensor] = None,
    branch_scale: Optional[Tensor] = None,
) -> Tensor:
    """``relu(e*(scale*(y - mean) + shift) + identity')`` in one pass, the end of a residual block.

    ``e`` = ``branch_scale``, an optional ``[N, C]`` scale per image and channel
    (squeeze-excitation's excitation), 1 when absent.

    ``identity' = id_scale*(identity - id_mean) + id_shift`` when the
    downsample branch's batch norm is applied here too, ``identity`` itself
    otherwise, nothing when None; absent means count as zeros. ``y`` and
    ``identity`` are ``[N, C, H, W]`` channels_last tensors of one dtype; the
    vectors are ``[C]``, used in fp32. The ReLU keeps NaN, as ``torch.relu``
    does. Differentiable in every tensor.
    """
    check_untransformed("bn_add_relu", (y, scale, shift, identity, id_scale, id_shift, mean, id_mean, branch_scale))
    y, identity = _autocast(y, identity)
    check_activation(y, "y", "bn_add_relu")
    c = y.shape[1]
    for name, v in (("mean", mean), ("scale", scale), ("shift", shift), ("id_mean", id_mean),
                    ("id_scale", id_scale), ("id_shift", id_shift)):
        check_vector(v, name, c, "one per channel", op="bn_add_relu")
    if scale is None or shift is None:
        raise ValueError("bn_add_relu: scale and shift are required")
    if (id_scale is None) != (id_shift is None) or (id_scale is not None and identity is None) or (
            id_mean is not None and id_scale is None):
        raise ValueError("bn_add_relu: id_scale and id_shift come together, with an identity; id_mean only "
                         "with them")
    if identity is not None:
        if identity.shape != y.shape or identity.dtype != y.dtype:
            raise ValueError(f"bn_add_relu: identity must match y ({tuple(y.shape)}, {y.dtype}); "
                             f"got {tuple(identity.shape)}, {identity.dtype}")
        check_activation(identity, "identity", "bn_add_relu")
    for name, v in (("mean", mean), ("scale", scale), ("shift", shift), ("identity", identity)):
        if v is not None and v.device != y.device:
            raise ValueError(f"bn_add_relu: {name} is on {v.device} but y is on {y.device}")
    if branch_scale is not None:
        if tuple(branch_scale.shape) != (y.shape[0], c) or not branch_scale.is_floating_point():
            raise ValueError(f"bn_add_relu: branch_scale must be a floating [N, C] = {(y.shape[0], c)} tensor; "
                             f"got {tuple(branch_scale.shape)}, {branch_scale.dtype}")
        if branch_scale.device != y.device:
            raise ValueError(f"bn_add_relu: branch_scale is on {branch_scale.device} but y is on {y.device}")
    check_runnable("bn_add_relu", ("y", y))

    def f32(v: Optional[Tensor]) -> Optional[Tensor]:
        return None if v is None else v.float().contiguous()  # the kernels read unit strides

    zeros = None
    if mean is None or (id_scale is not None and id_mean is None):
        zeros = torch.zeros(c, dtype=torch.float32, device=y.device)
    return torch.ops.aru.bn_add_relu(
        y, zeros if mean is None else f32(mean), f32(scale), f32(shift), identity,
        None if id_scale is None else (zeros if id_mean is None else f32(id_mean)), f32(id_scale), f32(id_shift),
        None if branch_scale is None else branch_scale.float().contiguous())


def bn_relu_maxpool(y: Tensor, scale: Tensor, shift: Tensor, *, mean: Optional[Tensor] = None,
                    kernel_size=3, stride=2, padding=1) -> Tensor:
    """``max_pool2d(relu(scale*(y - mean) + shift), kernel_size, stride, padding)`` in one
    pass, the end of a ResNet stem in training: the normalized activation is never
    written, and the backward keeps one int8 per pooled element (where its maximum
    lies) instead of max-pool's int64 indices.

    ``y`` is an ``[N, C, H, W]`` channels_last activation; the vectors are ``[C]``,
    used in fp32 (``mean`` absent: zeros). Square windows, no dilation, floor mode
    (``nn.MaxPool2d(kernel_size, stride, padding)``, ``stride=None`` its
    ``kernel_size``); the window's first maximum takes
    the gradient, as in PyTorch, and NaN propagates. Differentiable in ``y`` and
    the vectors.
    """
    op = "bn_relu_maxpool"
    check_untransformed(op, (y, scale, shift, mean))
    (y,) = _autocast(y)
    check_activation(y, "y", op)
    c = y.shape[1]
    for name, v in (("mean", mean), ("scale", scale), ("shift", shift)):
        check_vector(v, name, c, "one per channel", op=op)
        if v is not None and v.device != y.device:
            raise ValueError(f"{op}: {name} is on {v.device} but y is on {y.device}")
    if scale is None or shift is None:
        raise ValueError(f"{op}: scale and shift are required")
    check_runnable(op, ("y", y))
    k, s, p = _pool_window(op, kernel_size, stride, padding)
    mean = torch.zeros(c, dtype=torch.float32, device=y.device) if mean is None else mean
    mean, scale, shift = (v.float().contiguous() for v in (mean, scale, shift))  # the kernels read unit strides
    out, _ = torch.ops.aru.bn_relu_maxpool(y, mean, scale, shift, k, s, p)
    return out
