"""Local attention on FlexAttention with block masks built from the tile geometry (the CUDA path).

Tokens are gathered into tile-major order (``tiling.tile_order``), so each 128-token block is a
compact tile of the grid; the ``BlockMask`` lists, per query tile, the key tiles that intersect
the window (full ones without a mask, partial ones through ``mask_mod``), computed from tile
offsets (``tiling.block_structure``), never from an ``N x N`` mask. Global keys follow the image
keys, padded to whole blocks, and are visible to every query. The output is gathered back to
row-major order.

Plans (token order + ``BlockMask``) are cached per (grid, radius threshold, tile, global count,
device) in a small LRU, so several resolutions can alternate without rebuilding or pinning one.
``torch.compile(flex_attention)`` is created lazily on first CUDA use (nothing touches the GPU
at import); on other devices FlexAttention runs its eager implementation, which materialises
the scores and has no backward on CPU (tests only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .reference import Grid3
from .tiling import TileLayout, block_structure, tile_order

# Plans held at once. One plan of a 512 x 512 grid holds about 70 MB of block indices.
PLAN_CACHE_SIZE = 8
# Each geometry compiles its own kernels; past dynamo's default limit of 8 recompilations a
# call would silently run FlexAttention's unfused eager code (N x N scores), so compiled calls
# are made with at least this limit.
RECOMPILE_LIMIT = 64


@functools.cache
def _flex_api():
    """``(flex_attention, BlockMask, AuxRequest or None)``; imported lazily (needs torch >= 2.5)."""
    from torch.nn.attention import flex_attention as module

    return module.flex_attention, module.BlockMask, getattr(module, "AuxRequest", None)


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)``, created on first use.

    Static shapes: every grid gets its own kernels (the radius threshold is a tensor, so a new
    radius on a known grid compiles nothing). Automatic dynamic shapes are avoided on purpose:
    not every backend builds them (inductor's CPU template fails to in torch 2.13).
    """
    return torch.compile(_flex_api()[0], dynamic=False)


def _run_compiled(*args, **kwargs):
    """Call ``compiled_flex_attention`` with dynamo's recompile limit at least ``RECOMPILE_LIMIT``."""
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return compiled_flex_attention()(*args, **kwargs)


def flex_available() -> bool:
    """Whether this torch has FlexAttention."""
    try:
        _flex_api()
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class FlexPlan:
    """Everything a call needs besides q, k, v: the token order and the block mask."""

    gather: torch.Tensor  # (N_pad,) row-major token read into each tile-major position
    scatter: torch.Tensor  # (N,) tile-major position of each row-major token
    num_padded: int  # image tokens after padding to whole tiles
    global_padded: int  # global tokens after padding to whole blocks
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask


# Key kinds on the padded key sequence of ``make_mask_mod``.
_PAD, _GRID, _GLOBAL = 0, 1, 2


def make_mask_mod(coords: torch.Tensor, kind: torch.Tensor, r2: int):
    """The per-token rule on the tile-major key sequence.

    Args:
        coords: ``(L, 3)`` grid coordinates of every key position (queries use the first rows).
        kind: ``(L,)`` int8, ``_GRID`` for grid cells (visible within the radius), ``_GLOBAL``
            for global tokens (always visible), ``_PAD`` for padding (never visible).
        r2: squared-distance threshold.

    The threshold lives in a tensor, not in the closure as a Python int, so that compiled
    FlexAttention does not specialise (and recompile) on it.
    """
    ct, ch, cw = (coords[:, i].to(torch.int32).contiguous() for i in range(3))
    limit = torch.tensor(r2, dtype=torch.int32, device=coords.device)

    def mask_mod(b, h, q_idx, kv_idx):
        dt = ct[q_idx] - ct[kv_idx]
        dh = ch[q_idx] - ch[kv_idx]
        dw = cw[q_idx] - cw[kv_idx]
        near = dt * dt + dh * dh + dw * dw <= limit
        key = kind[kv_idx]
        return (key == _GLOBAL) | ((key == _GRID) & near)

    return mask_mod


