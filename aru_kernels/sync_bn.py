"""Batch statistics synchronized across processes (the fused ``nn.SyncBatchNorm``)."""

from __future__ import annotations

import torch

from .bn_ops import rows
from .conv_bn_ops import conv_bn_stats_grads, conv_with_stats

__all__ = ["SyncConvBatchStats", "synchronized"]


def synchronized(process_group) -> bool:
    """Whether statistics must be gathered: a ``torch.distributed`` group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


class SyncConvBatchStats(torch.autograd.Function):
    """``aru::conv_bn_stats`` with the batch mean and 1/std over the images of
    every process in ``group``.

    Each process reduces its tiles to (mean, M2) per channel, the processes
    exchange those 2*C numbers (plus their counts) with one all-gather, and
    each combines them in the same order (Chan et al.): no cancellation, the
    same result everywhere. Backward sums dL/dmean and dL/dinvstd over the
    processes (one all-reduce of 2*C numbers) and folds the statistics' term
    into the local conv backward. Returns ``(y, mean, invstd, unbiased
    variance, count)``, the last two per channel and not differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, in_mean, in_scale, in_shift, stride: int, padding: int, dilation: int,
                groups: int, in_relu: bool, eps: float, group):
        import torch.distributed as dist

        y, tile_mean, tile_m2, tile_rows, a = conv_with_stats(x, weight, in_mean, in_scale, in_shift, stride,
                                                              padding, dilation, groups, in_relu)
        local_rows = rows(y)
        starts = torch.arange(tile_mean.shape[0], device=y.device) * tile_rows
        counts = (local_rows - starts).clamp(max=tile_rows).to(torch.float32).unsqueeze(1)
        mean_r = (counts * tile_mean).sum(0) / max(local_rows, 1)
        m2_r = (tile_m2 + counts * (tile_mean - mean_r).square()).sum(0)
        local = torch.stack([mean_r, m2_r, torch.full_like(mean_r, local_rows)])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        g = torch.stack(gathered)  # [world, 3, C]
        n = g[:, 2]
        total = n.sum(0)
        mean = (n * g[:, 0]).sum(0) / total.clamp(min=1)
        m2 = (g[:, 1] + n * (g[:, 0] - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / total.clamp(min=1) + eps)
        # the backward's 1/count stays on the device: reading the count here would wait for the exchange
        ctx.count = total.clone()
        ctx.group = group
        ctx.conv_cfg = (stride, padding, dilation, groups, in_relu)
        ctx.slots = (0, 1, (2, 3, 4))
        ctx.ahead = a is not None
        ctx.save_for_backward(x, weight, in_mean, in_scale, in_shift, y, mean, invstd, a)
        # one value a channel over all processes has no unbiased variance: NaN, as PyTorch's
        # m2 * count / (count - 1) gives (an empty batch gives 0, and updates nothing)
        unbiased = torch.where(total == 1, torch.nan, m2 / (total - 1).clamp(min=1))
        ctx.mark_non_differentiable(unbiased, total)
        return y, mean, invstd, unbiased, total

    @staticmethod
    def backward(ctx, dy, dmean, dinvstd, _d_unbiased, _d_total):
        import torch.distributed as dist

        mean = ctx.saved_tensors[6]
        d = torch.stack([torch.zeros_like(mean) if v is None else v.float() for v in (dmean, dinvstd)])
        dist.all_reduce(d, group=ctx.group)
        return (*conv_bn_stats_grads(ctx, dy, d[0], d[1], ctx.count),) + (None,) * 7
