"""Training-mode residual blocks as one autograd node.

A block is ``relu(bn_n(conv_n(... relu(bn_1(conv_1(x))) ...)) + identity)``,
identity ``x`` or ``bn_d(conv_d(x))``, batch norms with batch statistics. The
forward is the same operators as one conv at a time (``aru::conv_bn_stats``
per conv, ``aru::bn_add_relu_mask`` at the end, which also keeps the final
ReLU's mask as bits), except that a block starting with a stride-1 1x1
convolution computes the previous block's end as that convolution loads its
input (``aru::block_end_conv_bn_stats``): the block output is written once
and not read back. What a node of its own buys is mostly the backward. With one
node per conv, autograd holds two gradients of the block input (the residual
branch's and the first conv's) and adds them in a pass of their own, and the
end of the block writes dL/dy of the last conv and dL/didentity as two
tensors. Here:

* the end of the last block writes the gradient behind its final ReLU,
  ``dz``, once (``aru::bn_add_relu_grad_sums``, reading the mask bits); the
  last conv's and the downsample conv's weight-gradient kernels scale it by
  their batch norm's scale as they load it (together with the statistics
  term they add anyway);
* a block's last input-gradient kernel (its first conv's, or with a
  downsample branch the downsample conv's, which adds the first conv's)
  adds the residual gradient in its epilogue;
* between two blocks of the node that kernel also applies the previous
  block's final ReLU and takes its batch norms' sums
  (``aru::conv_input_grad_block_end``): the gradient of a block output is
  never written, and that block's backward starts from its ``dz``;
* a stride-1 1x1 conv of at most 256 outputs takes its weight and input
  gradients in one launch (``aru::pointwise_conv_grads``, the same epilogues):
  its dL/dy with the statistics term is never written;
* so does a stride-1 grouped 3x3 inside the chain (``aru::tap_conv_grads``),
  which recomputes its normalized input from the previous conv's output; its
  forward (``aru::conv_bn_stats``) normalizes the input inside the conv's
  launch too: the normalized input is never written.

Batch-norm vector gradients are formed here from the kernels' per-channel
sums, by the formulas autograd applies on the one-conv-at-a-time path.

The node holds its blocks' activations itself, not through
``save_for_backward`` (which would keep every block's until the whole
node's backward ends), and frees each block's as its backward passes it:
the step's peak is then about what the forward leaves for the backward.
With ``retain_graph=True`` nothing is freed; under saved-tensor hooks
(``save_on_cpu``, non-reentrant checkpointing) or ``torch.compile`` they
go through ``save_for_backward`` as before.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .bn_ops import rows, stats_term
from .conv_ops import nhwc
from .plans import WGRAD_GRAM_MAX_CHANNELS, block_end_fuses, normalizes_ahead, pointwise_grads_fuse, tap_grads_fuse

__all__ = ["ConvBN", "ResidualBlocksTrain", "PER_CONV", "recompute_normalized_inputs"]

PER_CONV = 6  # tensors per conv: weight, bn weight, bn bias, running mean, running var, num_batches_tracked
SAVED_PER_CONV = 6  # what the backward reads per conv: y, mean, invstd, scale, shift, a (the normalized input)


class ConvBN(NamedTuple):
    """A convolution (no bias) and the batch norm after it, as a residual block holds them."""

    weight: Tensor
    bn_weight: Optional[Tensor]
    bn_bias: Optional[Tensor]
    running_mean: Optional[Tensor] = None
    running_var: Optional[Tensor] = None
    num_batches_tracked: Optional[Tensor] = None
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    momentum: Optional[float] = 0.1
    eps: float = 1e-5

    def tensors(self) -> tuple:
        return (self.weight, self.bn_weight, self.bn_bias, self.running_mean, self.running_var,
                self.num_batches_tracked)

    def config(self) -> tuple:
        return (self.stride, self.padding, self.dilation, self.groups, self.momentum, self.eps)


def _affine(bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], invstd: Tensor) -> tuple[Tensor, Tensor]:
    """The batch norm as ``scale*(y - mean) + shift``: (scale, shift) in fp32."""
    scale = invstd if bn_weight is None else bn_weight.float() * invstd
    shift = torch.zeros_like(invstd) if bn_bias is None else bn_bias.float()
    return scale, shift


def _bn_grads(d_shift: Tensor, d_scale: Tensor, invstd: Tensor, scale: Tensor, bn_weight: Optional[Tensor],
              count: int):
    """From sum(dL/dz) and sum(dL/dz * (y - mean)) over a batch norm's outputs z =
    scale*(y - mean) + shift: (dL/dweight, dL/dbias, a, b), with ``a + b*(y - mean)``
    the gradient through the batch mean and 1/std."""
    d_invstd = d_scale if bn_weight is None else d_scale * bn_weight.float()
    a, b = stats_term(-scale * d_shift, d_invstd, invstd, count)
    d_weight = None if bn_weight is None else (d_scale * invstd).to(bn_weight.dtype)
    return d_weight, d_shift, a, b


def _block_forward(configs, has_ds: bool, x: Optional[Tensor], pending: Optional[tuple], convs) -> tuple:
    """One block's forward: (its input, the previous block's ReLU mask bits or None,
    its own end as ``aru::bn_add_relu_mask``'s arguments, new running statistics,
    saved per-conv tensors).

    With ``pending`` (``x`` None) the previous block's end has not been computed:
    ``pending`` holds its ``aru::bn_add_relu_mask`` arguments, and this block's first
    conv computes it as it loads its input (``aru::block_end_conv_bn_stats``), writing
    the block input and the mask bits on the way."""
    chain = len(configs) - has_ds
    running, saved, stats = [], [], []
    h, prologue, prev_mask = x, (None, None, None), None
    for k in range(len(configs)):
        if k == chain:  # the downsample branch reads the block input
            h, prologue = x, (None, None, None)
        weight, bn_weight, bn_bias, rm, rv, nbt = convs[k]
        stride, padding, dilation, groups, momentum, eps = configs[k]
        if k == 0 and pending is not None:
            x, prev_mask, y, mean, invstd, new_rm, new_rv = torch.ops.aru.block_end_conv_bn_stats(
                *pending, weight, rm, rv, nbt, stride, padding, dilation, groups, momentum, eps)
            a = x.new_empty(0)
        else:
            y, mean, invstd, new_rm, new_rv, a, _ = torch.ops.aru.conv_bn_stats(
                h, weight, *prologue, rm, rv, nbt, stride, padding, dilation, groups,
                prologue[0] is not None, momentum, eps)
        scale, shift = _affine(bn_weight, bn_bias, invstd)
        running += [new_rm, new_rv]
        if getattr(_options, "recompute", False):
            a = a.new_empty(0)  # written again by the backward (recompute_normalized_inputs)
        saved.append((y, mean, invstd, scale, shift, a))
        stats.append((y, mean, scale, shift))
        h, prologue = y, (mean, scale, shift)
    identity = stats[chain] if has_ds else (x, None, None, None)
    return x, prev_mask, (*stats[chain - 1], *identity), running, saved


_options = threading.local()


@contextlib.contextmanager
def recompute_normalized_inputs(enabled: bool = True):
    """Within this context, training residual blocks (:func:`aru_kernels.residual_blocks_train`,
    the fused models' training forward) do not keep for the backward the inputs of their
    3x3 convolutions as normalized ahead (``relu(bn(y))``, written once by a pass of its
    own, :func:`aru_kernels.plans.normalizes_ahead`): the backward writes them again, by
    the same pass, just before the weight gradient that reads them, and frees them after.
    Same results, bit for bit. Less memory held (resnext50_32x4d at batch 256: 0.7 GiB of
    the 10.7 its step holds), one more read and write of each such input (1.5 GB a step).
    The stride-1 grouped 3x3s inside a chain (:func:`aru_kernels.plans.tap_grads_fuse`)
    never write theirs, with or without it.
    Like ``torch.no_grad``, it applies to the forwards run inside it, in this thread."""
    previous = getattr(_options, "recompute", False)
    _options.recompute = bool(enabled)
    try:
        yield
    finally:
        _options.recompute = previous


def _tap_grads(weight: Tensor, config) -> bool:
    """Whether an inner conv of a chain (input normalized by the previous batch norm) takes
    both gradients from ``aru::tap_conv_grads``, which recomputes the normalized input:
    then the forward does not keep it."""
    stride, padding, dilation, groups, _, _ = config
    return tap_grads_fuse(weight.shape[2], weight.shape[3], stride, padding, dilation, groups,
                          weight.shape[1] * groups, weight.shape[0])


def _conv_rule(rule, weight: Tensor, config) -> bool:
    """A plan rule of the conv's shape (``rule(kh, kw, stride, padding, groups, c_out)``:
    :func:`aru_kernels.plans.block_end_fuses`, :func:`aru_kernels.plans.pointwise_grads_fuse`)."""
    stride, padding, dilation, groups, _, _ = config
    return rule(weight.shape[2], weight.shape[3], stride, padding, groups, weight.shape[0])


# The largest input (C_in) of a 1x1 convolution whose batch norm's statistics term is
# folded through it. The fold saves writing and reading dL/dy' (C_out wide) and costs the
# input-gradient launch a second K segment of C_in, through the prologue: it pays while
# that launch stays bound by memory. Static model, sm_90, resnext50_32x4d at batch 256:
# stage 1 (128 inputs) -74 us a block; stage 2 (256) +39 us, its input gradient then
# bound by instructions (184 us against 101 of DRAM).
GRAM_MAX_CHANNELS = 128


def gram_folds(weight: Tensor, config) -> bool:
    """Whether a conv's batch-norm statistics term is folded into its input gradient
    (``conv_input_grad``'s ``gram``) instead of being written with dL/dy: a stride-1
    1x1 convolution, ``groups=1``, at most :data:`GRAM_MAX_CHANNELS` inputs."""
    stride, padding, dilation, groups, _, _ = config
    return (tuple(weight.shape[2:]) == (1, 1) and stride == 1 and padding == 0 and groups == 1
            and weight.shape[1] <= GRAM_MAX_CHANNELS)


class _BlockEnd(NamedTuple):
    """What the backward through a block's final ``relu(bn(y) + identity')`` reads."""

    relu_mask: Tensor
    y: Tensor  # the last conv's output
    mean: Tensor
    yd: Optional[Tensor]  # the downsample conv's output
    md: Optional[Tensor]


class ResidualBlocksTrain(torch.autograd.Function):
    """``forward(ctx, layout, pool, x, *tensors)``: residual blocks one after the other,
    ``layout`` holding per block ``(configs, has_downsample)``, ``configs`` each
    conv's :meth:`ConvBN.config`, the chain first and the downsample last;
    ``tensors`` their :meth:`ConvBN.tensors`, :data:`PER_CONV` each, in the same
    order, block after block. Returns the last block's output (with ``pool``, its
    mean over each image's pixels, ``[N, C, 1, 1]``: the output itself is never
    written), then each batch norm's new running mean and variance (empty without
    running statistics; ``num_batches_tracked`` must already count this batch),
    not differentiable.

    Between two blocks of the node, the first one's output is written once: where
    the second block starts with a stride-1 1x1 convolution, that convolution
    computes it as it loads its input (``aru::block_end_conv_bn_stats``), and it
    is never read back. Its gradient is never written: the second block's last
    input-gradient launch applies the first one's final ReLU and takes its batch
    norms' sums in its epilogue (``aru::conv_input_grad_block_end``)."""

    @staticmethod
    def forward(ctx, layout, pool, x, *tensors):
        running, saved, first = [], [], 0
        convs = []
        for configs, _ in layout:
            convs.append([tensors[first + i * PER_CONV:first + (i + 1) * PER_CONV] for i in range(len(configs))])
            first += len(configs) * PER_CONV
        inputs, ends = [], []
        h, pending = x, None
        for b, (configs, has_ds) in enumerate(layout):
            h, prev_mask, end, new_running, per = _block_forward(configs, has_ds, h, pending, convs[b])
            if prev_mask is not None:
                ends[-1] = ends[-1]._replace(relu_mask=prev_mask)
            chain = len(configs) - has_ds
            inputs.append(h)
            ends.append(_BlockEnd(None, per[chain - 1][0], per[chain - 1][1],
                                  per[chain][0] if has_ds else None, per[chain][1] if has_ds else None))
            running += new_running
            saved += [t for conv in per for t in conv]
            if b + 1 < len(layout) and _conv_rule(block_end_fuses, convs[b + 1][0][0], layout[b + 1][0][0]):
                h, pending = None, end  # computed by the next block's first conv as it loads it
            else:
                h, relu_mask = torch.ops.aru.bn_add_relu_mask(*end, pool=pool and b + 1 == len(layout))
                ends[-1] = ends[-1]._replace(relu_mask=relu_mask)
                pending = None
        ctx.layout, ctx.pool = layout, pool
        # weight, bn weight and bn bias of each conv (not the running statistics: updated in place)
        params = [t for i in range(0, len(tensors), PER_CONV) for t in tensors[i:i + 3]]
        if _holds_privately():
            # The activations are this node's own (no other tensor views them): held here, block by
            # block, so that the backward frees each block's as soon as it is through it.
            ctx.save_for_backward(x, *params)
            ctx.held, first = [], 0
            for b, (configs, _) in enumerate(layout):
                n = len(configs) * SAVED_PER_CONV
                ctx.held.append((None if b == 0 else inputs[b], ends[b], tuple(saved[first:first + n])))
                first += n
        else:
            ctx.save_for_backward(*inputs, *(t for e in ends for t in e), *params, *saved)
            ctx.held = None
        ctx.mark_non_differentiable(*running)
        return (h, *running)

    @staticmethod
    def backward(ctx, dout, *_running):
        layout = ctx.layout
        blocks = len(layout)
        n_convs = sum(len(configs) for configs, _ in layout)
        flat = ctx.saved_tensors
        if ctx.held is not None:
            if any(held is None for held in ctx.held):
                raise RuntimeError("residual_blocks_train: this node's activations were freed by an earlier "
                                   "backward through it that did not finish; run the forward again")
            params = flat[1:]
            # Freed block by block unless the graph is kept for another backward.
            store = ctx.held if not _keeps_graph() else list(ctx.held)
            store[0] = (flat[0], *store[0][1:])
        else:
            inputs, flat = flat[:blocks], flat[blocks:]
            ends, flat = [_BlockEnd(*flat[5 * b:5 * (b + 1)]) for b in range(blocks)], flat[5 * blocks:]
            params, saved = flat[:3 * n_convs], flat[3 * n_convs:]
            store, first = [], 0
            for b, (configs, _) in enumerate(layout):
                n = len(configs) * SAVED_PER_CONV
                store.append((inputs[b], ends[b], saved[first:first + n]))
                first += n
        flat = None
        end = store[-1][1]
        dout = dout.to(end.y.dtype)
        dz, sums = torch.ops.aru.bn_add_relu_grad_sums(dout if ctx.pool else nhwc(dout), end.relu_mask, end.y,
                                                       end.mean, end.yd, end.md, pooled=ctx.pool)
        end = None
        first = n_convs
        block_grads = [None] * blocks
        dx = None
        for b in reversed(range(blocks)):
            configs, has_ds = layout[b]
            first -= len(configs)
            convs = [params[(first + i) * 3:(first + i + 1) * 3] for i in range(len(configs))]
            x, _, saved = store[b]
            per = [saved[i * SAVED_PER_CONV:(i + 1) * SAVED_PER_CONV] for i in range(len(configs))]
            prev = store[b - 1][1] if b > 0 else None
            need_dx = b > 0 or ctx.needs_input_grad[2]
            block_grads[b], dx, sums_prev = _block_backward(configs, has_ds, x, convs, per, dz, sums, prev, need_dx)
            store[b] = x = saved = per = prev = None  # this block's activations (held privately: freed here)
            dz, sums = dx, sums_prev
        flat_grads = [t for g in block_grads for conv in g for t in conv]
        return (None, None, dx if ctx.needs_input_grad[2] else None, *flat_grads)


