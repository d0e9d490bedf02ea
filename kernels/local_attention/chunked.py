"""Exact local attention in bounded memory with plain PyTorch: the CPU (and any-device) path.

The grid is cut into boxes of query cells. The keys a box can see lie in the box grown by the
window's reach along each axis (``floor(radius)``, or ``floor(frames_radius)`` frames for a
cylinder; clipped to the grid), a strided slice of the ``(B, T, H, W, heads, D)`` view of ``k``
and ``v``: no index tensors, no ``N x N`` mask. Each box's queries attend to those keys and the
global keys in one softmax, with the pairs outside the window masked. Two ways:

- ``fused`` (CPU tensors, where torch has the op): PyTorch's fused CPU flash-attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel behind
  ``scaled_dot_product_attention`` on CPU) on each box, with an additive ``0 / -inf`` mask of
  the box's window pairs (the global keys always allowed). The box's queries, keys and values
  are copied into contiguous ``(B, heads, n, D)`` buffers of the compute dtype (float32, float64
  for float64 inputs); the kernel accumulates in that dtype and never stores the scores. A
  ``torch.autograd.Function`` saves only q, k, v, the output and the log-sum-exp, and its
  backward runs the kernel's backward box by box, gathering the same buffers again. The kernel
  wants one head dim for q, k and v: narrower tensors are padded with zeros (which changes no
  score and no output). A gradient of the log-sum-exp enters the kernel's backward through one
  more value channel of ones, with zero output and the lse gradient as that channel's output
  gradient (then ``dS = P (dP - rowsum(dO o) + g)``, the exact gradient).
- ``einsum`` (every other device, or ``fused=False``): the scores of a box in the compute dtype,
  masked, one exact ``logsumexp`` and ``exp``, then the weighted values; autograd differentiates
  through it.

Boxes. The kernel computes every (query, key) pair of a box, inside the window or not, so a box
of side ``s`` costs about ``(s + 2 reach)^2`` pairs per query for a disc of ``pi reach^2``: small
boxes waste fewer pairs, but copy more keys per query and give the kernel thinner blocks.
``choose_fused_box`` minimises a cost model in pairs, ``keys * (queries + _KEY_COST) +
_BOX_COST`` summed exactly over the boxes the grid is cut into (sides of powers of two); with
reach 15 on a 64 x 64 or 128 x 128 grid it picks 16 x 16 boxes. ``choose_box`` (the einsum path)
uses sides of ``max(8, reach)``.

Memory: the einsum path sizes its boxes so that one box's score matrix
(``B * heads * queries * keys``) stays under ``budget`` elements (64 MiB of float32 by default);
under autograd every box keeps its probabilities for backward, ``B * heads * N * keys_per_box``
in all, O(N * window), never O(N^2). The fused path keeps each box's mask
(``queries * (keys + global keys)`` elements of the compute dtype) under ``budget``; beyond q, k, v and the
output it holds one box's buffers (at most about the size of k and v in the compute dtype), a
few masks, and for backward only the output and log-sum-exp: O(N), like flash attention.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .reference import Grid3, Window

# Elements of one box's float32 score matrix (B * heads * queries * keys); 64 MiB.
_SCORE_ELEMENTS = 1 << 24
# The fused path's cost model, in (query, key) pairs of the kernel: per key of a box (copying its
# key and value, the kernel's per-key work) and per box; fitted to forward and backward times
# on a 2-core x86 CPU (16 heads of 72 channels, radius 4 to 16, 64 x 64 and 128 x 128 grids).
_KEY_COST = 64
_BOX_COST = 2000
# Query-box sides the fused path considers (and each axis's full extent); other sides (12, 24)
# ran a few percent slower in the kernel.
_SIDES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Masks the fused path keeps (the boxes of a row of the grid share at most three geometries).
_MASK_CACHE = 4


@functools.cache
def fused_available() -> bool:
    """Whether torch has the fused CPU flash-attention op with a mask and its backward."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") or not hasattr(
        aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    ):
        return False
    schema = str(aten._scaled_dot_product_flash_attention_for_cpu.default._schema)
    return "attn_mask" in schema


