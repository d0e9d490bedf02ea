"""Exact local attention in bounded memory with plain PyTorch: the CPU (and any-device) path.

The grid is cut into boxes of query cells. The keys a box can see lie in the box grown by the
window's reach along each axis (``floor(radius)``, or ``floor(frames_radius)`` frames for a
cylinder; clipped to the grid), a strided slice of the ``(B, T, H, W, heads, D)`` view of ``k``
and ``v``: no index tensors, no ``N x N`` mask. Each box scores its queries against those keys
(and the global keys), masks the pairs outside the window and takes one exact softmax in
float32 (float64 for float64 inputs).

Memory: boxes are sized so that one box's score matrix (``B * heads * queries * keys``)
stays under ``budget`` elements (64 MiB of float32 by default), so a forward pass without
autograd needs a few times that beyond q, k, v and the output. Under autograd every box keeps
its probabilities for backward: ``B * heads * N * keys_per_box`` in all, O(N * window), never
O(N^2).
"""

from __future__ import annotations

import itertools
import math

import torch

from .reference import Grid3, Window

# Elements of one box's float32 score matrix (B * heads * queries * keys); 64 MiB.
_SCORE_ELEMENTS = 1 << 24


def choose_box(
    grid: Grid3, window: Window, batch_heads: int, num_global: int, budget: int = _SCORE_ELEMENTS
) -> Grid3:
    """Query box ``(t, h, w)``: ``max(8, reach)`` cells along each axis (the window's reach along
    it), halved along its longest side until its scores fit ``budget``.

    A side of ``reach`` gives key boxes of ``(3 reach)^2`` cells, about 3x the disc they contain;
    bigger boxes waste more keys, smaller ones more per-box overhead.
    """
    reach = window.reach
    box = [min(g, max(8, r)) for g, r in zip(grid, reach, strict=True)]

    def cost(b: list[int]) -> int:
        keys = math.prod(min(g, s + 2 * r) for g, s, r in zip(grid, b, reach, strict=True))
        return batch_heads * math.prod(b) * (keys + num_global)

    while cost(box) > budget and max(box) > 1:
        axis = max(range(3), key=lambda a: box[a])
        box[axis] = -(-box[axis] // 2)
    return tuple(box)  # type: ignore[return-value]


def _outside_mask(box: Grid3, key_offset: Grid3, key_box: Grid3, window: Window, device) -> torch.Tensor:
    """``(queries, keys)`` bool, ``True`` for the pairs of a query box and its key box outside the window.

    Query cell ``i`` and key cell ``j`` of an axis are ``i - key_offset - j`` apart along it.
    """
    offsets = []
    for axis in range(3):
        qa = torch.arange(box[axis], device=device)
        ka = torch.arange(key_box[axis], device=device) + key_offset[axis]
        shape = [1] * 6
        shape[axis], shape[axis + 3] = box[axis], key_box[axis]
        offsets.append((qa[:, None] - ka[None, :]).view(shape))
    return ~window.inside(*offsets).reshape(math.prod(box), math.prod(key_box))


def local_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid3,
    window: Window,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
    layout: str = "bnhd",
    return_lse: bool = False,
    budget: int = _SCORE_ELEMENTS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Local attention box by box; arguments as in ``local_attention`` with ``grid`` as ``(T, H, W)``
    and the window as a :class:`~.reference.Window` (``window_geometry``).

    Returns:
        The output in the layout and dtype of ``q``; with ``return_lse`` also the float32
        log-sum-exp, ``(B, N, H)`` (``"bnhd"``) or ``(B, H, N)`` (``"bhnd"``).
    """
    if layout == "bhnd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if global_kv is not None:
            global_kv = tuple(t.transpose(1, 2) for t in global_kv)
    batch, _, heads, _ = q.shape
    dim_v = v.shape[-1]
    compute = torch.promote_types(q.dtype, torch.float32)
    # Splitting the token dim is always a view, whatever the strides.
    q5, k5, v5 = (t.unflatten(1, grid) for t in (q, k, v))
    k_g = v_g = None
    num_global = 0
    if global_kv is not None and global_kv[0].shape[1] > 0:
        k_g, v_g = (t.to(compute) for t in global_kv)
        num_global = k_g.shape[1]

    reach = window.reach
    box = choose_box(grid, window, batch * heads, num_global, budget)
    out = q.new_empty((batch, *grid, heads, dim_v))
    lse_out = q.new_empty((batch, *grid, heads), dtype=torch.float32) if return_lse else None

    masks: dict[tuple[Grid3, Grid3, Grid3], torch.Tensor] = {}  # interior boxes share one
    for starts in itertools.product(*(range(0, g, b) for g, b in zip(grid, box, strict=True))):
        stops = tuple(min(s + b, g) for s, b, g in zip(starts, box, grid, strict=True))
        key_starts = tuple(max(0, s - r) for s, r in zip(starts, reach, strict=True))
        key_stops = tuple(min(g, s + r) for s, g, r in zip(stops, grid, reach, strict=True))
        q_box = (slice(None), *(slice(a, b) for a, b in zip(starts, stops, strict=True)))
        k_box = (slice(None), *(slice(a, b) for a, b in zip(key_starts, key_stops, strict=True)))
        box_shape = tuple(b - a for a, b in zip(starts, stops, strict=True))
        geometry = (
            box_shape,
            tuple(k - s for k, s in zip(key_starts, starts, strict=True)),
            tuple(b - a for a, b in zip(key_starts, key_stops, strict=True)),
        )
        if geometry not in masks:
            masks[geometry] = _outside_mask(*geometry, window, q.device)

        qb = q5[q_box].reshape(batch, -1, heads, q.shape[-1]).to(compute) * scale
        kb = k5[k_box].reshape(batch, -1, heads, k.shape[-1]).to(compute)
        vb = v5[k_box].reshape(batch, -1, heads, dim_v).to(compute)
        scores = torch.einsum("bqhd,bkhd->bhqk", qb, kb).masked_fill(masks[geometry], float("-inf"))
        if k_g is not None:
            scores = torch.cat([scores, torch.einsum("bqhd,bkhd->bhqk", qb, k_g)], dim=-1)
        # Every query sees at least itself, so no row is all -inf.
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
        o = torch.einsum("bhqk,bkhe->bqhe", probs[..., : kb.shape[1]], vb)
        if k_g is not None:
            o = o + torch.einsum("bhqk,bkhe->bqhe", probs[..., kb.shape[1] :], v_g)
        out[q_box] = o.reshape(batch, *box_shape, heads, dim_v).to(out.dtype)
        if lse_out is not None:
            lse_out[q_box] = lse.squeeze(-1).transpose(1, 2).reshape(batch, *box_shape, heads)

    out = out.flatten(1, 3)
    if layout == "bhnd":
        out = out.transpose(1, 2)
    if lse_out is None:
        return out
    lse_out = lse_out.flatten(1, 3)
    return out, (lse_out.transpose(1, 2) if layout == "bhnd" else lse_out)
