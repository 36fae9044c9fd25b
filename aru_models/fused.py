"""Forward passes of the ResNet models through the fused Triton kernels.

:class:`aru_models.resnet.ResNet` and its blocks call into this module when
their ``impl`` is ``"fused"``, and so do the torchvision and timm modules that
:func:`aru_models.fuse` switched (:mod:`aru_models.external` reads their
parts: :class:`BlockParts`); the eager path never imports it.

Eval mode: every convolution runs as one :func:`aru_kernels.conv_bn_act`
launch with its batch norm applied in the epilogue from the module's own
running statistics, weight and bias (read at each call: nothing is cached),
the ReLU fused, and in the last convolution of each block the residual add
fused too.

Training mode (batch norms in training mode): consecutive blocks are one
autograd node (:func:`aru_kernels.residual_blocks_train`, by
:func:`layers_forward`: a whole network's stages, or one stage where its
output is taken, as a detection backbone's are; with ``nn.SyncBatchNorm`` across processes, one conv
at a time through :func:`aru_kernels.conv_bn_train`); each convolution
computes the batch statistics in the conv's epilogue and updates the running
statistics; the normalization and ReLU of conv k are applied in the prologue
of conv k+1 (for a 1x1 conv on load, so that normalized activation is never
written; for the grouped 3x3 in a pass of its own, once per element instead
of once per tap), and each block ends in one ``bn_add_relu`` pass (the
downsample branch's batch norm included) that also keeps its ReLU's mask as
bits. Backward: the residual gradient is added in the block's last
input-gradient kernel, and between two blocks of a node that kernel applies
the previous block's final ReLU too, so the gradient of a block output is
never written.

Squeeze-excitation (timm's ``SEModule``): the squeeze comes from the last
conv's epilogue, its two small layers run as the module's own, and the
excitation scales the block's final pass, in both modes. Other modules
between the last batch norm and the residual add (other attention modules,
stochastic depth, in training DropBlock) run as they are on a materialized
normalized branch. ``FrozenBatchNorm2d`` is applied like an eval-mode batch norm.

Where the kernels cannot compute a block or stem as it is at a call (hooks on
its submodules, which they would skip; batch norms in both modes; a conv
bias in training; a batch norm used twice in training; float64 parameters; a layer
replaced by one they do not compute), that call
runs the module's own forward, with an :class:`UnfusedWarning` saying why.

Activations stay channels_last (NHWC) between kernels. In training the stem's
last batch norm, ReLU and max-pool are one pass; in inference the max-pool,
and in both modes the global average pool and the classifier, stay PyTorch.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from aru_kernels import (ConvBN, bn_add_relu, bn_relu_maxpool, conv_bn_act, conv_bn_train, residual_blocks_train,
                         stem_train)
from aru_kernels.checks import SUPPORTED_DTYPES
from aru_kernels.maxpool import window_fits
from aru_kernels.sync_bn import synchronized

__all__ = ["resnet_forward", "block_forward", "layers_forward", "layer_forward", "parts_forward", "stem_forward",
           "stem", "stem_pairs", "warn_unfused", "block_parts", "BlockParts", "conv_bn", "conv_bn_batch_stats",
           "is_frozen_bn", "UnfusedWarning"]


class UnfusedWarning(UserWarning):
    """Modules of a model left on PyTorch's path: reported by :func:`aru_models.fuse`,
    or by a forward that cannot run the kernels at that call (hooks on a block's
    submodules, batch norms of a block in training and eval mode at once, a
    convolution with a bias in training, a batch norm used by two of a block's
    convolutions in training, float64 parameters, a layer replaced by one the
    kernels do not compute), which then calls the modules as they are."""


def is_frozen_bn(bn: nn.Module) -> bool:
    """torchvision's (or timm's) ``FrozenBatchNorm2d``: fixed statistics and affine, as buffers."""
    return type(bn).__name__ == "FrozenBatchNorm2d" and all(
        hasattr(bn, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))


def _nhwc(x: Tensor) -> Tensor:
    """``x`` in channels_last memory format; ``ValueError`` for what is not a 4-D batch
    (``nn.BatchNorm2d``'s message: ``F.conv2d`` alone takes one 3-D image)."""
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    return x.contiguous(memory_format=torch.channels_last)


def _uses_batch_stats(bn: nn.Module) -> bool:
    if is_frozen_bn(bn):
        return False
    return bn.training or getattr(bn, "running_mean", None) is None


_BN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _check_bn(bn: nn.Module) -> None:
    # a subclass with a forward of its own (timm's BatchNormAct2d: its activation inside) computes something
    # else, unless it is a batch norm synchronized across processes (a process_group attribute, as
    # nn.SyncBatchNorm's; the training CLI's for CPUs), whose statistics the kernels gather themselves
    own_forward = type(bn).forward not in _BN_FORWARDS and not hasattr(bn, "process_group")
    if not (isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not own_forward or is_frozen_bn(bn)):
        raise NotImplementedError(f"impl='fused' fuses BatchNorm2d (or FrozenBatchNorm2d) norm layers; "
                                  f"got {type(bn).__name__}")


def _check_conv(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise NotImplementedError(f"impl='fused' fuses nn.Conv2d convolutions; got {type(conv).__name__}")
    if type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        # weight standardization, "same" padding computed per input, ...
        raise NotImplementedError(f"impl='fused' fuses nn.Conv2d convolutions; {type(conv).__name__} has a "
                                  "forward of its own")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotImplementedError(f"impl='fused' supports numeric zero padding; got {conv.padding!r}, "
                                  f"padding_mode={conv.padding_mode!r}")


@dataclass(frozen=True)
class BlockParts:
    """What a residual block computes, as the fused forward reads it::

        h = relu(bn_k(conv_k(h))) for the chain's (conv, bn) pairs but the last
            (relu(drop_block(bn(conv(h)))) for the one before the last)
        out = relu(drop_path(se(bn_n(conv_n(h)))) + identity)
        identity = x, or bn_d(conv_d(pool(x))) for ``downsample`` = (pool or None, conv_d, bn_d)

    ``se``, ``drop_path`` and ``drop_block`` are modules applied as they are (None: absent).
    """

    chain: tuple
    downsample: tuple | None = None
    se: nn.Module | None = None
    drop_path: nn.Module | None = None
    drop_block: nn.Module | None = None

    def check(self) -> "BlockParts":
        for conv, bn in self.pairs():
            _check_conv(conv)
            _check_bn(bn)
        return self

    def norms(self) -> list[nn.Module]:
        return [bn for _, bn in self.pairs()]

    def pairs(self) -> tuple:
        """Every (conv, bn) of the block, the downsample's last."""
        return self.chain + ((self.downsample[1:],) if self.downsample else ())


def block_parts(block: nn.Module) -> BlockParts:
    """The parts of a ``BasicBlock`` or ``Bottleneck`` of this package or torchvision
    (``conv1``/``bn1``/.../``downsample`` = Sequential(conv, bn))."""
    if not isinstance(block.relu, nn.ReLU):
        raise NotImplementedError(f"relu is {type(block.relu).__name__}, not ReLU")
    chain = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):  # Bottleneck: 1x1 -> 3x3 (grouped: the ARU) -> 1x1
        chain.append((block.conv3, block.bn3))
    ds = block.downsample
    return BlockParts(tuple(chain), None if ds is None else (None, ds[0], ds[1])).check()


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


def conv_bn_batch_stats(conv: nn.Conv2d, bn: nn.Module, x: Tensor, prologue=None,
                        squeeze: bool = False) -> tuple[Tensor, ...]:
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
        squeeze=squeeze,
    )


