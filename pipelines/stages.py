"""The stages of a high-resolution chain: their sizes (:func:`plan_stages`) and what each one runs.

Stage 1 generates at the model's native area with the target's aspect ratio; every later stage
is an SDEdit pass at a larger size. :func:`plan_stages` picks the sizes, :class:`Stage` is one of
them as :class:`~lindiff.pipelines.highres.HighResPipeline` runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage of a chain: ``index`` (0-based) of ``num_stages``, its size (px) and SDEdit
    ``strength`` (1.0 for stage 1, which generates from noise)."""

    index: int
    num_stages: int
    height: int
    width: int
    strength: float

    @property
    def first(self) -> bool:
        return self.index == 0


def chain_stages(sizes: list[tuple[int, int]], strengths: list[float]) -> list[Stage]:
    """The :class:`Stage` s of a chain of ``sizes`` whose stages 2, 3, ... have SDEdit ``strengths``."""
    return [
        Stage(index, len(sizes), height, width, strength)
        for index, ((height, width), strength) in enumerate(zip(sizes, [1.0, *strengths], strict=True))
    ]


def plan_stages(
    height: int, width: int, native_size: int, stages: int | str = "auto", multiple: int = 8
) -> list[tuple[int, int]]:
    """The ``(height, width)`` of every stage of a chain to ``height x width`` px.

    Stage 1 has the area of a ``native_size`` square and the target's aspect ratio; the stages grow
    geometrically (per side) to the target, which is the last stage. ``stages="auto"`` picks the
    fewest stages with at most 2x per side between stages; a target no larger than the native area
    is one stage. Intermediate sizes are rounded to ``multiple``.

    Raises:
        ValueError: ``height``/``width`` is not a positive multiple of ``multiple`` (the message gives
            the nearest valid sizes), ``native_size`` is not positive, or ``stages`` is neither
            ``"auto"`` nor a positive int (more than 1 only when the target is larger than native).
    """
    if not is_int(multiple) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    for name, value in (("height", height), ("width", width)):
        if not is_int(value) or value < multiple or value % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} px for this model, got {value!r}"
                + _nearest(value, multiple)
            )
    if not is_int(native_size) or native_size < 1:
        raise ValueError(f"native_size must be a positive int (px), got {native_size!r}")
    side_ratio = math.sqrt(height * width) / native_size
    if stages == "auto":
        num_stages = 1 if side_ratio <= 1 else 1 + math.ceil(math.log2(side_ratio) - 1e-9)
    elif is_int(stages) and stages >= 1:
        if stages > 1 and side_ratio <= 1:
            raise ValueError(
                f"stages must be 1 (or 'auto') when the target {height}x{width} px is not larger than the "
                f"native {native_size}x{native_size} px, got {stages}"
            )
        num_stages = stages
    else:
        raise ValueError(f"stages must be 'auto' or a positive int, got {stages!r}")
    if num_stages == 1:
        return [(height, width)]
    first = (native_size * math.sqrt(height / width), native_size * math.sqrt(width / height))
    sizes = []
    for index in range(num_stages - 1):
        fraction = index / (num_stages - 1)
        sizes.append(
            tuple(
                max(multiple, multiple * round(start * (end / start) ** fraction / multiple))
                for start, end in zip(first, (height, width), strict=True)
            )
        )
    return [*sizes, (height, width)]


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nearest(value: object, multiple: int) -> str:
    if not is_int(value) or value < 1:
        return ""
    below = value - value % multiple
    options = sorted({size for size in (below, below + multiple) if size >= multiple})
    return f" (nearest valid: {' or '.join(map(str, options))})"
