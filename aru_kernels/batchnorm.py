"""Training-mode batch-norm kernels (NHWC, per-channel vectors in fp32).

* ``bn_finalize_kernel``: per-tile statistics written by the conv kernel's
  ``STATS`` epilogue -> per-channel mean and 1/sqrt(var + eps), and the
  running-statistics update of ``nn.BatchNorm2d``.
* ``bn_stats_backward_kernel``: the gradient that flows into the conv output
  ``y`` through the batch mean and variance.
* ``bn_add_relu_kernel`` / ``bn_add_relu_backward_kernel``: the end of a
  residual block, ``relu(scale*y + shift + identity')`` with
  ``identity' = id_scale*identity + id_shift`` (downsample branch's batch norm)
  or the identity itself, and its gradient with the per-channel sums that the
  scale and shift gradients need, written per tile (no atomics).
"""

import triton
import triton.language as tl


@triton.jit
def bn_finalize_kernel(
    tile_mean_ptr,  # [T, C] fp32 mean of each tile of TILE_M rows
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
    total = M * 1.0
    # Pass 1: the mean, as the count-weighted mean of the tile means.
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt < T)[:, None] & c_ok[None, :]
        count = tl.minimum(M - rt * TILE_M, TILE_M).to(tl.float32)
        tm = tl.load(tile_mean_ptr + rt[:, None] * C + rc[None, :], mask=ok, other=0.0)
        acc += tl.sum(tl.where(ok, count[:, None] * tm, 0.0), axis=0)
    mean = acc / total
    # Pass 2: Chan et al.'s combination, M2 = sum(M2_t + n_t * (mean_t - mean)^2):
    # no cancellation however large the mean.
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt < T)[:, None] & c_ok[None, :]
        count = tl.minimum(M - rt * TILE_M, TILE_M).to(tl.float32)
        tm = tl.load(tile_mean_ptr + rt[:, None] * C + rc[None, :], mask=ok, other=0.0)
        tm2 = tl.load(tile_m2_ptr + rt[:, None] * C + rc[None, :], mask=ok, other=0.0)
        d = tm - mean[None, :]
        m2 += tl.sum(tl.where(ok, tm2 + count[:, None] * d * d, 0.0), axis=0)
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
def bn_stats_backward_kernel(
    y_ptr,  # [M, C] conv output, NHWC rows
    dmean_ptr,  # [C] fp32 dL/dmean
    dinvstd_ptr,  # [C] fp32 dL/dinvstd
    mean_ptr,  # [C] fp32
    invstd_ptr,  # [C] fp32
    dy_ptr,  # [M, C] out: dL/dy through the batch statistics
    M,
    C,
    inv_count,  # 1 / number of values the statistics were taken over (M, or more across processes)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``dy = (dmean - dinvstd * invstd^3 * (y - mean)) / count``."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    inv_m = inv_count
    mean = tl.load(mean_ptr + rc, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + rc, mask=c_ok, other=0.0)
    b = -tl.load(dinvstd_ptr + rc, mask=c_ok, other=0.0) * invstd * invstd * invstd * inv_m
    a = tl.load(dmean_ptr + rc, mask=c_ok, other=0.0) * inv_m - b * mean
    off = rm.to(tl.int64)[:, None] * C + rc[None, :]
    y = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(dy_ptr + off, (a[None, :] + b[None, :] * y).to(dy_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bn_add_relu_kernel(
    y_ptr,  # [M, C] NHWC rows
    scale_ptr, shift_ptr,  # [C] fp32
    id_ptr,  # [M, C] identity (HAS_IDENTITY)
    id_scale_ptr, id_shift_ptr,  # [C] fp32 (ID_AFFINE)
    out_ptr,  # [M, C]
    M,
    C,
    HAS_IDENTITY: tl.constexpr,
    ID_AFFINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    off = rm.to(tl.int64)[:, None] * C + rc[None, :]
    y = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
    z = y * tl.load(scale_ptr + rc, mask=c_ok, other=0.0)[None, :] + tl.load(shift_ptr + rc, mask=c_ok, other=0.0)[None, :]
    if HAS_IDENTITY:
        r = tl.load(id_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if ID_AFFINE:
            r = r * tl.load(id_scale_ptr + rc, mask=c_ok, other=0.0)[None, :] + tl.load(id_shift_ptr + rc, mask=c_ok, other=0.0)[None, :]
        z = z + r
    tl.store(out_ptr + off, tl.maximum(z, 0.0).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bn_add_relu_backward_kernel(
    dout_ptr,  # [M, C] dL/dout
    out_ptr,  # [M, C] the forward output (its sign is the ReLU mask)
    y_ptr,  # [M, C]
    scale_ptr,  # [C] fp32
    id_ptr,  # [M, C] identity (HAS_IDENTITY)
    id_scale_ptr,  # [C] fp32 (ID_AFFINE)
    dy_ptr,  # [M, C] out: dL/dy
    did_ptr,  # [M, C] out: dL/didentity (HAS_IDENTITY)
    part_ptr,  # [3, T, C] fp32 out: per-tile sums of dz, dz*y, dz*identity
    M,
    C,
    T,
    HAS_IDENTITY: tl.constexpr,
    ID_AFFINE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    off = rm.to(tl.int64)[:, None] * C + rc[None, :]
    out = tl.load(out_ptr + off, mask=ok, other=0.0).to(tl.float32)
    dz = tl.where(out > 0, tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32), 0.0)
    y = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + rc, mask=c_ok, other=0.0)
    tl.store(dy_ptr + off, (dz * s[None, :]).to(dy_ptr.dtype.element_ty), mask=ok)
    tl.store(part_ptr + pid_m * C + rc, tl.sum(dz, axis=0), mask=c_ok)
    tl.store(part_ptr + (T + pid_m) * C + rc, tl.sum(dz * y, axis=0), mask=c_ok)
    if HAS_IDENTITY:
        did = dz
        if ID_AFFINE:
            r = tl.load(id_ptr + off, mask=ok, other=0.0).to(tl.float32)
            tl.store(part_ptr + (2 * T + pid_m) * C + rc, tl.sum(dz * r, axis=0), mask=c_ok)
            did = dz * tl.load(id_scale_ptr + rc, mask=c_ok, other=0.0)[None, :]
        tl.store(did_ptr + off, did.to(did_ptr.dtype.element_ty), mask=ok)
