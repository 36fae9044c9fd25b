"""ResNet, ResNeXt and Wide ResNet for ImageNet, as drop-in replacements for torchvision's.

The modules mirror ``torchvision.models.resnet`` exactly: the same submodules,
created and initialised in the same order. So state_dicts load strictly in
both directions, a model built under a given ``torch.manual_seed`` starts from
bitwise the same parameters as torchvision's, and the eager forward returns
bitwise the same outputs (and updates the same batch-norm statistics).

What they add is ``impl``, a plain string attribute (not part of the
state_dict) on the model and on every block that picks the forward:

* ``"eager"``: torch operators, exactly as torchvision;
* ``"fused"``: the Triton kernels of :mod:`aru_kernels`, through
  :mod:`aru_models.fused`. That module is imported on first use, so building,
  loading or running an eager model never loads Triton.

torchvision is not needed at run time: it is imported only when one of its
weights enums (or the name of a member, such as ``"DEFAULT"``) is passed as
``weights``, or by :func:`from_torchvision`, which converts a torchvision
model that already exists.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

from aru_kernels.runtime import default_impl

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = [
    "IMPLS",
    "resolve_impl",
    "conv1x1",
    "conv3x3",
    "BasicBlock",
    "Bottleneck",
    "make_layer",
    "ResNet",
    "from_torchvision",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

IMPLS = ("eager", "fused")

WeightsArg = Union["WeightsEnum", str, "os.PathLike[str]", None]
NormLayer = Callable[[int], nn.Module]


def resolve_impl(impl: str | None) -> str:
    """The forward ``impl`` names: ``"eager"`` or ``"fused"``; None picks
    :func:`aru_kernels.runtime.default_impl` (fused on a CUDA machine with Triton).

    Raises:
        ValueError: for any other value.
    """
    if impl is None:
        return default_impl()
    if not isinstance(impl, str) or impl not in IMPLS:
        allowed = ", ".join(repr(name) for name in IMPLS)
        raise ValueError(f"impl must be one of {allowed} or None; got {impl!r}")
    return impl


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias, padded to keep the size at stride 1."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34's residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Both convolutions are 3x3; the first applies ``stride``. ``downsample``
    (a 1x1 conv + norm, or None for the identity) maps ``x`` to the output's
    shape. ``groups``, ``base_width`` and ``dilation`` exist for a signature
    shared with :class:`Bottleneck` and must keep their defaults.

    Raises:
        ValueError: ``groups != 1`` or ``base_width != 64``, or an unknown ``impl``.
        NotImplementedError: ``dilation > 1``.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
        *,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.impl = resolve_impl(impl)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "fused":
            from . import fused

            # the modules' own calls where the kernels cannot compute the block as it is now
            return fused.block_forward(self, x, self._eager_forward)
        return self._eager_forward(x)

    def _eager_forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """ResNet-50+'s residual block; with ``groups > 1``, ResNeXt's aggregated
    residual transformation unit (ARU; Xie et al. 2017, arXiv 1611.05431, form (c)).

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))``
    where ``conv1`` is a 1x1 reducing ``inplanes`` to ``width`` channels,
    ``conv2`` a 3x3 with ``groups`` groups (the cardinality C) on ``width``
    channels, and ``conv3`` a 1x1 expanding to ``planes * 4``, with

        width = int(planes * base_width / 64) * groups

    so each of the C groups is ``int(planes * base_width / 64)`` channels wide
    (ResNeXt-50 32x4d: groups=32, base_width=4, group widths 4/8/16/32 over
    the four stages). ``stride`` sits in the 3x3 ("ResNet v1.5", as
    torchvision); ``downsample`` (a 1x1 conv + norm, or None for the identity)
    maps ``x`` to the output's shape; ``dilation`` dilates the 3x3.

    Raises:
        ValueError: an unknown ``impl``.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
        *,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.impl = resolve_impl(impl)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "fused":
            from . import fused

            # the modules' own calls where the kernels cannot compute the block as it is now
            return fused.block_forward(self, x, self._eager_forward)
        return self._eager_forward(x)

    def _eager_forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


