"""Local softmax attention in a window of the token grid: a disc (2D), a ball or a cylinder (3D).

The op dispatches on the device of its inputs: CUDA tensors run FlexAttention with block masks
built from the window geometry (``flex.py``, ``tiling.py``); anything else runs the exact
chunked PyTorch path (``chunked.py``: boxes of the grid, on CPU through PyTorch's fused
flash-attention kernel). Both are tested against the dense reference in
``reference.py``. Where compiled FlexAttention reaches Dynamo's recompile limit (too many
geometries in one process), the call warns and runs the chunked path, never FlexAttention's
eager fall-back with its dense ``N x N`` scores.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import warnings

import torch

from .chunked import local_attention_chunked
from .flex import RecompileLimitError, clear_plan_cache, flex_available, local_attention_flex, plan_cache_info
from .reference import as_grid3, local_attention_reference, window_geometry, window_mask
from .states import merge_attention_states
from .tiling import BLOCK_SIZE, choose_tile

LAYOUTS = ("bnhd", "bhnd")
BACKENDS = ("auto", "flex", "chunked")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = [
    "BACKENDS",
    "LAYOUTS",
    "RecompileLimitError",
    "clear_plan_cache",
    "local_attention",
    "local_attention_reference",
    "merge_attention_states",
    "plan_cache_info",
    "window_mask",
]

logger = logging.getLogger(__name__)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_radius(x) -> bool:
    """A real number ``>= 0`` (``math.inf`` included), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x) and x >= 0


