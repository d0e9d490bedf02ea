"""Grid tokens around a rank's image tokens: the halo that local operators (convolutions,
windows, pooling cells) need under context parallelism.

Image tokens are in row-major ``(T, H, W)`` order, so a rank's part of them is a run of tokens
that may start and end mid-row. A :class:`RowBlock` extends it to whole rows plus ``rows`` rows
above and below in the flattened ``(T*H, W)`` row sequence (LiT's convolution); a
:class:`GridBox` is a sub-grid of whole rows in consecutive frames that holds the part grown
by some frames and rows (CLEAR's window and pooling cells). Tokens that other ranks hold are
fetched by :func:`~lindiff.parallel.exchange.neighbour_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..grid import GridShape
from .exchange import neighbour_tokens
from .shards import SequenceShard


@dataclass(frozen=True)
class RowBlock:
    """Consecutive whole rows of the flattened ``(T*H, W)`` row sequence.

    Attributes:
        tokens: ``(B, rows * W, ...)`` the rows' tokens, row-major.
        first_row: global index ``t * H + y`` of the first row.
        local: where the rank's own tokens sit in ``tokens``.
    """

    tokens: torch.Tensor
    first_row: int
    local: slice

    def frame_segments(self, grid: GridShape) -> list[tuple[int, int]]:
        """The block's rows split where a frame ends: ``[(first, stop), ...]`` row indices in the block."""
        height, width = grid[1], grid[2]
        num_rows = self.tokens.shape[1] // width
        segments, row = [], self.first_row
        while row < self.first_row + num_rows:
            stop = min((row // height + 1) * height, self.first_row + num_rows)
            segments.append((row - self.first_row, stop - self.first_row))
            row = stop
        return segments


@dataclass(frozen=True)
class GridBox:
    """Frames ``frames`` x rows ``rows`` x all ``W`` columns of a ``(T, H, W)`` grid, as a grid of its own.

    Its tokens are in row-major order, like the grid's, so local operators run on the box with
    the same geometry as on the whole grid.
    """

    grid: GridShape
    frames: range
    rows: range

    @classmethod
    def around(cls, part: slice, grid: GridShape, frames: int, rows: int, align: int = 1) -> GridBox:
        """The box of the non-empty run ``part`` of the flattened grid grown by ``frames`` frames and
        ``rows`` rows each way (clipped to the grid), its rows widened to multiples of ``align``.

        A part inside one frame keeps its rows; a part that crosses frames covers whole frames. In
        both cases the part's tokens are consecutive in the box (:meth:`locate`).
        """
        num_frames, height, width = grid
        first_frame, first_row = divmod(part.start // width, height)
        last_frame, last_row = divmod((part.stop - 1) // width, height)
        if first_frame != last_frame:
            first_row, last_row = 0, height - 1
        top = max(0, first_row - rows) // align * align
        bottom = min(height, -(-(last_row + rows + 1) // align) * align)
        return cls(
            grid,
            range(max(0, first_frame - frames), min(num_frames, last_frame + frames + 1)),
            range(top, bottom),
        )

    @property
    def shape(self) -> GridShape:
        """``(T', H', W)`` of the box."""
        return (len(self.frames), len(self.rows), self.grid[2])

    @property
    def size(self) -> int:
        """Tokens in the box."""
        return math.prod(self.shape)

    def span(self) -> tuple[int, int]:
        """``[start, stop)`` of the flattened grid from the box's first token to its last (a superset of the box)."""
        height, width = self.grid[1], self.grid[2]
        return (
            (self.frames.start * height + self.rows.start) * width,
            ((self.frames.stop - 1) * height + self.rows.stop) * width,
        )

    def locate(self, part: slice) -> slice:
        """Where the tokens ``part`` of the flattened grid (inside the box, consecutive in it) sit in the box."""
        height, width = self.grid[1], self.grid[2]
        frame, rest = divmod(part.start, height * width)
        row, column = divmod(rest, width)
        start = ((frame - self.frames.start) * len(self.rows) + row - self.rows.start) * width + column
        return slice(start, start + part.stop - part.start)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The box's tokens ``(B, size, ...)`` out of the tokens ``x`` ``(B, n, ...)`` of :meth:`span`."""
        height, width = self.grid[1], self.grid[2]
        if len(self.frames) == 1 or len(self.rows) == height:
            return x
        rows = len(self.rows) * width
        return torch.cat([x[:, f * height * width :][:, :rows] for f in range(len(self.frames))], dim=1)


def _fetch(x: torch.Tensor, shard: SequenceShard, total: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """This rank's part ``x`` ``(B, n, ...)`` of a sequence of ``total`` tokens extended to the range
    ``spans[rank]`` (which holds the part; every rank's range given, in rank order) with the
    tokens of the other ranks."""
    parts = shard.parts(total)
    part, (start, stop) = parts[shard.rank], spans[shard.rank]
    if x.shape[1] != part.stop - part.start:
        raise ValueError(
            f"x holds {x.shape[1]} tokens, but process {shard.rank}'s part of the {total} image tokens "
            f"is {part.stop - part.start}"
        )
    reach = max(max(p.start - a, b - p.stop) for p, (a, b) in zip(parts, spans, strict=True))
    ahead, behind = neighbour_tokens(x, shard, total, part.start - start, stop - part.stop, reach)
    return torch.cat([ahead, x, behind], dim=1)


def _row_span(part: slice, rows: int, width: int, total: int) -> tuple[int, int]:
    """Token range ``[a, b)`` of the whole rows covering ``part`` plus ``rows`` rows each side."""
    start = max(0, (part.start // width - rows) * width)
    stop = min(total, (-(-part.stop // width) + rows) * width)
    return start, stop


def rows_around(x: torch.Tensor, shard: SequenceShard, grid: GridShape, rows: int) -> RowBlock:
    """This rank's image tokens ``x`` ``(B, n, ...)`` extended to whole rows and ``rows`` rows each side.

    ``x`` holds the rank's part :meth:`SequenceShard.part` of the ``T * H * W`` image tokens.
    Rows of other frames are included like any other (callers split by :meth:`RowBlock.frame_segments`).
    """
    width = grid[2]
    total = math.prod(grid)
    spans = [_row_span(part, rows, width, total) for part in shard.parts(total)]
    block = _fetch(x, shard, total, spans)
    start = spans[shard.rank][0]
    part = shard.part(total)
    return RowBlock(block, start // width, slice(part.start - start, part.stop - start))


def box_around(
    x: torch.Tensor, shard: SequenceShard, grid: GridShape, frames: int, rows: int
) -> tuple[GridBox, torch.Tensor]:
    """This rank's image tokens ``x`` ``(B, n, ...)`` with every token within ``frames`` frames and
    ``rows`` rows of them.

    Returns:
        The :class:`GridBox` around the rank's part (``GridBox.around(part, grid, frames, rows)``)
        and its tokens ``(B, box.size, ...)``; the rank's own tokens sit at ``box.locate(part)``.

    Raises:
        ValueError: if some rank holds no image token (fewer tokens than processes).
    """
    total = math.prod(grid)
    parts = shard.parts(total)
    if any(part.stop == part.start for part in parts):
        raise ValueError(
            f"context parallelism over {shard.world_size} processes needs at least as many image tokens, "
            f"got grid {grid} ({total} tokens)"
        )
    boxes = [GridBox.around(part, grid, frames, rows) for part in parts]
    tokens = _fetch(x, shard, total, [box.span() for box in boxes])
    box = boxes[shard.rank]
    return box, box.take(tokens)