def make_layer(
    block: type[BasicBlock | Bottleneck],
    inplanes: int,
    planes: int,
    blocks: int,
    stride: int = 1,
    *,
    dilation: int = 1,
    dilate: bool = False,
    groups: int = 1,
    base_width: int = 64,
    norm_layer: NormLayer | None = None,
    impl: str | None = None,
) -> nn.Sequential:
    """A stage of ``blocks`` residual blocks, built as torchvision's ``ResNet._make_layer``.

    The first block takes ``inplanes`` channels and applies ``stride``; it gets
    a projection shortcut (1x1 conv with that stride + norm) when the stride or
    the channel count changes. The others map ``planes * block.expansion``
    channels to themselves. With ``dilate`` the stride becomes dilation: the
    first block keeps ``dilation``, the others get ``dilation * stride``.
    Modules are created in torchvision's order (the projection first), so under
    the same seed they start from the same parameters.

    The next stage takes ``planes * block.expansion`` channels and, if
    ``dilate``, a dilation of ``dilation * stride``.
    """
    if norm_layer is None:
        norm_layer = nn.BatchNorm2d
    previous_dilation = dilation
    if dilate:
        dilation *= stride
        stride = 1
    outplanes = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != outplanes:
        downsample = nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))

    layers = [block(inplanes, planes, stride, downsample, groups, base_width, previous_dilation, norm_layer,
                    impl=impl)]
    for _ in range(1, blocks):
        layers.append(block(outplanes, planes, groups=groups, base_width=base_width, dilation=dilation,
                            norm_layer=norm_layer, impl=impl))
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """torchvision's ImageNet ResNet: a 7x7 stride-2 stem, a max pool, four
    stages of residual ``block``s (``layers`` blocks each; 64/128/256/512
    planes, stride 2 from the second stage on), global average pooling and a
    linear classifier.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: the number of blocks in each of the four stages.
        num_classes: outputs of the classifier.
        zero_init_residual: start the last norm of every residual branch at
            zero, so that every block starts as the identity.
        groups: groups of every bottleneck's 3x3 (ResNeXt's cardinality).
        width_per_group: ``base_width`` of every bottleneck (64 for ResNet).
        replace_stride_with_dilation: for the stages 2, 3, 4, whether to
            dilate instead of striding (keeps the resolution; bottlenecks only).
        norm_layer: builds the norm after each convolution from a channel
            count; ``nn.BatchNorm2d`` by default.
        impl: the forward, ``"eager"`` or ``"fused"``; None picks
            :func:`aru_kernels.runtime.default_impl`.

    Input ``(N, 3, H, W)`` images, output ``(N, num_classes)`` logits.

    Raises:
        ValueError: an unknown ``impl``, or ``replace_stride_with_dilation``
            without 3 entries.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        norm_layer: NormLayer | None = None,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.impl = resolve_impl(impl)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialise the last norm of each residual branch, so that every
        # block starts as the identity (Goyal et al. 2017, arXiv 1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        """The next stage (see :func:`make_layer`); advances ``inplanes`` and ``dilation``."""
        layer = make_layer(block, self.inplanes, planes, blocks, stride, dilation=self.dilation, dilate=dilate,
                           groups=self.groups, base_width=self.base_width, norm_layer=self._norm_layer,
                           impl=self.impl)
        if dilate:
            self.dilation *= stride
        self.inplanes = planes * block.expansion
        return layer

    def set_impl(self, impl: str | None) -> ResNet:
        """Run the model and every block with ``impl`` (``"eager"`` or
        ``"fused"``; None picks the default) from now on; returns the model.
        Parameters, buffers and the state_dict are untouched.

        Raises:
            ValueError: for any other value (the model is left as it was).
        """
        impl = resolve_impl(impl)
        for m in self.modules():
            if m is self or isinstance(m, (BasicBlock, Bottleneck)):
                m.impl = impl
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "fused":
            from . import fused

            return fused.resnet_forward(self, x)
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


# ---------------------------------------------------------------------------
# Weights: torchvision's enums, or files saved with torch.save


# "DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2": how torchvision
# names its weights. Such a string is a weights name unless a file has that name.
_WEIGHTS_NAME = re.compile(r"(\w+\.)?[A-Z][A-Z0-9_]*")


def _is_path(weights: object) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (os.path.exists(weights) or not _WEIGHTS_NAME.fullmatch(weights))


def _torchvision_weights(enum_name: str, weights: object) -> WeightsEnum:
    """The member of ``torchvision.models.<enum_name>`` that ``weights`` is, or names."""
    try:
        from torchvision import models
    except ImportError:
        if isinstance(weights, str):
            raise FileNotFoundError(errno.ENOENT, "No such weights file", weights) from None
        raise TypeError(f"weights must be None, a path to a saved state_dict, or a member of torchvision's "
                        f"{enum_name}; got a {type(weights).__name__} (and torchvision is not installed)") from None
    enum = getattr(models, enum_name)
    if isinstance(weights, str):
        try:
            return enum.verify(weights)
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, f"No such weights file, nor a member of torchvision's {enum_name}",
                                    weights) from None
    return enum.verify(weights)


def _read_state_dict(path: str) -> Mapping[str, Any]:
    """The state_dict saved in ``path``: the whole file, or its ``"state_dict"`` or ``"model"`` entry."""
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "No such weights file", path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"cannot read weights file {path!r}: {e}") from e
    if not isinstance(saved, Mapping):
        raise ValueError(f"weights file {path!r} holds a {type(saved).__name__}, not a state_dict "
                         "(nor a checkpoint dict with a 'state_dict' or 'model' entry)")
    for key in ("state_dict", "model"):
        if isinstance(saved.get(key), Mapping):
            return saved[key]
    return saved


def _load_checked(model: nn.Module, state_dict: Mapping[str, Any], path: str) -> None:
    """Load ``state_dict`` strictly, failing with a message that names ``path`` and the first bad keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [k for k in expected
                 if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != tuple(expected[k].shape)]

    def first(keys: list[str]) -> str:
        return repr(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")

    problems = []
    if missing:
        problems.append(f"missing key {first(missing)}")
    if unexpected:
        problems.append(f"unexpected key {first(unexpected)}")
    if misshaped:
        key = misshaped[0]
        saved, wanted = list(state_dict[key].shape), list(expected[key].shape)
        hint = f"; pass num_classes={saved[0]}" if key.startswith("fc.") else ""
        problems.append(f"shape mismatch for {first(misshaped)}: the file has {saved}, the model {wanted}{hint}")
    if problems:
        raise ValueError(f"weights file {path!r} does not fit this model: " + "; ".join(problems))
    model.load_state_dict(state_dict)


def _require(kwargs: dict[str, Any], name: str, value: Any) -> None:
    """Set ``kwargs[name]`` to the ``value`` the model requires, refusing a different one."""
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"{name}={kwargs[name]!r} does not fit this model, which requires {name}={value!r}")
    kwargs[name] = value


