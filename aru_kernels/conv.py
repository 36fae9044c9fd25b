"""Implicit-GEMM convolution with a fused prologue and epilogue (NHWC).

One kernel serves every convolution of the ResNet/ResNeXt family: 1x1, 3x3
and the 7x7 stem, any stride, padding and dilation, ``groups >= 1``.

The GEMM view, per group of channels::

    out[m, n] = sum_k A[m, k] * B[k, n]
    m = (image, p, q)            output pixel, NHWC row
    k = (tap, input channel)     tap = (kh, kw)
    n = output channel

**Packing.** Small groups (ResNeXt-50's widths are 4 and 8 channels) are too
narrow for tensor cores, whose dots need K, N >= 16. The launcher packs ``GP``
neighbouring groups into one *pack* whose weight is block-diagonal and dense:
``[packs, KH*KW*CIN_P, COUT_P]`` with ``CIN_P = GP * cin_per_group`` and
``COUT_P = GP * cout_per_group``. The zero blocks cost FLOPs, not bytes, and a
grouped conv is far below the ridge point, so they are nearly free. To the
kernel, every convolution is a dense convolution within one pack: ``groups=1``
is one pack holding everything.

**K order.** With ``CIN_P >= 16`` the kernel walks the taps and, in each tap,
blocks of contiguous input channels, as one pipelined loop. With fewer channels per pack
(the stem: 3) it folds the taps into K (``FOLD_TAPS``): k runs over
``(tap, channel)`` pairs, so no dot is mostly padding.

**Prologue** (``HAS_PROLOGUE``): ``relu?(in_scale[c] * x + in_shift[c])`` on
each loaded input element, i.e. the previous layer's batch norm applied
lazily; padded positions stay zero, as in a conv that follows BN + ReLU.

**Epilogue**, on the fp32 accumulator: ``relu?(scale[n] * acc + shift[n] +
residual)``, cast to the output dtype. With ``STATS`` each program also writes,
per output channel, the mean and the sum of squared deviations of its tile of
stored outputs: training-mode batch norm's statistics, combined later without
atomics, so runs are bitwise repeatable.

**Input gradient** (``TRANSPOSED``): the same loop computes dL/dx of a forward
convolution from dL/dy, with the weight packed transposed and the tap map
inverted (strided convs included). If the forward had a prologue
``a = relu?(s*x + b)``, ``PRO_BWD`` turns dL/da into dL/dx in the epilogue
(``res_ptr`` then holds the forward input x, ``scale_ptr``/``shift_ptr`` the
prologue's s and b) and writes per-tile partial sums of dL/db and dL/ds.
"""

import triton
import triton.language as tl


@triton.jit
def _prologue(a, ok, ch, ch_ok, in_scale_ptr, in_shift_ptr, PRO_RELU: tl.constexpr):
    """relu?(in_scale * a + in_shift) per input channel ``ch``; zero where not ``ok``."""
    s = tl.load(in_scale_ptr + ch, mask=ch_ok, other=0.0)
    b = tl.load(in_shift_ptr + ch, mask=ch_ok, other=0.0)
    a = a.to(tl.float32) * s[None, :] + b[None, :]
    if PRO_RELU:
        a = tl.maximum(a, 0.0)
    return tl.where(ok, a, 0.0)


