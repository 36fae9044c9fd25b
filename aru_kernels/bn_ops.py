"""The batch-norm operators: launchers, ``torch.library`` custom ops and their autograd.

* ``aru::bn_stats`` (:func:`finalize_stats`): per-tile statistics -> batch
  mean and 1/std, and the running-statistics update of ``nn.BatchNorm2d``.
* :func:`stats_term`: the gradient through the batch mean and variance, as
  the per-channel ``a + b*(y - mean)`` that the conv backward adds on load.
* ``aru::bn_add_relu`` and ``aru::bn_add_relu_backward``: the end of a
  residual block in one pass, and its gradient (``aru::bn_add_relu_scaled_backward``
  with a per-(image, channel) branch scale: squeeze-excitation);
  ``aru::bn_add_relu_mask`` also writes the ReLU's mask as bits, and
  ``aru::bn_add_relu_grad_sums`` reads them for the same gradient left
  unscaled, written once: for :mod:`aru_kernels.block_ops`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import batchnorm as _bn
from .checks import check_vector, first_derivatives_only
from .launch import launch
from .plans import elementwise_blocks, finalize_blocks, finalize_chunks, pool_blocks

__all__ = ["rows", "finalize_stats", "stats_term", "normalize", "relu_mask_shape", "bn_add_relu_mask",
           "bn_add_relu_grad_sums"]


def rows(t: Tensor) -> int:
    """Pixels of an [N, C, H, W] activation: N * H * W."""
    return t.shape[0] * t.shape[2] * t.shape[3]


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _grid(m: int, c: int, block_m: int, block_c: int) -> tuple[int, int]:
    return (-(-m // block_m), -(-c // block_c))


# --------------------------------------------------------------------------
# Batch statistics
# --------------------------------------------------------------------------


def finalize_stats(c: int, count: int, tile_mean: Tensor, tile_m2: Tensor, running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor], tile_rows: int,
                   momentum: Optional[float], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, new running mean, new running var) of ``count`` values per
    channel, given per-tile (mean, M2) of ``tile_rows`` values each (the last
    tile may hold fewer); the last two are empty without running statistics.

    An empty batch leaves the running statistics as they are, as
    ``nn.BatchNorm2d`` does; its mean is 0 and its invstd 1/sqrt(eps).
    """
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        check_vector(v, name, c, "one per channel: the finalize writes that many", "batch norm")
    device = tile_mean.device
    mean = torch.empty(c, dtype=torch.float32, device=device)
    invstd = torch.empty_like(mean)
    has_running = running_mean is not None
    new_rm = torch.empty_like(running_mean) if has_running else mean.new_empty(0)
    new_rv = torch.empty_like(running_var) if has_running else mean.new_empty(0)
    if count == 0 or c == 0:
        mean.zero_()
        invstd.fill_(eps ** -0.5)
        if has_running:
            new_rm.copy_(running_mean)
            new_rv.copy_(running_var)
        return mean, invstd, new_rm, new_rv
    tiles = tile_mean.shape[0]
    if isinstance(count, int) and tiles != -(-count // tile_rows):
        raise RuntimeError(f"finalize_stats: {tiles} statistics tiles do not hold {count} values in tiles of "
                           f"{tile_rows} (the last fewer): the launch wrote other tiles than the finalize reads")
    block_t, block_c = finalize_blocks(c)
    per_chunk = finalize_chunks(tiles, c, device)
    if per_chunk < tiles:  # combine chunks of tiles in parallel first
        chunks = -(-tiles // per_chunk)
        chunk_mean = torch.empty((chunks, c), dtype=torch.float32, device=device)
        chunk_m2 = torch.empty_like(chunk_mean)
        launch(_bn.bn_chunk_kernel, (chunks, -(-c // block_c)), tile_mean, tile_m2, chunk_mean, chunk_m2,
               count, tiles, c, tile_rows, per_chunk, BLOCK_T=block_t, BLOCK_C=block_c,
               role="bn_chunk", meta={"loop_trips": [-(-per_chunk // block_t)] * 2})
        tile_mean, tile_m2, tiles, tile_rows = chunk_mean, chunk_m2, chunks, tile_rows * per_chunk
    launch(
        _bn.bn_finalize_kernel, (-(-c // block_c),),
        tile_mean, tile_m2, mean, invstd,
        running_mean if has_running else mean, running_var if has_running else mean,
        new_rm if has_running else mean, new_rv if has_running else mean,
        num_batches_tracked if num_batches_tracked is not None else mean,
        count, tiles, c, tile_rows, 0.0 if momentum is None else momentum, eps,
        HAS_RUNNING=has_running, CUMULATIVE=momentum is None, BLOCK_T=block_t, BLOCK_C=block_c,
        role="bn_finalize", meta={"loop_trips": [-(-tiles // block_t)] * 2},
    )
    return mean, invstd, new_rm, new_rv


@torch.library.custom_op("aru::bn_stats", mutates_args=())
def _bn_stats_op(
    y: Tensor,
    tile_mean: Tensor,
    tile_m2: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    tile_rows: int,
    momentum: Optional[float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, new running mean, new running var) of ``y`` from its
    per-tile statistics (:func:`finalize_stats`; only ``y``'s shape is read).
    Not differentiable: ``aru::conv_bn_stats`` differentiates through the
    statistics."""
    return finalize_stats(y.shape[1], rows(y), tile_mean, tile_m2, running_mean, running_var,
                          num_batches_tracked, tile_rows, momentum, eps)


@_bn_stats_op.register_fake
def _bn_stats_fake(y, tile_mean, tile_m2, running_mean, running_var, num_batches_tracked, tile_rows,
                   momentum, eps):
    c = y.shape[1]
    vec = torch.empty(c, dtype=torch.float32, device=y.device)
    if running_mean is None:
        return vec, torch.empty_like(vec), vec.new_empty(0), vec.new_empty(0)
    return vec, torch.empty_like(vec), torch.empty_like(running_mean), torch.empty_like(running_var)


def stats_term(dmean: Optional[Tensor], dinvstd: Optional[Tensor], invstd: Tensor,
               count: int | Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with dL/dy through the batch statistics = ``a + b*(y - mean)``:
    ``a = dL/dmean / count``, ``b = -dL/dinvstd * invstd^3 / count`` (the mean's
    own term in the variance vanishes: the centred values sum to zero).
    Absent gradients count as zeros. ``count`` may be a tensor (per channel, or
    one value) where it is known on the device only."""
    if isinstance(count, Tensor):
        inv_count = (1.0 / count.clamp(min=1)).to(torch.float32)
    else:
        inv_count = 1.0 / max(1, count)
    zero = torch.zeros_like(invstd)
    a = zero if dmean is None else dmean.float() * inv_count
    b = zero if dinvstd is None else -dinvstd.float() * invstd.pow(3) * inv_count
    return a.contiguous(), b.contiguous()


# --------------------------------------------------------------------------
# Batch norm + residual + ReLU
# --------------------------------------------------------------------------


def normalize(x: Tensor, mean: Optional[Tensor], scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    """``relu?(scale*(x - mean) + shift)`` per channel into a new channels_last
    tensor (fp32 vectors; ``mean`` None counts as zeros): a conv prologue
    applied once, for convolutions that read each input element several times."""
    out = torch.empty_like(x, memory_format=torch.channels_last)
    m, c = rows(x), x.shape[1]
    if out.numel():
        block_m, block_c = elementwise_blocks(c)
        mean = torch.zeros_like(scale, dtype=torch.float32) if mean is None else mean.float().contiguous()
        scale, shift = scale.float().contiguous(), shift.float().contiguous()
        launch(_bn.bn_add_relu_kernel, _grid(m, c, block_m, block_c),
               x, mean, scale, shift, x, mean, scale, shift, out, m, c,
               HAS_IDENTITY=False, ID_AFFINE=False, BLOCK_M=block_m, BLOCK_C=block_c, RELU=relu,
               role="bn_add_relu")
    return out


def relu_mask_shape(y: Tensor) -> tuple[int, int]:
    """Shape of the ReLU bit mask of an [N, C, H, W] activation: one uint8 row of
    ``ceil(C/8)`` bytes per pixel (NHWC order), bit b of byte j for channel 8j + b."""
    return rows(y), -(-y.shape[1] // 8)


def _bn_add_relu_launch(y, mean, scale, shift, identity, id_mean, id_scale, id_shift, branch_scale,
                        relu_mask: Optional[Tensor] = None) -> Tensor:
    out = torch.empty_like(y, memory_format=torch.channels_last)
    m, c = rows(y), y.shape[1]
    if out.numel():
        block_m, block_c = elementwise_blocks(c)
        affine = id_scale is not None
        launch(
            _bn.bn_add_relu_kernel, _grid(m, c, block_m, block_c),
            y, mean, scale, shift, y if identity is None else identity,
            id_mean if affine else mean, id_scale if affine else scale, id_shift if affine else shift, out, m, c,
            HAS_IDENTITY=identity is not None, ID_AFFINE=affine, BLOCK_M=block_m, BLOCK_C=block_c,
            e_ptr=mean if branch_scale is None else branch_scale, HW=y.shape[2] * y.shape[3],
            BRANCH_SCALE=branch_scale is not None, mask_ptr=relu_mask, MASK_OUT=relu_mask is not None,
            role="bn_add_relu",
        )
    return out


@torch.library.custom_op("aru::bn_add_relu", mutates_args=())
def _bn_add_relu_op(
    y: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    identity: Optional[Tensor],
    id_mean: Optional[Tensor],
    id_scale: Optional[Tensor],
    id_shift: Optional[Tensor],
    branch_scale: Optional[Tensor] = None,
) -> Tensor:
    """``relu(e*(scale*(y - mean) + shift) + identity')``, identity' as in
    :func:`aru_kernels.bn_add_relu`, ``e`` = ``branch_scale`` [N, C] (absent: 1)."""
    return _bn_add_relu_launch(y, mean, scale, shift, identity, id_mean, id_scale, id_shift, branch_scale)


@_bn_add_relu_op.register_fake
def _bn_add_relu_fake(y, mean, scale, shift, identity, id_mean, id_scale, id_shift, branch_scale=None):
    return torch.empty_like(y, memory_format=torch.channels_last)


@torch.library.custom_op("aru::bn_add_relu_mask", mutates_args=())
def bn_add_relu_mask(
    y: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    identity: Optional[Tensor],
    id_mean: Optional[Tensor],
    id_scale: Optional[Tensor],
    id_shift: Optional[Tensor],
    pool: bool = False,
) -> tuple[Tensor, Tensor]:
    """``aru::bn_add_relu`` that also writes where its ReLU passes a gradient, one
    bit per element (:func:`relu_mask_shape`): the backward reads that instead of
    the output. With ``pool``, the output is each image's mean over its pixels,
    ``[N, C, 1, 1]`` (a global average pool after the block end, which is never
    written). Not differentiable itself: for nodes that own their backward."""
    out, relu_mask = _bn_add_relu_mask_fake(y, mean, scale, shift, identity, id_mean, id_scale, id_shift, pool)
    if not pool:
        return _bn_add_relu_launch(y, mean, scale, shift, identity, id_mean, id_scale, id_shift, None,
                                   relu_mask), relu_mask
    n, c, hw = y.shape[0], y.shape[1], y.shape[2] * y.shape[3]
    if out.numel():
        if hw == 0:
            raise ValueError(f"bn_add_relu_mask: the mean over an empty image ({tuple(y.shape)}) is undefined")
        block_m, block_c = pool_blocks(c, hw)
        affine = id_scale is not None
        launch(
            _bn.bn_add_relu_pool_kernel, (n, -(-c // block_c)),
            y, mean, scale, shift, y if identity is None else identity,
            id_mean if affine else mean, id_scale if affine else scale, id_shift if affine else shift,
            out, relu_mask, hw, c, HAS_IDENTITY=identity is not None, ID_AFFINE=affine,
            BLOCK_M=block_m, BLOCK_C=block_c, role="bn_add_relu_pool",
        )
    return out, relu_mask


@bn_add_relu_mask.register_fake
def _bn_add_relu_mask_fake(y, mean, scale, shift, identity, id_mean, id_scale, id_shift, pool=False):
    out = (torch.empty((y.shape[0], y.shape[1], 1, 1), dtype=y.dtype, device=y.device) if pool
           else torch.empty_like(y, memory_format=torch.channels_last))
    return out, torch.empty(relu_mask_shape(y), dtype=torch.uint8, device=y.device)


def _bn_add_relu_setup(ctx, inputs, output):
    y, mean, scale, shift, identity, id_mean, id_scale, id_shift, *branch = inputs
    ctx.has_identity = identity is not None
    e = branch[0] if branch else None
    ctx.has_branch = e is not None
    ctx.save_for_backward(y, mean, scale, identity, id_mean, id_scale, output, shift, e)


@torch.library.custom_op("aru::bn_add_relu_backward", mutates_args=())
def _bn_add_relu_backward_op(
    dout: Tensor,
    out: Tensor,
    y: Tensor,
    mean: Tensor,
    scale: Tensor,
    identity: Optional[Tensor],
    id_mean: Optional[Tensor],
    id_scale: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dy, dL/didentity (empty without identity), per-channel sums [3, C] of
    dz, dz*(y - mean), dz*(identity - id_mean)), dz the gradient behind the ReLU."""
    m, c = rows(y), y.shape[1]
    block_m, block_c = elementwise_blocks(c)
    tiles = -(-m // block_m)
    dy, did, _ = _bn_add_relu_backward_fake(dout, out, y, mean, scale, identity, id_mean, id_scale)
    part = torch.zeros((3, tiles, c), dtype=torch.float32, device=y.device)
    affine = id_scale is not None
    if dy.numel():
        launch(
            _bn.bn_add_relu_backward_kernel, (tiles, -(-c // block_c)),
            dout, out, y, mean, scale, y if identity is None else identity, id_mean if affine else mean,
            id_scale if affine else scale, dy, dy if identity is None else did, part, m, c, tiles,
            HAS_IDENTITY=identity is not None, ID_AFFINE=affine, BLOCK_M=block_m, BLOCK_C=block_c,
            role="bn_add_relu_bwd",
        )
    return dy, did, part.sum(1)  # fixed-order reduction over tiles


@_bn_add_relu_backward_op.register_fake
def _bn_add_relu_backward_fake(dout, out, y, mean, scale, identity, id_mean, id_scale):
    dy = torch.empty_like(y, memory_format=torch.channels_last)
    did = (torch.empty_like(identity, memory_format=torch.channels_last) if identity is not None
           else y.new_empty(0))
    return dy, did, torch.empty((3, y.shape[1]), dtype=torch.float32, device=y.device)


@torch.library.custom_op("aru::bn_add_relu_grad_sums", mutates_args=())
def bn_add_relu_grad_sums(
    dout: Tensor,
    relu_mask: Tensor,
    y: Tensor,
    mean: Tensor,
    identity: Optional[Tensor],
    id_mean: Optional[Tensor],
    pooled: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(dz, sums)`` for ``out = relu(scale*(y - mean) + shift + identity')`` with
    its ReLU mask ``relu_mask`` as ``aru::bn_add_relu_mask`` wrote it:
    dz = dL/dout behind the ReLU, written once (the consumers scale it as they
    load it), and the per-channel sums ``[3, C]`` of dz, dz*(y - mean) and,
    with ``identity`` (the downsample branch's conv output, its batch norm's
    mean ``id_mean``), dz*(identity - id_mean); the last row is zero without.
    With ``pooled``, ``dout`` is the gradient of ``bn_add_relu_mask(..., pool=True)``'s
    ``[N, C, 1, 1]`` means (any strides)."""
    m, c = rows(y), y.shape[1]
    if pooled:
        if tuple(dout.shape) != (y.shape[0], c, 1, 1):
            raise ValueError(f"bn_add_relu_grad_sums: a pooled gradient is [{y.shape[0]}, {c}, 1, 1] for "
                             f"y of shape {tuple(y.shape)}; got {tuple(dout.shape)}")
        dout = dout.reshape(y.shape[0], c).contiguous()
    block_m, block_c = elementwise_blocks(c)
    tiles = -(-m // block_m)
    dz = torch.empty_like(y, memory_format=torch.channels_last)
    part = torch.zeros((3, tiles, c), dtype=torch.float32, device=y.device)
    affine = identity is not None
    if dz.numel():
        launch(
            _bn.bn_add_relu_backward_kernel, (tiles, -(-c // block_c)),
            dout, relu_mask, y, mean, mean, y if identity is None else identity,
            mean if id_mean is None else id_mean, mean, dz, dz, part, m, c, tiles,
            HAS_IDENTITY=affine, ID_AFFINE=affine, BLOCK_M=block_m, BLOCK_C=block_c, SCATTER=False,
            MASK_BITS=True, POOLED=pooled, HW=y.shape[2] * y.shape[3], role="bn_add_relu_bwd",
        )
    return dz, part.sum(1)  # fixed-order reduction over tiles


@bn_add_relu_grad_sums.register_fake
def _bn_add_relu_grad_sums_fake(dout, relu_mask, y, mean, identity, id_mean, pooled=False):
    return (torch.empty_like(y, memory_format=torch.channels_last),
            torch.empty((3, y.shape[1]), dtype=torch.float32, device=y.device))


@torch.library.custom_op("aru::bn_add_relu_scaled_backward", mutates_args=())
def bn_add_relu_scaled_backward(
    dout: Tensor,
    out: Tensor,
    y: Tensor,
    mean: Tensor,
    scale: Tensor,
    shift: Tensor,
    branch_scale: Tensor,
    identity: Optional[Tensor],
    id_mean: Optional[Tensor],
    id_scale: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradient of ``relu(e*(scale*(y - mean) + shift) + identity')`` in one pass:
    (dL/dy, dL/didentity (empty without identity), per-channel sums [4, C] of g,
    g*(y - mean), dz, dz*(identity - id_mean) with g = e*dz, dL/de [N, C])."""
    n, c, h, w = y.shape
    hw = h * w
    block_m, block_c = elementwise_blocks(c)
    tiles = n * -(-hw // block_m) if hw else 0
    dy = torch.empty_like(y, memory_format=torch.channels_last)
    did = torch.empty_like(identity, memory_format=torch.channels_last) if identity is not None else y.new_empty(0)
    part = torch.zeros((5, tiles, c), dtype=torch.float32, device=y.device)
    affine = id_scale is not None
    if tiles and c:
        launch(
            _bn.bn_add_relu_scaled_backward_kernel, (tiles, -(-c // block_c)),
            dout, out, y, mean, scale, shift, branch_scale, y if identity is None else identity,
            id_mean if affine else mean, id_scale if affine else scale, dy, dy if identity is None else did,
            part, hw, c, tiles, HAS_IDENTITY=identity is not None, ID_AFFINE=affine,
            BLOCK_M=block_m, BLOCK_C=block_c, role="bn_add_relu_bwd",
        )
    d_e = part[4].view(n, tiles // max(n, 1), c).sum(1) if tiles else part.new_zeros((n, c))
    return dy, did, part[:4].sum(1), d_e  # fixed-order reductions over tiles


@bn_add_relu_scaled_backward.register_fake
def _bn_add_relu_scaled_backward_fake(dout, out, y, mean, scale, shift, branch_scale, identity, id_mean, id_scale):
    c = y.shape[1]
    did = torch.empty_like(identity, memory_format=torch.channels_last) if identity is not None else y.new_empty(0)
    return (torch.empty_like(y, memory_format=torch.channels_last), did,
            torch.empty((4, c), dtype=torch.float32, device=y.device),
            torch.empty((y.shape[0], c), dtype=torch.float32, device=y.device))


def _branch_scaled_backward(ctx, dout):
    """The gradients with a per-(image, channel) branch scale ``e``."""
    y, mean, scale, identity, id_mean, id_scale, out, shift, e = ctx.saved_tensors
    dy, did, sums, d_e = torch.ops.aru.bn_add_relu_scaled_backward(
        _nhwc(dout.to(out.dtype)), out, y, mean, scale, shift, e, identity, id_mean, id_scale)
    affine = id_scale is not None
    d_shift = sums[0]
    d_id = did if identity is not None else None
    return (dy, -scale * d_shift, sums[1], d_shift, d_id, -id_scale * sums[2] if affine else None,
            sums[3] if affine else None, sums[2] if affine else None, d_e)


def _bn_add_relu_backward(ctx, dout):
    if ctx.has_branch:
        return _branch_scaled_backward(ctx, dout)
    y, mean, scale, identity, id_mean, id_scale, out, _, _ = ctx.saved_tensors
    dy, did, sums = torch.ops.aru.bn_add_relu_backward(dout.contiguous(memory_format=torch.channels_last), out,
                                                       y, mean, scale, identity, id_mean, id_scale)
    affine = id_scale is not None
    d_shift = sums[0]
    return (dy, -scale * d_shift, sums[1], d_shift, did if ctx.has_identity else None,
            -id_scale * d_shift if affine else None, sums[2] if affine else None, d_shift if affine else None, None)


_bn_add_relu_op.register_autograd(_bn_add_relu_backward, setup_context=_bn_add_relu_setup)


# (gradients: no derivative of their own)
for _op in (_bn_add_relu_backward_op, bn_add_relu_grad_sums, bn_add_relu_scaled_backward):
    first_derivatives_only(_op)