def _check_inputs(
    q, k, v, grid, radius, frames_radius, global_kv, layout, scale, tile, backend, return_lse
) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D ({layout!r} layout), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPES:
        raise TypeError(f"q, k, v must be float32, float16, bfloat16 or float64, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")

    token_dim, head_dim = (1, 2) if layout == "bnhd" else (2, 1)
    batch, tokens, heads = q.shape[0], q.shape[token_dim], q.shape[head_dim]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != batch or t.shape[token_dim] != tokens or t.shape[head_dim] != heads:
            raise ValueError(
                f"{name} must have q's batch, tokens and heads ({batch}, {tokens}, {heads} in {layout!r} "
                f"layout): local attention is self-attention on one grid; got {name} shape {tuple(t.shape)}"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if tokens == 0:
        raise ValueError("q, k, v must have at least one token")

    if (
        not isinstance(grid, (tuple, list))
        or len(grid) not in (2, 3)
        or not all(_is_int(g) and g > 0 for g in grid)
    ):
        raise ValueError(f"grid must be (H, W) or (T, H, W) of positive ints, got {grid!r}")
    if math.prod(grid) != tokens:
        raise ValueError(
            f"grid {tuple(grid)} has {math.prod(grid)} cells but q, k, v have {tokens} tokens; "
            "the grid product must equal the token count (tokens in row-major order)"
        )
    if not _is_radius(radius):
        raise ValueError(
            f"radius must be a number >= 0 (in tokens; math.inf for full attention), got {radius!r}"
        )
    if frames_radius is not None and not _is_radius(frames_radius):
        raise ValueError(
            "frames_radius must be None (a ball over frames, rows and columns) or a number >= 0 "
            f"(frames; math.inf for every frame), got {frames_radius!r}"
        )

    if global_kv is not None:
        if not isinstance(global_kv, (tuple, list)) or len(global_kv) != 2:
            raise TypeError(f"global_kv must be a pair (k_g, v_g) or None, got {type(global_kv).__name__}")
        for name, t in zip(("global_kv[0] (k_g)", "global_kv[1] (v_g)"), global_kv, strict=True):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 4:
                raise ValueError(f"{name} must be 4-D ({layout!r} layout), got shape {tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(
                    f"{name} must match q's dtype {q.dtype} and device {q.device}, got {t.dtype}, {t.device}"
                )
            if t.shape[0] != batch or t.shape[head_dim] != heads:
                raise ValueError(
                    f"{name} must have q's batch {batch} and heads {heads} ({layout!r} layout), got shape {tuple(t.shape)}"
                )
        k_g, v_g = global_kv
        if k_g.shape[-1] != q.shape[-1] or v_g.shape[-1] != v.shape[-1]:
            raise ValueError(
                f"global_kv head dims must be q's {q.shape[-1]} (k_g) and v's {v.shape[-1]} (v_g), "
                f"got {k_g.shape[-1]} and {v_g.shape[-1]}"
            )
        if k_g.shape[token_dim] != v_g.shape[token_dim]:
            raise ValueError(
                f"global_kv token counts differ: k_g {k_g.shape[token_dim]} vs v_g {v_g.shape[token_dim]}"
            )

    if scale is not None and (
        not isinstance(scale, numbers.Real)
        or isinstance(scale, bool)
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite number or None (1/sqrt(D)), got {scale!r}")
    if tile is not None and (
        not isinstance(tile, (tuple, list))
        or len(tile) != len(grid)
        or not all(_is_int(t) and t > 0 for t in tile)
        or math.prod(tile) % BLOCK_SIZE
    ):
        raise ValueError(
            f"tile must be {len(grid)} positive ints (like grid) whose product is a multiple of "
            f"{BLOCK_SIZE} (one FlexAttention block), got {tile!r}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")


def _select_backend(backend: str, q: torch.Tensor) -> str:
    """``"flex"`` or ``"chunked"``; ``"auto"`` means flex on CUDA (fp16/bf16/fp32), chunked elsewhere."""
    if backend != "auto":
        return backend
    if q.device.type != "cuda" or q.dtype == torch.float64:
        return "chunked"
    if flex_available():
        return "flex"
    _log_fallback_once()
    return "chunked"


@functools.cache
def _log_fallback_once() -> None:
    logger.info(
        "torch %s has no FlexAttention; local_attention runs the chunked path on CUDA", torch.__version__
    )


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: tuple[int, int] | tuple[int, int, int],
    radius: float,
    frames_radius: float | None = None,
    global_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    layout: str = "bnhd",
    scale: float | None = None,
    backend: str = "auto",
    tile: tuple[int, ...] | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every grid token to the tokens in a window around it (plus global tokens).

    Query cell ``p`` attends key cell ``c``, ``(dt, dh, dw)`` apart in token units, iff

    - ``frames_radius=None``: ``||p - c||_2 <= radius`` (a disc in 2D, a ball in 3D); a radius
      at least the grid's diagonal (or ``math.inf``) is full attention;
    - ``frames_radius=F``: ``|dt| <= F`` and ``dh^2 + dw^2 <= radius^2``, a cylinder: the disc
      of ``radius`` in each of the ``2F + 1`` frames around the query's. With ``F >= T - 1`` (or
      ``math.inf``) and a radius at least the diagonal of a frame it is full attention.

    ``radius=0`` is the token itself (and, in a cylinder, the same position in the frames within
    ``F``). Global keys are seen by every query, in the same softmax.

    Args:
        q, k: ``(B, N, H, D)`` for ``layout="bnhd"``, ``(B, H, N, D)`` for ``layout="bhnd"``;
            the ``N`` tokens are the grid's cells in row-major order.
        v: the same with value dim ``D_v``.
        grid: ``(H, W)`` or ``(T, H, W)`` with product ``N``.
        radius: window radius in tokens, ``>= 0``; may be fractional.
        frames_radius: ``None`` (a ball, the default) or the cylinder's temporal extent in
            frames, ``>= 0``, counted inclusively (``0``: the query's frame only); fractional
            values are floored, ``math.inf`` is every frame. Grids of one frame (every 2D grid)
            ignore it: there a cylinder is the disc.
        global_kv: ``(k_g, v_g)``, ``(B, M, H, D)`` and ``(B, M, H, D_v)`` (or ``"bhnd"``), e.g.
            text tokens; ``M`` is independent of ``N``.
        layout: ``"bnhd"`` or ``"bhnd"``; strided views are accepted.
        scale: softmax scale, ``1/sqrt(D)`` by default.
        backend: ``"auto"`` (FlexAttention on CUDA for 16/32-bit floats, chunked otherwise),
            ``"flex"`` (compiled on CUDA; on CPU FlexAttention's eager implementation, forward
            only, which materialises the scores: small grids and tests only) or ``"chunked"``
            (exact, bounded memory, any device).
        tile: FlexAttention token tile (as many ints as ``grid``, product a multiple of 128);
            chosen from the geometry by default.
        return_lse: also return the natural-log log-sum-exp of each query's scaled scores,
            float32, ``(B, N, H)`` for ``"bnhd"`` and ``(B, H, N)`` for ``"bhnd"``; see
            ``merge_attention_states``.

    Returns:
        The output ``(B, N, H, D_v)`` (or ``(B, H, N, D_v)``) in the dtype of ``q``, and with
        ``return_lse`` the log-sum-exp.
    """
    _check_inputs(q, k, v, grid, radius, frames_radius, global_kv, layout, scale, tile, backend, return_lse)
    grid3 = as_grid3(grid)
    window = window_geometry(float(radius), None if frames_radius is None else float(frames_radius), grid3)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    global_kv = None if global_kv is None else tuple(global_kv)
    if _select_backend(backend, q) == "chunked":
        return local_attention_chunked(q, k, v, grid3, window, global_kv, scale, layout, return_lse)
    tile3 = choose_tile(grid3, window) if tile is None else as_grid3(tile)
    try:
        return local_attention_flex(q, k, v, grid3, window, tile3, global_kv, scale, layout, return_lse)
    except RecompileLimitError as error:
        message = (
            f"{error} local_attention runs the exact chunked path for grid {tuple(grid)} instead (slower)."
        )
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return local_attention_chunked(q, k, v, grid3, window, global_kv, scale, layout, return_lse)
