"""Switch the ResNet-family models people already hold to the fused kernels, in place.

:func:`fuse` walks a model's modules and recognizes, by class and structure:

* residual blocks: torchvision's and timm's ``Bottleneck`` and ``BasicBlock``
  (ReLU activations; timm's squeeze-excitation ``se``, stochastic depth
  ``drop_path``, ``drop_block`` and average-pool downsample included), and
  this package's;
* stems: torchvision's ``ResNet`` (``conv1``/``bn1``/``relu``), timm's
  ``ResNet`` (one conv, or the three-conv "deep" stem), and the body of a
  torchvision detection backbone (``IntermediateLayerGetter`` over a ResNet);
* batch norms: ``nn.BatchNorm2d`` in training or eval mode and
  ``FrozenBatchNorm2d`` (folded like eval mode, with the module's ``eps``).

Each recognized module gets a ``forward`` of its own that runs the kernels
(:mod:`aru_models.fused`) and reads the module's parameters and buffers as
they are at each call; where they cannot compute the module as it is at a
call (hooks on its submodules, see :class:`UnfusedWarning`), that call runs
the class's own forward. Nothing else changes: parameters, buffers, their
names in ``state_dict``, ``requires_grad``, train/eval modes. ``fuse(model,
impl="eager")`` removes those forwards again.

Those forwards are bound to their module: ``copy.deepcopy``, ``torch.save`` /
``torch.load`` and ``nn.DataParallel``'s replicas (whose parameters are
per-device copies) bind them to the copy.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict

from torch import Tensor, nn

from . import fused
from .fused import UnfusedWarning

__all__ = ["fuse", "UnfusedWarning"]

# where the classes fuse recognizes by name are defined (other models reuse the names:
# timm's RegNet and TResNet blocks, torchvision's video ResNets)
_RESNET_MODULES = ("torchvision.models.resnet", "timm.models.resnet")


def _from(module: nn.Module, *packages: str) -> bool:
    return type(module).__module__.split(".")[0] in packages


def _is_relu(m) -> bool:
    return isinstance(m, nn.ReLU)


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _is_block(m: nn.Module) -> bool:
    return (type(m).__name__ in ("Bottleneck", "BasicBlock") and type(m).__module__ in _RESNET_MODULES
            and hasattr(m, "conv1") and hasattr(m, "conv2"))


def _downsample(ds) -> tuple | None:
    if ds is None:
        return None
    mods = list(ds) if isinstance(ds, nn.Sequential) else [ds]
    if len(mods) == 2:
        return (None, mods[0], mods[1])
    if len(mods) == 3 and isinstance(mods[0], (nn.AvgPool2d, nn.Identity)):  # timm's avg_down
        return (None if isinstance(mods[0], nn.Identity) else mods[0], mods[1], mods[2])
    raise NotImplementedError(f"downsample {[type(m).__name__ for m in mods]} is not (pool,) conv, norm")


def block_parts(block: nn.Module) -> fused.BlockParts:
    """The :class:`aru_models.fused.BlockParts` of a torchvision or timm block;
    NotImplementedError (saying why) for what the kernels do not compute."""
    bottleneck = hasattr(block, "conv3")
    n = 3 if bottleneck else 2
    acts = [getattr(block, f"act{i}") for i in range(1, n + 1)] if hasattr(block, "act1") else [block.relu]
    for i, act in enumerate(acts):
        if not _is_relu(act):
            name = f"act{i + 1}" if hasattr(block, "act1") else "relu"
            raise NotImplementedError(f"{name} is {type(act).__name__}, not ReLU")
    if not _is_identity(getattr(block, "aa", None)):
        raise NotImplementedError(f"aa is {type(block.aa).__name__} (anti-aliased downsampling)")
    chain = tuple((getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, n + 1))
    drop_path, drop_block = getattr(block, "drop_path", None), getattr(block, "drop_block", None)
    return fused.BlockParts(chain, _downsample(block.downsample), getattr(block, "se", None),
                            None if _is_identity(drop_path) else drop_path,
                            None if _is_identity(drop_block) else drop_block).check()


def _block_forward(self, x: Tensor) -> Tensor:
    return fused.block_forward(self, x, functools.partial(type(self).forward, self), block_parts)


def _switched(m: nn.Module, attr: str, ours: tuple = ()):
    """The function of ours (one of the forwards, or of ``ours``) that ``m.<attr>`` was
    switched to, bound to ``m``; None if it was not."""
    switched = m.__dict__.get(attr)
    fn = getattr(switched, "func", None)
    return fn if fn in (*_FORWARDS, *ours) and getattr(switched, "args", None) == (m,) else None


def _fused_parts(block: nn.Module):
    """The parts of a block this module switched to the kernels; None for any other module."""
    return block_parts(block) if _switched(block, "forward") is _block_forward else None


def _stages(model: nn.Module) -> list:
    return [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]


def _stem(x: Tensor, conv1, bn1, act, pool) -> Tensor:
    return fused.stem(x, [conv1, bn1, act], functools.partial(fused.stem_pairs, conv1, bn1, act), pool)


def _torchvision_forward_impl(self, x: Tensor) -> Tensor:
    import torch

    x = _stem(x, self.conv1, self.bn1, self.relu, self.maxpool)
    x = fused.layers_forward(_stages(self), x, _fused_parts, pool=self.avgpool)
    return self.fc(torch.flatten(x, 1))


def _timm_forward_features(self, x: Tensor) -> Tensor:
    if getattr(self, "grad_checkpointing", False):  # switched on after fuse: timm's checkpointed stages
        fused.warn_unfused("impl='fused': ResNet runs on PyTorch's path at this call: grad_checkpointing is on")
        return type(self).forward_features(self, x)
    x = _stem(x, self.conv1, self.bn1, self.act1, self.maxpool)
    return fused.layers_forward(_stages(self), x, _fused_parts)


_STEM = ("conv1", "bn1", "relu")


def _getter_forward(self, x: Tensor):
    out = OrderedDict()
    items = list(self.items())
    if [name for name, _ in items[:3]] == list(_STEM) and not set(_STEM) & set(self.return_layers):
        pool, taken = None, 3
        if len(items) > 3 and items[3][0] == "maxpool" and "maxpool" not in self.return_layers:
            pool, taken = items[3][1], 4
        x = _stem(x, self.conv1, self.bn1, self.relu, pool)
        items = items[taken:]
    for name, module in items:
        x = fused.layer_forward(module, x, _fused_parts)
        if name in self.return_layers:
            out[self.return_layers[name]] = x
    return out


_FORWARDS = (_block_forward, _torchvision_forward_impl, _timm_forward_features, _getter_forward)


def _stem_override(m: nn.Module):
    """(method name, fused method, stem modules) for a recognized ResNet model or detection body."""
    name = type(m).__name__
    if name == "ResNet" and type(m).__module__ == "torchvision.models.resnet":
        return "_forward_impl", _torchvision_forward_impl, (m.conv1, m.bn1, m.relu)
    if name == "ResNet" and type(m).__module__ == "timm.models.resnet":
        if getattr(m, "grad_checkpointing", False):
            raise NotImplementedError("grad_checkpointing is on: the stem and stages stay as timm runs them")
        return "forward_features", _timm_forward_features, (m.conv1, m.bn1, m.act1)
    if (name == "IntermediateLayerGetter" and _from(m, "torchvision")
            and [n for n, _ in list(m.named_children())[:3]] == list(_STEM)):  # a torchvision ResNet's body
        if set(_STEM) & set(m.return_layers):
            raise NotImplementedError(f"the stem's own outputs are returned ({sorted(m.return_layers)})")
        return "forward", _getter_forward, (m.conv1, m.bn1, m.relu)
    return None


_ATTRS = ("forward", "_forward_impl", "forward_features")


def _replicate(self: nn.Module) -> nn.Module:
    """``nn.Module._replicate_for_data_parallel`` for a switched module: nn.DataParallel's
    replica (a shallow copy that is given per-device parameters), with the switched
    methods bound to the replica rather than to ``self``, whose parameters they would read."""
    replica = type(self)._replicate_for_data_parallel(self)
    for attr in _ATTRS:
        if _switched(self, attr) is not None:
            replica.__dict__[attr] = functools.partial(self.__dict__[attr].func, replica)
    replica.__dict__["_replicate_for_data_parallel"] = functools.partial(_replicate, replica)
    return replica


def _unfuse(model: nn.Module) -> None:
    for m in model.modules():
        for attr in _ATTRS:
            if _switched(m, attr) is not None:
                del m.__dict__[attr]
        if _switched(m, "_replicate_for_data_parallel", (_replicate,)) is not None:
            del m.__dict__["_replicate_for_data_parallel"]


def _replacing(m: nn.Module, attr: str, fn) -> tuple:
    """(m, attr, fn): ``m.<attr>`` to be switched to ``fn``; NotImplementedError where the
    instance holds a function of its own there (the user's: it would be lost)."""
    if attr in m.__dict__ and _switched(m, attr) is None:
        raise NotImplementedError(f"its {attr} was replaced on the instance")
    return m, attr, fn


def fuse(model: nn.Module, impl: str = "fused", *, strict: bool = False) -> nn.Module:
    """Run ``model``'s ResNet-family blocks and stem on the fused kernels, in place.

    Recognizes torchvision's and timm's ``ResNet``, ``Bottleneck`` and
    ``BasicBlock`` and a torchvision detection backbone's body (see the module
    docstring), whatever holds them; this package's own models are switched
    with their ``set_impl``. Parameters, buffers and ``state_dict`` keys stay
    the user's, so checkpoints load before and after, strictly. Squeeze-
    excitation and stochastic depth run as the model's own modules between the
    last batch norm and the residual add.

    Args:
        model: the model, changed in place and returned.
        impl: ``"fused"``, or ``"eager"`` to undo an earlier ``fuse``.
        strict: raise instead of warning when a recognized module cannot be fused.

    Returns:
        ``model``.

    Warns:
        UnfusedWarning: once, listing each recognized module left on PyTorch's
            path and why (an activation other than ReLU, blur-pool
            anti-aliasing, a norm layer other than batch norm, a conv or norm
            subclass with a forward of its own, ...). A forward warns too
            where it runs a module as PyTorch's at that call (hooks on its
            submodules, batch norms of a block in both modes, a conv bias
            in training).

    Raises:
        ValueError: an unknown ``impl``; with ``strict``, any module that
            would have been reported.
    """
    if impl not in ("fused", "eager"):
        raise ValueError(f"impl must be 'fused' or 'eager'; got {impl!r}")
    from .resnet import BasicBlock, Bottleneck

    own = [m for m in model.modules() if _from(m, "aru_models") and hasattr(m, "impl")]
    plan, skipped = [], []
    for name, m in model.named_modules() if impl == "fused" else ():
        try:
            if _from(m, "aru_models") and isinstance(m, (BasicBlock, Bottleneck)):
                fused.block_parts(m)  # switched with impl below: checked, to be reported
            elif _from(m, "aru_models") and hasattr(m, "set_impl"):
                fused.stem_pairs(m.conv1, m.bn1, m.relu)
            elif _is_block(m):
                block_parts(m)
                plan.append(_replacing(m, "forward", _block_forward))
            else:
                stem = _stem_override(m)
                if stem is not None:
                    fused.stem_pairs(*stem[2])
                    plan.append(_replacing(m, stem[0], stem[1]))
        except NotImplementedError as why:
            skipped.append(f"{name or type(m).__name__}: {why}")
    if skipped and strict:
        raise ValueError("fuse(strict=True): these modules cannot run on the fused kernels:\n  "
                         + "\n  ".join(skipped))
    _unfuse(model)
    for m in own:
        if hasattr(m, "set_impl"):
            m.set_impl(impl)
        else:
            m.impl = impl
    if impl == "eager":
        return model
    for m, attr, fn in plan:
        setattr(m, attr, functools.partial(fn, m))  # (a bound method would not pickle: torch.save(model))
        m._replicate_for_data_parallel = functools.partial(_replicate, m)
    if skipped:
        warnings.warn("fuse: left on PyTorch's path:\n  " + "\n  ".join(skipped), UnfusedWarning, stacklevel=2)
    if not plan and not own and not skipped:
        warnings.warn(f"fuse: no ResNet-family block or stem found in {type(model).__name__}", UnfusedWarning,
                      stacklevel=2)
    return model
