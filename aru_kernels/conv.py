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
residual)``, cast to the output dtype.
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
def conv_bn_act_kernel(
    x_ptr,  # [N, H, W, C_IN] input, NHWC contiguous
    w_ptr,  # [packs, KH*KW*CIN_P, COUT_P] packed weight, in the compute dtype
    out_ptr,  # [N, P, Q, C_OUT] output, NHWC contiguous
    scale_ptr,  # [C_OUT] fp32 epilogue scale (HAS_SCALE)
    shift_ptr,  # [C_OUT] fp32 epilogue shift (HAS_SHIFT)
    res_ptr,  # [N, P, Q, C_OUT] residual, NHWC contiguous (HAS_RESIDUAL)
    in_scale_ptr,  # [C_IN] fp32 prologue scale (HAS_PROLOGUE)
    in_shift_ptr,  # [C_IN] fp32 prologue shift (HAS_PROLOGUE)
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
    ih0 = p * STRIDE - PAD
    iw0 = q * STRIDE - PAD
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
            ih = ih0[:, None] + (tap // KW)[None, :] * DIL
            iw = iw0[:, None] + (tap % KW)[None, :] * DIL
            ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
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
            ih = ih0 + (tap // KW) * DIL
            iw = iw0 + (tap % KW) * DIL
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
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
    y = acc
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + co, mask=n_ok, other=0.0)[None, :]
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + co, mask=n_ok, other=0.0)[None, :]
    out_off = rm.to(tl.int64)[:, None] * C_OUT + co[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        y = y + tl.load(res_ptr + out_off, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=ok)
