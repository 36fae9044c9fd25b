"""Max-pool windows seen from their input: the gradient an input pixel takes
from the windows whose maximum it is.

``bn_relu_maxpool_kernel`` (:mod:`aru_kernels.maxpool`) keeps, per pooled
element, an int8 code: where in its window the maximum lies, ``-1`` where the
ReLU before the pool passes no gradient. The backward gathers from those codes
instead of scattering: each input pixel visits the windows that cover it, in
PyTorch's order (rows, then columns, ascending), and sums the gradients of
those whose code names it. The max-pool's backward kernel writes that sum; the
weight gradient of the convolution before a ResNet stem's pool
(``conv_wgrad_kernel``'s ``POOL_GRAD``) computes it as it loads its dL/dy tile,
so the full-resolution gradient is never written.

:func:`max_pool_grad_class` takes the input pixels a class at a time: those
whose ``(h + PAD) % STRIDE`` and ``(w + PAD) % STRIDE`` are the same lie at the
same positions of their windows, so each visits only the windows that cover it
(for a ResNet stem's 3x3 windows of stride 2: 1, 2, 2 or 4 a pixel, 9 for 4
pixels, where testing every window that could cover a pixel takes 16).

Windows are square (``K`` wide, stride ``STRIDE``, padding ``PAD``), no
dilation, floor mode: ``nn.MaxPool2d``'s defaults.
"""

import triton
import triton.language as tl


@triton.jit
def max_pool_grad_class(dout_ptr, code_ptr, n, j, l, row_ok, rc, c_ok, P, Q, C, RH, RW,
                        K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_C]``: for input pixels ``(n, j * STRIDE + RH - PAD,
    l * STRIDE + RW - PAD)`` (``row_ok``) and channels ``rc`` (``c_ok``) of a max-pool with
    a ``[N, P, Q, C]`` output, the sum of ``dout`` over the windows whose maximum each is
    (``code`` as the forward wrote it): the windows ``(j - i, l - i2)`` whose rows
    ``RH + i * STRIDE`` and columns ``RW + i2 * STRIDE`` lie inside ``K``, summed in
    PyTorch's order (rows, then columns, ascending). The class ``(RH, RW)`` is a
    constant when compiled: the windows that do not cover it are left out, and the
    first that does sets the sum rather than adding to zeros (the ResNet stem's
    gradient gathers, sm_90: 8 instructions fewer per 8 elements)."""
    WIN: tl.constexpr = (K + STRIDE - 1) // STRIDE
    g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    first = True
    for a in tl.static_range(WIN):
        i = WIN - 1 - a
        if RH + i * STRIDE < K:
            oh = j - i
            for b in tl.static_range(WIN):
                i2 = WIN - 1 - b
                if RW + i2 * STRIDE < K:
                    ow = l - i2
                    win = row_ok & (oh >= 0) & (oh < P) & (ow >= 0) & (ow < Q)
                    ok = win[:, None] & c_ok[None, :]
                    off = ((n * P + oh) * Q + ow).to(tl.int64)[:, None] * C + rc[None, :]
                    here = (RH + i * STRIDE) * K + RW + i2 * STRIDE
                    mine = tl.load(code_ptr + off, mask=ok, other=-1).to(tl.int32) == here
                    v = tl.where(mine, tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32), 0.0)
                    if first:
                        g = v
                    else:
                        g += v
                    first = False
    return g
