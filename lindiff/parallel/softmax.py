"""Softmax attention over a sequence split over processes: local windows, and replicated queries.

- :func:`local_attention_sharded`: each query attends to the keys in a window around it on the
  token grid, so a process needs only the keys within the window's reach of its own tokens. It
  fetches them (:func:`~lindiff.parallel.rows.box_around`: whole rows, ``floor(radius)`` rows
  and ``floor(frames_radius)`` frames (``floor(radius)`` for a ball) beyond its part, clipped to
  the grid) and runs :func:`lindiff.kernels.local_attention` on that box, its own queries in
  place and zeros elsewhere. Exact; it sends about ``2 * reach`` rows (frames on video) of keys
  and values per process and computes the box's extra rows of queries in vain.
- :func:`attention_over_shards`: queries that every process holds (e.g. the few text tokens)
  attending to all keys. Each process attends over its own keys (in chunks), keeping each
  part's log-sum-exp, and the processes combine the parts exactly: an all-reduce of the largest
  log-sum-exp ``(B, M, H)``, then one of the parts' outputs weighted by ``exp(lse - largest)``
  and of those weights, ``(B, M, H, D_v + 1)``, in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lindiff.kernels import local_attention
from lindiff.kernels.local_attention.reference import as_grid3, window_geometry

from ..grid import GridShape
from . import exchange
from .rows import box_around
from .shards import SequenceShard

# Elements of one float32 score chunk (B * H * queries * keys) in attention_over_shards; 64 MiB.
_SCORE_ELEMENTS = 1 << 24


def local_attention_sharded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: SequenceShard,
    grid: GridShape,
    *,
    radius: float,
    frames_radius: float | None = None,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float,
) -> torch.Tensor:
    """:func:`lindiff.kernels.local_attention` of this process's image tokens over the whole grid.

    Args:
        q, k: this process's part ``shard.part(T * H * W)`` of the image tokens, ``(B, n, H, D)``.
        v: the same, ``(B, n, H, D_v)``.
        grid: ``(T, H, W)`` of all image tokens.
        radius: window radius (closed: distances ``<= radius``), as for ``local_attention``.
        frames_radius: ``None`` for a ball, else the cylinder's extent in frames, as for
            ``local_attention``.
        global_kv: keys and values every query sees (whole, the same on every process).
        scale: softmax scale.

    Returns:
        ``(B, n, H, D_v)``, the output of this process's queries.
    """
    frames, rows, _ = window_geometry(radius, frames_radius, as_grid3(grid)).reach
    dim = k.shape[-1]
    box, kv = box_around(torch.cat([k, v], dim=-1), shard, grid, frames, rows)
    own = box.locate(shard.part(math.prod(grid)))
    q_box = F.pad(q, (0, 0, 0, 0, own.start, box.size - own.stop))
    out = local_attention(
        q_box,
        kv[..., :dim],
        kv[..., dim:],
        grid=box.shape,
        radius=radius,
        frames_radius=frames_radius,
        global_kv=global_kv,
        scale=scale,
    )
    return out[:, own]


def _attention_parts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` ``(B, M, H, D)`` over chunks of the keys ``k, v``
    ``(B, n, H, D | D_v)``, in float32 (float64 for float64 inputs).

    Returns:
        Each chunk's output ``(C, B, M, H, D_v)`` (zero without keys) and log-sum-exp
        ``(C, B, M, H)`` (``-inf`` without keys).
    """
    batch, queries, heads, _ = q.shape
    chunk = max(1, _SCORE_ELEMENTS // max(1, batch * heads * queries))
    dtype = torch.promote_types(q.dtype, torch.float32)
    q = q.to(dtype) * scale
    outputs, lses = [], []
    for k_part, v_part in zip(k.split(chunk, dim=1), v.split(chunk, dim=1), strict=True):
        scores = torch.einsum("bmhd,bnhd->bhmn", q, k_part.to(dtype))
        lse = scores.logsumexp(dim=-1)
        probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0).unsqueeze(-1))
        outputs.append(torch.einsum("bhmn,bnhd->bmhd", probs, v_part.to(dtype)))
        lses.append(lse.transpose(1, 2))
    return torch.stack(outputs), torch.stack(lses)


def attention_over_shards(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: SequenceShard, scale: float
) -> torch.Tensor:
    """Softmax attention of queries that every process holds over keys split over the processes.

    Args:
        q: ``(B, M, H, D)``, the same on every process.
        k, v: this process's keys and values ``(B, n, H, D)`` and ``(B, n, H, D_v)``; each key of
            the whole sequence on exactly one process.
        scale: softmax scale.

    Returns:
        ``(B, M, H, D_v)`` in the dtype of ``q``: attention over every process's keys.
    """
    outputs, lses = _attention_parts(q, k, v, scale)
    # Every part (chunk of keys, process) weighs its output by exp(lse - shift), one shift for all.
    weights = torch.exp(lses - exchange.all_reduce_max(lses.amax(dim=0), shard)).unsqueeze(-1)
    local = torch.cat([(outputs * weights).sum(dim=0), weights.sum(dim=0)], dim=-1)
    summed = exchange.all_reduce_sum(local, shard)
    return (summed[..., :-1] / summed[..., -1:]).to(q.dtype)
