"""Both gradients of a stride-1 grouped 3x3 convolution in one launch (NHWC),
and its training forward with the input's batch norm applied once an element.

For ``y = conv(a, W)``, ``a = relu?(s * (x - mu) + b)`` the previous batch
norm applied on the way in, and a batch norm with batch statistics after the
convolution, both backward products take the same gradient::

    dy'[o] = (c *) dy[o] + st_a + st_b * (y[o] - mean)       (the statistics term)
    dW[t]  = sum_m a[m]^T dy'[m - d_t]                         (weight gradient)
    da[m]  = sum_t dy'[m - d_t] W[t]                           (input gradient)

``m`` an input pixel (the flat NHWC row), ``t = (kh, kw)`` a tap and ``d_t``
its offset in flat pixels: at stride 1 with the output as large as the input,
the output pixel that input pixel ``m`` meets through tap ``t`` is ``m -
d_t``, a constant shift (where it lies in the image). So one program can
take both sums from the same shifted dy' tiles: for each tile of input
pixels, per tap, one tile of dy' is a dot operand of the input gradient
(``dy'_t @ W[t]``) and of the weight gradient (``a^T @ dy'_t``), and the
input tile ``a`` is loaded once, not once per tap.

dy' is formed once per element, by the program that walks its pixels, into
a small ring of rows private to the program (``ring_ptr``: ``RING`` rows of
``COUT_P`` channels, on a GPU held in L2), one ``BLOCK_M`` tile ahead of the
tile whose taps read it; the taps read their shifted windows back after a
barrier. The ring holds ``2 * BLOCK_M`` rows plus the taps' reach, so the
rows a step writes are never rows the step before may still read. dy' is
never a tensor, and the normalized input is recomputed from ``x``, which the
input gradient's epilogue (the prologue's backward) reads anyway.

Each program takes one pack of groups (the packing of
:mod:`aru_kernels.conv`) and a contiguous split of the pixels; it writes its
fp32 slab of dW (``[splits, packs, taps * CIN_P, COUT_P]``, tap-major as the
weight-gradient kernel writes them, added in split order by
``wgrad_slab_sum_kernel``) and one row per split of the prologue backward's
sums. Runs are bitwise repeatable.

The forward (``tap_forward_kernel``) is the same walk the other way round:
output pixel ``m`` reads input pixel ``m + d_t`` through tap ``t``, so the
program normalizes each input row once into its ring, one tile ahead, and
the nine taps read their windows from there. The normalized input is never a
tensor; each tile's batch statistics come from the same epilogue as the
convolution kernel's.
"""

import triton
import triton.language as tl

from .conv import _dot_f32, _prologue, _prologue_grad_epilogue, _relu


