"""Implicit-GEMM convolution with a fused prologue and epilogue (NHWC).

One kernel serves every convolution of the ResNet/ResNeXt family: 1x1, 3x3
and the 7x7 stem, any stride, padding and dilation, ``groups >= 1``.

The GEMM view, per group of channels::

    out[m, n] = sum_k A[m, k] * B[k, n]
    m = (image, p, q)            output pixel, NHWC row
    k = (tap, input channel)     tap = (kh, kw)
    n = output channel

**Packing.** Small groups (ResNeXt-50's widths are 4 and 8 channels) are too
narrow for tensor cores, whose dots need K, N >= 16. ``GP`` neighbouring
groups form one *pack* of ``CIN_P = GP * CIN_G`` input and ``COUT_P = GP *
COUT_G`` output channels, whose weight is block-diagonal. The kernel reads the
weight in the caller's own ``[C_out, C_in/groups, KH, KW]`` tensor (any
strides; ``channels_last`` weights load contiguously) and builds each
block-diagonal tile on load: the zero blocks come from the load mask, so no
packed copy exists that could go stale. The zero blocks cost FLOPs, not bytes,
and a grouped conv is far below the ridge point, so they are nearly free.
To the kernel, every convolution is a dense convolution within one pack:
``groups=1`` is one pack holding everything.

Non-finite values: a pack's dot multiplies every input channel of the pack by
the zero blocks of the other groups, so an inf or NaN input in one group makes
NaN in the other groups of its pack (``0 * inf``). A non-finite input never
yields a finite output where ``F.conv2d``'s is non-finite.

**K order.** With ``CIN_P >= 16`` the kernel walks the taps and, in each tap,
blocks of contiguous input channels, as one pipelined loop. With fewer channels per pack
(the stem: 3) it folds the taps into K (``FOLD_TAPS``): k runs over
``(tap, channel)`` pairs, so no dot is mostly padding.

**Prologue** (``HAS_PROLOGUE``): ``relu?(in_scale[c] * (x - in_mean[c]) +
in_shift[c])`` on each loaded input element (``in_mean`` with ``PRO_MEAN``),
i.e. the previous layer's batch norm applied lazily; padded positions stay
zero, as in a conv that follows BN + ReLU. Centring first, as batch norm
does, keeps values equal to the mean exactly at ``in_shift``.

**Block-end prologue** (``PRO_END``, a stride-1 1x1 convolution with
``groups=1``): the input is the previous residual block's output, computed
on load from that block's last conv output ``x`` and its identity:
``relu(in_scale*(x - in_mean) + in_shift + identity')``, identity' the
identity or (``PRO_END_AFFINE``) its own batch norm. The programs of the
first block of output channels also store it, rounded as the dot reads it,
and its ReLU's mask bits (:mod:`aru_kernels.relu_bits`): the block output is
written once and never read back by this convolution.

**Epilogue**, on the fp32 accumulator::

    y = relu?(scale[n] * (acc - mean[n]) / sqrt(var[n] + eps) + shift[n] + residual)

each term optional (``HAS_MEAN``, ``HAS_VAR``, ``HAS_SCALE``, ``HAS_SHIFT``,
``HAS_RESIDUAL``, ``RELU``): a bias, or an eval-mode batch norm computed from
its raw vectors, cast to the output dtype. ReLU propagates NaN, as
``torch.relu`` does. With ``STATS`` each program also writes, per output
channel, the mean and the sum of squared deviations of its tile of stored
outputs: training-mode batch norm's statistics, combined later without
atomics, so runs are bitwise repeatable. With ``SQUEEZE`` a row tile holds
pixels of one image only, and each program writes its tile's per-channel sum
of the stored outputs: the per-(image, channel) means that a
squeeze-excitation module needs, with no pass of their own (with ``STATS``
as well, its per-tile means are those of one image's rows and give them).

**Input gradient** (``TRANSPOSED``): the same loop computes dL/dx of a forward
convolution from dL/dy, reading the forward weight transposed and inverting
the tap map (strided convs included). If the forward had a prologue
``a = relu?(s*(x - mu) + b)``, ``PRO_BWD`` turns dL/da into dL/dx in the
epilogue (``res_ptr`` then holds the forward input x, ``scale_ptr``,
``shift_ptr`` and ``mean_ptr`` the prologue's s, b and mu) and writes per-tile
partial sums of dL/db and of dL/db * (x - mu), from which dL/ds follows.
With ``END_BWD`` (``groups=1``) the forward input x was a residual block's
output ``relu(bn(y_end) + identity')``: the epilogue applies that ReLU's
gradient (its mask read as bits, :mod:`aru_kernels.relu_bits`) to
dL/dx (plus the residual), writes the result, dz, and per-tile sums of dz,
dz * (y_end - mean) and (``END_ID``) dz * (y_d - mean_d) of the downsample
branch: that block end's backward, without dL/dx ever being written.
With ``GRAM`` (``PRO_BWD``, a stride-1 1x1 convolution, ``groups=1``) the
batch norm after this convolution, ``bn(y)``, has its variance term folded
through it: that term of dL/dy is ``b * (y - mean(y))`` per channel, and with
``y = W a`` it reaches dL/da as ``G (a - mean(a))``, ``G = W^T diag(b) W``.
A second K segment adds ``(a - mean(a)) @ G`` from the forward input ``a``
(recomputed from x through the prologue, the rows the epilogue reads anyway),
and ``acc_bias`` adds the constant part. dL/dy with the statistics term is
then never a tensor: the weight-gradient launch adds it for its own dot only.
A strided input gradient runs as ``STRIDE**2`` launches, one per output
phase (``PHASED``): each walks only the taps that reach its outputs (a 3x3
at stride 2: 1, 2, 2 and 4 of 9), none masked.

**Weight gradient** (``conv_wgrad_kernel``): with ``GRAD_STATS`` the loaded
dL/dy gets batch norm's statistics term ``a + b * (y - mean)`` added (the
gradient through the batch mean and variance; with ``STAT_SCALE`` the loaded
gradient is the one behind the batch norm, ``dL/dz``, and is first scaled by
the per-channel ``c``: ``c * dL/dz + a + b * (y - mean)``), and the programs of the first
k block write the sum once, for the input-gradient launch that follows:
the statistics' gradient is never a tensor of its own, and no separate pass
adds it. With ``DGRAD`` (a stride-1 1x1 convolution whose output channels
fit one block) the same launch also takes the input gradient from each dy'
tile it forms, so dy' is not written at all. Each split of the pixel sum
writes its own fp32 slab; ``wgrad_slab_sum_kernel`` adds the slabs in split
order and writes dL/dW in the weight's own layout and dtype, keeping only
each pack's diagonal blocks (the real groups).
"""

import triton
import triton.language as tl

from .pool_window import max_pool_grad_class
from .relu_bits import load_relu_mask, store_relu_mask


