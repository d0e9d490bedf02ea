"""Whole grid rows around a rank's image tokens: the halo that local operators (convolutions,
windows) need under context parallelism.

Image tokens are in row-major ``(T, H, W)`` order, so a rank's part of them is a run of tokens
that may start and end mid-row. A :class:`RowBlock` extends it to whole rows plus ``rows`` rows
above and below (fewer at the ends of the sequence), with the missing tokens fetched from the
other ranks by :func:`~lindiff.parallel.exchange.neighbour_tokens`.
"""

from __future__ import annotations

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


def _span(part: slice, rows: int, width: int, total: int) -> tuple[int, int]:
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
    total = grid[0] * grid[1] * width
    spans = [(part, _span(part, rows, width, total)) for part in shard.parts(total)]
    held = spans[shard.rank][0]
    if x.shape[1] != held.stop - held.start:
        raise ValueError(
            f"x holds {x.shape[1]} tokens, but process {shard.rank}'s part of the {total} tokens of grid "
            f"{grid} is {held.stop - held.start}"
        )
    reach = max(max(part.start - a, b - part.stop) for part, (a, b) in spans)
    part, (start, stop) = spans[shard.rank]
    ahead, behind = neighbour_tokens(x, shard, total, part.start - start, stop - part.stop, reach)
    block = torch.cat([ahead, x, behind], dim=1)
    return RowBlock(block, start // width, slice(part.start - start, part.stop - start))
