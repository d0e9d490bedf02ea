"""Local attention on FlexAttention with block masks built from the tile geometry (the CUDA path).

Tokens are written into tile-major order (``tiling.tile_order``), so each 128-token block is a
compact tile of the grid; the ``BlockMask`` lists, per query tile, the key tiles that intersect
the window (full ones without a mask, partial ones through ``mask_mod``), computed from tile
offsets (``tiling.block_structure``), never from an ``N x N`` mask. Global keys follow the image
keys, padded to whole blocks, and are visible to every query. q, k and v are each written once
into one tile-major buffer (image tokens, global tokens, padding) and the output is read back
once into the caller's layout.

Plans (token order + ``BlockMask``) are cached per (grid, window, tile, global count, device) in an LRU bounded by the bytes of their tensors, not by their number: the dense
block-index tensors grow as ``N^2 / 128^2`` (about 1 GB at 1M tokens). The budget is
``PLAN_CACHE_MB`` MiB, or ``LINDIFF_FLEX_PLAN_CACHE_MB`` from the environment; the plan in use
is always kept. The lookup runs outside a user's ``torch.compile`` of the whole model
(``torch.compiler.disable``): the cache is Python state that Dynamo must not trace.

``torch.compile(flex_attention)`` is created lazily on first CUDA use (nothing touches the GPU
at import). Each geometry compiles its own kernels; past Dynamo's recompile limit (raised to
``RECOMPILE_LIMIT``) a call would silently run FlexAttention's unfused eager code, which builds
the dense ``N x N`` scores. The compiled function is built with ``fullgraph=True``, so hitting the
limit raises instead, and ``RecompileLimitError`` says so (``local_attention`` then warns and
runs the exact, bounded-memory chunked path). On other devices FlexAttention runs its eager
implementation, which materialises the scores and has no backward on CPU (tests only).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .reference import Grid3, Window
from .tiling import TileLayout, block_structure, tile_order

# Bytes of cached plans (MiB), overridden by LINDIFF_FLEX_PLAN_CACHE_MB. A 512 x 512 grid's plan
# holds about 70 MB of block indices, a 1024 x 1024 one about 1 GB.
PLAN_CACHE_MB = 1024
PLAN_CACHE_ENV = "LINDIFF_FLEX_PLAN_CACHE_MB"
# Dynamo's recompile limit during compiled calls (at least; a higher user setting is kept).
RECOMPILE_LIMIT = 64


class RecompileLimitError(RuntimeError):
    """Compiled FlexAttention reached Dynamo's recompile limit (its fall-back would build N x N scores)."""