@dataclass(frozen=True)
class _Box:
    """One query box: the indices of its queries and keys in the ``(B, T, H, W, ...)`` views."""

    q: tuple[slice, ...]
    k: tuple[slice, ...]
    shape: Grid3
    key_shape: Grid3
    geometry: tuple[Grid3, Grid3, Grid3]  # (shape, key offset, key shape): what its mask depends on


def _boxes(grid: Grid3, box: Grid3, reach: Grid3) -> list[_Box]:
    """The query boxes of side ``box`` that tile ``grid`` and their key boxes, in row-major order."""
    boxes = []
    for starts in itertools.product(*(range(0, g, b) for g, b in zip(grid, box, strict=True))):
        stops = tuple(min(s + b, g) for s, b, g in zip(starts, box, grid, strict=True))
        key_starts = tuple(max(0, s - r) for s, r in zip(starts, reach, strict=True))
        key_stops = tuple(min(g, s + r) for s, g, r in zip(stops, grid, reach, strict=True))
        shape = tuple(b - a for a, b in zip(starts, stops, strict=True))
        key_shape = tuple(b - a for a, b in zip(key_starts, key_stops, strict=True))
        offset = tuple(k - s for k, s in zip(key_starts, starts, strict=True))
        boxes.append(
            _Box(
                (slice(None), *(slice(a, b) for a, b in zip(starts, stops, strict=True))),
                (slice(None), *(slice(a, b) for a, b in zip(key_starts, key_stops, strict=True))),
                shape,
                key_shape,
                (shape, offset, key_shape),
            )
        )
    return boxes