def conv_bn(conv: nn.Conv2d, bn: nn.Module, x: Tensor, *, residual: Tensor | None = None,
            relu: bool = False, squeeze: bool = False):
    """``relu?(bn(conv(x)) + residual)`` as one kernel launch, ``bn`` in eval mode
    (or frozen) with running statistics (folded into the epilogue); with ``squeeze``
    also the per-(image, channel) means of the output."""
    _check_bn(bn)
    _check_conv(conv)
    mean = bn.running_mean if conv.bias is None else bn.running_mean - conv.bias
    return conv_bn_act(x, conv.weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                       groups=conv.groups, mean=mean, var=bn.running_var, eps=bn.eps, scale=bn.weight,
                       shift=bn.bias, residual=residual, relu=relu, squeeze=squeeze)


def _active(module: nn.Module | None) -> bool:
    """A stochastic-depth or DropBlock module that changes its input now (training, p > 0)."""
    return module is not None and module.training and (getattr(module, "drop_prob", 1.0) or 0) > 0


def _drop_path_active(parts: BlockParts) -> bool:
    return _active(parts.drop_path)


def _tail_active(parts: BlockParts) -> bool:
    """Whether anything runs between the last batch norm and the residual add."""
    return parts.se is not None or _drop_path_active(parts)


def _excitation(se: nn.Module | None):
    """timm's ``SEModule`` as a function of the squeeze ([N, C] means) to the
    excitation ([N, C], fp32): its own layers on the [N, C, 1, 1] means; None for
    anything else (then the module runs as it is)."""
    if (type(se).__name__ != "SEModule" or not type(se).__module__.startswith("timm.")
            or not all(hasattr(se, a) for a in ("fc1", "bn", "act", "fc2", "gate"))
            or getattr(se, "add_maxpool", False)):  # a max over the pixels beside the mean: not the squeeze we take
        return None

    def excite(means: Tensor) -> Tensor:
        n, c = means.shape
        return se.gate(se.fc2(se.act(se.bn(se.fc1(means.view(n, c, 1, 1)))))).float().view(n, c)
    return excite