def _resnet(
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    enum_name: str,
    weights: WeightsArg,
    progress: bool,
    impl: str | None,
    kwargs: dict[str, Any],
) -> ResNet:
    if weights is None:
        return ResNet(block, layers, impl=impl, **kwargs)
    if _is_path(weights):
        path = os.fspath(weights)
        state_dict = _read_state_dict(path)
        model = ResNet(block, layers, impl=impl, **kwargs)
        _load_checked(model, state_dict, path)
        return model
    weights = _torchvision_weights(enum_name, weights)
    _require(kwargs, "num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, impl=impl, **kwargs)
    model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


_BUILDER_ARGS = """

    Args:
        weights: None (default) for random initialisation, as torchvision's;
            a member of the torchvision weights enum named above, or its name
            (``"DEFAULT"``, ``"IMAGENET1K_V1"``): downloaded and checked as
            torchvision does, and ``num_classes`` follows its categories; or
            the path of a file saved by ``torch.save(model.state_dict(), path)``
            (a checkpoint dict holding it under ``"state_dict"`` or ``"model"``
            will do), loaded strictly.
        progress: show a progress bar while downloading torchvision weights.
        impl: the forward, ``"eager"`` or ``"fused"``; None picks
            :func:`aru_kernels.runtime.default_impl`.
        **kwargs: passed to :class:`ResNet`: ``num_classes``,
            ``zero_init_residual``, ``groups``, ``width_per_group``,
            ``replace_stride_with_dilation``, ``norm_layer``.

    Raises:
        ValueError: an unknown ``impl``; a keyword that contradicts the
            architecture or the torchvision weights; a weights file that cannot
            be read or does not fit the model (the message names the file and
            the first missing, unexpected or mis-shaped key).
        FileNotFoundError: the weights file does not exist.
        TypeError: ``weights`` is neither a path nor a member of the enum.
"""


def _builder(fn: Callable[..., ResNet]) -> Callable[..., ResNet]:
    """Append the arguments and errors that every builder shares to its docstring."""
    fn.__doc__ = fn.__doc__.rstrip() + _BUILDER_ARGS.rstrip() + "\n"
    return fn


@_builder
def resnet18(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
             **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al. 2015, arXiv 1512.03385): basic blocks, stages [2, 2, 2, 2].

    torchvision weights: ``ResNet18_Weights``.
    """
    return _resnet(BasicBlock, [2, 2, 2, 2], "ResNet18_Weights", weights, progress, impl, kwargs)


@_builder
def resnet34(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
             **kwargs: Any) -> ResNet:
    """ResNet-34 (He et al. 2015, arXiv 1512.03385): basic blocks, stages [3, 4, 6, 3].

    torchvision weights: ``ResNet34_Weights``.
    """
    return _resnet(BasicBlock, [3, 4, 6, 3], "ResNet34_Weights", weights, progress, impl, kwargs)


@_builder
def resnet50(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
             **kwargs: Any) -> ResNet:
    """ResNet-50 v1.5 (He et al. 2015, arXiv 1512.03385; stride in the 3x3):
    bottlenecks, stages [3, 4, 6, 3].

    torchvision weights: ``ResNet50_Weights``.
    """
    return _resnet(Bottleneck, [3, 4, 6, 3], "ResNet50_Weights", weights, progress, impl, kwargs)


@_builder
def resnet101(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
              **kwargs: Any) -> ResNet:
    """ResNet-101 v1.5 (He et al. 2015, arXiv 1512.03385; stride in the 3x3):
    bottlenecks, stages [3, 4, 23, 3].

    torchvision weights: ``ResNet101_Weights``.
    """
    return _resnet(Bottleneck, [3, 4, 23, 3], "ResNet101_Weights", weights, progress, impl, kwargs)


@_builder
def resnet152(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
              **kwargs: Any) -> ResNet:
    """ResNet-152 v1.5 (He et al. 2015, arXiv 1512.03385; stride in the 3x3):
    bottlenecks, stages [3, 8, 36, 3].

    torchvision weights: ``ResNet152_Weights``.
    """
    return _resnet(Bottleneck, [3, 8, 36, 3], "ResNet152_Weights", weights, progress, impl, kwargs)


@_builder
def resnext50_32x4d(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
                    **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2017, arXiv 1611.05431): aggregated residual
    transformation units of cardinality 32 and group width 4 (grouped 3x3s of
    128/256/512/1024 channels), stages [3, 4, 6, 3].

    torchvision weights: ``ResNeXt50_32X4D_Weights``. ``groups`` and
    ``width_per_group`` are fixed (32, 4).
    """
    _require(kwargs, "groups", 32)
    _require(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 6, 3], "ResNeXt50_32X4D_Weights", weights, progress, impl, kwargs)


