"""A strided convolution over few input channels, rewritten as a stride-1 one over
2x2 pixel blocks (space-to-depth): the ResNet stem.

The stem's 7x7 stride-2 convolution reads 3 channels a pixel: 6-byte rows, one
scalar gather per (tap, channel), K = 147 padded to the tensor-core width. With
``X'[n, i, j, (a, b, c)] = x_pad[n, c, 2i + a, 2j + b]`` (channels padded to 16)
and ``W'[o, (a, b, c), u, v] = W[o, c, 2u + a, 2v + b]`` (zero past the kernel),
the same output is a 4x4 stride-1 convolution of X' by W': 32-byte rows, one
vector load a row and tap. The same products are summed, in another order.

``space_to_depth_kernel`` builds X' in one pass; the weight's rewrite is a few
PyTorch ops on a tiny tensor, differentiable, so autograd maps the rewritten
weight's gradient back to the user's weight. :func:`aru_kernels.conv_bn_act`
runs such convolutions this way (inference), and so does the training stem
(:mod:`aru_kernels.stem_ops`), forward and weight gradient, the latter over the
X' its forward kept (:func:`weight_grad_back` maps dL/dW' back: each weight's
gradient is one entry of it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch

__all__ = ["applies", "rewrite", "rewrite_weight", "space_to_depth", "weight_grad_back"]

CHANNELS = 16  # X' channels: 4 * C_in, padded to the tensor-core width


@triton.jit
def space_to_depth_kernel(
    x_ptr,  # [N, H, W, C] NHWC
    out_ptr,  # [N, HS, WS, CHANNELS] NHWC
    M,  # N * HS * WS output pixels
    H, W, HS, WS, PAD,
    C: tl.constexpr, CHANNELS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ch = tl.arange(0, CHANNELS)
    j = rm % WS
    t = rm // WS
    i = t % HS
    n = t // HS
    blk = ch // C  # (a, b) = (blk // 2, blk % 2)
    c = ch - blk * C
    r = (2 * i)[:, None] + (blk // 2)[None, :] - PAD
    s = (2 * j)[:, None] + (blk % 2)[None, :] - PAD
    ok = (rm < M)[:, None] & (blk < 4)[None, :] & (r >= 0) & (r < H) & (s >= 0) & (s < W)
    v = tl.load(x_ptr + ((n.to(tl.int64)[:, None] * H + r) * W + s) * C + c[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * CHANNELS + ch[None, :], v, mask=(rm < M)[:, None])


def applies(x: Tensor, weight: Tensor, stride: int, dilation: int, groups: int, prologue: bool) -> bool:
    """Whether a convolution runs rewritten: stride 2, no dilation, one group, no
    prologue, at most 4 input channels, a square kernel of 3 or more, an input
    that needs no gradient."""
    kh, kw = weight.shape[2:]
    return (stride == 2 and dilation == 1 and groups == 1 and not prologue and 0 < x.shape[1] <= CHANNELS // 4
            and kh == kw >= 3 and not x.requires_grad)


@torch.library.custom_op("aru::space_to_depth", mutates_args=())
def space_to_depth(x: Tensor, padding: int, hs: int, ws: int) -> Tensor:
    """X' ``[N, CHANNELS, hs, ws]`` (channels_last) of ``x`` ``[N, C, H, W]`` padded by
    ``padding``: ``X'[n, (a, b, c), i, j] = x_pad[n, c, 2i + a, 2j + b]``, zero past
    ``x`` and in channels ``4C`` and up. Not differentiable (for inputs that need
    no gradient)."""
    n, c, h, w = x.shape
    out = torch.empty((n, hs, ws, CHANNELS), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    m = n * hs * ws
    block_m = 128
    if m:
        launch(space_to_depth_kernel, (triton.cdiv(m, block_m),), x.contiguous(memory_format=torch.channels_last),
               out, m, h, w, hs, ws, padding, C=c, CHANNELS=CHANNELS, BLOCK_M=block_m, role="space_to_depth")
    return out


@space_to_depth.register_fake
def _space_to_depth_fake(x, padding, hs, ws):
    return torch.empty((x.shape[0], hs, ws, CHANNELS), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)


def rewrite(x: Tensor, weight: Tensor, padding: int, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(X', W')`` for a stride-2 convolution of ``x`` by ``weight`` with ``padding``
    and output size ``out_hw``: the stride-1, unpadded convolution of X' by W'
    gives the same output (module docstring)."""
    kk = (weight.shape[2] + 1) // 2
    x2 = torch.ops.aru.space_to_depth(x, padding, out_hw[0] + kk - 1, out_hw[1] + kk - 1)
    return x2, rewrite_weight(weight)


def rewrite_weight(weight: Tensor) -> Tensor:
    """:func:`rewrite`'s ``W'``: ``W'[o, (a, b, c), u, v] = W[o, c, 2u + a, 2v + b]``."""
    o, c, k = weight.shape[0], weight.shape[1], weight.shape[2]
    kk = (k + 1) // 2
    wp = F.pad(weight, (0, 2 * kk - k, 0, 2 * kk - k))  # [O, C, 2kk, 2kk]
    w2 = wp.reshape(o, c, kk, 2, kk, 2).permute(0, 3, 5, 1, 2, 4).reshape(o, 4 * c, kk, kk)
    w2 = F.pad(w2, (0, 0, 0, 0, 0, CHANNELS - 4 * c))
    return w2.contiguous(memory_format=torch.channels_last)


def weight_grad_back(d_w2: Tensor, weight_shape) -> Tensor:
    """dL/dW from dL/dW' (``[O, CHANNELS, kk, kk]``, :func:`rewrite`'s ``W'``): each
    weight is one entry of W', so this is a gather (W's padded taps and channels dropped)."""
    o, c, k = weight_shape[0], weight_shape[1], weight_shape[2]
    kk = (k + 1) // 2
    d = d_w2[:, :4 * c].reshape(o, 2, 2, c, kk, kk).permute(0, 3, 4, 1, 5, 2).reshape(o, c, 2 * kk, 2 * kk)
    return d[:, :, :k, :k]
