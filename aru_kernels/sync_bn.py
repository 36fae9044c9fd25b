"""Batch statistics synchronized across processes (the fused ``nn.SyncBatchNorm``)."""

from __future__ import annotations

import torch

from .bn_ops import rows, stats_grads

__all__ = ["SyncBatchStats", "synchronized"]


def synchronized(process_group) -> bool:
    """Whether statistics must be gathered: a ``torch.distributed`` group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


class SyncBatchStats(torch.autograd.Function):
    """Batch mean and 1/std over the images of every process in ``group``.

    Each process reduces its tiles to (mean, M2) per channel, the processes
    exchange those 2*C numbers (plus their counts) with one all-gather, and
    each combines them in the same order (Chan et al.): no cancellation, the
    same result everywhere. Backward sums dL/dmean and dL/dinvstd over the
    processes (one all-reduce of 2*C numbers) and applies them to the local y.
    Returns ``(mean, invstd, unbiased variance, count)``, the last two
    per channel and not differentiable.
    """

    @staticmethod
    def forward(ctx, y, tile_mean, tile_m2, tile_rows: int, eps: float, group):
        import torch.distributed as dist

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
        ctx.count = int(total[0].item()) if total.numel() else 0
        ctx.group = group
        ctx.save_for_backward(y, mean, invstd)
        unbiased = m2 / (total - 1).clamp(min=1)
        ctx.mark_non_differentiable(unbiased, total)
        return mean, invstd, unbiased, total

    @staticmethod
    def backward(ctx, dmean, dinvstd, _d_unbiased, _d_total):
        import torch.distributed as dist

        y, mean, invstd = ctx.saved_tensors
        d = torch.stack(stats_grads(dmean, dinvstd, mean))
        dist.all_reduce(d, group=ctx.group)
        dy = torch.ops.aru.bn_stats_backward(y.contiguous(memory_format=torch.channels_last), d[0].contiguous(),
                                             d[1].contiguous(), mean, invstd, max(1, ctx.count))
        return dy, None, None, None, None, None
