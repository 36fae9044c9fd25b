"""``aru::tap_conv_grads``: a stride-1 grouped 3x3 convolution's weight and input
gradients in one launch (:mod:`aru_kernels.tap_grads`).

The convolution's input is the previous batch norm applied on the way in,
``a = relu?(in_scale * (x - in_mean) + in_shift)``, and a batch norm with batch
statistics follows it. Two launches (:func:`aru_kernels.conv_ops.conv_weight_grad`
reading the normalized input, then :func:`aru_kernels.conv_ops.conv_input_grad`)
write dL/dy with the statistics term and read it back; here it is formed once per
element into a ring private to each program, both gradients take it from there, and
the normalized input is recomputed from ``x`` where the input gradient's epilogue
reads ``x`` anyway. :func:`tap_forward_stats` is the same convolution's training
forward, the batch norm of its input applied once an element inside the launch:
what ``aru::conv_bn_stats`` runs when the caller does not keep the normalized input.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from . import tap_grads as _tap
from .checks import check_activation, check_vector, first_derivatives_only
from .conv_ops import conv_geometry, nhwc_empty, sum_slabs
from .launch import launch
from .plans import (MIN_DOT, TAP_GRADS_MAX_PACK, input_precision, plan_conv, plan_tap_forward, plan_tap_grads,
                    tap_grads_fuse)
from .runtime import interpreting

__all__ = ["tap_conv_grads", "tap_forward_stats"]

_OP = "tap_conv_grads"


def _plan(x: Tensor, weight: Tensor, padding: int, dilation: int, groups: int, dy: Tensor, stat_y: Tensor,
          vectors, prologue):
    check_activation(x, "x", _OP)
    n, c_in, h, w = x.shape
    if weight.dim() != 4 or groups < 1 or c_in % groups or weight.shape[0] % groups or \
            weight.shape[1] * groups != c_in:
        raise ValueError(f"{_OP}: weight [C_out, C_in/groups, 3, 3] for x's {c_in} channels in {groups} groups; "
                         f"got {tuple(weight.shape)}")
    if not tap_grads_fuse(*weight.shape[2:], 1, padding, dilation, groups, c_in, weight.shape[0]):
        raise ValueError(f"{_OP}: needs a stride-1 3x3 convolution with padding = dilation whose packs of groups "
                         f"hold {MIN_DOT} to {TAP_GRADS_MAX_PACK} channels each way; got a "
                         f"{tuple(weight.shape[2:])} kernel, padding={padding}, dilation={dilation}, {c_in} -> "
                         f"{weight.shape[0]} channels in {groups} groups")
    conv = plan_conv(x.shape, weight.shape, x.dtype, stride=1, padding=padding, dilation=dilation, groups=groups,
                     has_prologue=True, pro_mean=prologue[0] is not None, device=x.device)
    c_out = weight.shape[0]
    for name, t in (("dy", dy), ("stat_y", stat_y)):
        check_activation(t, name, _OP)
        if tuple(t.shape) != (n, c_out, h, w) or t.dtype != x.dtype:
            raise ValueError(f"{_OP}: {name} must be a {x.dtype} tensor of shape {(n, c_out, h, w)}; "
                             f"got {tuple(t.shape)}, {t.dtype}")
    for name, v in vectors:
        check_vector(v, name, c_out, "one per output channel", _OP)
    for name, v in zip(("in_mean", "in_scale", "in_shift"), prologue):
        check_vector(v, name, c_in, "one per input channel", _OP)
    if prologue[1] is None or prologue[2] is None:
        raise ValueError(f"{_OP}: in_scale and in_shift are required (the input's batch norm)")
    return conv


@torch.library.custom_op("aru::tap_conv_grads", mutates_args=())
def tap_conv_grads(
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    stat_y: Tensor,
    stat_mean: Tensor,
    stat_a: Tensor,
    stat_b: Tensor,
    stat_c: Optional[Tensor],
    in_mean: Optional[Tensor],
    in_scale: Tensor,
    in_shift: Tensor,
    in_relu: bool,
    padding: int,
    dilation: int,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dW, dx, sums)`` of ``y = conv(relu?(in_scale*(x - in_mean) + in_shift), weight)``
    (3x3, stride 1, padding = dilation, ``groups`` packed by at most 32 channels) for
    ``dL/dy = (stat_c*) dy + stat_a + stat_b * (stat_y - stat_mean)``: dW in the weight's
    dtype (summed in fp32), dx = dL/dx through the prologue, and ``sums`` ``[2, C_in]``:
    of dL/d(in_shift) and dL/d(in_shift) * (x - in_mean), i.e. dL/d(in_scale), as
    ``aru::conv_input_grad`` returns them summed. One launch; dL/dy with the statistics
    term is never written."""
    prologue = (in_mean, in_scale, in_shift)
    vectors = (("stat_mean", stat_mean), ("stat_a", stat_a), ("stat_b", stat_b), ("stat_c", stat_c))
    conv = _plan(x, weight, padding, dilation, groups, dy, stat_y, vectors, prologue)
    n, c_in, h, w = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = nhwc_empty(x.shape, x)
    if conv.m == 0:
        return torch.zeros(weight.shape, dtype=weight.dtype, device=x.device), dx, torch.zeros((2, c_in), **f32)
    plan, ring_rows = plan_tap_grads(conv, x.device)
    packs, splits = conv.packs, plan.splits
    part = torch.empty((splits, packs, plan.k_total, conv.cout_p), **f32)
    sums = torch.empty((2, splits, c_in), **f32)
    ring = torch.empty((splits * packs, ring_rows, conv.cout_p), dtype=x.dtype, device=x.device)

    def vec(v):
        return part if v is None else v.float().contiguous()
    launch(
        _tap.tap_grads_kernel, plan.grid,
        x, dy, stat_y, weight, *weight.stride(), vec(in_mean), vec(in_scale), vec(in_shift),
        vec(stat_mean), vec(stat_a), vec(stat_b), vec(stat_c), ring, part, dx, sums[0], sums[1],
        conv.m, plan.m_per_split, H=h, W=w, C_IN=c_in, C_OUT=weight.shape[0], KH=3, KW=3, PAD=padding,
        DIL=dilation, CIN_G=conv.cin_g, COUT_G=conv.cout_g, CIN_P=conv.cin_p, COUT_P=conv.cout_p,
        PRO_MEAN=in_mean is not None, PRO_RELU=in_relu, STAT_SCALE=stat_c is not None,
        DOT_F32=interpreting(), INPUT_PRECISION=input_precision(x.dtype), BLOCK_M=plan.block_m, RING=ring_rows,
        role="wgrad_dgrad", meta={"conv": conv_geometry(conv), "tap": ("tap_grads", conv), "loop_trips": [
            triton.cdiv(2 * (padding * w + padding), plan.block_m), plan.m_per_split // plan.block_m]},
        **plan.launch_options,
    )
    return sum_slabs(part, weight, conv.gp), dx, sums.sum(1)  # fixed-order sums over the splits


@tap_conv_grads.register_fake
def _tap_conv_grads_fake(x, dy, weight, stat_y, stat_mean, stat_a, stat_b, stat_c, in_mean, in_scale, in_shift,
                         in_relu, padding, dilation, groups):
    _plan(x, weight, padding, dilation, groups, dy, stat_y,
          (("stat_mean", stat_mean), ("stat_a", stat_a), ("stat_b", stat_b), ("stat_c", stat_c)),
          (in_mean, in_scale, in_shift))
    return (torch.empty(weight.shape, dtype=weight.dtype, device=x.device),
            torch.empty_like(x, memory_format=torch.channels_last),
            torch.empty((2, x.shape[1]), dtype=torch.float32, device=x.device))


def tap_forward_stats(x: Tensor, weight: Tensor, in_mean: Optional[Tensor], in_scale: Tensor, in_shift: Tensor,
                      in_relu: bool, padding: int, dilation: int, groups: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(y, tile_mean, tile_m2, tile_rows)`` of ``y = conv(relu?(in_scale*(x - in_mean) +
    in_shift), weight)`` for the convolutions :func:`aru_kernels.plans.tap_grads_fuse`
    takes, with each tile's batch statistics (as ``conv_bn_act_into(..., stats=True)``
    returns them): the input's batch norm applied once per element inside the launch,
    the normalized input never written. The launcher under ``aru::conv_bn_stats``."""
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    conv = plan_conv(x.shape, weight.shape, x.dtype, stride=1, padding=padding, dilation=dilation, groups=groups,
                     has_prologue=True, pro_mean=in_mean is not None, device=x.device)
    plan, ring_rows = plan_tap_forward(conv, x.device)
    y = nhwc_empty((n, c_out, h, w), x)
    f32 = dict(dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(conv.m, plan.block_m)
    tile_mean, tile_m2 = torch.empty((tiles, c_out), **f32), torch.empty((tiles, c_out), **f32)
    if conv.m == 0:
        return y, tile_mean, tile_m2, plan.block_m
    ring = torch.empty((plan.splits * conv.packs, ring_rows, conv.cin_p), dtype=x.dtype, device=x.device)
    launch(
        _tap.tap_forward_kernel, plan.grid,
        x, weight, *weight.stride(), in_scale if in_mean is None else in_mean.float().contiguous(),
        in_scale.float().contiguous(), in_shift.float().contiguous(), ring, y, tile_mean, tile_m2,
        conv.m, plan.m_per_split, H=h, W=w, C_IN=c_in, C_OUT=c_out, DIL=dilation, CIN_G=conv.cin_g,
        COUT_G=conv.cout_g, CIN_P=conv.cin_p, COUT_P=conv.cout_p, PRO_MEAN=in_mean is not None, PRO_RELU=in_relu,
        DOT_F32=interpreting(), INPUT_PRECISION=input_precision(x.dtype), BLOCK_M=plan.block_m, RING=ring_rows,
        role="fwd", meta={"conv": conv_geometry(conv), "tap": ("tap_forward", conv), "loop_trips": [
            triton.cdiv(2 * (dilation * w + dilation), plan.block_m), plan.m_per_split // plan.block_m]},
        **plan.launch_options,
    )
    return y, tile_mean, tile_m2, plan.block_m


first_derivatives_only(tap_conv_grads)  # (gradients: no derivative of their own)