def _holds_privately() -> bool:
    """Whether :class:`ResidualBlocksTrain` may hold its activations itself rather than
    through ``save_for_backward``: not while saved-tensor hooks are set (e.g.
    ``torch.autograd.graph.save_on_cpu``, non-reentrant checkpointing), which must see
    them, nor while ``torch.compile`` traces (which manages saved tensors itself)."""
    if torch.compiler.is_compiling():
        return False
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is not None and top_hooks(False) is None


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``): then saved
    activations must outlive it."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def _block_backward(configs, has_ds: bool, x: Tensor, convs, per, dz: Tensor, sums: Tensor,
                    prev: Optional[_BlockEnd], need_dx: bool):
    """One block's backward from dz (the gradient behind its final ReLU) and its
    batch norms' sums: (per-conv gradients, then dL/dx, or with ``prev`` the
    previous block's dz, and its sums)."""
    n_convs = len(configs)
    chain = n_convs - has_ds
    grads = [[None] * PER_CONV for _ in range(n_convs)]
    weights, bn_weights, bn_biases = [c[0] for c in convs], [c[1] for c in convs], [c[2] for c in convs]

    def input_grad(k: int, g: Tensor, src, pro, inner: bool, residual: Optional[Tensor]):
        stride, padding, dilation, groups, _, _ = configs[k]
        last = prev is not None and not inner and (k == chain if has_ds else k == 0)
        if last and groups == 1:  # through the previous block's end, dL/dx never written
            return torch.ops.aru.conv_input_grad_block_end(g, weights[k], stride, padding, dilation, groups,
                                                           residual, *prev)
        dx, part_shift, part_scale = torch.ops.aru.conv_input_grad(
            g, weights[k], src, *pro, stride, padding, dilation, groups, inner, None if inner else residual)
        if last:
            return torch.ops.aru.bn_add_relu_grad_sums(dx, *prev)
        return dx, ((part_shift.sum(0), part_scale.sum(0)) if inner else None)

    def conv_backward(k: int, g: Tensor, d_shift: Tensor, d_scale: Tensor, scaled: bool,
                      residual: Optional[Tensor], need_dx: bool):
        """Gradients of conv k from ``g`` (dL/dz behind its batch norm when ``scaled``,
        else dL/dy without the statistics term) and the batch norm's sums; returns
        dL/d(conv k's input) and, for k > 0, the sums of batch norm k - 1 (for the
        block's last input gradient with ``prev``: the previous block's dz and sums)."""
        y, mean, invstd, scale, shift, a = per[k]
        stride, padding, dilation, groups, _, _ = configs[k]
        d_w, d_b, st_a, st_b = _bn_grads(d_shift, d_scale, invstd, scale, bn_weights[k], rows(y))
        grads[k][1] = d_w
        # a copy: d_b is a row of the sums, the same row for the last batch norm and the downsample's
        # (both add to z); autograd keeps what it is given as .grad, so two biases would share it
        grads[k][2] = None if bn_biases[k] is None else d_b.to(bn_biases[k].dtype, copy=True)
        inner = 0 < k < chain  # its input is the previous conv's output, normalized on the way in
        src = per[k - 1][0] if inner else x
        pro = (per[k - 1][1], per[k - 1][3], per[k - 1][4]) if inner else (None, None, None)
        ahead = normalizes_ahead(weights[k].shape[2], weights[k].shape[3], inner)  # as aru::conv_bn_stats
        if need_dx and inner and _tap_grads(weights[k], configs[k]):
            # one launch for both gradients from the input before its batch norm: dL/dy' never
            # written, the normalized input not read
            dw, dx, sums = torch.ops.aru.tap_conv_grads(
                src, g, weights[k], y, mean, st_a, st_b, scale if scaled else None, *pro, True,
                configs[k][1], configs[k][2], configs[k][3])
            grads[k][0] = dw.to(weights[k].dtype)
            return dx, (sums[0], sums[1])
        if ahead and a.numel() == 0:  # not kept (recompute_normalized_inputs): the forward's pass again
            a = torch.ops.aru.bn_add_relu(src, *pro, None, None, None, None)
        if need_dx and not ahead and _conv_rule(pointwise_grads_fuse, weights[k], configs[k]):
            # one launch for both gradients: dL/dy' never written. The block's last input gradient
            # (its first conv's, or the downsample conv's) takes the previous block's end.
            last = prev is not None and not inner and (k == chain if has_ds else k == 0)
            dw, dx, sums = torch.ops.aru.pointwise_conv_grads(
                src, g, weights[k], y, mean, st_a, st_b, scale if scaled else None, residual,
                *(prev if last else (None,) * 5), *pro, inner)
            grads[k][0] = dw.to(weights[k].dtype)
            return dx, ((sums[0], sums[1]) if inner else sums if last else None)
        fold = need_dx and inner and not ahead and gram_folds(weights[k], configs[k])
        reads_y = not fold or weights[k].shape[1] > WGRAD_GRAM_MAX_CHANNELS  # else the input's A^T A stands in
        dw, g_stat = torch.ops.aru.conv_weight_grad(
            a if ahead else src, g, weights[k], *((None, None, None) if ahead else pro), stride, padding,
            dilation, groups, inner and not ahead, y if reads_y else None, mean if reads_y else None, st_a, st_b,
            scale if scaled else None, input_sums=fold)
        grads[k][0] = dw.to(weights[k].dtype)
        if not need_dx:
            return None, None
        if fold:  # the statistics term through the convolution: dL/dy' is never written (gram_folds)
            w2 = weights[k].float().flatten(1)  # [C_out, C_in]
            gram = w2.t() @ (st_b[:, None] * w2)
            w_c = weights[k] if not scaled else (weights[k].float() * scale.view(-1, 1, 1, 1)).to(weights[k].dtype)
            dx, part_shift, part_scale = torch.ops.aru.conv_input_grad(
                g, w_c, src, *pro, stride, padding, dilation, groups, True, None, gram,
                g_stat / max(1, rows(y)), w2.t() @ st_a)
            return dx, (part_shift.sum(0), part_scale.sum(0))
        return input_grad(k, g_stat, src, pro, inner, residual)

    g, d_shift, d_scale, scaled = dz, sums[0], sums[1], True
    dx, out_sums = None, None
    for k in reversed(range(chain)):
        residual = dz if (k == 0 and not has_ds) else None
        dx_k, nxt = conv_backward(k, g, d_shift, d_scale, scaled, residual, k > 0 or need_dx)
        if k > 0:
            g, (d_shift, d_scale), scaled = dx_k, nxt, False
        else:
            dx, out_sums = dx_k, nxt
    if has_ds:
        dx, out_sums = conv_backward(chain, dz, sums[0], sums[2], True, dx, need_dx)
    return grads, dx, out_sums
