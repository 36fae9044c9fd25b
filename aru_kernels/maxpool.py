"""A ResNet stem's end, ``max_pool(relu(scale*(y - mean) + shift))``, in one pass.

In training, the stem's batch norm and ReLU write a full-resolution tensor that
the max-pool reads back, and ``max_pool2d_with_indices`` keeps an int64 index
per pooled element; its backward scatters the gradient into a full-resolution
buffer, which the ReLU's and batch norm's backward read again. Here:

* ``bn_relu_maxpool_kernel`` reads ``y`` once and writes the pooled output and
  one int8 per pooled element: the position of the window's maximum (the first
  one, as PyTorch picks it; a NaN wins, the last one as in PyTorch), or -1
  where the ReLU passes no gradient (the maximum is ``<= 0``). Its programs walk
  down the pooled rows, so an input row two windows share is normalized once;
* ``bn_relu_maxpool_backward_kernel`` gathers, for each input pixel, the
  gradient of the windows whose maximum it is, a class of pixels (the same
  place in their windows) at a time (:mod:`aru_kernels.pool_window`),
  and writes dL/dy with the per-channel sums that batch norm's scale, shift
  and mean gradients need (per tile, added in a fixed order);
* ``bn_relu_maxpool_sums_kernel`` takes those sums alone, for a stem whose conv
  weight gradient gathers the same gradient, from the pooled elements' side.

Windows are square (``K`` wide, stride ``STRIDE``, padding ``PAD`` of
-infinity), no dilation, floor mode: ``nn.MaxPool2d``'s defaults.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .batchnorm import _centred, _vec
from .checks import first_derivatives_only
from .bn_ops import rows
from .conv import _relu
from .launch import launch
from .plans import elementwise_blocks, max_pool_blocks
from .pool_window import max_pool_grad_class

__all__ = ["pool_size", "stride_blocks", "window_fits", "bn_relu_maxpool", "bn_relu_maxpool_backward"]


@triton.jit
def _row_max(y_ptr, n, h, q, q_ok, rc, c_ok, mean, scale, shift, H, W, C, out_dtype: tl.constexpr,
             K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, NAN_ABOVE: tl.constexpr,
             BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """Input row ``h``'s share of the windows of pooled columns ``q``: the maximum
    of ``relu(scale*(y - mean) + shift)`` over each window's ``K`` columns, compared
    as stored (rounded to ``out_dtype``), and its column ``dw`` in the window.

    16-bit (``NAN_ABOVE``): one int32 key, the stored bits (non-negative after the
    ReLU, so ordered as integers; NaN above +inf) over 7 bits, ``127 - dw`` so that
    the first of equal values wins, ``dw`` for NaN so that the last does; 0 for an
    element outside the image, below every element's key. Returned twice.
    fp32: ``(value, dw)``, ``-inf`` where the row has no element inside."""
    h_ok = (h >= 0) & (h < H)
    base = (n * H + h) * W
    best = tl.full((BLOCK_Q, BLOCK_C), float("-inf"), tl.float32)
    pos = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.int32)
    key = tl.full((BLOCK_Q, BLOCK_C), -1, tl.int32)
    for dw in tl.static_range(K):
        w = q * STRIDE - PAD + dw
        inside = q_ok & h_ok & (w >= 0) & (w < W)
        ok = inside[:, None] & c_ok[None, :]
        v = tl.load(y_ptr + (base + w).to(tl.int64)[:, None] * C + rc[None, :], mask=ok, other=0.0)
        z = _relu((v.to(tl.float32) - mean) * scale + shift).to(out_dtype)
        if NAN_ABOVE:
            bits = z.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF  # (a -0 as +0)
            low = tl.where(bits > NAN_ABOVE, dw, 127 - dw)
            # outside the image a key of 0: the row's mask ANDed in, not a select per element
            key = tl.maximum(key, ((bits << 7) | low) & tl.where(inside, -1, 0)[:, None])
        else:
            z = z.to(tl.float32)
            take = ok & ((z > best) | (z != z))  # the first maximum; a NaN replaces whatever came before
            best = tl.where(take, z, best)
            pos = tl.where(take, dw, pos)
    if NAN_ABOVE:
        return key, key
    else:
        return best, pos


@triton.jit
def bn_relu_maxpool_kernel(
    y_ptr,  # [N, H, W, C] NHWC
    mean_ptr, scale_ptr, shift_ptr,  # [C] fp32
    out_ptr,  # [N, P, Q, C] out
    code_ptr,  # [N, P, Q, C] int8 out: the maximum's position in its window, -1 where no gradient passes
    H, W, P, Q, C,
    ROW_BLOCKS, COL_BLOCKS,  # blocks of ROWS pooled rows, of BLOCK_Q pooled columns
    K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
    NAN_ABOVE: tl.constexpr = 0,  # 16-bit outputs: the bits of +inf; their NaN lie above (0: fp32)
):
    """A program walks ``ROWS`` pooled rows of one image down a strip of ``BLOCK_Q``
    pooled columns. Each window is the maximum of its ``K`` input rows' shares
    (:func:`_row_max`), taken in order, so ties and NaN resolve as PyTorch's max-pool
    over the stored ReLU output does (the first maximum; the last NaN). Where windows
    overlap by one row (``K == STRIDE + 1``, a ResNet stem's 3x3 windows of stride 2)
    a window's last row is the next one's first, normalized once: 2 rows of 3 for
    each pooled row instead of 3.

    A row's 16-bit key counts the column ``dw``; in the window it counts
    ``dh * K + dw``, ``127 - (dh * K + dw)`` for a number: the row's key less
    ``dh * K``, or more for a NaN (``K <= 11`` keeps it within 7 bits)."""
    pid = tl.program_id(0)
    col_b = pid % COL_BLOCKS
    t = pid // COL_BLOCKS
    p0 = (t % ROW_BLOCKS) * ROWS
    n = t // ROW_BLOCKS
    q = col_b * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mean, scale, shift = _vec(mean_ptr, rc, c_ok), _vec(scale_ptr, rc, c_ok), _vec(shift_ptr, rc, c_ok)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    CARRY: tl.constexpr = K == STRIDE + 1
    if CARRY:  # the first window's first row; then each window's last
        carry_a, carry_b = _row_max(y_ptr, n, p0 * STRIDE - PAD, q, q_ok, rc, c_ok, mean, scale, shift, H, W, C,
                                    dtype, K, STRIDE, PAD, NAN_ABOVE, BLOCK_Q, BLOCK_C)
    off = ((n * P + p0) * Q + q).to(tl.int64)[:, None] * C + rc[None, :]
    for i in range(ROWS):
        p = p0 + i
        for dh in tl.static_range(K):
            if CARRY and dh == 0:
                ra, rb = carry_a, carry_b
            else:
                ra, rb = _row_max(y_ptr, n, p * STRIDE - PAD + dh, q, q_ok, rc, c_ok, mean, scale, shift, H, W,
                                  C, dtype, K, STRIDE, PAD, NAN_ABOVE, BLOCK_Q, BLOCK_C)
            if CARRY and dh == K - 1:
                carry_a, carry_b = ra, rb
            if NAN_ABOVE:
                if dh == 0:
                    key = ra
                else:  # (a row wholly outside the image, key 0, falls below every other)
                    key = tl.maximum(key, ra + tl.where((ra >> 7) > NAN_ABOVE, dh * K, -dh * K))
            else:
                if dh == 0:
                    best = ra
                    pos = rb
                else:
                    take = (ra > best) | (ra != ra)
                    best = tl.where(take, ra, best)
                    pos = tl.where(take, dh * K + rb, pos)
        ok = (q_ok & (p < P))[:, None] & c_ok[None, :]
        if NAN_ABOVE:
            bits = key >> 7
            low = key & 127
            pos = tl.where(bits > NAN_ABOVE, low, 127 - low)
            tl.store(out_ptr + off, bits.to(tl.int16).to(dtype, bitcast=True), mask=ok)
            tl.store(code_ptr + off, tl.where(bits == 0, -1, pos).to(tl.int8), mask=ok)
        else:
            tl.store(out_ptr + off, best.to(dtype), mask=ok)
            tl.store(code_ptr + off, tl.where(best <= 0, -1, pos).to(tl.int8), mask=ok)
        off += Q * C


@triton.jit
def bn_relu_maxpool_backward_kernel(
    dout_ptr,  # [N, P, Q, C] dL/d(pooled output)
    code_ptr,  # [N, P, Q, C] int8, as bn_relu_maxpool_kernel wrote it
    y_ptr,  # [N, H, W, C]
    mean_ptr, scale_ptr,  # [C] fp32
    dy_ptr,  # [N, H, W, C] out: dL/dy = scale * g, g the gradient behind the ReLU
    part_ptr,  # [2, T, C] fp32 out: per-tile sums of g and g*(y - mean)
    M,  # N * HJ * WL blocks of STRIDE x STRIDE input pixels
    H, W, P, Q, C, T, HJ, WL,
    K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A program takes BLOCK_M blocks ``(n, j, l)`` of STRIDE x STRIDE input pixels, one
    class of pixels at a time (:func:`aru_kernels.pool_window.max_pool_grad_class`):
    ``(j * STRIDE + rh - PAD, l * STRIDE + rw - PAD)`` for each ``(rh, rw)``."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    l = rm % WL
    t = rm // WL
    j = t % HJ
    n = t // HJ
    s_g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)  # summed over the rows once, at the end
    s_gy = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for rh in tl.static_range(STRIDE):
        h = j * STRIDE + rh - PAD
        for rw in tl.static_range(STRIDE):
            w = l * STRIDE + rw - PAD
            row_ok = (rm < M) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            g = max_pool_grad_class(dout_ptr, code_ptr, n, j, l, row_ok, rc, c_ok, P, Q, C, rh, rw, K, STRIDE,
                                    BLOCK_M, BLOCK_C)
            ok = row_ok[:, None] & c_ok[None, :]
            off = ((n * H + h) * W + w).to(tl.int64)[:, None] * C + rc[None, :]
            tl.store(dy_ptr + off, (g * _vec(scale_ptr, rc, c_ok)).to(dy_ptr.dtype.element_ty), mask=ok)
            s_g += g
            s_gy += g * _centred(y_ptr, off, ok, mean_ptr, rc, c_ok)
    tl.store(part_ptr + pid_m * C + rc, tl.sum(s_g, axis=0), mask=c_ok)
    tl.store(part_ptr + (T + pid_m) * C + rc, tl.sum(s_gy, axis=0), mask=c_ok)


@triton.jit
def bn_relu_maxpool_sums_kernel(
    dout_ptr,  # [N, P, Q, C] dL/d(pooled output)
    code_ptr,  # [N, P, Q, C] int8, as bn_relu_maxpool_kernel wrote it
    y_ptr,  # [N, H, W, C]
    mean_ptr,  # [C] fp32
    part_ptr,  # [2, T, C] fp32 out: per-tile sums of g and g*(y - mean)
    M,  # N * P * Q pooled pixels
    H, W, P, Q, C, T,
    K: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The sums of :func:`bn_relu_maxpool_backward` without dL/dy, from the windows'
    side: g, the gradient behind the ReLU, is at each input pixel the sum of ``dout``
    over the windows whose maximum it is, so the sum of g over the pixels is that of
    ``dout`` over the windows with a code, and the sum of ``g * (y - mean)`` that of
    ``dout * (y - mean)`` at each window's maximum. One pass over the pooled elements
    (a quarter of the pixels of a ResNet stem), reading ``y`` only where the code
    points: no gather of windows per pixel."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    q = rm % Q
    t = rm // Q
    p = t % P
    n = t // P
    ok = (rm < M)[:, None] & c_ok[None, :]
    off = rm.to(tl.int64)[:, None] * C + rc[None, :]
    code = tl.load(code_ptr + off, mask=ok, other=-1).to(tl.int32)
    live = code >= 0  # (-1: masked, or no gradient behind the ReLU)
    g = tl.where(live, tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32), 0.0)
    dh = code // K
    h = (p * STRIDE - PAD)[:, None] + dh
    w = (q * STRIDE - PAD)[:, None] + (code - dh * K)
    at = ((n[:, None] * H + h) * W + w).to(tl.int64) * C + rc[None, :]
    centred = tl.load(y_ptr + at, mask=live, other=0.0).to(tl.float32) - _vec(mean_ptr, rc, c_ok)
    tl.store(part_ptr + tl.program_id(0) * C + rc, tl.sum(g, axis=0), mask=c_ok)
    tl.store(part_ptr + (T + tl.program_id(0)) * C + rc, tl.sum(g * centred, axis=0), mask=c_ok)


# The bits of +inf of the 16-bit dtypes, whose pooled maximum is taken as an integer key.
_INF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def pool_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Pooled length of ``size`` (floor mode, no dilation)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def stride_blocks(size: int, stride: int, padding: int) -> int:
    """Blocks of ``stride`` pixels that hold the ``size`` pixels of an axis, block ``j``
    pixels ``j * stride - padding + r`` (``r`` the class, :mod:`aru_kernels.pool_window`)."""
    return (size - 1 + padding) // stride + 1


def window_fits(kernel_size: int, stride: int, padding: int) -> bool:
    """Whether the kernels take this max-pool window (square, no dilation, floor mode)."""
    return 1 <= kernel_size <= 11 and stride >= 1 and 0 <= padding <= kernel_size // 2


def _check_window(kernel_size: int, stride: int, padding: int) -> None:
    if not window_fits(kernel_size, stride, padding):
        raise ValueError("bn_relu_maxpool: needs 1 <= kernel_size <= 11, stride >= 1 and "
                         f"0 <= padding <= kernel_size // 2; got kernel_size={kernel_size}, stride={stride}, "
                         f"padding={padding}")


def _pooled(y: Tensor, kernel_size: int, stride: int, padding: int) -> tuple[Tensor, Tensor]:
    _check_window(kernel_size, stride, padding)
    n, c, h, w = y.shape
    p, q = pool_size(h, kernel_size, stride, padding), pool_size(w, kernel_size, stride, padding)
    if p < 1 or q < 1:
        raise ValueError(f"bn_relu_maxpool: a {h}x{w} input is smaller than the {kernel_size}x{kernel_size} "
                         f"window with padding {padding}")
    out = torch.empty((n, c, p, q), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    return out, torch.empty((n, p, q, c), dtype=torch.int8, device=y.device)


@torch.library.custom_op("aru::bn_relu_maxpool", mutates_args=())
def bn_relu_maxpool(y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, kernel_size: int, stride: int,
                    padding: int) -> tuple[Tensor, Tensor]:
    """``(out, code)``: ``out = max_pool2d(relu(scale*(y - mean) + shift), kernel_size, stride,
    padding)`` (channels_last, ``y``'s dtype; fp32 ``[C]`` vectors), and ``code`` ``[N, P, Q, C]``
    int8, where in its window each maximum lies (``-1`` where the ReLU passes no gradient),
    all the backward reads of the output side."""
    out, code = _pooled(y, kernel_size, stride, padding)
    c, h, w = y.shape[1:]
    n, p, q = out.shape[0], out.shape[2], out.shape[3]
    rows_, block_q, block_c, warps = max_pool_blocks(p, q, c)
    row_blocks, col_blocks = triton.cdiv(p, rows_), triton.cdiv(q, block_q)
    if out.numel():
        launch(bn_relu_maxpool_kernel, (n * row_blocks * col_blocks, triton.cdiv(c, block_c)),
               y, mean, scale, shift, out, code, h, w, p, q, c, row_blocks, col_blocks,
               K=kernel_size, STRIDE=stride, PAD=padding, ROWS=rows_, BLOCK_Q=block_q, BLOCK_C=block_c,
               NAN_ABOVE=_INF_BITS.get(y.dtype, 0), role="bn_relu_maxpool", num_warps=warps,
               meta={"loop_trips": [rows_]})
    return out, code


@bn_relu_maxpool.register_fake
def _bn_relu_maxpool_fake(y, mean, scale, shift, kernel_size, stride, padding):
    return _pooled(y, kernel_size, stride, padding)


@torch.library.custom_op("aru::bn_relu_maxpool_backward", mutates_args=())
def bn_relu_maxpool_backward(dout: Tensor, code: Tensor, y: Tensor, mean: Tensor, scale: Tensor,
                             kernel_size: int, stride: int, padding: int,
                             write_dy: bool = True) -> tuple[Tensor, Tensor]:
    """``(dy, sums)``: dL/dy of :func:`bn_relu_maxpool` from dL/dout (channels_last) and its
    ``code``, and the per-channel sums ``[2, C]`` of g and g*(y - mean), g the gradient
    behind the ReLU (dL/dy = scale*g). Without ``write_dy`` the sums alone (``dy`` empty)."""
    n, c, h, w = y.shape
    if not write_dy:  # from the windows' side (bn_relu_maxpool_sums_kernel)
        m = rows(dout)
        block_m, block_c = elementwise_blocks(c)
        block_m = max(16, block_m // 2)  # (sm_90, a ResNet stem: 96 registers, no spill)
        tiles = triton.cdiv(m, block_m)
        part = torch.zeros((2, tiles, c), dtype=torch.float32, device=y.device)
        if m and c:
            launch(bn_relu_maxpool_sums_kernel, (tiles, triton.cdiv(c, block_c)),
                   dout, code, y, mean, part, m, h, w, dout.shape[2], dout.shape[3], c, tiles,
                   K=kernel_size, STRIDE=stride, PAD=padding, BLOCK_M=block_m, BLOCK_C=block_c,
                   role="bn_relu_maxpool_bwd")
        return y.new_empty(0), part.sum(1)  # fixed-order reduction over tiles
    hj, wl = stride_blocks(h, stride, padding), stride_blocks(w, stride, padding)
    m = n * hj * wl if rows(y) else 0
    block_m, block_c = elementwise_blocks(c)
    # two fp32 tiles of sums held over the classes: a quarter of the rows (a ResNet stem's,
    # sm_90: triton 3.6 spills 96 bytes at half; issue floor 174 us, 3.8 182)
    block_m = max(16, block_m // 4)
    tiles = triton.cdiv(m, block_m)
    dy = _bn_relu_maxpool_backward_fake(dout, code, y, mean, scale, kernel_size, stride, padding, write_dy)[0]
    part = torch.zeros((2, tiles, c), dtype=torch.float32, device=y.device)
    if m and c:
        launch(bn_relu_maxpool_backward_kernel, (tiles, triton.cdiv(c, block_c)),
               dout, code, y, mean, scale, dy, part, m, h, w, dout.shape[2], dout.shape[3], c, tiles, hj, wl,
               K=kernel_size, STRIDE=stride, PAD=padding, BLOCK_M=block_m, BLOCK_C=block_c,
               role="bn_relu_maxpool_bwd")
    return dy, part.sum(1)  # fixed-order reduction over tiles


@bn_relu_maxpool_backward.register_fake
def _bn_relu_maxpool_backward_fake(dout, code, y, mean, scale, kernel_size, stride, padding, write_dy=True):
    return (torch.empty_like(y, memory_format=torch.channels_last) if write_dy else y.new_empty(0),
            torch.empty((2, y.shape[1]), dtype=torch.float32, device=y.device))


def _setup(ctx, inputs, output):
    y, mean, scale, _, kernel_size, stride, padding = inputs
    ctx.window = (kernel_size, stride, padding)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient written for the codes
    ctx.save_for_backward(y, mean, scale, output[1])


def _backward(ctx, dout, _d_code):
    if dout is None:  # the pooled output took no part in the loss
        return None, None, None, None, None, None, None
    y, mean, scale, code = ctx.saved_tensors
    dy, sums = torch.ops.aru.bn_relu_maxpool_backward(dout.to(y.dtype).contiguous(memory_format=torch.channels_last),
                                                      code, y, mean, scale, *ctx.window)
    d_shift = sums[0]
    return dy, -scale * d_shift, sums[1], d_shift, None, None, None


bn_relu_maxpool.register_autograd(_backward, setup_context=_setup)


first_derivatives_only(bn_relu_maxpool_backward)  # (gradients: no derivative of their own)