@functools.cache
def _flex_api():
    """``(flex_attention, BlockMask, AuxRequest or None)``; imported lazily (needs torch >= 2.5)."""
    from torch.nn.attention import flex_attention as module

    return module.flex_attention, module.BlockMask, getattr(module, "AuxRequest", None)


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False, fullgraph=True)``, created on first use.

    Static shapes: every grid gets its own kernels (the window's thresholds are tensors, so a new
    radius or frames_radius on a known grid compiles nothing). Automatic dynamic shapes are
    avoided on purpose: not every backend builds them (inductor's CPU template fails to in torch
    2.13).
    ``fullgraph=True`` turns a recompile-limit hit into an error instead of an eager fall-back.
    """
    return torch.compile(_flex_api()[0], dynamic=False, fullgraph=True)


def _run_compiled(*args, **kwargs):
    """Call ``compiled_flex_attention`` with Dynamo's recompile limit at least ``RECOMPILE_LIMIT``.

    Raises:
        RecompileLimitError: the limit is reached (too many geometries compiled in this process).
    """
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # Older torch releases name the exception FailOnCacheLimitHit.
    limit_hit = (
        getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None) or torch._dynamo.exc.FailOnCacheLimitHit
    )
    try:
        with torch._dynamo.config.patch(recompile_limit=limit):
            return compiled_flex_attention()(*args, **kwargs)
    except limit_hit as error:
        raise RecompileLimitError(
            f"compiled FlexAttention reached torch._dynamo's recompile limit ({limit}): every grid size, "
            "global-token count and dtype compiles its own kernels, and past the limit FlexAttention "
            "would run its unfused eager code, which builds the dense N x N scores. Raise "
            "torch._dynamo.config.recompile_limit, or call torch._dynamo.reset() between workloads."
        ) from error


def flex_available() -> bool:
    """Whether this torch has FlexAttention."""
    try:
        _flex_api()
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class FlexPlan:
    """Everything a call needs besides q, k, v: the token order, the padding and the block mask."""

    gather: torch.Tensor  # (N_pad,) row-major token read into each tile-major position
    scatter: torch.Tensor  # (N,) tile-major position of each row-major token
    padding: torch.Tensor  # (N_pad - N,) tile-major positions of the cells that pad the grid
    num_padded: int  # image tokens after padding to whole tiles
    global_padded: int  # global tokens after padding to whole blocks
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    nbytes: int  # device memory held by the plan's tensors


# Key kinds on the padded key sequence of ``make_mask_mod``.
_PAD, _GRID, _GLOBAL = 0, 1, 2


def make_mask_mod(coords: torch.Tensor, kind: torch.Tensor, window: Window):
    """The per-token rule on the tile-major key sequence.

    Args:
        coords: ``(L, 3)`` grid coordinates of every key position (queries use the first rows).
        kind: ``(L,)`` int8, ``_GRID`` for grid cells (visible inside the window), ``_GLOBAL``
            for global tokens (always visible), ``_PAD`` for padding (never visible).
        window: the window (``window_geometry``).

    One branch-free rule covers both shapes, ``time * dt^2 + dh^2 + dw^2 <= r2`` and
    ``dt^2 <= frames^2``: a ball has ``time = 1`` (its frame bound ``r2`` is then implied), a
    cylinder ``time = 0``. The three numbers live in tensors, not in the closure as Python ints,
    so that compiled FlexAttention does not specialise (and recompile) on the window.
    """
    ct, ch, cw = (coords[:, i].to(torch.int32).contiguous() for i in range(3))
    ball = window.frames is None
    time, limit, frames2 = (
        torch.tensor(x, dtype=torch.int32, device=coords.device)
        for x in (int(ball), window.r2, window.r2 if ball else window.frames**2)
    )

    def mask_mod(b, h, q_idx, kv_idx):
        dt = ct[q_idx] - ct[kv_idx]
        dh = ch[q_idx] - ch[kv_idx]
        dw = cw[q_idx] - cw[kv_idx]
        near = (time * dt * dt + dh * dh + dw * dw <= limit) & (dt * dt <= frames2)
        key = kind[kv_idx]
        return (key == _GLOBAL) | ((key == _GRID) & near)

    return mask_mod


def build_plan(grid: Grid3, window: Window, tile: Grid3, num_global: int, device: torch.device) -> FlexPlan:
    """Token order, padding and ``BlockMask`` for one geometry (uncached; see ``get_plan``)."""
    _, block_mask_cls, _ = _flex_api()
    layout = TileLayout(grid, tile)
    block = layout.block_size
    gather, scatter, coords, valid = tile_order(layout)
    image_blocks = layout.num_blocks
    global_blocks = -(-num_global // block)
    global_padded = global_blocks * block
    width = image_blocks + global_blocks

    num, idx, full_num, full_idx = block_structure(layout, window, width)
    if global_blocks:
        # Complete global blocks are full for every query; a last, padded one is partial.
        ids = torch.arange(image_blocks, width, dtype=torch.int32)
        whole = global_blocks if num_global % block == 0 else global_blocks - 1
        rows = torch.arange(image_blocks)
        full_idx[rows[:, None], full_num[:, None].long() + torch.arange(whole)] = ids[:whole]
        full_num = full_num + whole
        if whole < global_blocks:
            idx[rows, num.long()] = ids[-1]
            num = num + 1

    coords = torch.cat([coords, coords.new_zeros(global_padded, 3)])
    kind = torch.cat(
        [valid.to(torch.int8) * _GRID, (torch.arange(global_padded) < num_global).to(torch.int8) * _GLOBAL]
    )
    mask_mod = make_mask_mod(coords.to(device), kind.to(device), window)
    block_mask = block_mask_cls.from_kv_blocks(
        *(t.to(device)[None, None] for t in (num, idx, full_num, full_idx)),
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(layout.num_padded, layout.num_padded + global_padded),
    )
    order = [t.to(device) for t in (gather, scatter, torch.nonzero(~valid).squeeze(1))]
    tensors = [*order, *(t for t in block_mask.as_tuple() if isinstance(t, torch.Tensor))]
    # mask_mod holds int32 (t, h, w) and the int8 kind of every key position.
    nbytes = sum(t.numel() * t.element_size() for t in tensors) + len(kind) * (3 * 4 + 1)
    return FlexPlan(*order, layout.num_padded, global_padded, block_mask, nbytes)


class PlanCacheInfo(NamedTuple):
    """Statistics of the plan cache: lookups that found / built a plan, plans held, their bytes, the budget."""

    hits: int
    misses: int
    currsize: int
    nbytes: int
    max_bytes: int


def plan_cache_max_bytes() -> int:
    """The plan cache's budget in bytes: ``LINDIFF_FLEX_PLAN_CACHE_MB`` (MiB, may be fractional) or ``PLAN_CACHE_MB``."""
    text = os.environ.get(PLAN_CACHE_ENV, "").strip()
    if not text:
        return PLAN_CACHE_MB << 20
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not 0 <= megabytes < float("inf"):
        raise ValueError(f"{PLAN_CACHE_ENV} must be a number of MiB >= 0, got {text!r}")
    return int(megabytes * (1 << 20))


