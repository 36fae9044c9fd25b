"""Triton kernels for ResNeXt's aggregated residual transformation unit.

Floors: ``conv`` and ``batchnorm`` hold the kernels (pure math on pointers),
``ops`` the launchers and the ``torch.library`` operators, ``reference`` the
pure-PyTorch oracle.
"""

from . import reference
from .ops import bn_add_relu, conv_bn_act, conv_bn_train, fold_bn
from .runtime import default_impl, fused_available, interpreting

__all__ = [
    "conv_bn_act",
    "conv_bn_train",
    "bn_add_relu",
    "fold_bn",
    "reference",
    "default_impl",
    "fused_available",
    "interpreting",
]
