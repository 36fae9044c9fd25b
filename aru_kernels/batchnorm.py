"""Training-mode batch-norm kernels (NHWC, per-channel vectors in fp32).

* ``bn_chunk_kernel`` and ``bn_finalize_kernel``: per-tile statistics
  written by the conv kernel's ``STATS`` epilogue -> per-channel mean and
  1/sqrt(var + eps), and the running-statistics update of
  ``nn.BatchNorm2d``; chunks of tiles are combined in parallel first when
  there are many.
* ``bn_add_relu_kernel`` / ``bn_add_relu_backward_kernel``: the end of a
  residual block, ``relu(e*(scale*(y - mean) + shift) + identity')`` (``e``
  an optional per-(image, channel) scale: squeeze-excitation) with
  ``identity' = id_scale*(identity - id_mean) + id_shift`` (downsample
  branch's batch norm) or the identity itself (the ReLU optional, for a
  convolution's input normalized ahead of it), and its gradient with the
  per-channel sums that the scale, shift and mean gradients need, written per
  tile (no atomics); or (``SCATTER`` off) the gradient behind the ReLU alone,
  once, for a residual block's backward that scales it where it reads it.
* ``bn_add_relu_pool_kernel``: that end followed by the network's global
  average pool, the block output never written (the backward kernel's
  ``POOLED`` spreads the pooled gradient back over the pixels).

Batch norm is applied as ``scale*(v - mean) + shift``, centred first as
``nn.BatchNorm2d`` does: a value equal to the mean lands exactly on
``shift``, so a ReLU after it closes where eager's does, and the gradient sums
are of centred values (no cancellation for channels with a large mean).
ReLUs keep NaN, as ``torch.relu`` does.
"""

import triton
import triton.language as tl

from .conv import _relu
from .relu_bits import load_relu_mask, store_relu_mask