class _PlanCache:
    """Least-recently-used plans, evicted while their bytes exceed the budget (the newest always stays)."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple, FlexPlan] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.nbytes = 0

    def get(self, key: tuple) -> FlexPlan:
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                self.hits += 1
                return plan
            self.misses += 1
        plan = build_plan(*key)  # outside the lock: building a large plan takes a while
        budget = plan_cache_max_bytes()
        with self._lock:
            if key in self._plans:  # another thread built it meanwhile
                return self._plans[key]
            self._plans[key] = plan
            self.nbytes += plan.nbytes
            while self.nbytes > budget and len(self._plans) > 1:
                _, old = self._plans.popitem(last=False)
                self.nbytes -= old.nbytes
        return plan

    def info(self) -> PlanCacheInfo:
        with self._lock:
            return PlanCacheInfo(
                self.hits, self.misses, len(self._plans), self.nbytes, plan_cache_max_bytes()
            )

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.hits = self.misses = self.nbytes = 0


_PLANS = _PlanCache()


@torch.compiler.disable
def get_plan(grid: Grid3, window: Window, tile: Grid3, num_global: int, device: torch.device) -> FlexPlan:
    """``build_plan`` behind the byte-bounded LRU, keyed by the whole geometry and the device."""
    return _PLANS.get((grid, window, tile, num_global, device))


def plan_cache_info() -> PlanCacheInfo:
    """Hits, misses, plans held, their bytes and the budget of the plan cache."""
    return _PLANS.info()


def clear_plan_cache() -> None:
    """Drop every cached plan (and the device memory its block mask holds) and reset the counts."""
    _PLANS.clear()


def _to_tiles(
    x: torch.Tensor, plan: FlexPlan, token_dim: int, extra: torch.Tensor | None = None, pad: int = 0
) -> torch.Tensor:
    """One tile-major buffer of ``x`` followed by ``extra`` tokens and ``pad`` zero tokens.

    Every token is written once (``index_copy_``); the cells that pad the grid to whole tiles are
    zeroed (as keys they are masked, but a zero probability times a non-finite value is NaN).

    Returns:
        ``(B, H, L, D)``: a view of a buffer in ``x``'s layout (``(B, L, H, D)`` for ``"bnhd"``).
    """
    extra_tokens = 0 if extra is None else extra.shape[token_dim]
    shape = list(x.shape)
    shape[token_dim] = plan.num_padded + extra_tokens + pad
    buf = x.new_empty(shape)
    buf.index_copy_(token_dim, plan.scatter, x)
    if plan.padding.numel():
        buf.index_fill_(token_dim, plan.padding, 0)
    if extra_tokens:
        buf.narrow(token_dim, plan.num_padded, extra_tokens).copy_(extra)
    if pad:
        buf.narrow(token_dim, plan.num_padded + extra_tokens, pad).zero_()
    return buf.transpose(1, 2) if token_dim == 1 else buf


def _from_tiles(x: torch.Tensor, plan: FlexPlan, token_dim: int) -> torch.Tensor:
    """The rows of a tile-major ``(B, H, L, ...)`` result in row-major order, contiguous in the caller's layout."""
    return (x.transpose(1, 2) if token_dim == 1 else x).index_select(token_dim, plan.scatter)


def local_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid3,
    window: Window,
    tile: Grid3,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
    layout: str = "bnhd",
    return_lse: bool = False,
    compiled: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Local attention through FlexAttention; arguments as in ``local_attention_chunked`` plus ``tile``.

    Args:
        compiled: use ``torch.compile(flex_attention)``; default: on CUDA only. Inside a user's
            ``torch.compile`` FlexAttention is traced into the user's graph instead.

    Raises:
        RecompileLimitError: compiled FlexAttention reached Dynamo's recompile limit.
    """
    flex_attention, _, aux_request = _flex_api()
    token_dim = 1 if layout == "bnhd" else 2
    num_global = 0 if global_kv is None else global_kv[0].shape[token_dim]
    device = q.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = get_plan(grid, window, tile, num_global, device)

    k_g, v_g = global_kv if num_global else (None, None)
    pad = plan.global_padded - num_global
    qf = _to_tiles(q, plan, token_dim)
    kf, vf = _to_tiles(k, plan, token_dim, k_g, pad), _to_tiles(v, plan, token_dim, v_g, pad)

    if compiled is None:
        compiled = device.type == "cuda"
    fn = _run_compiled if compiled and not torch.compiler.is_compiling() else flex_attention
    kwargs = {"block_mask": plan.block_mask, "scale": scale}
    lse = None
    if return_lse and aux_request is not None:
        out, aux = fn(qf, kf, vf, return_aux=aux_request(lse=True), **kwargs)
        lse = aux.lse
    elif return_lse:
        out, lse = fn(qf, kf, vf, return_lse=True, **kwargs)
    else:
        out = fn(qf, kf, vf, **kwargs)

    out = _from_tiles(out, plan, token_dim)
    if lse is None:
        return out
    return out, _from_tiles(lse.float(), plan, token_dim)