def build_plan(grid: Grid3, r2: int, tile: Grid3, num_global: int, device: torch.device) -> FlexPlan:
    """Token order, padding and ``BlockMask`` for one geometry (uncached; see ``get_plan``)."""
    _, block_mask_cls, _ = _flex_api()
    layout = TileLayout(grid, tile)
    block = layout.block_size
    gather, scatter, coords, valid = tile_order(layout)
    image_blocks = layout.num_blocks
    global_blocks = -(-num_global // block)
    global_padded = global_blocks * block
    width = image_blocks + global_blocks

    num, idx, full_num, full_idx = block_structure(layout, r2, width)
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
    mask_mod = make_mask_mod(coords.to(device), kind.to(device), r2)
    block_mask = block_mask_cls.from_kv_blocks(
        *(t.to(device)[None, None] for t in (num, idx, full_num, full_idx)),
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(layout.num_padded, layout.num_padded + global_padded),
    )
    return FlexPlan(gather.to(device), scatter.to(device), layout.num_padded, global_padded, block_mask)


@functools.lru_cache(maxsize=PLAN_CACHE_SIZE)
def get_plan(grid: Grid3, r2: int, tile: Grid3, num_global: int, device: torch.device) -> FlexPlan:
    """``build_plan`` behind a small LRU keyed by the whole geometry and the device."""
    return build_plan(grid, r2, tile, num_global, device)


def plan_cache_info() -> functools._CacheInfo:
    """Hits, misses, ``maxsize`` and current size of the plan cache."""
    return get_plan.cache_info()


def clear_plan_cache() -> None:
    """Drop every cached plan (and the device memory its block mask holds)."""
    get_plan.cache_clear()


def local_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Grid3,
    r2: int,
    tile: Grid3,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
    layout: str = "bnhd",
    return_lse: bool = False,
    compiled: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Local attention through FlexAttention; arguments as in ``local_attention_chunked`` plus ``tile``.

    Args:
        compiled: use ``torch.compile(flex_attention)``; default: on CUDA only.
    """
    flex_attention, _, aux_request = _flex_api()
    num_global = 0 if global_kv is None else global_kv[0].shape[1 if layout == "bnhd" else 2]
    device = q.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    plan = get_plan(grid, r2, tile, num_global, device)

    token_dim = 1 if layout == "bnhd" else 2

    def to_tiles(x: torch.Tensor, extra: torch.Tensor | None = None, pad: int = 0) -> torch.Tensor:
        """Tile-major ``(B, H, L, D)``, followed by ``extra`` tokens and ``pad`` zero tokens."""
        parts = [x.index_select(token_dim, plan.gather)]
        if extra is not None:
            parts.append(extra)
        if pad:
            shape = list(x.shape)
            shape[token_dim] = pad
            parts.append(x.new_zeros(shape))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=token_dim)
        return x.transpose(1, 2) if layout == "bnhd" else x

    k_g, v_g = global_kv if num_global else (None, None)
    pad = plan.global_padded - num_global
    qf = to_tiles(q)
    kf, vf = to_tiles(k, k_g, pad), to_tiles(v, v_g, pad)

    if compiled is None:
        compiled = device.type == "cuda"
    fn = _run_compiled if compiled else flex_attention
    kwargs = {"block_mask": plan.block_mask, "scale": scale}
    lse = None
    if return_lse and aux_request is not None:
        out, aux = fn(qf, kf, vf, return_aux=aux_request(lse=True), **kwargs)
        lse = aux.lse
    elif return_lse:
        out, lse = fn(qf, kf, vf, return_lse=True, **kwargs)
    else:
        out = fn(qf, kf, vf, **kwargs)

    out = out.index_select(2, plan.scatter)  # (B, H, N, D_v)
    out = out.transpose(1, 2) if layout == "bnhd" else out
    if lse is None:
        return out
    lse = lse.float().index_select(2, plan.scatter)
    return out, (lse.transpose(1, 2) if layout == "bnhd" else lse)