@_builder
def resnext101_32x8d(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
                     **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d (Xie et al. 2017, arXiv 1611.05431): aggregated residual
    transformation units of cardinality 32 and group width 8, stages [3, 4, 23, 3].

    torchvision weights: ``ResNeXt101_32X8D_Weights``. ``groups`` and
    ``width_per_group`` are fixed (32, 8).
    """
    _require(kwargs, "groups", 32)
    _require(kwargs, "width_per_group", 8)
    return _resnet(Bottleneck, [3, 4, 23, 3], "ResNeXt101_32X8D_Weights", weights, progress, impl, kwargs)


@_builder
def resnext101_64x4d(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
                     **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d (Xie et al. 2017, arXiv 1611.05431): aggregated residual
    transformation units of cardinality 64 and group width 4, stages [3, 4, 23, 3].

    torchvision weights: ``ResNeXt101_64X4D_Weights``. ``groups`` and
    ``width_per_group`` are fixed (64, 4).
    """
    _require(kwargs, "groups", 64)
    _require(kwargs, "width_per_group", 4)
    return _resnet(Bottleneck, [3, 4, 23, 3], "ResNeXt101_64X4D_Weights", weights, progress, impl, kwargs)


@_builder
def wide_resnet50_2(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
                    **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016, arXiv 1605.07146): ResNet-50
    with bottlenecks twice as wide inside (the last block is 2048-1024-2048
    instead of 2048-512-2048).

    torchvision weights: ``Wide_ResNet50_2_Weights``. ``width_per_group`` is
    fixed (128).
    """
    _require(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 6, 3], "Wide_ResNet50_2_Weights", weights, progress, impl, kwargs)


@_builder
def wide_resnet101_2(*, weights: WeightsArg = None, progress: bool = True, impl: str | None = None,
                     **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 (Zagoruyko & Komodakis 2016, arXiv 1605.07146): ResNet-101
    with bottlenecks twice as wide inside.

    torchvision weights: ``Wide_ResNet101_2_Weights``. ``width_per_group`` is
    fixed (128).
    """
    _require(kwargs, "width_per_group", 64 * 2)
    return _resnet(Bottleneck, [3, 4, 23, 3], "Wide_ResNet101_2_Weights", weights, progress, impl, kwargs)


# ---------------------------------------------------------------------------
# Converting a torchvision model that already exists


def _norm_layer_like(norm: nn.Module) -> NormLayer:
    """A ``norm_layer`` that builds norms configured like ``norm``."""
    if isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        # a SyncBatchNorm's process group too: its repr does not show it, so a lost one would go unnoticed
        group = {"process_group": norm.process_group} if isinstance(norm, nn.SyncBatchNorm) else {}
        return functools.partial(type(norm), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                                 track_running_stats=norm.track_running_stats, **group)
    if isinstance(norm, nn.GroupNorm):
        return lambda channels: nn.GroupNorm(norm.num_groups, channels, eps=norm.eps, affine=norm.affine)
    return type(norm)


def _first_difference(a: str, b: str) -> tuple[int, str, str]:
    """(number, line of ``a``, line of ``b``) of the first line where two different texts differ."""
    pairs = itertools.zip_longest(a.splitlines(), b.splitlines(), fillvalue="")
    return next((number, x.strip(), y.strip()) for number, (x, y) in enumerate(pairs, 1) if x != y)


def from_torchvision(model: nn.Module, impl: str | None = None) -> ResNet:
    """This package's :class:`ResNet` equivalent to a torchvision ResNet/ResNeXt ``model``.

    The configuration is read from the instance: block type, blocks per stage,
    groups, width per group, which stages dilate, classes, and the norm layer
    (its type; eps, momentum, affine and ``track_running_stats`` of batch
    norms, and the process group of synchronized ones; groups, eps and affine
    of group norms; other types are called with the channel count). A model
    changed after it was built (``model.maxpool = nn.Identity()``, a new stem)
    is refused rather than converted into something else: every module must
    match what that configuration builds.

    The result holds copies of ``model``'s parameters and buffers with their
    devices, dtypes and ``requires_grad``, and every submodule's train/eval
    mode. ``model`` is left untouched, and no random numbers are drawn.

    Args:
        model: a ``torchvision.models.ResNet`` (any of its builders, or a
            custom configuration) made of torchvision's own blocks.
        impl: the forward, ``"eager"`` or ``"fused"``; None picks
            :func:`aru_kernels.runtime.default_impl`.

    Raises:
        TypeError: ``model`` is not a torchvision ResNet as its constructor
            builds it (the message says what differs).
        ValueError: an unknown ``impl``.
    """
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is None or not isinstance(model, tv.ResNet):
        raise TypeError("expected a torchvision.models.ResNet (resnet18 ... wide_resnet101_2, or a custom "
                        f"configuration); got {type(model).__module__}.{type(model).__qualname__}")
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    block_types = {type(b) for stage in stages for b in stage}
    blocks = {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck}
    if len(block_types) != 1 or not block_types <= blocks.keys():
        names = sorted(t.__qualname__ for t in block_types)
        raise TypeError(f"expected a torchvision ResNet made of torchvision's BasicBlock or Bottleneck only; "
                        f"got blocks {names}")
    if not isinstance(model.fc, nn.Linear):
        raise TypeError(f"expected a torchvision ResNet whose fc is an nn.Linear; got {type(model.fc).__qualname__}")

    with torch.device("meta"):
        converted = ResNet(
            blocks[block_types.pop()],
            [len(stage) for stage in stages],
            num_classes=model.fc.out_features,
            groups=model.groups,
            width_per_group=model.base_width,
            replace_stride_with_dilation=[stage[0].stride == 1 for stage in stages[1:]],
            norm_layer=_norm_layer_like(model.bn1),
            impl=impl,
        )
    if repr(converted) != repr(model):
        line, found, built = _first_difference(repr(model), repr(converted))
        raise TypeError(f"expected a torchvision ResNet as its constructor builds it; line {line} of this model's "
                        f"repr is {found!r} where its configuration builds {built!r}")
    mixed = [name for name, m in model.named_modules()
             if isinstance(m, nn.SyncBatchNorm) and m.process_group is not getattr(model.bn1, "process_group", None)]
    if mixed:
        raise TypeError(f"expected a torchvision ResNet whose SyncBatchNorms share one process group; {mixed[0]}'s "
                        "is not bn1's")
    converted.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in converted.named_parameters():
        p.requires_grad_(requires_grad[name])
    training = {name: m.training for name, m in model.named_modules()}
    for name, m in converted.named_modules():
        m.training = training[name]
    return converted
