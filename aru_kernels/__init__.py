"""Triton kernels for ResNeXt's aggregated residual transformation unit.

Floors, each importing only the ones below it:

* kernels, pure math on pointers: ``conv`` (implicit-GEMM convolution, its
  input and weight gradients, batch norm's statistics term added as dL/dy
  is loaded), ``batchnorm`` (finalize, ``bn_add_relu`` and its backward),
  ``relu_bits`` (a ReLU's gradient mask as bits), ``space_to_depth`` (the
  stem as a stride-1 convolution of 2x2 pixel blocks, with its operator),
  ``maxpool`` (the stem's batch norm, ReLU and max-pool in one pass, with its
  operators);
* launch plans: ``plans`` (block sizes and grids as rules of the shape, or
  the tuned tiles of the GPU at hand), ``launch`` (every kernel launch, which
  the static cost model ``aot`` can record instead of run);
* operators: ``conv_ops`` and ``bn_ops`` (launchers, ``torch.library``
  custom ops and their autograd), ``conv_bn_ops`` (the training conv and its
  batch statistics as one autograd node), ``pointwise_ops`` (a 1x1 conv's two
  gradients in one launch), ``block_ops`` (training-mode
  residual blocks as one autograd node), ``sync_bn`` (statistics across
  processes), with ``checks`` for their inputs;
* the public functions: ``functional``, re-exported here;
* ``reference``: the pure-PyTorch oracle the tests compare against.
"""

from . import reference
from .functional import (ConvBN, bn_add_relu, bn_relu_maxpool, conv_bn_act, conv_bn_train, recompute_normalized_inputs,
                         residual_block_train, residual_blocks_train, stem_train)
from .runtime import default_impl, fused_available, interpreting

__all__ = [
    "conv_bn_act",
    "conv_bn_train",
    "bn_add_relu",
    "bn_relu_maxpool",
    "residual_block_train",
    "residual_blocks_train",
    "recompute_normalized_inputs",
    "stem_train",
    "ConvBN",
    "reference",
    "default_impl",
    "fused_available",
    "interpreting",
]
