"""A ReLU's gradient mask kept as bits: one per element, ``[M, ceil(C/8)]`` uint8
rows (NHWC pixel order), bit ``b`` of byte ``j`` for channel ``8j + b``.

A residual block's backward needs only where its final ReLU let the gradient
through; one bit per element is 1/16 of reading the bf16 output back. The
block end's forward (:func:`aru_kernels.batchnorm.bn_add_relu_kernel`) writes
the bits, and its backward (``bn_add_relu_backward_kernel``, or the next
block's input-gradient epilogue in :func:`aru_kernels.conv.conv_bn_act_kernel`)
reads them. Tiles cover whole bytes: ``BLOCK_C`` is a multiple of 8 and each
tile's first channel too.
"""

import triton
import triton.language as tl


@triton.jit
def _mask_bytes(rows, row_ok, byte0, C, BLOCK_C: tl.constexpr):
    """Offsets and validity of the bytes of a tile's mask: ``rows`` its pixels,
    ``byte0`` the byte of its first channel."""
    rb = byte0 + tl.arange(0, BLOCK_C // 8)
    row_bytes = (C + 7) // 8
    return rows.to(tl.int64)[:, None] * row_bytes + rb[None, :], row_ok[:, None] & (rb < row_bytes)[None, :]


@triton.jit
def store_relu_mask(mask_ptr, stored, ok, rows, row_ok, byte0, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Write, for a [BLOCK_M, BLOCK_C] tile of a ReLU's output as stored, where
    torch.relu's gradient passes: not ``<= 0`` (NaN passes); channels outside
    ``ok`` write 0 bits."""
    keep = tl.where(ok & ~(stored.to(tl.float32) <= 0), 1, 0)
    byte = tl.sum(tl.reshape(keep, (BLOCK_M, BLOCK_C // 8, 8)) << tl.arange(0, 8)[None, None, :], axis=2)
    off, b_ok = _mask_bytes(rows, row_ok, byte0, C, BLOCK_C)
    tl.store(mask_ptr + off, byte.to(tl.uint8), mask=b_ok)


@triton.jit
def load_relu_mask(mask_ptr, rows, row_ok, byte0, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The [BLOCK_M, BLOCK_C] tile of the mask as booleans (False outside the tensor)."""
    off, b_ok = _mask_bytes(rows, row_ok, byte0, C, BLOCK_C)
    byte = tl.load(mask_ptr + off, mask=b_ok, other=0).to(tl.int32)
    return tl.reshape((byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1, (BLOCK_M, BLOCK_C)) != 0
