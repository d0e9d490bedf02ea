"""Tile geometry for block-sparse local attention: token reordering and block structure.

FlexAttention skips work in blocks of ``BLOCK`` consecutive query and key tokens. In row-major
order a block of 128 tokens is a thin strip of the grid and touches many other strips; so the
tokens are reordered tile by tile (e.g. ``8 x 16`` tiles in 2D, ``4 x 4 x 8`` in 3D), every block
is one compact tile, and a (query tile, key tile) pair is

- *empty* when the closest two cells of the tiles are outside the window (skipped),
- *full* when the farthest two cells are inside the window and the key tile has no padding
  (computed without a mask),
- *partial* otherwise (computed with the per-token ``mask_mod``).

The grid is padded up to whole tiles; padded cells are never valid keys and their query rows
are dropped when the output is put back in row-major order. Whether a tile pair is empty or full
depends only on the tile offset, so the structure is built from a short list of offsets, never
from an ``N x N`` mask. Everything here is plain PyTorch on the CPU and is tested without CUDA.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .reference import Grid3, Window

BLOCK_SIZE = 128


@dataclass(frozen=True)
class TileLayout:
    """A grid cut into tiles of ``tile`` cells, padded up to whole tiles.

    Attributes:
        grid: ``(T, H, W)`` of the tokens.
        tile: ``(t, h, w)`` cells per tile; one tile is one block of ``prod(tile)`` tokens.
        tiles: number of tiles along each axis.
    """

    grid: Grid3
    tile: Grid3

    @property
    def tiles(self) -> Grid3:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile, strict=True))  # type: ignore[return-value]

    @property
    def block_size(self) -> int:
        return math.prod(self.tile)

    @property
    def num_blocks(self) -> int:
        return math.prod(self.tiles)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_padded(self) -> int:
        return self.num_blocks * self.block_size


def tile_order(layout: TileLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tile-major token order of the padded grid.

    Position ``p`` of the padded sequence is cell ``p % block_size`` (row-major inside the tile)
    of tile ``p // block_size`` (row-major over the tiles).

    Returns:
        gather: ``(N_pad,)`` int64, the row-major token read into each position. Padded cells
            read the nearest real token (clamped coordinates), so gathering never reads out of
            bounds; they are masked as keys and dropped as queries.
        scatter: ``(N,)`` int64, the position of each row-major token (``gather[scatter] == arange(N)``).
        coords: ``(N_pad, 3)`` int64 ``(t, h, w)`` of each position (padded cells lie outside the grid).
        valid: ``(N_pad,)`` bool, ``False`` on padded cells.
    """
    tiles, tile, grid = layout.tiles, layout.tile, layout.grid
    # (tile_t, tile_h, tile_w, in_t, in_h, in_w) -> coordinate along each axis.
    axes = []
    for axis in range(3):
        index = torch.arange(tiles[axis])[:, None] * tile[axis] + torch.arange(tile[axis])[None, :]
        shape = [1] * 6
        shape[axis], shape[axis + 3] = tiles[axis], tile[axis]
        axes.append(index.view(shape))
    full_shape = (*tiles, *tile)
    coords = torch.stack([a.expand(full_shape) for a in axes], dim=-1).reshape(-1, 3)
    upper = torch.tensor(grid) - 1
    valid = (coords <= upper).all(dim=-1)
    clamped = torch.minimum(coords, upper)
    gather = (clamped[:, 0] * grid[1] + clamped[:, 1]) * grid[2] + clamped[:, 2]
    scatter = torch.empty(layout.num_tokens, dtype=torch.int64)
    scatter[gather[valid]] = torch.nonzero(valid).squeeze(1)
    return gather, scatter, coords, valid