def _tail(parts: BlockParts, z: Tensor) -> Tensor:
    if parts.se is not None:
        z = parts.se(z)
    if parts.drop_path is not None:
        z = parts.drop_path(z)
    return z.contiguous(memory_format=torch.channels_last)


def _ds_input(parts: BlockParts, x: Tensor) -> Tensor:
    pool = parts.downsample[0]
    return x if pool is None else pool(x).contiguous(memory_format=torch.channels_last)


def _add_relu(z: Tensor, identity: Tensor, id_affine=None, branch_scale: Tensor | None = None) -> Tensor:
    """``relu(e*z + identity')`` in one pass (identity' and ``e`` = ``branch_scale`` as in
    :func:`aru_kernels.bn_add_relu`)."""
    ones = torch.ones(z.shape[1], dtype=torch.float32, device=z.device)
    if id_affine is None:
        return bn_add_relu(z, ones, torch.zeros_like(ones), identity, branch_scale=branch_scale)
    mean, scale, shift = id_affine
    return bn_add_relu(z, ones, torch.zeros_like(ones), identity, scale, shift, id_mean=mean,
                       branch_scale=branch_scale)


def _block_eval(parts: BlockParts, x: Tensor) -> Tensor:
    identity = x  # under autocast, conv_bn_act casts the residual as it casts its input
    if parts.downsample is not None:
        identity = conv_bn(parts.downsample[1], parts.downsample[2], _ds_input(parts, x))
    out = x
    for i, (conv, bn) in enumerate(parts.chain[:-1]):
        if i == len(parts.chain) - 2 and _active(parts.drop_block):  # frozen statistics, trained: DropBlock
            out = torch.relu(parts.drop_block(conv_bn(conv, bn, out))).contiguous(memory_format=torch.channels_last)
        else:
            out = conv_bn(conv, bn, out, relu=True)
    conv, bn = parts.chain[-1]
    if not _tail_active(parts):
        return conv_bn(conv, bn, out, residual=identity, relu=True)
    excite = _excitation(parts.se)
    if excite is not None and not _drop_path_active(parts):
        # squeeze from the last conv's epilogue, excitation applied in the block's final pass
        z, means = conv_bn(conv, bn, out, squeeze=True)
        del out  # not held through the block's last pass
        return _add_relu(z, identity, branch_scale=excite(means.to(z.dtype)))
    z = conv_bn(conv, bn, out)
    del out
    return _add_relu(_tail(parts, z), identity)