@triton.jit
def _combine(tile_mean_ptr, tile_m2_ptr, t_start, t_end, rc, c_ok, M, C, TILE_M,
             BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean, M2) per channel of tiles ``[t_start, t_end)``, each of
    TILE_M rows (the batch's last may hold fewer): the count-weighted mean of
    the tile means, then Chan et al.'s M2 = sum(M2_t + n_t * (mean_t - mean)^2),
    with no cancellation however large the mean."""
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    n = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt < t_end)[:, None] & c_ok[None, :]
        count = tl.where(rt < t_end, tl.minimum(M - rt * TILE_M, TILE_M).to(tl.float32), 0.0)
        tm = tl.load(tile_mean_ptr + rt[:, None] * C + rc[None, :], mask=ok, other=0.0)
        acc += count[:, None] * tm
        n += count
    total = tl.sum(n, axis=0)
    mean = tl.sum(acc, axis=0) / tl.maximum(total, 1.0)
    m2 = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt < t_end)[:, None] & c_ok[None, :]
        count = tl.minimum(M - rt * TILE_M, TILE_M).to(tl.float32)
        tm = tl.load(tile_mean_ptr + rt[:, None] * C + rc[None, :], mask=ok, other=0.0)
        tm2 = tl.load(tile_m2_ptr + rt[:, None] * C + rc[None, :], mask=ok, other=0.0)
        d = tm - mean[None, :]
        m2 += tl.where(ok, tm2 + count[:, None] * d * d, 0.0)
    return total, mean, tl.sum(m2, axis=0)


@triton.jit
def bn_chunk_kernel(
    tile_mean_ptr,  # [T, C] fp32 mean of each tile of TILE_M rows
    tile_m2_ptr,  # [T, C] fp32 sum of squared deviations from the tile mean
    chunk_mean_ptr,  # [chunks, C] fp32 out: mean of each chunk of TILES_PER_CHUNK tiles
    chunk_m2_ptr,  # [chunks, C] fp32 out: its sum of squared deviations
    M, T, C, TILE_M,
    TILES_PER_CHUNK,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """First half of a parallel finalize: program (chunk, channel block) combines
    its chunk of tiles; :func:`bn_finalize_kernel` then combines the chunks (each
    TILES_PER_CHUNK * TILE_M rows) in a fixed order, so the result is deterministic."""
    chunk = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    t_start = chunk * TILES_PER_CHUNK
    _, mean, m2 = _combine(tile_mean_ptr, tile_m2_ptr, t_start, tl.minimum(t_start + TILES_PER_CHUNK, T), rc, c_ok,
                           M, C, TILE_M, BLOCK_T, BLOCK_C)
    tl.store(chunk_mean_ptr + chunk * C + rc, mean, mask=c_ok)
    tl.store(chunk_m2_ptr + chunk * C + rc, m2, mask=c_ok)


@triton.jit
def bn_finalize_kernel(
    tile_mean_ptr,  # [T, C] fp32 mean of each tile of TILE_M rows (or of each chunk, after bn_chunk_kernel)
    tile_m2_ptr,  # [T, C] fp32 sum of squared deviations from the tile mean
    mean_ptr,  # [C] fp32 out: batch mean
    invstd_ptr,  # [C] fp32 out: 1 / sqrt(biased batch variance + eps)
    running_mean_ptr,  # [C] running mean (HAS_RUNNING)
    running_var_ptr,  # [C] running variance (HAS_RUNNING)
    new_running_mean_ptr,  # [C] out: the updated running mean (HAS_RUNNING)
    new_running_var_ptr,  # [C] out: the updated running variance, from the unbiased batch variance
    num_batches_ptr,  # [] num_batches_tracked, already incremented (CUMULATIVE)
    M,  # rows (pixels) in the batch
    T,  # tiles
    C,
    TILE_M,  # rows per tile (the last tile may hold fewer)
    momentum,
    eps,
    HAS_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,  # momentum=None: cumulative moving average
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    total, mean, m2 = _combine(tile_mean_ptr, tile_m2_ptr, 0, T, rc, c_ok, M, C, TILE_M, BLOCK_T, BLOCK_C)
    var = m2 / total
    tl.store(mean_ptr + rc, mean, mask=c_ok)
    tl.store(invstd_ptr + rc, 1.0 / tl.sqrt(var + eps), mask=c_ok)
    if HAS_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(num_batches_ptr).to(tl.float32)
        else:
            factor = momentum
        unbiased = m2 / tl.maximum(total - 1.0, 1.0)
        rm = tl.load(running_mean_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
        rv = tl.load(running_var_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
        rm = (1.0 - factor) * rm + factor * mean
        rv = (1.0 - factor) * rv + factor * unbiased
        tl.store(new_running_mean_ptr + rc, rm.to(new_running_mean_ptr.dtype.element_ty), mask=c_ok)
        tl.store(new_running_var_ptr + rc, rv.to(new_running_var_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _vec(ptr, rc, c_ok):
    """A per-channel fp32 vector as a row that broadcasts over pixels."""
    return tl.load(ptr + rc, mask=c_ok, other=0.0)[None, :]


@triton.jit
def _centred(ptr, off, ok, mean_ptr, rc, c_ok):
    """``v - mean`` per channel, in fp32."""
    return tl.load(ptr + off, mask=ok, other=0.0).to(tl.float32) - _vec(mean_ptr, rc, c_ok)


@triton.jit
def _relu_grad(dout_ptr, out_ptr, off, ok):
    """dL/dout behind the block's final ReLU, in fp32: torch.relu's gradient, zero where
    the output is <= 0 (NaN outputs pass it on)."""
    out = tl.load(out_ptr + off, mask=ok, other=0.0).to(tl.float32)
    return tl.where(out <= 0, 0.0, tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def bn_add_relu_kernel(
    y_ptr,  # [M, C] NHWC rows
    mean_ptr, scale_ptr, shift_ptr,  # [C] fp32
    id_ptr,  # [M, C] identity (HAS_IDENTITY)
    id_mean_ptr, id_scale_ptr, id_shift_ptr,  # [C] fp32 (ID_AFFINE)
    out_ptr,  # [M, C]
    M,
    C,
    HAS_IDENTITY: tl.constexpr,
    ID_AFFINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    RELU: tl.constexpr = True,
    e_ptr=None,  # [N, C] fp32 per-(image, channel) scale of the normalized branch (BRANCH_SCALE)
    HW=1,  # pixels per image (BRANCH_SCALE)
    BRANCH_SCALE: tl.constexpr = False,
    mask_ptr=None,  # [M, ceil(C/8)] uint8 out: the ReLU's gradient mask as bits (MASK_OUT)
    MASK_OUT: tl.constexpr = False,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    off = rm.to(tl.int64)[:, None] * C + rc[None, :]
    z = _centred(y_ptr, off, ok, mean_ptr, rc, c_ok) * _vec(scale_ptr, rc, c_ok) + _vec(shift_ptr, rc, c_ok)
    if BRANCH_SCALE:  # squeeze-excitation's excitation (and stochastic depth), per image and channel
        img = rm // HW
        z = z * tl.load(e_ptr + img.to(tl.int64)[:, None] * C + rc[None, :], mask=ok, other=0.0)
    if HAS_IDENTITY:
        z = z + _identity(id_ptr, off, ok, id_mean_ptr, id_scale_ptr, id_shift_ptr, rc, c_ok, ID_AFFINE)
    if RELU:
        z = _relu(z)
    stored = z.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + off, stored, mask=ok)
    if MASK_OUT:
        store_relu_mask(mask_ptr, stored, ok, rm, rm < M, tl.program_id(1) * (BLOCK_C // 8), C, BLOCK_M, BLOCK_C)


@triton.jit
def _identity(id_ptr, off, ok, id_mean_ptr, id_scale_ptr, id_shift_ptr, rc, c_ok, ID_AFFINE: tl.constexpr):
    """A block end's identity branch in fp32: ``id_scale*(identity - id_mean) + id_shift``
    (``ID_AFFINE``: the downsample conv's output through its batch norm), else the identity."""
    if ID_AFFINE:
        return (_centred(id_ptr, off, ok, id_mean_ptr, rc, c_ok) * _vec(id_scale_ptr, rc, c_ok)
                + _vec(id_shift_ptr, rc, c_ok))
    return tl.load(id_ptr + off, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def bn_add_relu_pool_kernel(
    y_ptr,  # [M, C] NHWC rows, M = N * HW
    mean_ptr, scale_ptr, shift_ptr,  # [C] fp32
    id_ptr,  # [M, C] identity (HAS_IDENTITY)
    id_mean_ptr, id_scale_ptr, id_shift_ptr,  # [C] fp32 (ID_AFFINE)
    pool_ptr,  # [N, C] out: each image's mean of relu(scale*(y - mean) + shift + identity') as stored
    mask_ptr,  # [M, ceil(C/8)] uint8 out: the ReLU's gradient mask as bits
    HW,  # pixels per image
    C,
    HAS_IDENTITY: tl.constexpr,
    ID_AFFINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``bn_add_relu_kernel`` (``MASK_OUT``) followed by a global average pool: one
    program per (image, channel block) walks the image's pixels in order, so the
    block output is never written and the sum is the same run after run."""
    n = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(0, HW, BLOCK_M):
        pix = start + tl.arange(0, BLOCK_M)
        row_ok = pix < HW
        rm = n * HW + pix
        ok = row_ok[:, None] & c_ok[None, :]
        off = rm.to(tl.int64)[:, None] * C + rc[None, :]
        z = _centred(y_ptr, off, ok, mean_ptr, rc, c_ok) * _vec(scale_ptr, rc, c_ok) + _vec(shift_ptr, rc, c_ok)
        if HAS_IDENTITY:
            z = z + _identity(id_ptr, off, ok, id_mean_ptr, id_scale_ptr, id_shift_ptr, rc, c_ok, ID_AFFINE)
        stored = _relu(z).to(pool_ptr.dtype.element_ty)  # the values the unfused pool would read
        store_relu_mask(mask_ptr, stored, ok, rm, row_ok, tl.program_id(1) * (BLOCK_C // 8), C, BLOCK_M, BLOCK_C)
        acc += tl.sum(tl.where(ok, stored.to(tl.float32), 0.0), axis=0)
    tl.store(pool_ptr + n.to(tl.int64) * C + rc, (acc / HW).to(pool_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def bn_add_relu_backward_kernel(
    dout_ptr,  # [M, C] dL/dout
    out_ptr,  # [M, C] the forward output (its sign is the ReLU mask); its mask as bits with MASK_BITS
    y_ptr,  # [M, C]
    mean_ptr, scale_ptr,  # [C] fp32
    id_ptr,  # [M, C] identity (HAS_IDENTITY)
    id_mean_ptr, id_scale_ptr,  # [C] fp32 (ID_AFFINE)
    dy_ptr,  # [M, C] out: dL/dy (SCATTER), else dz itself, the gradient behind the ReLU
    did_ptr,  # [M, C] out: dL/didentity (HAS_IDENTITY and SCATTER)
    part_ptr,  # [3, T, C] fp32 out: per-tile sums of dz, dz*(y - mean), dz*(identity - id_mean)
    M,
    C,
    T,
    HAS_IDENTITY: tl.constexpr,
    ID_AFFINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SCATTER: tl.constexpr = True,  # write dL/dy and dL/didentity; else dz once, for consumers that scale it
    MASK_BITS: tl.constexpr = False,  # out_ptr holds the ReLU mask as bits (bn_add_relu_kernel's MASK_OUT)
    POOLED: tl.constexpr = False,  # dout_ptr is [N, C], dL/d(each image's mean over its HW pixels) (MASK_BITS)
    HW=1,
):
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    off = rm.to(tl.int64)[:, None] * C + rc[None, :]
    if MASK_BITS:
        keep = load_relu_mask(out_ptr, rm, rm < M, tl.program_id(1) * (BLOCK_C // 8), C, BLOCK_M, BLOCK_C)
        if POOLED:  # the mean's gradient, spread over the image's pixels
            img = (rm // HW).to(tl.int64)
            d = tl.load(dout_ptr + img[:, None] * C + rc[None, :], mask=ok, other=0.0).to(tl.float32) / HW
        else:
            d = tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dz = tl.where(keep, d, 0.0)
    else:
        dz = _relu_grad(dout_ptr, out_ptr, off, ok)
    yc = _centred(y_ptr, off, ok, mean_ptr, rc, c_ok)
    if SCATTER:
        tl.store(dy_ptr + off, (dz * _vec(scale_ptr, rc, c_ok)).to(dy_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(dy_ptr + off, dz.to(dy_ptr.dtype.element_ty), mask=ok)
    tl.store(part_ptr + pid_m * C + rc, tl.sum(dz, axis=0), mask=c_ok)
    tl.store(part_ptr + (T + pid_m) * C + rc, tl.sum(dz * yc, axis=0), mask=c_ok)
    if HAS_IDENTITY:
        did = dz
        if ID_AFFINE:
            ic = _centred(id_ptr, off, ok, id_mean_ptr, rc, c_ok)
            tl.store(part_ptr + (2 * T + pid_m) * C + rc, tl.sum(dz * ic, axis=0), mask=c_ok)
            did = dz * _vec(id_scale_ptr, rc, c_ok)
        if SCATTER:
            tl.store(did_ptr + off, did.to(did_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bn_add_relu_scaled_backward_kernel(
    dout_ptr,  # [M, C] dL/dout
    out_ptr,  # [M, C] the forward output (its sign is the ReLU mask)
    y_ptr,  # [M, C]
    mean_ptr, scale_ptr, shift_ptr,  # [C] fp32
    e_ptr,  # [N, C] fp32 branch scale
    id_ptr,  # [M, C] identity (HAS_IDENTITY)
    id_mean_ptr, id_scale_ptr,  # [C] fp32 (ID_AFFINE)
    dy_ptr,  # [M, C] out: dL/dy = e * dz * scale
    did_ptr,  # [M, C] out: dL/didentity (HAS_IDENTITY)
    part_ptr,  # [5, T, C] fp32 out: per-tile sums of g, g*(y - mean), dz, dz*(identity - id_mean), dz*z
    HW,  # pixels per image
    C,
    T,  # tiles: images x tiles per image
    HAS_IDENTITY: tl.constexpr,
    ID_AFFINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Gradient of ``relu(e*z + identity')``, ``z = scale*(y - mean) + shift``, ``e`` per
    (image, channel): row tiles lie within one image, so the per-tile sums of
    ``dz*z`` add up to dL/de per image (dz the gradient behind the ReLU, g = e*dz)."""
    pid_m = tl.program_id(0)
    tiles_per_img = (HW + BLOCK_M - 1) // BLOCK_M
    img = pid_m // tiles_per_img
    local = (pid_m - img * tiles_per_img) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = img * HW + local
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (local < HW)[:, None] & c_ok[None, :]
    off = rm.to(tl.int64)[:, None] * C + rc[None, :]
    dz = _relu_grad(dout_ptr, out_ptr, off, ok)
    yc = _centred(y_ptr, off, ok, mean_ptr, rc, c_ok)
    scale = _vec(scale_ptr, rc, c_ok)
    e = tl.load(e_ptr + img.to(tl.int64) * C + rc, mask=c_ok, other=0.0)[None, :]
    g = dz * e
    tl.store(dy_ptr + off, (g * scale).to(dy_ptr.dtype.element_ty), mask=ok)
    z = yc * scale + _vec(shift_ptr, rc, c_ok)  # (dz is 0 on masked rows)
    tl.store(part_ptr + pid_m * C + rc, tl.sum(g, axis=0), mask=c_ok)
    tl.store(part_ptr + (T + pid_m) * C + rc, tl.sum(g * yc, axis=0), mask=c_ok)
    tl.store(part_ptr + (2 * T + pid_m) * C + rc, tl.sum(dz, axis=0), mask=c_ok)
    tl.store(part_ptr + (4 * T + pid_m) * C + rc, tl.sum(dz * z, axis=0), mask=c_ok)
    if HAS_IDENTITY:
        did = dz
        if ID_AFFINE:
            ic = _centred(id_ptr, off, ok, id_mean_ptr, rc, c_ok)
            tl.store(part_ptr + (3 * T + pid_m) * C + rc, tl.sum(dz * ic, axis=0), mask=c_ok)
            did = dz * _vec(id_scale_ptr, rc, c_ok)
        tl.store(did_ptr + off, did.to(did_ptr.dtype.element_ty), mask=ok)
