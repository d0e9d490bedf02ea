"""The collectives lindiff's methods use under context parallelism (NCCL on GPUs, gloo on CPUs).

Both keep autograd working: with a tensor that requires grad they go through
``torch.distributed.nn.functional``, whose backward sends the gradients back the same way
(all-reduce: summed; all-gather: each rank gets the gradient of its own slab).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from .shards import SequenceShard


def _differentiable(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def all_reduce_sum(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The sum of ``x`` over the processes of ``shard.group``; ``x`` is overwritten unless it needs grad."""
    if _differentiable(x):
        return dist_nn.all_reduce(x, op=dist.ReduceOp.SUM, group=shard.group)
    x = x.contiguous()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=shard.group)
    return x


def all_reduce_max(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The elementwise maximum of ``x`` over the processes of ``shard.group``, without gradient (a
    constant: callers use it as a shift that cancels out, like a softmax's maximum)."""
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=shard.group)
    return x


def all_gather(x: torch.Tensor, shard: SequenceShard) -> list[torch.Tensor]:
    """Every process's ``x`` (same shape on all), in rank order."""
    x = x.contiguous()
    if _differentiable(x):
        return list(dist_nn.all_gather(x, group=shard.group))
    out = [torch.empty_like(x) for _ in range(shard.world_size)]
    dist.all_gather(out, x, group=shard.group)
    return out


def gather_sequence(x: torch.Tensor, shard: SequenceShard) -> tuple[torch.Tensor, slice]:
    """A sequence from every process's part of it, the parts in rank order.

    Parts may differ in length, as in diffusers' ``*_anything`` splits (the lengths are gathered
    first, then the parts padded to the longest).

    Args:
        x: this process's part ``(B, n, ...)``; ``B`` and the trailing dims are the same on all.

    Returns:
        The whole sequence ``(B, N, ...)`` and where this process's part sits in it.
    """
    sizes = [int(size) for size in torch.cat(all_gather(torch.tensor([x.shape[1]], device=x.device), shard))]
    start = sum(sizes[: shard.rank])
    own = slice(start, start + x.shape[1])
    longest = max(sizes)
    if longest == 0:
        return x, own
    pad = (0, 0) * (x.ndim - 2) + (0, longest - x.shape[1])
    slabs = all_gather(F.pad(x, pad), shard)
    return torch.cat([slab[:, :size] for slab, size in zip(slabs, sizes, strict=True)], dim=1), own


def neighbour_tokens(
    x: torch.Tensor, shard: SequenceShard, total: int, before: int, after: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens just before and just after this rank's part of a sequence split over ranks.

    Every rank sends its first and last ``width`` tokens (fewer if it holds fewer) in one
    all-gather; a rank takes what it needs from its neighbours, and from ranks further away when a
    neighbour holds fewer tokens than asked for.

    Args:
        x: this rank's part ``(B, n, ...)`` of a sequence of ``total`` tokens split as ``shard`` says.
        before: tokens wanted before the part (at most ``width``; fewer exist near the start).
        after: tokens wanted after it (at most ``width``).
        width: the largest ``before`` or ``after`` of any rank: the same on every rank.

    Returns:
        ``(B, min(before, start), ...)`` and ``(B, min(after, total - stop), ...)``.
    """
    if not 0 <= before <= width or not 0 <= after <= width:
        raise ValueError(f"before ({before}) and after ({after}) must lie in [0, width={width}]")
    held = [min(size, width) for size in shard.sizes(total)]
    own = held[shard.rank]
    pad = (0, 0) * (x.ndim - 2) + (0, width - own)
    slab = torch.cat([F.pad(x[:, :own], pad), F.pad(x[:, x.shape[1] - own :], pad)], dim=1)
    slabs = all_gather(slab, shard)
    ahead, behind = [], []
    need = before
    for rank in range(shard.rank - 1, -1, -1):  # tails of the ranks before, nearest first
        take = min(need, held[rank])
        if take:
            ahead.insert(0, slabs[rank][:, width + held[rank] - take : width + held[rank]])
        need -= take
    need = after
    for rank in range(shard.rank + 1, shard.world_size):  # heads of the ranks after
        take = min(need, held[rank])
        if take:
            behind.append(slabs[rank][:, :take])
        need -= take
    empty = x[:, :0]
    return torch.cat([empty, *ahead], dim=1), torch.cat([empty, *behind], dim=1)