@functools.lru_cache(maxsize=64)
def tile_offsets(tile: Grid3, tiles: Grid3, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile offsets ``(dt, dh, dw)`` whose tile pairs intersect the window, and which are full.

    Along an axis with tile size ``s``, two tiles ``d`` apart have cells between
    ``max(0, |d| s - s + 1)`` and ``|d| s + s - 1`` apart, independently of the other axes. The
    window (ball or cylinder) shrinks as any gap grows, so a pair is non-empty iff the smallest
    gaps are inside it, and full (before padding) iff the largest gaps are.

    Returns:
        offsets: ``(O, 3)`` int64, lexicographically sorted (so kv tile indices come out sorted).
        full: ``(O,)`` bool.
    """
    ranges = []
    for s, n, reach in zip(tile, tiles, window.reach, strict=True):
        most = min(n - 1, (reach + s - 1) // s)
        ranges.append(torch.arange(-most, most + 1))
    offsets = torch.stack(torch.meshgrid(*ranges, indexing="ij"), dim=-1).reshape(-1, 3)
    size = torch.tensor(tile)
    near = (offsets.abs() * size - size + 1).clamp(min=0)
    far = offsets.abs() * size + size - 1
    keep = window.inside(*near.unbind(-1))
    return offsets[keep], window.inside(*far[keep].unbind(-1))


def _compact(rows: torch.Tensor, keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the kept column values first (in order), padded with zeros to ``width`` columns."""
    count = keep.sum(-1)
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    packed = torch.gather(rows, -1, order).masked_fill(torch.arange(rows.shape[-1]) >= count[:, None], 0)
    out = torch.zeros(rows.shape[0], width, dtype=torch.int32)
    cols = min(width, rows.shape[-1])
    out[:, :cols] = packed[:, :cols].to(torch.int32)
    return count.to(torch.int32), out


def block_structure(
    layout: TileLayout, window: Window, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which key tiles each query tile needs, split into partial and full blocks.

    Args:
        layout: the tiling.
        window: the window (``window_geometry``).
        width: columns of the index tensors (at least ``layout.num_blocks``; FlexAttention wants
            the total number of key blocks, global blocks included).

    Returns:
        ``kv_num_blocks (Q,)``, ``kv_indices (Q, width)``, ``full_kv_num_blocks (Q,)``,
        ``full_kv_indices (Q, width)``, int32, in the format of ``BlockMask.from_kv_blocks``
        (without its batch and head dimensions). ``Q = layout.num_blocks``.
    """
    width = layout.num_blocks if width is None else width
    tiles = torch.tensor(layout.tiles)
    offsets, full = tile_offsets(layout.tile, layout.tiles, window)
    query = torch.stack(torch.meshgrid(*[torch.arange(n) for n in layout.tiles], indexing="ij"), dim=-1)
    query = query.reshape(-1, 1, 3)
    key = query + offsets[None]  # (Q, O, 3)
    inside = ((key >= 0) & (key < tiles)).all(-1)
    key_index = (key[..., 0] * tiles[1] + key[..., 1]) * tiles[2] + key[..., 2]
    # A key tile that reaches past the grid holds padded keys and always needs the mask.
    complete = torch.tensor([g % t == 0 for g, t in zip(layout.grid, layout.tile, strict=True)])
    whole = ((key < tiles - 1) | complete).all(-1)
    is_full = inside & full[None] & whole
    is_partial = inside & ~is_full
    num, idx = _compact(key_index, is_partial, width)
    full_num, full_idx = _compact(key_index, is_full, width)
    return num, idx, full_num, full_idx


def count_blocks(grid: Grid3, tile: Grid3, window: Window) -> tuple[int, int]:
    """``(partial, full)`` non-empty block counts of a tiling, without building the structure.

    Key tiles cut by the grid's edge are counted as full when their offset is; this is only used
    to rank tilings.
    """
    layout = TileLayout(grid, tile)
    offsets, full = tile_offsets(tile, layout.tiles, window)
    tiles = torch.tensor(layout.tiles)
    pairs = (tiles - offsets.abs()).clamp(min=0).prod(-1)
    return int(pairs[~full].sum()), int(pairs[full].sum())


@functools.lru_cache(maxsize=64)
def choose_tile(grid: Grid3, window: Window, block_size: int = BLOCK_SIZE) -> Grid3:
    """The power-of-two tile of ``block_size`` cells with the fewest (weighted) non-empty blocks.

    Partial blocks count 1.25 (they evaluate the mask); ties go to less padding, then to the more
    compact tile. 2D grids (``T == 1``) only consider tiles with ``t == 1``.
    """
    log = int(math.log2(block_size))
    if 2**log != block_size:
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    best, best_key = None, None
    for a in range(log + 1) if grid[0] > 1 else (0,):
        for b in range(log - a + 1):
            tile = (2**a, 2**b, 2 ** (log - a - b))
            partial, full = count_blocks(grid, tile, window)
            layout = TileLayout(grid, tile)
            key = (1.25 * partial + full, layout.num_padded, max(tile) / min(tile))
            if best_key is None or key < best_key:
                best, best_key = tile, key
    return best  # type: ignore[return-value]
