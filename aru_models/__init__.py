"""ResNet and ResNeXt models built on the fused ARU kernels, as drop-in
replacements for torchvision's.

Every builder takes torchvision's arguments (``weights``, ``progress``, and
``num_classes``, ``zero_init_residual``, ``groups``, ``width_per_group``,
``replace_stride_with_dilation``, ``norm_layer``) plus ``impl``: ``"eager"``
runs torch operators exactly as torchvision does, ``"fused"`` the Triton
kernels. State_dicts are interchangeable with torchvision's in both directions.

=====================  ===========  ==============  =====================
builder                block        stages          groups x group width
=====================  ===========  ==============  =====================
``resnet18``           BasicBlock   2, 2, 2, 2      --
``resnet34``           BasicBlock   3, 4, 6, 3      --
``resnet50``           Bottleneck   3, 4, 6, 3      1 x 64
``resnet101``          Bottleneck   3, 4, 23, 3     1 x 64
``resnet152``          Bottleneck   3, 8, 36, 3     1 x 64
``resnext50_32x4d``    Bottleneck   3, 4, 6, 3      32 x 4
``resnext101_32x8d``   Bottleneck   3, 4, 23, 3     32 x 8
``resnext101_64x4d``   Bottleneck   3, 4, 23, 3     64 x 4
``wide_resnet50_2``    Bottleneck   3, 4, 6, 3      1 x 128
``wide_resnet101_2``   Bottleneck   3, 4, 23, 3     1 x 128
=====================  ===========  ==============  =====================

Group widths are those of the first stage and double at every stage. The
CIFAR networks of the ResNeXt paper (``resnext29_8x64d``, ``resnext29_16x64d``
and the CPU-sized ``resnext29_tiny``; 3x3 stem, three stages) live in
:mod:`aru_models.cifar`; ``python -m aru_models.train`` trains any of them.
:func:`from_torchvision` converts a torchvision model that already exists;
:func:`fuse` switches a model people already hold (torchvision's or timm's
ResNe(X)t family, a detection backbone) to the fused kernels in place.
"""

from .resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    from_torchvision,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from .cifar import CifarResNeXt, resnext29_8x64d, resnext29_16x64d, resnext29_tiny
from .external import UnfusedWarning, fuse

__all__ = [
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "from_torchvision",
    "fuse",
    "UnfusedWarning",
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
    "CifarResNeXt",
    "resnext29_8x64d",
    "resnext29_16x64d",
    "resnext29_tiny",
]
