"""Max-pool windows seen from their input: the gradient an input pixel takes
from the windows whose maximum it is.

``bn_relu_maxpool_kernel`` (:mod:`aru_kernels.maxpool`) keeps, per pooled
element, an int8 code: where in its window the maximum lies, ``-1`` where the
ReLU before the pool passes no gradient. The backward gathers from those codes
instead of scattering: each input pixel visits the few windows that cover it,
in PyTorch's order (rows, then columns, ascending), and sums the gradients of
those whose code names it. The max-pool's backward kernel writes that sum; the
weight gradient of the convolution before a ResNet stem's pool
(``conv_wgrad_kernel``'s ``POOL_GRAD``) computes it as it loads its dL/dy tile,
so the full-resolution gradient is never written.

Windows are square (``K`` wide, stride ``STRIDE``, padding ``PAD``), no
dilation, floor mode: ``nn.MaxPool2d``'s defaults.
"""

import triton
import triton.language as tl


@triton.jit
def max_pool_grad(dout_ptr, code_ptr, n, h, w, row_ok, rc, c_ok, P, Q, C,
                  K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_C]``: for input pixels ``(n, h, w)`` (``row_ok``) and
    channels ``rc`` (``c_ok``) of a max-pool with a ``[N, P, Q, C]`` output, the sum of
    ``dout`` over the windows whose maximum each is (``code`` as the forward wrote it)."""
    WIN: tl.constexpr = (K + STRIDE - 1) // STRIDE  # windows covering a pixel, per axis
    g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(WIN):
        oh = (h + PAD) // STRIDE - (WIN - 1) + i
        dh = h + PAD - oh * STRIDE
        for j in tl.static_range(WIN):
            ow = (w + PAD) // STRIDE - (WIN - 1) + j
            dw = w + PAD - ow * STRIDE
            win = row_ok & (oh >= 0) & (oh < P) & (dh < K) & (ow >= 0) & (ow < Q) & (dw < K)
            ok = win[:, None] & c_ok[None, :]  # whole rows, so that the loads stay vectors
            off = ((n * P + oh) * Q + ow).to(tl.int64)[:, None] * C + rc[None, :]
            mine = tl.load(code_ptr + off, mask=ok, other=-1).to(tl.int32) == (dh * K + dw)[:, None]
            g += tl.where(mine, tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32), 0.0)
    return g