def _one_node(parts: BlockParts) -> bool:
    """Whether a training-mode block runs as (part of) one autograd node of
    :func:`aru_kernels.residual_blocks_train`: nothing between its last batch norm
    and the add, no pooled downsample, no DropBlock, no statistics across processes."""
    pooled = parts.downsample is not None and parts.downsample[0] is not None
    return not (_tail_active(parts) or pooled or _active(parts.drop_block)
                or any(_synced(bn) for bn in parts.norms()))


def _node_block(parts: BlockParts) -> tuple:
    ds = parts.downsample
    return [_conv_bn_tuple(c, b) for c, b in parts.chain], None if ds is None else _conv_bn_tuple(ds[1], ds[2])


def _block_train(parts: BlockParts, x: Tensor) -> Tensor:
    if _one_node(parts):  # the whole block as one autograd node
        return residual_blocks_train(x, [_node_block(parts)])
    tail = _tail_active(parts)
    dropping = _active(parts.drop_block)
    synced = any(_synced(bn) for bn in parts.norms())
    excite = None if _drop_path_active(parts) or synced else _excitation(parts.se)
    y, prologue = x, None
    for i, (conv, bn) in enumerate(parts.chain):
        last = i == len(parts.chain) - 1
        y, *prologue = conv_bn_batch_stats(conv, bn, y, prologue, squeeze=last and excite is not None)
        if i == len(parts.chain) - 2 and dropping:  # DropBlock between this batch norm and its ReLU
            y, prologue = torch.relu(parts.drop_block(_normalized(y, *prologue))), None
    if excite is not None:
        *prologue, means = prologue
    mean, scale, shift = prologue
    identity, id_affine = x, None
    if parts.downsample is not None:
        identity, *id_affine = conv_bn_batch_stats(parts.downsample[1], parts.downsample[2],
                                                   _ds_input(parts, x))
    if not tail or excite is not None:
        # squeeze-excitation fused: the squeeze of bn(y) from the conv's own epilogue
        # (scale*(mean of y - mean) + shift), the excitation applied in the final pass
        e = None if excite is None else excite((scale * (means - mean) + shift).to(y.dtype))
        if id_affine is None:
            return bn_add_relu(y, scale, shift, identity, mean=mean, branch_scale=e)
        md, sd, bd = id_affine
        return bn_add_relu(y, scale, shift, identity, sd, bd, mean=mean, id_mean=md, branch_scale=e)
    # squeeze-excitation / stochastic depth between the batch norm and the add: the
    # normalized branch is materialized for them (PyTorch ops), then added and ReLU'd
    return _add_relu(_tail(parts, _normalized(y, mean, scale, shift)), identity, id_affine)


