"""Plain-PyTorch local (windowed) softmax attention on a token grid: the geometry and a dense reference.

Tokens are the cells of a grid ``(H, W)`` (images) or ``(T, H, W)`` (video), flattened in
row-major order, so token ``i`` of an ``(H, W)`` grid sits at ``(i // W, i % W)``. Query ``i``
attends to key ``j`` iff their grid positions, ``(dt, dh, dw)`` apart, are inside the window
(in token units; ``radius = 0`` is the token itself):

- ``frames_radius=None``: a disc (2D) or ball (3D), ``dt^2 + dh^2 + dw^2 <= radius^2``;
- ``frames_radius=F``: a cylinder, ``|dt| <= F`` and ``dh^2 + dw^2 <= radius^2`` (a disc in
  every frame within ``F`` frames). On a grid of one frame the two agree.

Optional global keys (text tokens) are seen by every query, in one joint softmax with the window.

Everything is compared in integers: :func:`window_geometry` turns the radii into a
:class:`Window` (a threshold ``r2`` on squared distances and a frame count), so every
implementation (this reference, the chunked CPU path, the FlexAttention block masks, the tile
choice) agrees exactly on which pairs are inside the window.

``local_attention_reference`` builds the dense ``N x N`` mask: it is for tests on small grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Grid3 = tuple[int, int, int]

# Squared distances are integers; a radius whose square lands a hair below one (sqrt(2) ** 2 is
# 2.0000000000000004, sqrt(5) ** 2 may be 4.999...) must still include it.
_RADIUS_TOLERANCE = 1e-6


def as_grid3(grid: tuple[int, ...]) -> Grid3:
    """``(H, W)`` -> ``(1, H, W)``; ``(T, H, W)`` unchanged. Every code path works on three axes."""
    grid = tuple(int(g) for g in grid)
    return (1, *grid) if len(grid) == 2 else grid  # type: ignore[return-value]


def max_squared_distance(grid3: Grid3) -> int:
    """The largest squared distance between two tokens of the grid."""
    return sum((g - 1) ** 2 for g in grid3)


def radius_threshold(radius: float, grid3: Grid3) -> int:
    """The integer ``r2`` such that a pair is inside the window iff ``d^2 <= r2``.

    Clipped to the grid's largest squared distance, so any radius at least the grid's diagonal
    (``math.inf`` included) gives full attention and the same ``r2``.
    """
    limit = max_squared_distance(grid3)
    if radius * radius >= limit:
        return limit
    return math.floor(radius * radius + _RADIUS_TOLERANCE)


def frames_threshold(frames_radius: float, frames: int) -> int:
    """The integer ``F`` such that a pair is inside a cylinder iff ``|dt| <= F``, clipped to ``frames - 1``
    (so any ``frames_radius`` at least the clip's length, ``math.inf`` included, gives the same ``F``)."""
    if frames_radius >= frames - 1:
        return frames - 1
    return math.floor(frames_radius + _RADIUS_TOLERANCE)


@dataclass(frozen=True)
class Window:
    """A window in integers, the one geometry every path shares (and the plan caches' key).

    Attributes:
        r2: threshold on squared distances: of ``(dt, dh, dw)`` for a ball, of ``(dh, dw)`` for
            a cylinder.
        frames: ``None`` for a ball; for a cylinder the largest frame offset ``|dt|`` inside it.
    """

    r2: int
    frames: int | None = None

    @property
    def reach(self) -> Grid3:
        """The largest offset along ``(t, h, w)`` inside the window."""
        side = math.isqrt(self.r2)
        return (side if self.frames is None else self.frames, side, side)

    def inside(self, dt, dh, dw):
        """Whether offsets ``dt, dh, dw`` (ints or broadcastable int tensors) are inside the window."""
        if self.frames is None:
            return dt * dt + dh * dh + dw * dw <= self.r2
        return (abs(dt) <= self.frames) & (dh * dh + dw * dw <= self.r2)


def window_geometry(radius: float, frames_radius: float | None, grid3: Grid3) -> Window:
    """The :class:`Window` of ``radius`` (and ``frames_radius``, ``None`` for a ball) on a grid ``(T, H, W)``.

    Clipped to the grid (:func:`radius_threshold`, :func:`frames_threshold`): every radius at
    least the grid's extent gives the same window. On one frame a cylinder is the ball (``frames``
    ``None``), so both share plans.
    """
    if frames_radius is None or grid3[0] == 1:
        return Window(radius_threshold(radius, grid3))
    return Window(radius_threshold(radius, (1, *grid3[1:])), frames_threshold(frames_radius, grid3[0]))


def grid_coordinates(grid3: Grid3, device: torch.device | str | None = None) -> torch.Tensor:
    """``(N, 3)`` int64 ``(t, h, w)`` of every token in row-major order."""
    axes = [torch.arange(g, device=device) for g in grid3]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def window_mask(
    grid: tuple[int, ...],
    radius: float,
    device: torch.device | str | None = None,
    frames_radius: float | None = None,
) -> torch.Tensor:
    """Dense ``(N, N)`` bool mask, ``True`` where query ``i`` may attend to key ``j``. Small grids only."""
    grid3 = as_grid3(grid)
    coords = grid_coordinates(grid3, device)
    offsets = coords[:, None, :] - coords[None, :, :]
    return window_geometry(radius, frames_radius, grid3).inside(*offsets.unbind(-1))


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, ...],
    radius: float,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    layout: str = "bnhd",
    scale: float | None = None,
    return_lse: bool = False,
    frames_radius: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense masked softmax attention over the window (and the global keys); O(N^2) memory.

    Args:
        q, k: ``(B, N, H, D)`` for ``layout="bnhd"``, ``(B, H, N, D)`` for ``"bhnd"``.
        v: the same with value dim ``D_v``.
        grid: ``(H, W)`` or ``(T, H, W)`` with product ``N``.
        radius: window radius in tokens.
        frames_radius: ``None`` for a ball; else the cylinder's extent in frames (``|dt| <= it``).
        global_kv: ``(k_g, v_g)`` of ``M`` tokens in the same layout, visible to every query.
        scale: softmax scale, ``1/sqrt(D)`` by default.
        return_lse: also return the natural-log log-sum-exp of the scaled scores, float32,
            ``(B, N, H)`` for ``"bnhd"`` and ``(B, H, N)`` for ``"bhnd"``.

    Returns:
        The output in the layout and dtype of ``q`` (and the log-sum-exp). Computed in float32
        (float64 for float64 inputs).
    """
    if layout == "bhnd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if global_kv is not None:
            global_kv = tuple(t.transpose(1, 2) for t in global_kv)
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    keys, values = k, v
    mask = window_mask(grid, radius, q.device, frames_radius)
    if global_kv is not None:
        keys = torch.cat([k, global_kv[0]], dim=1)
        values = torch.cat([v, global_kv[1]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], global_kv[0].shape[1])], dim=1)
    scores = torch.einsum("bnhd,bmhd->bhnm", q.to(compute), keys.to(compute)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhnm,bmhe->bnhe", torch.exp(scores - lse.unsqueeze(-1)), values.to(compute))
    out = out.to(q.dtype)
    if layout == "bhnd":
        out = out.transpose(1, 2)
    else:
        lse = lse.transpose(1, 2)
    return (out, lse.float()) if return_lse else out