@triton.jit
def _dot_f32(a, b):
    """``a @ b`` as fp32, computed in float64 and rounded once: the interpreter's dot
    (``DOT_F32``). numpy's float32 matmul can round identical rows differently (on some
    CPUs its kernels split the sum by row position), so a flat image region would not
    give equal outputs, and exact ties (a batch-norm input at its batch mean, a ReLU at
    zero) would break where the GPU keeps them."""
    return tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)


@triton.jit
def _relu(v):
    """max(v, 0) that keeps NaN, as ``torch.relu`` does (plain ``tl.maximum`` drops it):
    PTX's ``max.NaN``, one instruction, which a following bf16/fp16 store or
    dot operand conversion absorbs (``cvt.relu``)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _prologue(a, ok, ch, ch_ok, in_mean_ptr, in_scale_ptr, in_shift_ptr, PRO_MEAN: tl.constexpr,
              PRO_RELU: tl.constexpr):
    """relu?(in_scale * (a - in_mean) + in_shift) per input channel ``ch``; zero where not ``ok``."""
    a = a.to(tl.float32)
    if PRO_MEAN:
        a = a - tl.load(in_mean_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    s = tl.load(in_scale_ptr + ch, mask=ch_ok, other=0.0)
    b = tl.load(in_shift_ptr + ch, mask=ch_ok, other=0.0)
    a = a * s[None, :] + b[None, :]
    if PRO_RELU:
        a = _relu(a)
    return tl.where(ok, a, 0.0)


@triton.jit
def _block_end_input(y, ok, off, ch, ch_ok, rows, row_ok, byte0, write, in_mean_ptr, in_scale_ptr, in_shift_ptr,
                     id_ptr, id_mean_ptr, id_scale_ptr, id_shift_ptr, out_ptr, mask_ptr, C,
                     AFFINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """A residual block's output from its last conv's output ``y`` (loaded at
    ``off``): ``relu(in_scale * (y - in_mean) + in_shift + identity')``, identity'
    the identity as loaded or (``AFFINE``) its own batch norm, as
    :func:`aru_kernels.batchnorm.bn_add_relu_kernel` computes and rounds it; where
    ``write``, stored with its ReLU's mask bits (``rows`` the tile's pixels,
    ``byte0`` the byte of its first channel). Zero where not ``ok``."""
    z = _prologue(y, ok, ch, ch_ok, in_mean_ptr, in_scale_ptr, in_shift_ptr, True, False)
    r = tl.load(id_ptr + off, mask=ok, other=0.0)
    if AFFINE:
        r = _prologue(r, ok, ch, ch_ok, id_mean_ptr, id_scale_ptr, id_shift_ptr, True, False)
    stored = _relu(z + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
    if write:
        tl.store(out_ptr + off, stored, mask=ok)
        store_relu_mask(mask_ptr, stored, ok, rows, row_ok, byte0, C, BLOCK_M, BLOCK_K)
    return stored


@triton.jit
def _prologue_grad_epilogue(g, x, off, ok, ch, ch_ok, out_ptr, mean_ptr, scale_ptr, shift_ptr,
                            PRO_MEAN: tl.constexpr, PRO_RELU: tl.constexpr):
    """Store dL/dx = s * dL/da behind a forward prologue ``a = relu?(s*(x - mu) + b)``,
    from ``g`` = dL/da (fp32) and the tile of x (channels ``ch``, NHWC offsets ``off``);
    return the tile's sums of dL/db and dL/db * (x - mu), i.e. dL/ds, per channel."""
    xc = x.to(tl.float32)
    if PRO_MEAN:
        xc = xc - tl.load(mean_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    s = tl.load(scale_ptr + ch, mask=ch_ok, other=0.0)[None, :]
    if PRO_RELU:
        pre = s * xc + tl.load(shift_ptr + ch, mask=ch_ok, other=0.0)[None, :]
        g = tl.where(pre <= 0, 0.0, g)  # a NaN pre-activation passes the gradient, as torch.relu's does
    g = tl.where(ok, g, 0.0)
    tl.store(out_ptr + off, (g * s).to(out_ptr.dtype.element_ty), mask=ok)
    return tl.sum(g, axis=0), tl.sum(g * xc, axis=0)  # -> dL/db, dL/ds


@triton.jit
def _input_grad_epilogue(g, off, ok, rows, row_ok, ch, ch_ok, byte0, out_ptr, res_ptr, end_mask_ptr,
                         end_y_ptr, end_mean_ptr, end_id_ptr, end_id_mean_ptr,
                         C, HAS_RESIDUAL: tl.constexpr, END_BWD: tl.constexpr, END_ID: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store an input-gradient tile ``g`` = dL/dx (fp32, rows ``rows``, channels ``ch``;
    ``off`` their NHWC offsets), plus ``res_ptr``'s tile with ``HAS_RESIDUAL``. With
    ``END_BWD`` x was a residual block's output ``relu(bn(y_end) + identity')``: store
    dz behind its ReLU instead (mask bits at ``byte0``), and return the tile's sums its
    batch norms' gradients take, per channel: of dz, dz * (y_end - mean) and (``END_ID``)
    dz * (y_d - mean_d). (Zeros for the sums not taken.)"""
    s_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_b = s_a
    s_c = s_a
    if HAS_RESIDUAL:
        g += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if END_BWD:
        keep = load_relu_mask(end_mask_ptr, rows, row_ok, byte0, C, BLOCK_M, BLOCK_C)
        g = tl.where(keep & ok, g, 0.0)
        yc = (tl.load(end_y_ptr + off, mask=ok, other=0.0).to(tl.float32)
              - tl.load(end_mean_ptr + ch, mask=ch_ok, other=0.0)[None, :])
        s_a = tl.sum(g, axis=0)
        s_b = tl.sum(g * yc, axis=0)
        if END_ID:
            ic = (tl.load(end_id_ptr + off, mask=ok, other=0.0).to(tl.float32)
                  - tl.load(end_id_mean_ptr + ch, mask=ch_ok, other=0.0)[None, :])
            s_c = tl.sum(g * ic, axis=0)
    tl.store(out_ptr + off, g.to(out_ptr.dtype.element_ty), mask=ok)
    return s_a, s_b, s_c


@triton.jit
def _tap_coord(o, k, size, STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
               TRANSPOSED: tl.constexpr, INSIDE: tl.constexpr = False):
    """The input coordinate that output coordinate ``o`` reads at kernel offset
    ``k``, and whether it exists. Transposed (input-gradient) launches invert
    the forward map ``o_fwd = (i_fwd + PAD - k * DIL) / STRIDE``. ``INSIDE``
    (:func:`_inside`): every tap of every output lies inside the input, so
    nothing is tested."""
    if TRANSPOSED:
        num = o + PAD - k * DIL
        i = num // STRIDE
        ok = (num >= 0) & (num % STRIDE == 0) & (i < size)
    else:
        i = o * STRIDE - PAD + k * DIL
        if INSIDE:
            ok = True
        else:
            ok = (i >= 0) & (i < size)
    return i, ok


@triton.constexpr_function
def _inside(H, W, P, Q, KH, KW, STRIDE, PAD, DIL) -> bool:
    """Whether every tap of every output pixel of a (forward) convolution lies
    inside its input, so that its launches test no input bounds per element:
    without padding, the input ends where the last output's last tap does or
    later (checked too). The ResNet stem, whose image is padded ahead by its
    space-to-depth, and the strided 1x1s."""
    return PAD == 0 and (P - 1) * STRIDE + (KH - 1) * DIL < H and (Q - 1) * STRIDE + (KW - 1) * DIL < W


@triton.jit
def _weight_tile_offsets(pack, ck, k_ok, rn, n_ok, sw_o, sw_i,
                         CIN_G: tl.constexpr, COUT_G: tl.constexpr, CIN_P: tl.constexpr, COUT_P: tl.constexpr,
                         TRANSPOSED: tl.constexpr):
    """Offsets and mask of the block-diagonal tile ``B[k, n]`` of one pack in
    the weight's own layout ``w[C_out, C_in/groups, KH, KW]`` (strides
    ``sw_*``), tap (0, 0); other taps add their offset.

    ``ck`` gives each row's input channel within the pack and ``rn`` each
    column's output channel within the pack. Entries whose channels belong to
    different groups are the zero blocks: masked, never read. A transposed
    launch reads the forward weight transposed, its input channels being the
    forward's output channels.
    """
    same_group = (ck // CIN_G)[:, None] == (rn // COUT_G)[None, :]
    if TRANSPOSED:
        off = (pack * CIN_P + ck)[:, None] * sw_o + (rn % COUT_G)[None, :] * sw_i
    else:
        off = (ck % CIN_G)[:, None] * sw_i + (pack * COUT_P + rn)[None, :] * sw_o
    return off, same_group & k_ok[:, None] & n_ok[None, :]


@triton.jit
def conv_bn_act_kernel(
    x_ptr,  # [N, H, W, C_IN] input, NHWC contiguous
    w_ptr,  # the forward weight [C_out, C_in/groups, KH, KW], strides sw_*, any floating dtype
    out_ptr,  # [N, P, Q, C_OUT] output, NHWC contiguous
    mean_ptr,  # [C_OUT] fp32 epilogue mean (HAS_MEAN); the prologue's mean with PRO_BWD
    var_ptr,  # [C_OUT] fp32 epilogue variance (HAS_VAR)
    scale_ptr,  # [C_OUT] fp32 epilogue scale (HAS_SCALE)
    shift_ptr,  # [C_OUT] fp32 epilogue shift (HAS_SHIFT)
    res_ptr,  # [N, P, Q, C_OUT] residual, NHWC contiguous (HAS_RESIDUAL)
    in_mean_ptr,  # [C_IN] fp32 prologue mean (PRO_MEAN)
    in_scale_ptr,  # [C_IN] fp32 prologue scale (HAS_PROLOGUE)
    in_shift_ptr,  # [C_IN] fp32 prologue shift (HAS_PROLOGUE)
    part_a_ptr, part_b_ptr,  # [M tiles, C_OUT] fp32 per-tile partial statistics (STATS or PRO_BWD)
    M,  # N * P * Q: output pixels
    sw_o, sw_i, sw_h, sw_w,  # strides of the forward weight
    eps,  # added to the epilogue variance (HAS_VAR)
    # Fixed per layer, so constants: the pixel decoding divides by constants.
    H: tl.constexpr, W: tl.constexpr,  # input spatial size
    P: tl.constexpr, Q: tl.constexpr,  # output spatial size
    C_IN: tl.constexpr, C_OUT: tl.constexpr,  # channels of input and output (their NHWC row strides)
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr,  # input and output channels of one group
    CIN_P: tl.constexpr,  # input channels of one pack
    COUT_P: tl.constexpr,  # output channels of one pack
    FOLD_TAPS: tl.constexpr,  # k runs over (tap, channel) pairs instead of taps x channel blocks
    HAS_PROLOGUE: tl.constexpr, PRO_MEAN: tl.constexpr, PRO_RELU: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_VAR: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    TRANSPOSED: tl.constexpr,  # input-gradient launch: x is dL/d(conv output), w read transposed
    STATS: tl.constexpr,  # write per-tile (mean, M2) of the stored output, for batch norm
    SQUEEZE: tl.constexpr,  # row tiles within one image; write per-tile sums of the stored output
    PRO_BWD: tl.constexpr,  # input-gradient of a conv with a prologue (see module docstring)
    PHASED: tl.constexpr,  # strided input-gradient launch over one output phase (see module docstring)
    PHASE_H: tl.constexpr, PHASE_W: tl.constexpr,
    DOT_F32: tl.constexpr,  # the interpreter's dot, _dot_f32 (its bf16 dot is wrong)
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32 operands ("ieee" or "tf32")
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    # END_BWD: x was the output of a residual block, relu(bn(y_end) + identity'):
    end_mask_ptr=None,  # [M, ceil(C_OUT/8)] uint8: that ReLU's gradient mask as bits (relu_bits)
    end_y_ptr=None,  # [N, P, Q, C_OUT] its last conv's output
    end_mean_ptr=None,  # [C_OUT] fp32 that conv's batch mean
    end_id_ptr=None,  # [N, P, Q, C_OUT] its downsample conv's output (END_ID)
    end_id_mean_ptr=None,  # [C_OUT] fp32 that conv's batch mean (END_ID)
    part_c_ptr=None,  # [M tiles, C_OUT] fp32 out: per-tile sums of dz * (end_id - end_id_mean) (END_ID)
    END_BWD: tl.constexpr = False,  # input gradient through that block end (see the module docstring)
    END_ID: tl.constexpr = False,
    # GRAM (with PRO_BWD, 1x1, stride 1, groups 1): the next batch norm's variance term folded
    gram_ptr=None,  # [C_OUT, C_OUT] fp32 G = W^T diag(b) W
    gram_mean_ptr=None,  # [C_OUT] fp32 the forward input's mean over the batch, after its prologue
    acc_bias_ptr=None,  # [C_OUT] fp32 added to dL/da before the prologue's backward
    GRAM: tl.constexpr = False,
    # PRO_END (1x1, stride 1, no padding, groups 1): x is the last conv output of the previous
    # residual block, whose end relu(in_scale * (x - in_mean) + in_shift + identity') is the input
    pro_id_ptr=None,  # [N, H, W, C_IN] that block's identity: its input, or its downsample conv's output
    pro_id_mean_ptr=None, pro_id_scale_ptr=None, pro_id_shift_ptr=None,  # [C_IN] fp32 (PRO_END_AFFINE)
    pro_out_ptr=None,  # [N, H, W, C_IN] out: the block's output, as stored
    pro_mask_ptr=None,  # [M, ceil(C_IN/8)] uint8 out: its ReLU's gradient mask as bits (relu_bits)
    PRO_END: tl.constexpr = False,
    PRO_END_AFFINE: tl.constexpr = False,  # the identity has a batch norm of its own
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

    TILES_PER_IMG: tl.constexpr = (P * Q + BLOCK_M - 1) // BLOCK_M  # (SQUEEZE)
    if SQUEEZE:  # tile pid_m is a tile of one image's rows, so its sums are that image's
        sq_img = pid_m // TILES_PER_IMG
        local = (pid_m - sq_img * TILES_PER_IMG) * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = sq_img * (P * Q) + local
        m_ok = local < P * Q
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
    # A phased launch's rows are the outputs (p, q) = (i, j) * STRIDE + PHASE, which
    # only the taps kh = KH0 + STRIDE * jh (jh < NKH) reach, each at dy row i + OFF_H - jh.
    KH0: tl.constexpr = (PHASE_H + PAD) % STRIDE
    KW0: tl.constexpr = (PHASE_W + PAD) % STRIDE
    NKH: tl.constexpr = (KH - KH0 + STRIDE - 1) // STRIDE
    NKW: tl.constexpr = (KW - KW0 + STRIDE - 1) // STRIDE
    OFF_H: tl.constexpr = (PHASE_H + PAD - KH0) // STRIDE
    OFF_W: tl.constexpr = (PHASE_W + PAD - KW0) // STRIDE
    P_PH: tl.constexpr = (P - PHASE_H + STRIDE - 1) // STRIDE
    Q_PH: tl.constexpr = (Q - PHASE_W + STRIDE - 1) // STRIDE
    TAPS: tl.constexpr = PHASED * NKH * NKW + (1 - PHASED) * KH * KW
    INSIDE: tl.constexpr = _inside(H, W, P, Q, KH, KW, STRIDE, PAD, DIL)  # (forward launches only)
    if PHASED:
        t = rm // Q_PH
        j = rm - t * Q_PH
        img = t // P_PH
        i = t - img * P_PH
        p = i * STRIDE + PHASE_H
        q = j * STRIDE + PHASE_W
        out_row = (img * P + p) * Q + q
    else:
        # q = rm - t * Q rather than rm % Q: LLVM would pair the % with the // and
        # freeze the pair, which triton 3.6's LLVM fails to select for some tiles
        t = rm // Q
        q = rm - t * Q
        img = t // P
        p = t - img * P
        i = p
        j = q
        out_row = rm
    img_base = img.to(tl.int64) * H * W * C_IN + pack * CIN_P

    rn = n0 + tl.arange(0, BLOCK_N)  # output channel within the pack
    n_ok = rn < COUT_P
    dot_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FOLD_TAPS:
        K_TOTAL: tl.constexpr = KH * KW * CIN_P
        for k0 in range(0, K_TOTAL, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K_TOTAL
            c = rk % CIN_P
            tap = rk // CIN_P
            ih, h_ok = _tap_coord(p[:, None], (tap // KW)[None, :], H, STRIDE, PAD, DIL, TRANSPOSED, INSIDE)
            iw, w_ok = _tap_coord(q[:, None], (tap % KW)[None, :], W, STRIDE, PAD, DIL, TRANSPOSED, INSIDE)
            ok = m_ok[:, None] & k_ok[None, :] & h_ok & w_ok
            a = tl.load(x_ptr + img_base[:, None] + (ih * W + iw) * C_IN + c[None, :], mask=ok, other=0.0)
            if HAS_PROLOGUE:
                a = _prologue(a, ok, pack * CIN_P + c, k_ok, in_mean_ptr, in_scale_ptr, in_shift_ptr,
                              PRO_MEAN, PRO_RELU)
            b_off, b_ok = _weight_tile_offsets(pack, c, k_ok, rn, n_ok, sw_o, sw_i,
                                               CIN_G, COUT_G, CIN_P, COUT_P, TRANSPOSED)
            tap_off = ((tap // KW) * sw_h + (tap % KW) * sw_w)[:, None]
            b = tl.load(w_ptr + b_off + tap_off, mask=b_ok, other=0.0)
            if DOT_F32:
                acc += _dot_f32(a, b)
            else:
                acc = tl.dot(a.to(dot_dtype), b.to(dot_dtype), acc, input_precision=INPUT_PRECISION)
    else:
        # One pipelined loop over (tap, channel block) pairs. With one channel
        # block the weight tile's offsets and mask are the same at every tap:
        # computed once, here.
        C_BLOCKS: tl.constexpr = (CIN_P + BLOCK_K - 1) // BLOCK_K
        rk0 = tl.arange(0, BLOCK_K)
        b_off, b_ok = _weight_tile_offsets(pack, rk0, rk0 < CIN_P, rn, n_ok, sw_o, sw_i,
                                           CIN_G, COUT_G, CIN_P, COUT_P, TRANSPOSED)
        b_in = (rk0 < CIN_P)[:, None] & n_ok[None, :]
        for it in range(0, TAPS * C_BLOCKS):
            tap = it // C_BLOCKS
            rk = (it % C_BLOCKS) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = rk < CIN_P
            if PHASED:
                kh = KH0 + STRIDE * (tap // NKW)
                kw = KW0 + STRIDE * (tap % NKW)
                ih = i + OFF_H - tap // NKW
                iw = j + OFF_W - tap % NKW
                h_ok = (ih >= 0) & (ih < H)
                w_ok = (iw >= 0) & (iw < W)
            else:
                kh = tap // KW
                kw = tap % KW
                ih, h_ok = _tap_coord(p, kh, H, STRIDE, PAD, DIL, TRANSPOSED, INSIDE)
                iw, w_ok = _tap_coord(q, kw, W, STRIDE, PAD, DIL, TRANSPOSED, INSIDE)
            row_ok = m_ok & h_ok & w_ok
            ok = row_ok[:, None] & k_ok[None, :]
            row = img_base + (ih * W + iw) * C_IN
            a = tl.load(x_ptr + row[:, None] + rk[None, :], mask=ok, other=0.0)
            if HAS_PROLOGUE:
                a = _prologue(a, ok, pack * CIN_P + rk, k_ok, in_mean_ptr, in_scale_ptr, in_shift_ptr,
                              PRO_MEAN, PRO_RELU)
            if PRO_END:  # the programs of the first block of N write the block output, each element once
                a = _block_end_input(a, ok, row[:, None] + rk[None, :], rk, k_ok, rm, m_ok,
                                     (it % C_BLOCKS) * (BLOCK_K // 8), pid_n == 0, in_mean_ptr, in_scale_ptr,
                                     in_shift_ptr, pro_id_ptr, pro_id_mean_ptr, pro_id_scale_ptr, pro_id_shift_ptr,
                                     pro_out_ptr, pro_mask_ptr, C_IN, PRO_END_AFFINE, BLOCK_M, BLOCK_K)
            if C_BLOCKS > 1:
                b_off, b_ok = _weight_tile_offsets(pack, rk, k_ok, rn, n_ok, sw_o, sw_i,
                                                   CIN_G, COUT_G, CIN_P, COUT_P, TRANSPOSED)
                b_in = k_ok[:, None] & n_ok[None, :]
            w_tap = w_ptr + b_off
            if KH * KW > 1:  # (a 1x1 weight's tap strides may be 1: adding 0 * 1 would hide its alignment)
                w_tap += kh * sw_h + kw * sw_w
            b = tl.load(w_tap, mask=b_in, other=0.0)
            b = tl.where(b_ok, b, 0.0)
            if DOT_F32:
                acc += _dot_f32(a, b)
            else:
                acc = tl.dot(a.to(dot_dtype), b.to(dot_dtype), acc, input_precision=INPUT_PRECISION)

    if GRAM:
        # a second K segment: (a - mean(a)) @ G, a = the forward input after its prologue
        # (relu?(s * (x - mu) + b), x at res_ptr), one row per output pixel
        x_row = out_row.to(tl.int64) * C_OUT
        for k2 in range(0, C_OUT, BLOCK_K):
            rk2 = k2 + tl.arange(0, BLOCK_K)
            k2_ok = rk2 < C_OUT
            ok2 = m_ok[:, None] & k2_ok[None, :]
            a2 = tl.load(res_ptr + x_row[:, None] + rk2[None, :], mask=ok2, other=0.0)
            a2 = _prologue(a2, ok2, rk2, k2_ok, mean_ptr, scale_ptr, shift_ptr, PRO_MEAN, PRO_RELU)
            a2 = tl.where(ok2, a2 - tl.load(gram_mean_ptr + rk2, mask=k2_ok, other=0.0)[None, :], 0.0)
            g2 = tl.load(gram_ptr + rk2[:, None] * C_OUT + rn[None, :], mask=k2_ok[:, None] & n_ok[None, :],
                         other=0.0)
            if DOT_F32:
                acc += _dot_f32(a2, g2)
            else:
                acc = tl.dot(a2.to(dot_dtype), g2.to(dot_dtype), acc, input_precision=INPUT_PRECISION)

    # Epilogue on the fp32 accumulator.
    co = pack * COUT_P + rn
    out_off = out_row.to(tl.int64)[:, None] * C_OUT + co[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    part_off = pid_m * C_OUT + co
    if PRO_BWD:
        # acc = dL/da with a = relu?(s * (x - mu) + b) the forward prologue; res_ptr holds x.
        g = acc
        if GRAM:
            g += tl.load(acc_bias_ptr + co, mask=n_ok, other=0.0)[None, :]
        s_a, s_b = _prologue_grad_epilogue(g, tl.load(res_ptr + out_off, mask=ok, other=0.0), out_off, ok, co,
                                           n_ok, out_ptr, mean_ptr, scale_ptr, shift_ptr, PRO_MEAN, PRO_RELU)
        tl.store(part_a_ptr + part_off, s_a, mask=n_ok)
        tl.store(part_b_ptr + part_off, s_b, mask=n_ok)
    elif END_BWD:  # groups = 1: one pack, co = n0 + rn
        s_a, s_b, s_c = _input_grad_epilogue(acc, out_off, ok, out_row, m_ok, co, n_ok, n0 // 8, out_ptr, res_ptr,
                                             end_mask_ptr, end_y_ptr, end_mean_ptr, end_id_ptr, end_id_mean_ptr,
                                             C_OUT, HAS_RESIDUAL, True, END_ID, BLOCK_M, BLOCK_N)
        tl.store(part_a_ptr + part_off, s_a, mask=n_ok)
        tl.store(part_b_ptr + part_off, s_b, mask=n_ok)
        if END_ID:
            tl.store(part_c_ptr + part_off, s_c, mask=n_ok)
    else:
        y = acc
        if HAS_MEAN:
            y = y - tl.load(mean_ptr + co, mask=n_ok, other=0.0)[None, :]
        if HAS_VAR or HAS_SCALE:
            # one per-channel factor; 1/sqrt as PyTorch's batch-norm kernels take it (rsqrt)
            factor = tl.full((BLOCK_N,), 1.0, tl.float32)
            if HAS_VAR:
                factor = tl.math.rsqrt(tl.load(var_ptr + co, mask=n_ok, other=1.0) + eps)
            if HAS_SCALE:
                factor = factor * tl.load(scale_ptr + co, mask=n_ok, other=0.0)
            y = y * factor[None, :]
        if HAS_SHIFT:
            y = y + tl.load(shift_ptr + co, mask=n_ok, other=0.0)[None, :]
        if HAS_RESIDUAL:
            y = y + tl.load(res_ptr + out_off, mask=ok, other=0.0).to(tl.float32)
        if RELU:
            y = _relu(y)
        y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_off, y, mask=ok)
        if SQUEEZE and not STATS:  # the squeeze of squeeze-excitation: sums of the stored values, per image
            tl.store(part_a_ptr + part_off, tl.sum(tl.where(ok, y.to(tl.float32), 0.0), axis=0), mask=n_ok)
        if STATS:
            # Per-tile mean and sum of squared deviations of the stored values;
            # tiles combine exactly (Chan et al.), safe for large means. (With
            # SQUEEZE the tiles are per image, and their means give the squeeze.)
            if SQUEEZE:
                count = tl.minimum(P * Q - (pid_m % TILES_PER_IMG) * BLOCK_M, BLOCK_M).to(tl.float32)
            else:
                count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
            if BLOCK_N >= 64:
                # Read back what the program stored, in the store's layout, where a
                # thread holds several rows of 8 adjacent channels and the warps split
                # the rows: the sums over rows are mostly adds in a thread. In the
                # accumulator's layout each thread holds 2 rows a channel and the sums
                # take 3 shuffle levels for every channel a thread holds (static
                # floors: the notes of 2026-12-05). Narrow tiles (16 channels, 2 a
                # thread) keep the accumulator's layout. The barrier makes the other
                # threads' stores visible, whatever layout the load takes.
                tl.debug_barrier()
                v = tl.load(out_ptr + out_off, mask=ok, other=0.0).to(tl.float32)
            else:
                v = tl.where(ok, y.to(tl.float32), 0.0)
            mean = tl.sum(v, axis=0) / count
            d = tl.where(ok, v - mean[None, :], 0.0)
            tl.store(part_a_ptr + part_off, mean, mask=n_ok)
            tl.store(part_b_ptr + part_off, tl.sum(d * d, axis=0), mask=n_ok)


@triton.jit
def conv_wgrad_kernel(
    x_ptr,  # [N, H, W, C_IN] forward input, NHWC contiguous
    dy_ptr,  # [N, P, Q, C_OUT] dL/dy, NHWC contiguous
    part_ptr,  # [SPLITS, packs, KH*KW*CIN_P, COUT_P] fp32 partial dL/dW, one slab per split of M
    in_mean_ptr,  # [C_IN] fp32 forward prologue mean (PRO_MEAN)
    in_scale_ptr,  # [C_IN] fp32 forward prologue scale (HAS_PROLOGUE)
    in_shift_ptr,  # [C_IN] fp32 forward prologue shift (HAS_PROLOGUE)
    y_ptr,  # [N, P, Q, C_OUT] forward output (GRAD_STATS)
    st_mean_ptr, st_a_ptr, st_b_ptr,  # [C_OUT] fp32 batch mean and the statistics term's a, b (GRAD_STATS)
    st_c_ptr,  # [C_OUT] fp32 factor on the loaded dL/dy (STAT_SCALE)
    st_sq_ptr,  # [N, C_OUT] fp32 per-(image, channel) term of dL/dy (SQ_TERM)
    dy_out_ptr,  # [N, P, Q, C_OUT] out: dL/dy with the statistics term, as the dot read it (GRAD_STATS)
    M,  # N * P * Q
    M_PER_SPLIT,  # output pixels per split, a multiple of BLOCK_M
    # spatial sizes and channel counts, fixed per layer: constants, so that the pixel
    # decoding inside the loop divides by constants (multiply and shift)
    H: tl.constexpr, W: tl.constexpr, P: tl.constexpr, Q: tl.constexpr,
    C_IN: tl.constexpr, C_OUT: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    CIN_P: tl.constexpr, COUT_P: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, PRO_MEAN: tl.constexpr, PRO_RELU: tl.constexpr,
    GRAD_STATS: tl.constexpr,  # dL/dy + st_a + st_b * (y - st_mean) (module docstring)
    STAT_SCALE: tl.constexpr,  # st_c * dL/dy + ... (the loaded gradient is batch norm's input-side one)
    SQ_TERM: tl.constexpr,  # ... + st_sq[image, channel] (the gradient through a squeeze: per-image means)
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    asum_ptr=None,  # [SPLITS, packs, KH*KW*CIN_P] fp32 out: sums of A over the split's pixels (A_SUMS)
    WRITE_DY: tl.constexpr = True,  # with GRAD_STATS: write dy' for the input-gradient launch
    A_SUMS: tl.constexpr = False,
    gram_ptr=None,  # [SPLITS, K, K] fp32 out: A^T A over the split's pixels (A_GRAM)
    A_GRAM: tl.constexpr = False,  # one block of k, BLOCK_N == BLOCK_K: program column N_BLOCKS takes A^T A
    # DGRAD (a stride-1 1x1 convolution, groups=1, all of N in one block): dL/dx from the same dy tiles
    w_ptr=None,  # the forward weight [C_OUT, C_IN, 1, 1], strides sw_o, sw_i
    sw_o=0, sw_i=0,
    dx_ptr=None,  # [N, H, W, C_IN] out: dL/dx (+ residual); with END_BWD dz behind the input's block end
    res_ptr=None,  # [N, H, W, C_IN] another gradient of x, added (HAS_RESIDUAL)
    end_mask_ptr=None, end_y_ptr=None, end_mean_ptr=None,  # the input's block end (END_BWD, as conv_bn_act_kernel)
    end_id_ptr=None, end_id_mean_ptr=None,  # (END_ID)
    # [SPLITS, C_IN] fp32 out: per-split sums (END_BWD; with a prologue, its backward's)
    part_a_ptr=None, part_b_ptr=None, part_c_ptr=None,
    DGRAD: tl.constexpr = False,
    HAS_RESIDUAL: tl.constexpr = False,
    END_BWD: tl.constexpr = False,
    END_ID: tl.constexpr = False,
    # POOL_GRAD: dy_ptr is [N, PP, PQ, C_OUT], the gradient of a max-pool of this conv's output
    # after its batch norm and ReLU, and pool_code_ptr its int8 codes (aru_kernels.maxpool)
    pool_code_ptr=None,
    POOL_GRAD: tl.constexpr = False,
    PP: tl.constexpr = 1, PQ: tl.constexpr = 1,
    POOL_K: tl.constexpr = 1, POOL_STRIDE: tl.constexpr = 1, POOL_PAD: tl.constexpr = 0,
    # M a multiple of BLOCK_M: the pixel loop stops at M, so every block it takes is whole
    FULL_STEPS: tl.constexpr = False,
):
    """Weight gradient: per pack, ``dW[k, n] = sum_m A[m, k] * dy[m, n]``.

    ``k = (tap, ci)`` runs over every tap and input channel of the pack, tap
    major (the forward's ``FOLD_TAPS`` order), so one program computes the
    taps of a block of k from one dy tile per pixel block: dy is read once
    per k block, not once per tap. ``A`` is the forward's input after its
    prologue, gathered and recomputed on load; the k coordinates are decoded
    once per program, and a stride-1 1x1 convolution reads its rows without
    any decoding. The sum over the output pixels m is split across
    ``program_id(1)``; each split writes its own slab and the launcher adds
    the slabs in a fixed order, so the result is deterministic. Whole pack
    blocks are computed (tensor-core tiles); the launcher keeps their
    diagonal, the real groups. With ``A_SUMS`` the programs of the first n
    block also write, per split, the sums of ``A`` over their pixels (the
    input's per-channel sums, for the folded variance term of
    ``conv_bn_act_kernel``'s ``GRAM``), and without ``WRITE_DY`` the
    statistics term is added for this launch's dot only, dy' not written.
    With ``A_GRAM`` (all of k in one block, ``BLOCK_N == BLOCK_K``) one more
    column of programs computes ``A^T A`` per split instead of a block of
    dW: with ``y = A W^T`` (a 1x1 convolution), the statistics term's share
    of dW, ``sum_m (y[m, n] - mean_n) A[m, k]``, is
    ``(W (A^T A - s s^T / M))[n, k]`` (``s`` the sums of A), which the
    launcher adds without y being read.

    With ``DGRAD`` (a stride-1 1x1 convolution, ``groups=1``, all output
    channels in one block) each program also computes the input gradient of
    its pixels and k block, ``dy' W[:, k]``, from the dy' tile it has just
    formed: dy' (with the statistics term) is never written and read back.
    The epilogue is the input-gradient launch's (``HAS_RESIDUAL``,
    ``END_BWD``, ``END_ID`` as in ``conv_bn_act_kernel``, or with a prologue
    its backward, ``PRO_BWD``'s); its sums are kept over the program's pixel
    blocks, in order, and written once per split.

    With ``POOL_GRAD`` (a ResNet stem: this conv, its batch norm, a ReLU, a
    max-pool) the dy tile is gathered from the pooled gradient and the pool's
    codes (:mod:`aru_kernels.pool_window`: the gradient behind
    the ReLU), then scaled and given the statistics term (``STAT_SCALE``,
    ``GRAD_STATS``): the full-resolution dL/dy is never written. ``M`` then
    counts blocks of POOL_STRIDE x POOL_STRIDE pixels, each row of them padded
    to whole steps of BLOCK_M (so a step's image and row are scalars), and the pixel loop runs
    once for each stride class of the pool (``(p + POOL_PAD) % POOL_STRIDE``, the
    same of q), so it reads only the windows that cover its pixels, at positions
    known when compiled (:func:`aru_kernels.pool_window.max_pool_grad_class`).
    """
    K_TOTAL: tl.constexpr = KH * KW * CIN_P
    K_BLOCKS: tl.constexpr = (K_TOTAL + BLOCK_K - 1) // BLOCK_K
    N_BLOCKS: tl.constexpr = (COUT_P + BLOCK_N - 1) // BLOCK_N
    POINTWISE: tl.constexpr = (KH == 1) and (KW == 1) and (STRIDE == 1) and (PAD == 0)
    INSIDE: tl.constexpr = _inside(H, W, P, Q, KH, KW, STRIDE, PAD, DIL)  # no input bounds to test
    pid = tl.program_id(0)
    split = tl.program_id(1)
    COLUMNS: tl.constexpr = N_BLOCKS + A_GRAM  # A_GRAM: the last column of programs takes A^T A
    n_b = pid % COLUMNS
    t = pid // COLUMNS
    if A_GRAM:
        tl.static_assert(K_BLOCKS == 1 and BLOCK_N == BLOCK_K and not GRAD_STATS)
    k_b = t % K_BLOCKS
    pack = t // K_BLOCKS

    # Columns: (tap, input channel), decoded once.
    rk = k_b * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = rk < K_TOTAL
    ci = rk % CIN_P
    tap = rk // CIN_P
    dh = (tap // KW) * DIL - PAD  # input row offset of the tap
    dw = (tap % KW) * DIL - PAD
    col = (dh * W + dw) * C_IN + pack * CIN_P + ci
    rn = n_b * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < COUT_P
    cn = pack * COUT_P + rn

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    a_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if DGRAD:
        tl.static_assert(POINTWISE and N_BLOCKS == 1 and COUT_P == C_OUT and not A_GRAM and not WRITE_DY)
        tl.static_assert(not HAS_PROLOGUE or not (END_BWD or HAS_RESIDUAL))
        # W[n, k] for this k block, read once: the input gradient's right operand
        wt = tl.load(w_ptr + cn[:, None] * sw_o + ci[None, :] * sw_i, mask=n_ok[:, None] & k_ok[None, :],
                     other=0.0).to(dy_ptr.dtype.element_ty)
    d_a = tl.zeros((BLOCK_K,), dtype=tl.float32)  # DGRAD: this split's sums of its epilogue, in pixel order
    d_b = d_a
    d_c = d_a
    CLASSES: tl.constexpr = POOL_STRIDE * POOL_STRIDE if POOL_GRAD else 1
    m_start = split * M_PER_SPLIT
    m_end = m_start + M_PER_SPLIT
    # whole tiles (FULL_STEPS, and 1x1 k and n blocks that divide k and n): no row or column
    # masks on the x, dy and y tiles, nor the selects that keep A zero on masked rows
    WHOLE_A: tl.constexpr = FULL_STEPS and POINTWISE and K_TOTAL % BLOCK_K == 0 and not POOL_GRAD and not A_GRAM
    WHOLE_G: tl.constexpr = FULL_STEPS and COUT_P % BLOCK_N == 0 and not POOL_GRAD and not A_GRAM
    if FULL_STEPS:
        tl.static_assert(not POOL_GRAD)
        m_end = tl.minimum(m_end, M)
    for cls in tl.static_range(CLASSES):  # POOL_GRAD: one loop a stride class of the pool (docstring)
        for m0 in range(m_start, m_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < M
            if POOL_GRAD:  # rm: blocks of POOL_STRIDE x POOL_STRIDE pixels; this loop's class of them
                HJ: tl.constexpr = (P - 1 + POOL_PAD) // POOL_STRIDE + 1
                WL: tl.constexpr = (Q - 1 + POOL_PAD) // POOL_STRIDE + 1
                WLP: tl.constexpr = (WL + BLOCK_M - 1) // BLOCK_M * BLOCK_M
                rh = cls // POOL_STRIDE
                rw = cls % POOL_STRIDE
                # a row of blocks takes WLP slots (M counts them), so a step's BLOCK_M lie in one
                # row: its image and block row are scalars, only the column a vector (a padding
                # slot, pl >= WL, has q >= Q)
                t3 = m0 // WLP
                pl = (m0 - t3 * WLP) + tl.arange(0, BLOCK_M)
                img = t3 // HJ
                pj = t3 - img * HJ
                p = pj * POOL_STRIDE + rh - POOL_PAD
                q = pl * POOL_STRIDE + rw - POOL_PAD
                m_ok = (m0 < M) & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
                rm = (img * P + p) * Q + q  # the pixel itself
            if POINTWISE:
                row = rm.to(tl.int64) * C_IN
                if WHOLE_A:
                    ok = True
                else:
                    ok = m_ok[:, None] & k_ok[None, :]
            else:
                if not POOL_GRAD:
                    t2 = rm // Q  # (no %: see conv_bn_act_kernel)
                    q = rm - t2 * Q
                    img = t2 // P
                    p = t2 - img * P
                if INSIDE:
                    ok = m_ok[:, None] & k_ok[None, :]
                else:
                    ih = (p * STRIDE)[:, None] + dh[None, :]
                    iw = (q * STRIDE)[:, None] + dw[None, :]
                    ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                row = ((img.to(tl.int64) * H + p * STRIDE) * W + q * STRIDE) * C_IN
            x_tile = tl.load(x_ptr + row[:, None] + col[None, :], mask=ok, other=0.0)
            a = x_tile
            if HAS_PROLOGUE:
                a = _prologue(a, ok, pack * CIN_P + ci, k_ok, in_mean_ptr, in_scale_ptr, in_shift_ptr,
                              PRO_MEAN, PRO_RELU)
            g_off = rm.to(tl.int64)[:, None] * C_OUT + cn[None, :]
            if WHOLE_G:
                g_ok = True
            else:
                g_ok = m_ok[:, None] & n_ok[None, :]
            if POOL_GRAD:
                tl.static_assert(GRAD_STATS and STAT_SCALE and not WRITE_DY and not DGRAD)
                g = max_pool_grad_class(dy_ptr, pool_code_ptr, img, pj, pl, m_ok, cn, n_ok, PP, PQ, C_OUT, rh, rw,
                                        POOL_K, POOL_STRIDE, BLOCK_M, BLOCK_N)
            elif A_GRAM:  # the Gram column's right operand is A itself; it reads no dL/dy
                g = tl.where(n_b == N_BLOCKS, a.to(dy_ptr.dtype.element_ty),
                             tl.load(dy_ptr + g_off, mask=g_ok & (n_b < N_BLOCKS), other=0.0))
            else:
                g = tl.load(dy_ptr + g_off, mask=g_ok, other=0.0)
            if GRAD_STATS:
                g = g.to(tl.float32)
                if STAT_SCALE:
                    g = g * tl.load(st_c_ptr + cn, mask=n_ok, other=0.0)[None, :]
                y_t = tl.load(y_ptr + g_off, mask=g_ok, other=0.0)
                if DGRAD:
                    g = g + _prologue(y_t, g_ok, cn, n_ok, st_mean_ptr, st_b_ptr, st_a_ptr, True, False)
                elif WHOLE_G or dy_ptr.dtype.element_ty != tl.float16:
                    # unmasked: a row or channel outside the tile gets a finite term (y and the
                    # vectors load 0 there), which meets only zeros of A in the dot and is never
                    # stored. (DGRAD keeps the mask: without it, its epilogue spills.)
                    g = g + _prologue(y_t, True, cn, n_ok, st_mean_ptr, st_b_ptr, st_a_ptr, True, False)
                else:
                    # float16: outside the tile's rows that term, a - b * mean, passes 65504 where
                    # |mean| >> std, turns inf in the cast below, and inf * 0 in the dot is NaN
                    g = g + _prologue(y_t, m_ok[:, None], cn, n_ok, st_mean_ptr, st_b_ptr, st_a_ptr, True, False)
                if SQ_TERM:
                    g_img = (rm // (P * Q)).to(tl.int64)
                    g += tl.load(st_sq_ptr + g_img[:, None] * C_OUT + cn[None, :], mask=g_ok, other=0.0)
                g = g.to(dy_ptr.dtype.element_ty)
                if WRITE_DY and k_b == 0:  # one k block's programs cover every (pixel, channel) once
                    tl.store(dy_out_ptr + g_off, g, mask=g_ok)
            if A_SUMS:
                a_sum += tl.sum(a.to(tl.float32), axis=0)
            if DOT_F32:
                acc += _dot_f32(tl.trans(a), g)
            else:
                acc = tl.dot(tl.trans(a.to(g.dtype)), g, acc, input_precision=INPUT_PRECISION)
            if DGRAD:
                if DOT_F32:
                    da = _dot_f32(g, wt)
                else:
                    da = tl.dot(g, wt, input_precision=INPUT_PRECISION)
                if HAS_PROLOGUE:  # dL/da behind the forward prologue, from the x tile loaded above
                    t_a, t_b = _prologue_grad_epilogue(da, x_tile, row[:, None] + col[None, :], ok, ci, k_ok, dx_ptr,
                                                       in_mean_ptr, in_scale_ptr, in_shift_ptr, PRO_MEAN, PRO_RELU)
                    d_a += t_a
                    d_b += t_b
                else:
                    t_a, t_b, t_c = _input_grad_epilogue(da, row[:, None] + col[None, :], ok, rm, m_ok, ci, k_ok,
                                                         k_b * (BLOCK_K // 8), dx_ptr, res_ptr, end_mask_ptr, end_y_ptr,
                                                         end_mean_ptr, end_id_ptr, end_id_mean_ptr, C_IN, HAS_RESIDUAL,
                                                         END_BWD, END_ID, BLOCK_M, BLOCK_K)
                    d_a += t_a
                    d_b += t_b
                    d_c += t_c
    if DGRAD and (HAS_PROLOGUE or END_BWD):  # one row of sums per split, added in a fixed order by the launcher
        tl.store(part_a_ptr + split * C_IN + ci, d_a, mask=k_ok)
        tl.store(part_b_ptr + split * C_IN + ci, d_b, mask=k_ok)
        if END_ID:
            tl.store(part_c_ptr + split * C_IN + ci, d_c, mask=k_ok)
    slab = part_ptr + (split * (C_OUT // COUT_P) + pack).to(tl.int64) * (K_TOTAL * COUT_P)
    if A_GRAM:
        if n_b == N_BLOCKS:
            rg = tl.arange(0, BLOCK_N)
            tl.store(gram_ptr + split * (K_TOTAL * K_TOTAL) + rk[:, None] * K_TOTAL + rg[None, :], acc,
                     mask=k_ok[:, None] & (rg < K_TOTAL)[None, :])
        else:
            tl.store(slab + rk[:, None] * COUT_P + rn[None, :], acc, mask=k_ok[:, None] & n_ok[None, :])
    else:
        tl.store(slab + rk[:, None] * COUT_P + rn[None, :], acc, mask=k_ok[:, None] & n_ok[None, :])
    if A_SUMS:  # one n block's programs cover every k once
        if n_b == 0:
            tl.store(asum_ptr + (split * (C_OUT // COUT_P) + pack) * K_TOTAL + rk, a_sum, mask=k_ok)


@triton.jit
def wgrad_slab_sum_kernel(
    part_ptr,  # [SPLITS, packs, TAPS*GP*CIN_G, GP*COUT_G] fp32 slabs of conv_wgrad_kernel
    out_ptr,  # [C_out, CIN_G, KH, KW] out: dL/dW, contiguous, in its own dtype
    scale_ptr,  # [C_out] fp32: each output channel's sum scaled (HAS_SCALE)
    term_ptr,  # [C_out, CIN_G * TAPS] fp32 added after the scale (HAS_TERM)
    SPLITS,
    SLAB,  # elements of one split's slab: packs * TAPS * CIN_P * COUT_P
    CIN_G: tl.constexpr,
    COUT_G: tl.constexpr,
    GP: tl.constexpr,
    TAPS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_TERM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out[co, i, t] = scale[co] * sum_s part[s, pack, t, j, i, c] + term[co, i, t]``
    for ``co = pack * GP * COUT_G + c`` and ``j = c // COUT_G`` (the diagonal block),
    the slabs added in split order: bitwise repeatable. Program (pack, block of c,
    block of rows ``r = i * TAPS + t``); loads run along c, stores along r, as the
    layouts lie: a row of the weight is contiguous."""
    COUT_P: tl.constexpr = GP * COUT_G
    CIN_P: tl.constexpr = GP * CIN_G
    pack = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = r // TAPS
    t = r - i * TAPS
    c_ok = c < COUT_P
    ok = (r < TAPS * CIN_G)[:, None] & c_ok[None, :]
    src = (((pack * TAPS + t) * CIN_P + i)[:, None] + (c // COUT_G)[None, :] * CIN_G) * COUT_P + c[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    ptrs = part_ptr + src
    for _ in range(SPLITS):  # pointers advance in 64 bits: no split offset overflows
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += SLAB
    co = pack * COUT_P + c
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + co, mask=c_ok, other=0.0)[None, :]
    dst = co[None, :] * (CIN_G * TAPS) + r[:, None]
    if HAS_TERM:
        acc += tl.load(term_ptr + dst, mask=ok, other=0.0)
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=ok)