@triton.jit
def _weight_tap(w_ptr, like_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, KH_I: tl.constexpr, KW_I: tl.constexpr,
                CIN_G: tl.constexpr, COUT_G: tl.constexpr, COUT_P: tl.constexpr):
    """``W[n, ci]`` of one tap for the pack's output channels ``rn`` (rows) and input
    channels ``ci`` (columns): the block-diagonal tile, zero across groups."""
    same = (rn // COUT_G)[:, None] == (ci // CIN_G)[None, :]
    off = (pack * COUT_P + rn)[:, None] * sw_o + (ci % CIN_G)[None, :] * sw_i + KH_I * sw_h + KW_I * sw_w
    return tl.load(w_ptr + off, mask=same, other=0.0).to(like_ptr.dtype.element_ty)  # as the dot reads it


@triton.jit
def _form_rows(o, lim, dy_ptr, y_ptr, ring, s0, cn, rn, c, st_a, st_b, st_mean,
               C_OUT: tl.constexpr, COUT_P: tl.constexpr, RING: tl.constexpr, HALO_LO: tl.constexpr,
               STAT_SCALE: tl.constexpr):
    """dy' of output pixels ``o`` (those below ``lim`` and not negative) into the ring."""
    ok = ((o >= 0) & (o < lim))[:, None]
    off = o.to(tl.int64)[:, None] * C_OUT + cn[None, :]
    g = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if STAT_SCALE:
        g = g * c[None, :]
    yc = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32) - st_mean[None, :]
    g = g + (st_a[None, :] + st_b[None, :] * yc)
    slot = (o - s0 + HALO_LO) & (RING - 1)
    tl.store(ring + slot[:, None] * COUT_P + rn[None, :], g.to(dy_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _tap(acc, acc_w, a, wt, ring, m, m_ok, h, w, s0, rn,
         KH_I: tl.constexpr, KW_I: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
         PAD: tl.constexpr, DIL: tl.constexpr, COUT_P: tl.constexpr, RING: tl.constexpr,
         HALO_LO: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One tap's dy' window read back from the ring; its share of both sums."""
    DH: tl.constexpr = KH_I * DIL - PAD
    DW: tl.constexpr = KW_I * DIL - PAD
    ok = m_ok & (h >= DH) & (h < H + DH) & (w >= DW) & (w < W + DW)
    slot = (m - (DH * W + DW) - s0 + HALO_LO) & (RING - 1)
    d = tl.load(ring + slot[:, None] * COUT_P + rn[None, :], mask=ok[:, None], other=0.0)
    if DOT_F32:
        acc += _dot_f32(d, wt)
        acc_w += _dot_f32(tl.trans(a), d)
    else:
        acc = tl.dot(d, wt, acc, input_precision=INPUT_PRECISION)
        acc_w = tl.dot(tl.trans(a), d, acc_w, input_precision=INPUT_PRECISION)
    return acc, acc_w


@triton.jit
def _store_tap(slab, acc_w, ci, rn, T: tl.constexpr, CIN_P: tl.constexpr, COUT_P: tl.constexpr):
    tl.store(slab + (T * CIN_P + ci)[:, None] * COUT_P + rn[None, :], acc_w)


@triton.jit
def tap_grads_kernel(
    x_ptr,  # [N, H, W, C_IN] the forward input before its prologue, NHWC contiguous
    dy_ptr,  # [N, H, W, C_OUT] dL/dy (with STAT_SCALE: dL/dz behind the batch norm)
    y_ptr,  # [N, H, W, C_OUT] the forward output
    w_ptr,  # [C_OUT, C_IN/groups, 3, 3] the forward weight, strides sw_*
    sw_o, sw_i, sw_h, sw_w,
    in_mean_ptr, in_scale_ptr, in_shift_ptr,  # [C_IN] fp32: the prologue's mu, s, b
    st_mean_ptr, st_a_ptr, st_b_ptr, st_c_ptr,  # [C_OUT] fp32: the statistics term (st_c with STAT_SCALE)
    ring_ptr,  # [splits * packs, RING, COUT_P] scratch rows of dy', dy's dtype
    part_ptr,  # [splits, packs, 9 * CIN_P, COUT_P] fp32 out: dW slabs
    dx_ptr,  # [N, H, W, C_IN] out: dL/dx behind the prologue
    sum_a_ptr, sum_b_ptr,  # [splits, C_IN] fp32 out: the prologue backward's sums (dL/db, dL/ds)
    M,  # N * H * W
    M_PER_SPLIT,  # pixels per split, a multiple of BLOCK_M
    H: tl.constexpr, W: tl.constexpr,
    C_IN: tl.constexpr, C_OUT: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, PAD: tl.constexpr, DIL: tl.constexpr,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, CIN_P: tl.constexpr, COUT_P: tl.constexpr,
    PRO_MEAN: tl.constexpr, PRO_RELU: tl.constexpr, STAT_SCALE: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, RING: tl.constexpr,
):
    tl.static_assert(KH == 3 and KW == 3)
    HALO_LO: tl.constexpr = ((KH - 1) * DIL - PAD) * W + (KW - 1) * DIL - PAD  # the largest tap offset
    HALO_HI: tl.constexpr = PAD * W + PAD  # minus the smallest
    tl.static_assert(RING >= 2 * BLOCK_M + HALO_LO + HALO_HI)
    pack = tl.program_id(0)
    split = tl.program_id(1)
    packs = tl.num_programs(0)
    ring = ring_ptr + (split * packs + pack).to(tl.int64) * (RING * COUT_P)
    ci = tl.arange(0, CIN_P)
    rn = tl.arange(0, COUT_P)
    ch = pack * CIN_P + ci
    cn = pack * COUT_P + rn
    ch_ok = ci < CIN_P
    st_a = tl.load(st_a_ptr + cn)
    st_b = tl.load(st_b_ptr + cn)
    st_mean = tl.load(st_mean_ptr + cn)
    c = st_a
    if STAT_SCALE:
        c = tl.load(st_c_ptr + cn)

    wt0 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 0, 0, CIN_G, COUT_G, COUT_P)
    wt1 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 0, 1, CIN_G, COUT_G, COUT_P)
    wt2 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 0, 2, CIN_G, COUT_G, COUT_P)
    wt3 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 1, 0, CIN_G, COUT_G, COUT_P)
    wt4 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 1, 1, CIN_G, COUT_G, COUT_P)
    wt5 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 1, 2, CIN_G, COUT_G, COUT_P)
    wt6 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 2, 0, CIN_G, COUT_G, COUT_P)
    wt7 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 2, 1, CIN_G, COUT_G, COUT_P)
    wt8 = _weight_tap(w_ptr, dy_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 2, 2, CIN_G, COUT_G, COUT_P)
    w0 = tl.zeros((CIN_P, COUT_P), dtype=tl.float32)
    w1 = w0
    w2 = w0
    w3 = w0
    w4 = w0
    w5 = w0
    w6 = w0
    w7 = w0
    w8 = w0
    d_a = tl.zeros((CIN_P,), dtype=tl.float32)
    d_b = d_a

    s0 = split * M_PER_SPLIT
    rows = tl.arange(0, BLOCK_M)
    # the rows the first tile's taps reach behind and ahead of it
    for c0 in range(s0 - HALO_LO, s0 + HALO_HI, BLOCK_M):
        _form_rows(c0 + rows, tl.minimum(s0 + HALO_HI, M), dy_ptr, y_ptr, ring, s0, cn, rn, c, st_a, st_b,
                   st_mean, C_OUT, COUT_P, RING, HALO_LO, STAT_SCALE)
    for m0 in range(s0, s0 + M_PER_SPLIT, BLOCK_M):
        # one tile ahead: the rows this tile's last taps reach
        _form_rows(m0 + HALO_HI + rows, M, dy_ptr, y_ptr, ring, s0, cn, rn, c, st_a, st_b, st_mean,
                   C_OUT, COUT_P, RING, HALO_LO, STAT_SCALE)
        tl.debug_barrier()
        m = m0 + rows
        m_ok = m < M
        t2 = m // W
        w = m - t2 * W
        h = t2 - (t2 // H) * H
        ok = m_ok[:, None] & ch_ok[None, :]
        off = m.to(tl.int64)[:, None] * C_IN + ch[None, :]
        x = tl.load(x_ptr + off, mask=ok, other=0.0)
        a = _prologue(x, ok, ch, ch_ok, in_mean_ptr, in_scale_ptr, in_shift_ptr, PRO_MEAN,
                      PRO_RELU).to(dy_ptr.dtype.element_ty)
        acc = tl.zeros((BLOCK_M, CIN_P), dtype=tl.float32)
        acc, w0 = _tap(acc, w0, a, wt0, ring, m, m_ok, h, w, s0, rn, 0, 0, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        acc, w1 = _tap(acc, w1, a, wt1, ring, m, m_ok, h, w, s0, rn, 0, 1, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        acc, w2 = _tap(acc, w2, a, wt2, ring, m, m_ok, h, w, s0, rn, 0, 2, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        acc, w3 = _tap(acc, w3, a, wt3, ring, m, m_ok, h, w, s0, rn, 1, 0, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        acc, w4 = _tap(acc, w4, a, wt4, ring, m, m_ok, h, w, s0, rn, 1, 1, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        acc, w5 = _tap(acc, w5, a, wt5, ring, m, m_ok, h, w, s0, rn, 1, 2, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        acc, w6 = _tap(acc, w6, a, wt6, ring, m, m_ok, h, w, s0, rn, 2, 0, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        acc, w7 = _tap(acc, w7, a, wt7, ring, m, m_ok, h, w, s0, rn, 2, 1, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        acc, w8 = _tap(acc, w8, a, wt8, ring, m, m_ok, h, w, s0, rn, 2, 2, H, W, PAD, DIL, COUT_P, RING, HALO_LO,
                       DOT_F32, INPUT_PRECISION)
        t_a, t_b = _prologue_grad_epilogue(acc, x, off, ok, ch, ch_ok, dx_ptr, in_mean_ptr, in_scale_ptr,
                                           in_shift_ptr, PRO_MEAN, PRO_RELU)
        d_a += t_a
        d_b += t_b
    tl.store(sum_a_ptr + split * C_IN + ch, d_a)
    tl.store(sum_b_ptr + split * C_IN + ch, d_b)
    slab = part_ptr + (split * packs + pack).to(tl.int64) * (KH * KW * CIN_P * COUT_P)
    _store_tap(slab, w0, ci, rn, 0, CIN_P, COUT_P)
    _store_tap(slab, w1, ci, rn, 1, CIN_P, COUT_P)
    _store_tap(slab, w2, ci, rn, 2, CIN_P, COUT_P)
    _store_tap(slab, w3, ci, rn, 3, CIN_P, COUT_P)
    _store_tap(slab, w4, ci, rn, 4, CIN_P, COUT_P)
    _store_tap(slab, w5, ci, rn, 5, CIN_P, COUT_P)
    _store_tap(slab, w6, ci, rn, 6, CIN_P, COUT_P)
    _store_tap(slab, w7, ci, rn, 7, CIN_P, COUT_P)
    _store_tap(slab, w8, ci, rn, 8, CIN_P, COUT_P)


@triton.jit
def _form_input(i, lim, x_ptr, ring, s0, ch, ci, mu, s, b, C_IN: tl.constexpr, CIN_P: tl.constexpr,
                RING: tl.constexpr, REACH: tl.constexpr, PRO_MEAN: tl.constexpr, PRO_RELU: tl.constexpr):
    """The normalized input ``relu?(s * (x - mu) + b)`` of pixels ``i`` (those below ``lim``
    and not negative) into the ring, rounded to x's dtype as a pass of its own would store it."""
    ok = ((i >= 0) & (i < lim))[:, None]
    v = tl.load(x_ptr + i.to(tl.int64)[:, None] * C_IN + ch[None, :], mask=ok, other=0.0).to(tl.float32)
    if PRO_MEAN:
        v = v - mu[None, :]
    v = v * s[None, :] + b[None, :]
    if PRO_RELU:
        v = _relu(v)
    slot = (i - s0 + REACH) & (RING - 1)
    tl.store(ring + slot[:, None] * CIN_P + ci[None, :], v.to(x_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _forward_tap(acc, wt, ring, o, o_ok, p, q, s0, ci, KH_I: tl.constexpr, KW_I: tl.constexpr, H: tl.constexpr,
                 W: tl.constexpr, DIL: tl.constexpr, CIN_P: tl.constexpr, RING: tl.constexpr, REACH: tl.constexpr,
                 DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One tap of the forward: the input window it reads, from the ring, times ``W[t]^T``."""
    DH: tl.constexpr = (KH_I - 1) * DIL
    DW: tl.constexpr = (KW_I - 1) * DIL
    ok = o_ok & (p >= -DH) & (p < H - DH) & (q >= -DW) & (q < W - DW)
    slot = (o + (DH * W + DW) - s0 + REACH) & (RING - 1)
    a = tl.load(ring + slot[:, None] * CIN_P + ci[None, :], mask=ok[:, None], other=0.0)
    if DOT_F32:
        acc += _dot_f32(a, wt)
    else:
        acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def tap_forward_kernel(
    x_ptr,  # [N, H, W, C_IN] the input before its batch norm, NHWC contiguous
    w_ptr,  # [C_OUT, C_IN/groups, 3, 3] strides sw_*
    sw_o, sw_i, sw_h, sw_w,
    in_mean_ptr, in_scale_ptr, in_shift_ptr,  # [C_IN] fp32: the prologue's mu, s, b
    ring_ptr,  # [splits * packs, RING, CIN_P] scratch rows of the normalized input, x's dtype
    out_ptr,  # [N, H, W, C_OUT] out: y
    part_a_ptr, part_b_ptr,  # [cdiv(M, BLOCK_M), C_OUT] fp32 out: each tile's mean and M2 of the stored y
    M,  # N * H * W
    M_PER_SPLIT,  # pixels per split, a multiple of BLOCK_M
    H: tl.constexpr, W: tl.constexpr,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, DIL: tl.constexpr,
    CIN_G: tl.constexpr, COUT_G: tl.constexpr, CIN_P: tl.constexpr, COUT_P: tl.constexpr,
    PRO_MEAN: tl.constexpr, PRO_RELU: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, RING: tl.constexpr,
):
    """The training forward of the same convolutions: ``y = conv(relu?(s * (x - mu) + b), W)``
    (3x3, stride 1, padding = dilation) with each tile's batch statistics, as
    ``conv_bn_act_kernel``'s ``STATS`` writes them. The batch norm of the input is
    applied once per element, into the program's ring, one step ahead of the tile whose
    taps read it: the normalized input is never a tensor."""
    REACH: tl.constexpr = DIL * W + DIL  # how far a tap reaches, in flat pixels, either way
    tl.static_assert(RING >= 2 * BLOCK_M + 2 * REACH)
    pack = tl.program_id(0)
    split = tl.program_id(1)
    packs = tl.num_programs(0)
    ring = ring_ptr + (split * packs + pack).to(tl.int64) * (RING * CIN_P)
    ci = tl.arange(0, CIN_P)
    rn = tl.arange(0, COUT_P)
    ch = pack * CIN_P + ci
    cn = pack * COUT_P + rn
    s = tl.load(in_scale_ptr + ch)
    b = tl.load(in_shift_ptr + ch)
    mu = s  # (read only with PRO_MEAN)
    if PRO_MEAN:
        mu = tl.load(in_mean_ptr + ch)
    wt0 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 0, 0, CIN_G, COUT_G, COUT_P))
    wt1 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 0, 1, CIN_G, COUT_G, COUT_P))
    wt2 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 0, 2, CIN_G, COUT_G, COUT_P))
    wt3 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 1, 0, CIN_G, COUT_G, COUT_P))
    wt4 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 1, 1, CIN_G, COUT_G, COUT_P))
    wt5 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 1, 2, CIN_G, COUT_G, COUT_P))
    wt6 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 2, 0, CIN_G, COUT_G, COUT_P))
    wt7 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 2, 1, CIN_G, COUT_G, COUT_P))
    wt8 = tl.trans(_weight_tap(w_ptr, x_ptr, pack, rn, ci, sw_o, sw_i, sw_h, sw_w, 2, 2, CIN_G, COUT_G, COUT_P))

    s0 = split * M_PER_SPLIT
    rows = tl.arange(0, BLOCK_M)
    for c0 in range(s0 - REACH, s0 + REACH, BLOCK_M):  # the rows the first tile's taps reach
        _form_input(c0 + rows, tl.minimum(s0 + REACH, M), x_ptr, ring, s0, ch, ci, mu, s, b, C_IN, CIN_P, RING,
                    REACH, PRO_MEAN, PRO_RELU)
    for m0 in range(s0, s0 + M_PER_SPLIT, BLOCK_M):
        _form_input(m0 + REACH + rows, M, x_ptr, ring, s0, ch, ci, mu, s, b, C_IN, CIN_P, RING, REACH, PRO_MEAN,
                    PRO_RELU)
        tl.debug_barrier()
        o = m0 + rows
        o_ok = o < M
        t2 = o // W
        q = o - t2 * W
        p = t2 - (t2 // H) * H
        acc = tl.zeros((BLOCK_M, COUT_P), dtype=tl.float32)
        acc = _forward_tap(acc, wt0, ring, o, o_ok, p, q, s0, ci, 0, 0, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        acc = _forward_tap(acc, wt1, ring, o, o_ok, p, q, s0, ci, 0, 1, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        acc = _forward_tap(acc, wt2, ring, o, o_ok, p, q, s0, ci, 0, 2, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        acc = _forward_tap(acc, wt3, ring, o, o_ok, p, q, s0, ci, 1, 0, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        acc = _forward_tap(acc, wt4, ring, o, o_ok, p, q, s0, ci, 1, 1, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        acc = _forward_tap(acc, wt5, ring, o, o_ok, p, q, s0, ci, 1, 2, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        acc = _forward_tap(acc, wt6, ring, o, o_ok, p, q, s0, ci, 2, 0, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        acc = _forward_tap(acc, wt7, ring, o, o_ok, p, q, s0, ci, 2, 1, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        acc = _forward_tap(acc, wt8, ring, o, o_ok, p, q, s0, ci, 2, 2, H, W, DIL, CIN_P, RING, REACH, DOT_F32,
                           INPUT_PRECISION)
        ok = o_ok[:, None]
        y = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + o.to(tl.int64)[:, None] * C_OUT + cn[None, :], y, mask=ok)
        # the tile's mean and sum of squared deviations of the stored values (Chan et al.)
        v = tl.where(ok, y.to(tl.float32), 0.0)
        count = tl.minimum(M - m0, BLOCK_M).to(tl.float32)
        mean = tl.sum(v, axis=0) / count
        d = tl.where(ok, v - mean[None, :], 0.0)
        tile = m0 // BLOCK_M
        in_m = (rn < COUT_P) & (m0 < M)
        tl.store(part_a_ptr + tile * C_OUT + cn, mean, mask=in_m)
        tl.store(part_b_ptr + tile * C_OUT + cn, tl.sum(d * d, axis=0), mask=in_m)
