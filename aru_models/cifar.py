"""ResNeXt-29 for 32x32 images (CIFAR), as in Xie et al. 2017 (arXiv 1611.05431), section 5.3.

A 3x3 stem convolution (stride 1, no max pool), three stages of three
:class:`~aru_models.resnet.Bottleneck` blocks at 32x32, 16x16 and 8x8 (the
stride in the first block of stages 2 and 3), global average pooling and a
linear classifier: 1 + 3 * 3 * 3 + 1 = 29 weighted layers. The bottleneck of
stage 1 is C groups of d channels ("C x d"), doubling with each stage, and the
block outputs are four times the stage's planes.

======================  ====  ===  ==========  ===============  ==========
builder                 C     d    stem        block outputs    parameters
======================  ====  ===  ==========  ===============  ==========
``resnext29_8x64d``     8     64   64          256, 512, 1024   34.4 M
``resnext29_16x64d``    16    64   64          256, 512, 1024   68.2 M
``resnext29_tiny``      2     4    8           32, 64, 128      0.06 M
======================  ====  ===  ==========  ===============  ==========

(10 classes.) The first two are the paper's networks. ``resnext29_tiny`` keeps
their structure at an eighth of the width and a cardinality of 2, so that an
epoch of the digits data takes seconds on a CPU (about 10 s on two busy cores;
``python -m aru_models.train``, 5 such epochs, reaches 92% validation
accuracy); it is meant for quick runs and tests.

The blocks are those of the ImageNet models, so every block has an ``impl``;
with ``"fused"`` the stem (its conv, batch norm and ReLU) and every block run
through the fused kernels, and the classifier as a torch operator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .resnet import Bottleneck, conv3x3, make_layer, resolve_impl

__all__ = ["CifarResNeXt", "resnext29_8x64d", "resnext29_16x64d", "resnext29_tiny"]


class CifarResNeXt(nn.Module):
    """ResNeXt-29 for 32x32 inputs (any size that survives two halvings works).

    Args:
        cardinality: groups of every grouped 3x3 (C).
        bottleneck_width: channels per group in stage 1 (d); 2d in stage 2, 4d in stage 3.
        planes: planes of the three stages; blocks output ``4 * planes`` channels.
        stem_width: output channels of the 3x3 stem convolution.
        depth_per_stage: blocks in each stage (3 for ResNeXt-29).
        num_classes: outputs of the classifier.
        impl: the blocks' forward, ``"eager"`` or ``"fused"``; None picks
            :func:`aru_kernels.runtime.default_impl`.

    Input ``(N, 3, H, W)`` images, output ``(N, num_classes)`` logits.

    Raises:
        ValueError: an unknown ``impl``, or a ``bottleneck_width`` that the stage-1
            ``planes`` cannot express (``64 * bottleneck_width`` must be a multiple
            of ``planes[0]``).
    """

    def __init__(
        self,
        cardinality: int,
        bottleneck_width: int,
        planes: Sequence[int] = (64, 128, 256),
        stem_width: int = 64,
        depth_per_stage: int = 3,
        num_classes: int = 10,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.impl = resolve_impl(impl)
        if (64 * bottleneck_width) % planes[0]:
            raise ValueError(f"bottleneck_width={bottleneck_width} is not expressible with stage-1 planes={planes[0]}: "
                             "64 * bottleneck_width must be a multiple of it")
        # Bottleneck's width is int(planes * base_width / 64) * groups: this base_width
        # gives d channels per group at stage 1, doubling with the planes after it.
        base_width = 64 * bottleneck_width // planes[0]
        self.conv1 = conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = stem_width
        stages = []
        for i, p in enumerate(planes):
            stages.append(make_layer(Bottleneck, inplanes, p, depth_per_stage, stride=1 if i == 0 else 2,
                                     groups=cardinality, base_width=base_width, impl=self.impl))
            inplanes = p * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)

        # torchvision's ResNet initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def set_impl(self, impl: str | None) -> CifarResNeXt:
        """Run the model and every block with ``impl`` (``"eager"`` or ``"fused"``;
        None picks the default) from now on; returns the model.

        Raises:
            ValueError: for any other value (the model is left as it was).
        """
        impl = resolve_impl(impl)
        for m in self.modules():
            if m is self or isinstance(m, Bottleneck):
                m.impl = impl
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "fused":
            from . import fused

            return fused.resnet_forward(self, x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnext29_8x64d(*, num_classes: int = 10, impl: str | None = None) -> CifarResNeXt:
    """ResNeXt-29 8x64d (Xie et al. 2017, table 7): cardinality 8, 64 channels
    per group in stage 1, block outputs 256/512/1024; 34.4 M parameters."""
    return CifarResNeXt(8, 64, num_classes=num_classes, impl=impl)


def resnext29_16x64d(*, num_classes: int = 10, impl: str | None = None) -> CifarResNeXt:
    """ResNeXt-29 16x64d (Xie et al. 2017, table 7): cardinality 16, 64 channels
    per group in stage 1, block outputs 256/512/1024; 68.2 M parameters."""
    return CifarResNeXt(16, 64, num_classes=num_classes, impl=impl)


def resnext29_tiny(*, num_classes: int = 10, impl: str | None = None) -> CifarResNeXt:
    """A small ResNeXt-29 for quick CPU runs and tests: cardinality 2, 4 channels
    per group in stage 1, an 8-channel stem and block outputs 32/64/128 (an
    eighth of the paper's); 0.06 M parameters."""
    return CifarResNeXt(2, 4, planes=(8, 16, 32), stem_width=8, num_classes=num_classes, impl=impl)