@triton.jit
def _tap_coord(o, k, size, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """The input coordinate that output coordinate ``o`` reads at kernel offset
    ``k``, and whether it exists. Transposed (input-gradient) launches invert
    the forward map ``o_fwd = (i_fwd + PAD - k * DIL) / STRIDE``."""
    if TRANSPOSED:
        num = o + PAD - k * DIL
        i = num // STRIDE
        ok = (num >= 0) & (num % STRIDE == 0) & (i < size)
    else:
        i = o * STRIDE - PAD + k * DIL
        ok = (i >= 0) & (i < size)
    return i, ok


@triton.jit
def conv_bn_act_kernel(
    x_ptr,  # [N, H, W, C_IN] input, NHWC contiguous
    w_ptr,  # [packs, KH*KW*CIN_P, COUT_P] packed weight, in the compute dtype
    out_ptr,  # [N, P, Q, C_OUT] output, NHWC contiguous
    scale_ptr,  # [C_OUT] fp32 epilogue scale (HAS_SCALE)
    shift_ptr,  # [C_OUT] fp32 epilogue shift (HAS_SHIFT)
    res_ptr,  # [N, P, Q, C_OUT] residual, NHWC contiguous (HAS_RESIDUAL)
    in_scale_ptr,  # [C_IN] fp32 prologue scale (HAS_PROLOGUE)
    in_shift_ptr,  # [C_IN] fp32 prologue shift (HAS_PROLOGUE)
    part_a_ptr, part_b_ptr,  # [M tiles, C_OUT] fp32 per-tile partial statistics (STATS or PRO_BWD)
    M,  # N * P * Q: output pixels
    H, W,  # input spatial size
    P, Q,  # output spatial size
    C_IN, C_OUT,  # channels of input and output (their NHWC row strides)
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    CIN_P: tl.constexpr,  # input channels of one pack
    COUT_P: tl.constexpr,  # output channels of one pack
    FOLD_TAPS: tl.constexpr,  # k runs over (tap, channel) pairs instead of taps x channel blocks
    HAS_PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    TRANSPOSED: tl.constexpr,  # input-gradient launch: x is dL/d(conv output), w the transposed pack
    STATS: tl.constexpr,  # write per-tile (mean, M2) of the stored output, for batch norm
    PRO_BWD: tl.constexpr,  # input-gradient of a conv with a prologue (see module docstring)
    DOT_F32: tl.constexpr,  # upcast dot operands to fp32 (the interpreter's bf16 dot is wrong)
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands ("ieee" or "tf32")
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Output-channel blocks vary fastest, so programs that share an input
    # tile run together and read it from L2.
    N_BLOCKS: tl.constexpr = (COUT_P + BLOCK_N - 1) // BLOCK_N
    n_programs = (C_OUT // COUT_P) * N_BLOCKS
    pid = tl.program_id(0)
    pid_n = pid % n_programs
    pid_m = pid // n_programs
    pack = pid_n // N_BLOCKS
    n0 = (pid_n % N_BLOCKS) * BLOCK_N

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    q = rm % Q
    t = rm // Q
    p = t % P
    img = t // P
    img_base = img.to(tl.int64) * H * W * C_IN + pack * CIN_P

    rn = n0 + tl.arange(0, BLOCK_N)  # output channel within the pack
    n_ok = rn < COUT_P
    w_pack = w_ptr + pack * (KH * KW * CIN_P * COUT_P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FOLD_TAPS:
        K_TOTAL: tl.constexpr = KH * KW * CIN_P
        for k0 in range(0, K_TOTAL, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K_TOTAL
            c = rk % CIN_P
            tap = rk // CIN_P
            ih, h_ok = _tap_coord(p[:, None], (tap // KW)[None, :], H, STRIDE, PAD, DIL, TRANSPOSED)
            iw, w_ok = _tap_coord(q[:, None], (tap % KW)[None, :], W, STRIDE, PAD, DIL, TRANSPOSED)
            ok = m_ok[:, None] & k_ok[None, :] & h_ok & w_ok
            a = tl.load(x_ptr + img_base[:, None] + (ih * W + iw) * C_IN + c[None, :], mask=ok, other=0.0)
            if HAS_PROLOGUE:
                a = _prologue(a, ok, pack * CIN_P + c, k_ok, in_scale_ptr, in_shift_ptr, PRO_RELU)
            b = tl.load(w_pack + rk[:, None] * COUT_P + rn[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
    else:
        # One pipelined loop over (tap, channel block) pairs.
        C_BLOCKS: tl.constexpr = (CIN_P + BLOCK_K - 1) // BLOCK_K
        for it in range(0, KH * KW * C_BLOCKS):
            tap = it // C_BLOCKS
            rk = (it % C_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = rk < CIN_P
            ih, h_ok = _tap_coord(p, tap // KW, H, STRIDE, PAD, DIL, TRANSPOSED)
            iw, w_ok = _tap_coord(q, tap % KW, W, STRIDE, PAD, DIL, TRANSPOSED)
            row_ok = m_ok & h_ok & w_ok
            ok = row_ok[:, None] & k_ok[None, :]
            row = img_base + (ih * W + iw) * C_IN
            a = tl.load(x_ptr + row[:, None] + rk[None, :], mask=ok, other=0.0)
            if HAS_PROLOGUE:
                a = _prologue(a, ok, pack * CIN_P + rk, k_ok, in_scale_ptr, in_shift_ptr, PRO_RELU)
            b = tl.load(w_pack + (tap * CIN_P + rk)[:, None] * COUT_P + rn[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if DOT_F32:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)

    # Epilogue on the fp32 accumulator.
    co = pack * COUT_P + rn
    out_off = rm.to(tl.int64)[:, None] * C_OUT + co[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    part_off = pid_m * C_OUT + co
    if PRO_BWD:
        # acc = dL/da with a = relu?(s * x + b) the forward prologue; res_ptr holds x.
        x_in = tl.load(res_ptr + out_off, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + co, mask=n_ok, other=0.0)[None, :]
        g = acc
        if PRO_RELU:
            g = tl.where(s * x_in + tl.load(shift_ptr + co, mask=n_ok, other=0.0)[None, :] > 0, g, 0.0)
        g = tl.where(ok, g, 0.0)
        tl.store(part_a_ptr + part_off, tl.sum(g, axis=0), mask=n_ok)  # -> dL/db
        tl.store(part_b_ptr + part_off, tl.sum(g * x_in, axis=0), mask=n_ok)  # -> dL/ds
        tl.store(out_ptr + out_off, (g * s).to(out_ptr.dtype.element_ty), mask=ok)
    else:
        y = acc
        if HAS_SCALE:
            y = y * tl.load(scale_ptr + co, mask=n_ok, other=0.0)[None, :]
        if HAS_SHIFT:
            y = y + tl.load(shift_ptr + co, mask=n_ok, other=0.0)[None, :]
        if HAS_RESIDUAL:
            y = y + tl.load(res_ptr + out_off, mask=ok, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_off, y, mask=ok)
        if STATS:
            # Per-tile mean and sum of squared deviations of the stored values;
            # tiles combine exactly (Chan et al.), safe for large means.
            count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
            v = tl.where(ok, y.to(tl.float32), 0.0)
            mean = tl.sum(v, axis=0) / count
            d = tl.where(ok, v - mean[None, :], 0.0)
            tl.store(part_a_ptr + part_off, mean, mask=n_ok)
            tl.store(part_b_ptr + part_off, tl.sum(d * d, axis=0), mask=n_ok)


@triton.jit
def conv_wgrad_kernel(
    x_ptr,  # [N, H, W, C_IN] forward input, NHWC contiguous
    dy_ptr,  # [N, P, Q, C_OUT] dL/dy, NHWC contiguous
    part_ptr,  # [SPLITS, packs, KH*KW, CIN_P, COUT_P] fp32 partial dL/dW, one slab per split of M
    in_scale_ptr,  # [C_IN] fp32 forward prologue scale (HAS_PROLOGUE)
    in_shift_ptr,  # [C_IN] fp32 forward prologue shift (HAS_PROLOGUE)
    M,  # N * P * Q
    H, W, P, Q, C_IN, C_OUT,
    M_PER_SPLIT,  # output pixels per split, a multiple of BLOCK_M
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    CIN_P: tl.constexpr, COUT_P: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, PRO_RELU: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Weight gradient: for each pack and tap, ``dW[ci, co] = sum_m a[m @ tap, ci] * dy[m, co]``.

    ``a`` is the forward's input after its prologue, recomputed on load. The
    sum over the output pixels m is split across ``program_id(1)``; each split
    writes its own slab and the launcher adds the slabs in a fixed order, so
    the result is deterministic. Whole pack blocks are computed; the launcher
    keeps their diagonal (the real groups).
    """
    CI_BLOCKS: tl.constexpr = (CIN_P + BLOCK_CI - 1) // BLOCK_CI
    CO_BLOCKS: tl.constexpr = (COUT_P + BLOCK_CO - 1) // BLOCK_CO
    pid = tl.program_id(0)
    split = tl.program_id(1)
    co_b = pid % CO_BLOCKS
    t = pid // CO_BLOCKS
    ci_b = t % CI_BLOCKS
    t = t // CI_BLOCKS
    tap = t % (KH * KW)
    pack = t // (KH * KW)

    rci = ci_b * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = rci < CIN_P
    rco = co_b * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = rco < COUT_P
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    m_start = split * M_PER_SPLIT
    for m0 in range(m_start, m_start + M_PER_SPLIT, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        q = rm % Q
        t2 = rm // Q
        p = t2 % P
        img = t2 // P
        ih, h_ok = _tap_coord(p, tap // KW, H, STRIDE, PAD, DIL, False)
        iw, w_ok = _tap_coord(q, tap % KW, W, STRIDE, PAD, DIL, False)
        ok = (m_ok & h_ok & w_ok)[:, None] & ci_ok[None, :]
        row = (img.to(tl.int64) * H * W + ih * W + iw) * C_IN + pack * CIN_P
        a = tl.load(x_ptr + row[:, None] + rci[None, :], mask=ok, other=0.0)
        if HAS_PROLOGUE:
            a = _prologue(a, ok, pack * CIN_P + rci, ci_ok, in_scale_ptr, in_shift_ptr, PRO_RELU)
        g = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * C_OUT + (pack * COUT_P + rco)[None, :],
                    mask=m_ok[:, None] & co_ok[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(tl.trans(a.to(tl.float32)), g.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a.to(g.dtype)), g, acc, input_precision=INPUT_PRECISION)
    slab = part_ptr + ((split * (C_OUT // COUT_P) + pack) * (KH * KW) + tap) * (CIN_P * COUT_P)
    tl.store(slab + rci[:, None] * COUT_P + rco[None, :], acc, mask=ci_ok[:, None] & co_ok[None, :])