def choose_box(
    grid: Grid3, window: Window, batch_heads: int, num_global: int, budget: int = _SCORE_ELEMENTS
) -> Grid3:
    """The einsum path's query box ``(t, h, w)``: ``max(8, reach)`` cells along each axis (the
    window's reach along it), halved along its longest side until its scores fit ``budget``.

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


def _axis_sums(extent: int, side: int, reach: int) -> tuple[int, int, int]:
    """Along one axis cut into pieces of ``side``: the piece count, the sum of the pieces' key
    extents and the sum of their query extent * key extent."""
    count = keys = pairs = 0
    for start in range(0, extent, side):
        queries = min(start + side, extent) - start
        key = min(extent, start + side + reach) - max(0, start - reach)
        count, keys, pairs = count + 1, keys + key, pairs + queries * key
    return count, keys, pairs


@functools.lru_cache(maxsize=64)
def choose_fused_box(grid: Grid3, window: Window, num_global: int, budget: int = _SCORE_ELEMENTS) -> Grid3:
    """The fused path's query box ``(t, h, w)``: the one that minimises the sum over boxes of
    ``(keys + num_global) * (queries + _KEY_COST) + _BOX_COST`` (sides from ``_SIDES`` and each
    axis's extent), among those whose mask, ``queries * (keys + num_global)``, fits ``budget``
    (single cells if none does). Exact over the boxes the grid is cut into, edges included."""
    axes = []
    for extent, reach in zip(grid, window.reach, strict=True):
        sides = sorted({s for s in _SIDES if s < extent} | {extent})
        axes.append([(side, _axis_sums(extent, side, reach)) for side in sides])
    best, best_cost = (1, 1, 1), math.inf
    for choice in itertools.product(*axes):
        sums = [s for _, s in choice]
        count, keys, pairs = (math.prod(s[i] for s in sums) for i in range(3))
        queries = math.prod(s for s, _ in choice)
        largest_keys = math.prod(
            min(g, s + 2 * r) for g, (s, _), r in zip(grid, choice, window.reach, strict=True)
        )
        if queries * (largest_keys + num_global) > budget:
            continue
        # sum over boxes of (K + M)(Q + c) + C = sum KQ + c sum K + M N + (c M + C) count
        cost = (
            pairs
            + _KEY_COST * keys
            + num_global * math.prod(grid)
            + (_KEY_COST * num_global + _BOX_COST) * count
        )
        if cost < best_cost:
            best, best_cost = tuple(s for s, _ in choice), cost
    return best  # type: ignore[return-value]


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


@dataclass(frozen=True)
class _Plan:
    """One call's geometry, softmax scale and query boxes (the fused path's forward and backward share it)."""

    grid: Grid3
    window: Window
    scale: float
    boxes: tuple[_Box, ...]


def _einsum_attention(q, k, v, global_kv, plan: _Plan, return_lse: bool):
    """The einsum path on ``(B, N, H, D)`` views; ``global_kv`` ``(k_g, v_g)`` or ``None``.

    Returns ``(B, *grid, H, D_v)`` in the dtype of ``q`` and the float32 log-sum-exp
    ``(B, *grid, H)`` (or ``None``).
    """
    batch, _, heads, _ = q.shape
    dim_v = v.shape[-1]
    grid, window, scale = plan.grid, plan.window, plan.scale
    compute = torch.promote_types(q.dtype, torch.float32)
    # Splitting the token dim is always a view, whatever the strides.
    q5, k5, v5 = (t.unflatten(1, grid) for t in (q, k, v))
    k_g = v_g = None
    if global_kv is not None:
        k_g, v_g = (t.to(compute) for t in global_kv)
    out = q.new_empty((batch, *grid, heads, dim_v))
    lse_out = q.new_empty((batch, *grid, heads), dtype=torch.float32) if return_lse else None

    masks: dict[tuple[Grid3, Grid3, Grid3], torch.Tensor] = {}  # interior boxes share one
    for b in plan.boxes:
        if b.geometry not in masks:
            masks[b.geometry] = _outside_mask(*b.geometry, window, q.device)
        qb = q5[b.q].reshape(batch, -1, heads, q.shape[-1]).to(compute) * scale
        kb = k5[b.k].reshape(batch, -1, heads, k.shape[-1]).to(compute)
        vb = v5[b.k].reshape(batch, -1, heads, dim_v).to(compute)
        scores = torch.einsum("bqhd,bkhd->bhqk", qb, kb).masked_fill(masks[b.geometry], float("-inf"))
        if k_g is not None:
            scores = torch.cat([scores, torch.einsum("bqhd,bkhd->bhqk", qb, k_g)], dim=-1)
        # Every query sees at least itself, so no row is all -inf.
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse)
        o = torch.einsum("bhqk,bkhe->bqhe", probs[..., : kb.shape[1]], vb)
        if k_g is not None:
            o = o + torch.einsum("bhqk,bkhe->bqhe", probs[..., kb.shape[1] :], v_g)
        out[b.q] = o.reshape(batch, *b.shape, heads, dim_v).to(out.dtype)
        if lse_out is not None:
            lse_out[b.q] = lse.squeeze(-1).transpose(1, 2).reshape(batch, *b.shape, heads)
    return out, lse_out


def _unstage(x: torch.Tensor, shape: Grid3) -> torch.Tensor:
    """``(B, heads, n, d)`` -> the ``(B, t, h, w, heads, d)`` view of a box of ``shape``."""
    return x.unflatten(2, shape).permute(0, 2, 3, 4, 1, 5)


def _stage(buffer: torch.Tensor, part: torch.Tensor, offset: int = 0) -> int:
    """Copy ``part`` ``(B, t, h, w, heads, d)`` (or ``(B, n, heads, d)``) into ``buffer``
    ``(B, heads, tokens, width)`` at token ``offset``, channels ``:d``; returns the token count."""
    tokens = math.prod(part.shape[1:-2])
    target = buffer[:, :, offset : offset + tokens, : part.shape[-1]]
    if part.ndim == 6:
        target.unflatten(2, part.shape[1:4]).copy_(part.permute(0, 4, 1, 2, 3, 5))
    else:
        target.copy_(part.transpose(1, 2))
    return tokens


def _additive_mask(cache: OrderedDict, box: _Box, window: Window, num_global: int, dtype, device):
    """``(1, 1, queries, keys + num_global)`` ``0 / -inf`` mask of ``box``, ``None`` where every pair is
    inside the window; the last ``_MASK_CACHE`` geometries are kept in ``cache``."""
    if box.geometry in cache:
        cache.move_to_end(box.geometry)
        return cache[box.geometry]
    outside = _outside_mask(*box.geometry, window, device)
    mask = None
    if outside.any():
        mask = torch.zeros(outside.shape[0], outside.shape[1] + num_global, dtype=dtype, device=device)
        mask[:, : outside.shape[1]].masked_fill_(outside, float("-inf"))
        mask = mask[None, None]
    cache[box.geometry] = mask
    if len(cache) > _MASK_CACHE:
        cache.popitem(last=False)
    return mask


def _staged_boxes(plan: _Plan, q, k, v, global_kv, width: int, value_ones: bool):
    """For each box of ``plan``: its ``(B, heads, n, width)`` queries, keys (window, then global) and
    values in reused buffers of the compute dtype, zero-padded to ``width`` channels (values with a
    channel of ones at ``D_v`` if ``value_ones``), its key count and its mask."""
    batch, _, heads, _ = q.shape
    dim_v = v.shape[-1]
    compute = torch.promote_types(q.dtype, torch.float32)
    q5, k5, v5 = (t.unflatten(1, plan.grid) for t in (q, k, v))
    num_global = 0 if global_kv is None else global_kv[0].shape[1]
    most_queries = max(math.prod(b.shape) for b in plan.boxes)
    most_keys = max(math.prod(b.key_shape) for b in plan.boxes) + num_global
    q_buf = q.new_zeros((batch, heads, most_queries, width), dtype=compute)
    k_buf = q.new_zeros((batch, heads, most_keys, width), dtype=compute)
    v_buf = q.new_zeros((batch, heads, most_keys, width), dtype=compute)
    if value_ones:
        v_buf[..., dim_v] = 1.0
    masks: OrderedDict = OrderedDict()
    for box in plan.boxes:
        queries = _stage(q_buf, q5[box.q])
        keys = _stage(k_buf, k5[box.k])
        _stage(v_buf, v5[box.k])
        if global_kv is not None:
            _stage(k_buf, global_kv[0], keys)
            _stage(v_buf, global_kv[1], keys)
        total = keys + num_global
        mask = _additive_mask(masks, box, plan.window, num_global, compute, q.device)
        yield box, q_buf[:, :, :queries], k_buf[:, :, :total], v_buf[:, :, :total], keys, mask


class _FusedLocalAttention(torch.autograd.Function):
    """The fused path: ``q, k`` ``(B, N, H, D)``, ``v`` ``(B, N, H, D_v)``, ``k_g, v_g`` ``(B, M, H, .)``
    or ``None``; returns the output ``(B, N, H, D_v)`` in q's dtype and the float32 lse ``(B, N, H)``."""

    @staticmethod
    def forward(ctx, q, k, v, k_g, v_g, plan: _Plan):
        batch, _, heads, dim = q.shape
        dim_v = v.shape[-1]
        compute = torch.promote_types(q.dtype, torch.float32)
        global_kv = None if k_g is None else (k_g, v_g)
        out = q.new_empty((batch, *plan.grid, heads, dim_v), dtype=compute)
        lse = q.new_empty((batch, *plan.grid, heads), dtype=compute)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        for box, qb, kb, vb, _, mask in _staged_boxes(plan, q, k, v, global_kv, max(dim, dim_v), False):
            o, box_lse = flash(qb, kb, vb, 0.0, False, attn_mask=mask, scale=plan.scale)
            out[box.q] = _unstage(o[..., :dim_v], box.shape)
            lse[box.q] = box_lse.transpose(1, 2).unflatten(1, box.shape)
        out, lse = out.flatten(1, 3), lse.flatten(1, 3)
        ctx.save_for_backward(q, k, v, k_g, v_g, out, lse)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse.float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, k_g, v_g, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        batch, _, heads, dim = q.shape
        dim_v = v.shape[-1]
        compute = out.dtype
        grad_out = out.new_zeros(out.shape) if grad_out is None else grad_out
        with_lse = grad_lse is not None
        width = max(dim, dim_v + with_lse)
        grad_q = q.new_empty((batch, *plan.grid, heads, dim), dtype=compute)
        grad_k = q.new_zeros((batch, *plan.grid, heads, dim), dtype=compute)
        grad_v = q.new_zeros((batch, *plan.grid, heads, dim_v), dtype=compute)
        grad_kg = None if k_g is None else torch.zeros_like(k_g, dtype=compute)
        grad_vg = None if v_g is None else torch.zeros_like(v_g, dtype=compute)
        out5, grad_out5, lse5 = (t.unflatten(1, plan.grid) for t in (out, grad_out, lse))
        grad_lse5 = grad_lse.unflatten(1, plan.grid) if with_lse else None
        o_buf = q.new_zeros((batch, heads, max(math.prod(b.shape) for b in plan.boxes), width), dtype=compute)
        g_buf = torch.zeros_like(o_buf)
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        global_kv = None if k_g is None else (k_g, v_g)
        for box, qb, kb, vb, keys, mask in _staged_boxes(plan, q, k, v, global_kv, width, with_lse):
            queries = _stage(o_buf, out5[box.q])
            _stage(g_buf, grad_out5[box.q])
            if with_lse:
                # dS = P (dP + g - rowsum(dO o)) through a value channel of ones with output 0.
                g_buf[:, :, :queries, dim_v] = grad_lse5[box.q].flatten(1, 3).transpose(1, 2)
            box_lse = lse5[box.q].flatten(1, 3).transpose(1, 2).contiguous()
            gq, gk, gv = flash_backward(
                g_buf[:, :, :queries],
                qb,
                kb,
                vb,
                o_buf[:, :, :queries],
                box_lse,
                0.0,
                False,
                attn_mask=mask,
                scale=plan.scale,
            )
            grad_q[box.q] = _unstage(gq[..., :dim], box.shape)
            grad_k[box.k] += _unstage(gk[:, :, :keys, :dim], box.key_shape)
            grad_v[box.k] += _unstage(gv[:, :, :keys, :dim_v], box.key_shape)
            if grad_kg is not None:
                grad_kg += gk[:, :, keys:, :dim].transpose(1, 2)
                grad_vg += gv[:, :, keys:, :dim_v].transpose(1, 2)
        grads = [grad_q, grad_k, grad_v]
        grads = [g.flatten(1, 3).to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True)]
        if grad_kg is not None:
            grads += [grad_kg.to(k_g.dtype), grad_vg.to(v_g.dtype)]
        else:
            grads += [None, None]
        return (*grads, None)


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
    fused: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Local attention box by box; arguments as in ``local_attention`` with ``grid`` as ``(T, H, W)``
    and the window as a :class:`~.reference.Window` (``window_geometry``).

    Args:
        budget: the einsum path's largest box score matrix, the fused path's largest box mask (elements).
        fused: run PyTorch's fused CPU flash-attention kernel on each box (``True``; CPU only), the
            einsum path (``False``), or the kernel where it can run (``None``: CPU tensors with a
            torch that has it).

    Returns:
        The output in the layout and dtype of ``q``; with ``return_lse`` also the float32
        log-sum-exp, ``(B, N, H)`` (``"bnhd"``) or ``(B, H, N)`` (``"bhnd"``).
    """
    can_fuse = q.device.type == "cpu" and fused_available()
    if fused is None:
        fused = can_fuse
    elif fused and not can_fuse:
        raise ValueError(
            f"fused=True needs CPU tensors and torch's fused CPU flash-attention op with a mask; "
            f"got {q.device.type} tensors on torch {torch.__version__}"
        )
    if layout == "bhnd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if global_kv is not None:
            global_kv = tuple(t.transpose(1, 2) for t in global_kv)
    if global_kv is not None and global_kv[0].shape[1] == 0:
        global_kv = None
    num_global = 0 if global_kv is None else global_kv[0].shape[1]

    if fused:
        box = choose_fused_box(grid, window, num_global, budget)
    else:
        box = choose_box(grid, window, q.shape[0] * q.shape[2], num_global, budget)
    plan = _Plan(grid, window, scale, tuple(_boxes(grid, box, window.reach)))
    if fused:
        out, lse = _FusedLocalAttention.apply(q, k, v, *(global_kv or (None, None)), plan)
    else:
        out, lse = _einsum_attention(q, k, v, global_kv, plan, return_lse)
        out = out.flatten(1, 3)
        lse = None if lse is None else lse.flatten(1, 3)
    if layout == "bhnd":
        out = out.transpose(1, 2)
    if not return_lse:
        return out
    return out, (lse.transpose(1, 2) if layout == "bhnd" else lse)
