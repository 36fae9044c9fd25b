"""Forward passes of the ResNet models through the fused Triton kernels.

:class:`aru_models.resnet.ResNet` and its blocks call into this module when
their ``impl`` is ``"fused"``; the eager path never imports it.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["resnet_forward", "block_forward"]


def resnet_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Logits of ``model`` (an :class:`aru_models.resnet.ResNet`) for images ``x``."""
    raise NotImplementedError("the fused path of ResNet is not implemented yet; use impl='eager'")


def block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """Output of a residual ``block`` (BasicBlock or Bottleneck) for activations ``x``."""
    raise NotImplementedError("the fused path of the residual blocks is not implemented yet; use impl='eager'")
