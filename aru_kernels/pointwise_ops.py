"""``aru::pointwise_conv_grads``: a 1x1 convolution's weight and input gradients in one launch.

For ``y = conv(x, W)`` (1x1, stride 1, ``groups=1``) followed by a batch norm
with batch statistics, the gradient both backward products take is
``dy' = dy + a + b*(y - mean)`` (or ``c*dy + ...``, ``dy`` then the gradient
behind the batch norm): the batch-norm statistics term, added as dy and y
are loaded. Two launches (:func:`aru_kernels.conv_ops.conv_weight_grad`,
then :func:`aru_kernels.conv_ops.conv_input_grad`) write dy' and read it
back; here the weight-gradient kernel (``conv_wgrad_kernel`` with ``DGRAD``)
uses each dy' tile it forms twice, for dW and for dL/dx = dy' W, whose
epilogue is the input-gradient launch's: a residual gradient added, the
previous residual block's end (as ``aru::conv_input_grad_block_end``), or the
backward of a batch-norm prologue on the input (as ``aru::conv_input_grad``'s).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import conv as _conv
from .bn_ops import relu_mask_shape
from .checks import check_activation, check_prologue, check_vector, first_derivatives_only
from .conv_ops import (block_end_sums, conv_geometry, conv_input_grad, conv_input_grad_block_end,
                       conv_weight_grad, nhwc_empty, sum_slabs)
from .launch import launch
from .plans import POINTWISE_GRADS_MAX_N, input_precision, plan_conv, plan_pointwise_grads, pointwise_grads_fuse
from .runtime import interpreting

__all__ = ["pointwise_conv_grads"]

_OP = "pointwise_conv_grads"


def _check(x, dy, weight, stat_y, vectors, residual, relu_mask, end_y, end_mean, end_id, end_id_mean,
           prologue) -> None:
    check_activation(x, "x", _OP)
    check_activation(dy, "dy", _OP)
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    if weight.dim() != 4 or weight.shape[1] != c_in or not pointwise_grads_fuse(*weight.shape[2:], 1, 0, 1, c_out):
        raise ValueError(f"{_OP}: needs the weight of a 1x1 convolution of x's {c_in} channels (groups=1) into at "
                         f"most {POINTWISE_GRADS_MAX_N} channels; got {tuple(weight.shape)}")
    for name, t, c in (("dy", dy, c_out), ("stat_y", stat_y, c_out), ("residual", residual, c_in),
                       ("end_y", end_y, c_in), ("end_id", end_id, c_in)):
        if t is not None and (tuple(t.shape) != (n, c, h, w) or t.dtype != x.dtype
                              or not t.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError(f"{_OP}: {name} must be a channels_last {x.dtype} tensor of shape {(n, c, h, w)}; "
                             f"got {tuple(t.shape)}, {t.dtype}")
    for name, v in vectors:
        check_vector(v, name, c_out, "one per output channel", _OP)
    for name, v in (("end_mean", end_mean), ("end_id_mean", end_id_mean), *zip(("in_mean", "in_scale", "in_shift"),
                                                                               prologue)):
        check_vector(v, name, c_in, "one per input channel", _OP)
    in_mean, in_scale, in_shift = prologue
    check_prologue(_OP, in_mean, in_scale, in_shift)
    if in_scale is not None and (residual is not None or relu_mask is not None):
        raise ValueError(f"{_OP}: a prologue's backward takes no residual and no block end")
    if relu_mask is not None:
        if relu_mask.dtype != torch.uint8 or tuple(relu_mask.shape) != relu_mask_shape(x):
            raise ValueError(f"{_OP}: relu_mask must be uint8 of shape {relu_mask_shape(x)}; "
                             f"got {relu_mask.dtype} {tuple(relu_mask.shape)}")
        if end_y is None or end_mean is None or (end_id is None) != (end_id_mean is None):
            raise ValueError(f"{_OP}: the block end needs end_y and end_mean, and end_id with end_id_mean")


@torch.library.custom_op("aru::pointwise_conv_grads", mutates_args=())
def pointwise_conv_grads(
    x: Tensor,
    dy: Tensor,
    weight: Tensor,
    stat_y: Tensor,
    stat_mean: Tensor,
    stat_a: Tensor,
    stat_b: Tensor,
    stat_c: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    relu_mask: Optional[Tensor] = None,
    end_y: Optional[Tensor] = None,
    end_mean: Optional[Tensor] = None,
    end_id: Optional[Tensor] = None,
    end_id_mean: Optional[Tensor] = None,
    in_mean: Optional[Tensor] = None,
    in_scale: Optional[Tensor] = None,
    in_shift: Optional[Tensor] = None,
    in_relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dW, dx, sums)`` of ``y = conv(x, weight)`` (1x1, stride 1, ``groups=1``,
    at most 256 output channels) for ``dL/dy = (stat_c*) dy + stat_a + stat_b *
    (stat_y - stat_mean)``: dW in the weight's dtype (summed in fp32); dx = dL/dx +
    ``residual``, or with ``relu_mask`` (x a residual block's output ``relu(bn(end_y) + identity')``,
    as ``aru::conv_input_grad_block_end`` takes it) dz behind that block's ReLU
    and ``sums`` ``[3, C_in]`` of dz, dz*(end_y - end_mean) and dz*(end_id -
    end_id_mean). With ``in_scale`` and ``in_shift`` the convolution's input was
    ``relu?(in_scale*(x - in_mean) + in_shift)`` (as ``aru::conv_input_grad``
    takes it): dx is dL/dx through it and ``sums`` ``[2, C_in]`` the sums of
    dL/d(in_shift) and dL/d(in_shift) * (x - in_mean), i.e. dL/d(in_scale).
    Otherwise ``sums`` is empty. One launch; dL/dy is never written."""
    prologue = (in_mean, in_scale, in_shift)
    _check(x, dy, weight, stat_y, (("stat_mean", stat_mean), ("stat_a", stat_a), ("stat_b", stat_b),
                                   ("stat_c", stat_c)), residual, relu_mask, end_y, end_mean, end_id, end_id_mean,
           prologue)
    pro = in_scale is not None
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    m = n * h * w
    if m == 0 or weight.numel() == 0:  # nothing to launch: the two operators' own handling of the empty cases
        dw, dy_stat = conv_weight_grad(x, dy, weight, *prologue, 1, 0, 1, 1, in_relu, stat_y, stat_mean,
                                       stat_a, stat_b, stat_c)
        if relu_mask is not None:
            dz, sums = conv_input_grad_block_end(dy_stat, weight, 1, 0, 1, 1, residual, relu_mask, end_y, end_mean,
                                                 end_id, end_id_mean)
            return dw, dz, sums
        dx, part_shift, part_scale = conv_input_grad(dy_stat, weight, x, *prologue, 1, 0, 1, 1, in_relu, residual)
        sums = torch.stack((part_shift.sum(0), part_scale.sum(0))) if pro else x.new_empty(0, dtype=torch.float32)
        return dw, dx, sums
    conv = plan_conv(x.shape, weight.shape, x.dtype, device=x.device)
    plan = plan_pointwise_grads(conv, x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    part = torch.empty((plan.splits, 1, c_in, c_out), **f32)
    dx = nhwc_empty(x.shape, x)
    end = relu_mask is not None
    planes = 3 if end_id is not None else 2  # the third, dz*(end_id - end_id_mean), only with end_id
    sums = torch.empty((planes, plan.splits, c_in), **f32) if end or pro else part  # one row a split

    def vec(v):
        return part if v is None else v.float().contiguous()
    sw = weight.stride()
    launch(
        _conv.conv_wgrad_kernel, plan.grid,
        x, dy, part, vec(in_mean), vec(in_scale), vec(in_shift),
        stat_y, vec(stat_mean), vec(stat_a), vec(stat_b), vec(stat_c), part, dy,
        m, plan.m_per_split, h, w, h, w, c_in, c_out,
        KH=1, KW=1, STRIDE=1, PAD=0, DIL=1, CIN_P=c_in, COUT_P=c_out,
        HAS_PROLOGUE=pro, PRO_MEAN=in_mean is not None, PRO_RELU=in_relu,
        GRAD_STATS=True, STAT_SCALE=stat_c is not None,
        SQ_TERM=False, DOT_F32=interpreting(), INPUT_PRECISION=input_precision(x.dtype),
        BLOCK_M=plan.block_m, BLOCK_K=plan.block_k, BLOCK_N=plan.block_n, asum_ptr=part, WRITE_DY=False,
        w_ptr=weight, sw_o=sw[0], sw_i=sw[1], dx_ptr=dx, res_ptr=dx if residual is None else residual,
        end_mask_ptr=relu_mask if end else dx, end_y_ptr=end_y if end else dx, end_mean_ptr=vec(end_mean),
        end_id_ptr=dx if end_id is None else end_id, end_id_mean_ptr=vec(end_id_mean),
        part_a_ptr=sums[0] if end or pro else part, part_b_ptr=sums[1] if end or pro else part,
        part_c_ptr=sums[2] if end_id is not None else part,
        DGRAD=True, HAS_RESIDUAL=residual is not None, END_BWD=end, END_ID=end_id is not None,
        role="wgrad_dgrad", meta={"conv": conv_geometry(conv), "loop_trips": [plan.m_per_split // plan.block_m]},
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    dw = sum_slabs(part, weight, 1)  # fixed-order sum over the splits, in the weight's layout and dtype
    if not (end or pro):
        return dw, dx, x.new_empty(0, dtype=torch.float32)
    sums = sums.sum(1)  # fixed-order reduction over the splits
    return dw, dx, block_end_sums(sums) if end else sums


@pointwise_conv_grads.register_fake
def _pointwise_conv_grads_fake(x, dy, weight, stat_y, stat_mean, stat_a, stat_b, stat_c=None, residual=None,
                               relu_mask=None, end_y=None, end_mean=None, end_id=None, end_id_mean=None, in_mean=None,
                               in_scale=None, in_shift=None, in_relu=False):
    _check(x, dy, weight, stat_y, (("stat_mean", stat_mean), ("stat_a", stat_a), ("stat_b", stat_b),
                                   ("stat_c", stat_c)), residual, relu_mask, end_y, end_mean, end_id, end_id_mean,
           (in_mean, in_scale, in_shift))
    rows = 3 if relu_mask is not None else (2 if in_scale is not None else 0)
    sums = (torch.empty((rows, x.shape[1]), dtype=torch.float32, device=x.device) if rows
            else x.new_empty(0, dtype=torch.float32))
    return (torch.empty(weight.shape, dtype=weight.dtype, device=x.device),
            torch.empty_like(x, memory_format=torch.channels_last), sums)


first_derivatives_only(pointwise_conv_grads)  # (gradients: no derivative of their own)