def _normalized(y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale*(y - mean) + shift`` materialized with PyTorch ops (channels_last, y's dtype),
    for modules that run between a batch norm and what follows it."""
    z = (y - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return z.to(y.dtype).contiguous(memory_format=torch.channels_last)


def parts_forward(parts: BlockParts, x: Tensor) -> Tensor:
    """Output of the residual block ``parts`` for activations ``x`` (channels_last out)."""
    x = _nhwc(x)
    modes = {_uses_batch_stats(bn) for bn in parts.norms()}
    if len(modes) > 1:
        raise NotImplementedError("impl='fused' needs a block's batch norms all in training or all "
                                  "in eval mode")
    return _block_train(parts, x) if modes == {True} else _block_eval(parts, x)


def warn_unfused(message: str) -> None:
    """An :class:`UnfusedWarning` attributed to the first caller outside this package,
    torch, timm and torchvision (the user's line, for filters by module); none while
    torch.compile traces (it cannot trace ``warnings.warn``: the fallback itself traces)."""
    if torch.compiler.is_compiling():
        return
    # this package's folder and those of the libraries whose modules call it
    libraries = [sys.modules.get(name) for name in ("torch", "timm", "torchvision")]
    roots = tuple(os.path.dirname(os.path.abspath(path)) + os.sep
                  for path in [__file__] + [getattr(m, "__file__", None) for m in libraries] if path)
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UnfusedWarning, stacklevel=level)


def _hooks_below(module: nn.Module, itself: bool = False) -> str | None:
    """The name of a submodule of ``module`` (``module`` too with ``itself``) whose call
    runs hooks; the kernels would skip them."""
    if _global_hooks():
        return "every module (global hooks)"
    stack = [("", module)] if itself else [(name, m) for name, m in module._modules.items() if m is not None]
    while stack:  # (named_modules() builds every name: a few us a module, at every forward)
        name, m = stack.pop()
        if _own_hooks(m):
            return name or type(m).__name__
        stack += [(f"{name}.{child}" if name else child, c) for child, c in m._modules.items() if c is not None]
    return None


def _state_reason(pairs) -> str | None:
    """Why the kernels cannot run (conv, bn) ``pairs`` as they are now; None if they can."""
    dtypes = {conv.weight.dtype for conv, _ in pairs}
    if not dtypes <= set(SUPPORTED_DTYPES):  # (model.double(): float64, for checks against references)
        return (f"{'/'.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} parameters "
                "(the kernels compute in float32, float16 and bfloat16)")
    modes = {_uses_batch_stats(bn) for _, bn in pairs}
    if len(modes) > 1:
        return "its batch norms are in training and in eval mode at once"
    if modes == {True} and any(conv.bias is not None for conv, _ in pairs):
        return "a convolution with a bias, in training"
    if modes == {True} and len({id(bn) for _, bn in pairs}) < len(pairs):
        # (one module called twice updates its running statistics once a use, in order: one node does not)
        return "a batch norm used by two of its convolutions, in training"
    return None


def _fusable(block: nn.Module, parts_of, itself: bool = False) -> tuple[BlockParts | None, str | None]:
    """``(parts_of(block), None)`` where the kernels can compute ``block`` as it is now,
    ``(None, why)`` where not (hooks on its submodules, or on itself with ``itself``)."""
    hooked = _hooks_below(block, itself)
    if hooked is not None:
        return None, f"hooks on {hooked}"
    try:
        parts = parts_of(block)
    except NotImplementedError as e:
        return None, str(e)
    if parts is None:
        return None, "not switched to the kernels"
    why = _state_reason(parts.pairs())
    return (None, why) if why is not None else (parts, None)


def block_forward(block: nn.Module, x: Tensor, eager: Callable[[Tensor], Tensor] | None = None,
                  parts_of: Callable[[nn.Module], BlockParts] = block_parts) -> Tensor:
    """Output of a residual ``block`` (BasicBlock or Bottleneck) for activations ``x``,
    its parts read by ``parts_of``.

    Where the kernels cannot compute the block as it is at this call (hooks on
    its submodules, which they would skip; see :class:`UnfusedWarning`),
    ``eager(x)`` runs it instead, with an :class:`UnfusedWarning` saying why;
    without ``eager``, ``NotImplementedError``. Returns a channels_last tensor
    whatever the input's memory format (``eager``'s result as it comes).
    """
    parts, why = _fusable(block, parts_of)
    if why is not None:
        if eager is None:
            raise NotImplementedError(why)
        warn_unfused(f"impl='fused': {type(block).__name__} runs on PyTorch's path at this call: {why}")
        return eager(x)
    return parts_forward(parts, x)


def _global_hooks() -> bool:
    """Module hooks registered for every module (``register_module_forward_hook`` and kin)."""
    from torch.nn.modules import module as _m
    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


def _own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _hooked(m: nn.Module) -> bool:
    """A module whose call runs hooks (its own or global ones): it must be called."""
    return _global_hooks() or _own_hooks(m)


def layers_forward(layers, x: Tensor, parts_of=None, pool: nn.Module | None = None) -> Tensor:
    """``layers`` (stages: ``nn.Sequential`` modules of residual blocks) applied in turn.
    In training, consecutive blocks that each run as one autograd node run as
    one node together, across stage boundaries too
    (:func:`aru_kernels.residual_blocks_train`: no gradient of a block output
    between them is written). ``parts_of(block)`` gives a block's
    :class:`BlockParts`, or None for a module that is called as it is; blocks
    with hooks are called too, as is a layer that is not a plain Sequential
    or has hooks of its own. ``pool``, a module applied to the result (a
    network's ``avgpool``), is computed by the last blocks' end where it is a
    global average pool and they run as one node: their output is never written."""
    parts_of = parts_of or _own_parts
    run: list = []
    in_run: set = set()  # ids of the batch norms of the blocks in ``run``

    def flush(x: Tensor, pooled: bool = False) -> Tensor:
        if len(run) == 1 and not pooled:
            x = run[0][0](x)
        elif run:
            x = residual_blocks_train(_nhwc(x),
                                      [_node_block(parts) for _, parts in run], pool=pooled)
        run.clear()
        in_run.clear()
        return x

    for layer in layers:
        if type(layer) is not nn.Sequential or _hooked(layer):
            x = layer(flush(x))
            continue
        for block in layer:
            parts, _ = _fusable(block, parts_of, itself=True)  # (a block with hooks of its own is called)
            if parts is not None and {_uses_batch_stats(bn) for bn in parts.norms()} == {True} and _one_node(parts):
                norms = {id(bn) for bn in parts.norms()}
                if not norms.isdisjoint(in_run):
                    x = flush(x)  # (a batch norm of an earlier block of the run: updated after it)
                run.append((block, parts))
                in_run.update(norms)
                continue
            x = block(flush(x))
    if pool is None:
        return flush(x)
    if run and _global_avg_pool(pool):
        return flush(x, pooled=True)
    return pool(flush(x))


def _global_avg_pool(pool: nn.Module) -> bool:
    """An ``nn.AdaptiveAvgPool2d`` to 1x1 without hooks: each image's mean over its pixels."""
    return (type(pool) is nn.AdaptiveAvgPool2d and not _hooked(pool)
            and tuple(_pair(pool.output_size)) == (1, 1))


def layer_forward(layer: nn.Module, x: Tensor, parts_of=None) -> Tensor:
    """``layer(x)`` for one stage, as :func:`layers_forward` runs it."""
    return layers_forward([layer], x, parts_of)


def _own_parts(block: nn.Module) -> BlockParts | None:
    """This package's blocks (switched to the kernels) as :class:`BlockParts`."""
    return block_parts(block) if getattr(block, "impl", None) == "fused" and hasattr(block, "conv1") else None


def _fusable_pool(pool: nn.Module | None) -> bool:
    """An ``nn.MaxPool2d`` that :func:`aru_kernels.bn_relu_maxpool` computes: square
    windows the kernels take (:func:`aru_kernels.maxpool.window_fits`), no dilation, floor
    mode, no indices returned, no hooks to run."""
    if type(pool) is not nn.MaxPool2d or pool.ceil_mode or pool.return_indices or _hooked(pool):
        return False

    def square(v) -> bool:
        return not isinstance(v, (tuple, list)) or (len(v) == 2 and v[0] == v[1])
    return (all(square(v) for v in (pool.kernel_size, pool.stride, pool.padding))
            and pool.dilation in (1, (1, 1), [1, 1])
            and window_fits(*(_pair(v)[0] for v in (pool.kernel_size, pool.stride, pool.padding))))


def stem_forward(pairs, x: Tensor, pool: nn.Module | None = None) -> Tensor:
    """``pool(relu(bn(conv(...))))`` for each (conv, bn) of ``pairs`` in turn: a stem,
    then its max-pool when given. In training, the last batch norm, its ReLU and an
    ``nn.MaxPool2d`` run as one pass (:func:`aru_kernels.bn_relu_maxpool`); a stem of
    one conv whose input takes no gradient is one autograd node with it
    (:func:`aru_kernels.stem_train`)."""
    x = _nhwc(x)
    modes = {_uses_batch_stats(bn) for _, bn in pairs}
    if len(modes) > 1:
        raise NotImplementedError("impl='fused' needs a stem's batch norms all in training or all in eval mode")
    if modes == {True}:
        if len(pairs) == 1 and _fusable_pool(pool) and not x.requires_grad and not _synced(pairs[0][1]):
            # one node: its backward never writes the full-resolution gradient
            return stem_train(x, _conv_bn_tuple(*pairs[0]), kernel_size=pool.kernel_size, stride=pool.stride,
                              padding=pool.padding)
        y, prologue = x, None
        for conv, bn in pairs:
            y, *prologue = conv_bn_batch_stats(conv, bn, y, prologue)
        mean, scale, shift = prologue
        if _fusable_pool(pool):
            return bn_relu_maxpool(y, scale, shift, mean=mean, kernel_size=pool.kernel_size, stride=pool.stride,
                                   padding=pool.padding)
        x = bn_add_relu(y, scale, shift, mean=mean)
    else:
        for conv, bn in pairs:
            x = conv_bn(conv, bn, x, relu=True)
    return x if pool is None else pool(x)


def stem(x: Tensor, modules: list, pairs_of: Callable[[], list], pool: nn.Module | None = None) -> Tensor:
    """A network's stem: ``modules`` (its conv, or a deep stem's Sequential, its batch
    norm and its ReLU) applied to ``x``, then ``pool`` if given; through
    :func:`stem_forward` with the (conv, bn) pairs ``pairs_of()`` gives where the
    kernels can run them as they are at this call, else by calling the modules, with
    an :class:`UnfusedWarning` saying why (hooks on them, which the kernels would
    skip; a norm or conv they do not compute, ``pairs_of`` raising
    ``NotImplementedError``; batch norms in both modes; a conv bias in training;
    a batch norm used twice in training; float64 parameters)."""
    hooked = [name for m in modules for name in [_hooks_below(m, itself=True)] if name]
    why = f"hooks on {hooked[0]}" if hooked else None
    if why is None:
        try:
            pairs = pairs_of()
            why = _state_reason(pairs)
        except NotImplementedError as e:
            why = str(e)
    if why is None:
        return stem_forward(pairs, x, pool)
    warn_unfused(f"impl='fused': the stem runs on PyTorch's path at this call: {why}")
    for m in modules:
        x = m(x)
    return x if pool is None else pool(x)


def stem_pairs(conv1, bn1, act) -> list:
    """(conv, bn) pairs of a stem each followed by ReLU: ``conv1`` a conv, or timm's deep
    stem Sequential(conv, bn, act, conv, bn, act, conv); the last conv's norm is ``bn1``.
    ``NotImplementedError`` for what the kernels do not compute."""
    if not isinstance(act, nn.ReLU):
        raise NotImplementedError(f"the stem's activation is {type(act).__name__}, not ReLU")
    if isinstance(conv1, nn.Sequential):
        mods = list(conv1)
        if len(mods) != 7 or not all(isinstance(m, nn.ReLU) for m in (mods[2], mods[5])):
            raise NotImplementedError(f"stem {[type(m).__name__ for m in mods]} is not conv, bn, relu x2, conv")
        pairs = [(mods[0], mods[1]), (mods[3], mods[4]), (mods[6], bn1)]
    else:
        pairs = [(conv1, bn1)]
    for conv, bn in pairs:
        _check_conv(conv)
        _check_bn(bn)
    return pairs


def resnet_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of ``model`` (an :class:`aru_models.resnet.ResNet`, or a network
    with its ``conv1``/``bn1``/[``maxpool``]/``layer*``/``avgpool``/``fc`` layout
    such as :class:`aru_models.cifar.CifarResNeXt`)
    for images ``x``, in any memory format (made channels_last once, here)."""
    parts = (model.conv1, model.bn1, model.relu)
    x = stem(x, list(parts), functools.partial(stem_pairs, *parts), getattr(model, "maxpool", None))  # (CIFAR: none)
    x = layers_forward(_stages(model), x, pool=model.avgpool)
    return model.fc(torch.flatten(x, 1))


def _stages(model: nn.Module) -> list[nn.Module]:
    return [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
