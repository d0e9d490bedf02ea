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


FIRST_STAGE_RATIO = 4.0
"""How much larger per side than stage 1 the first SDEdit stage of an ``"auto"`` chain may be."""
STAGE_RATIO = 2.0
"""How much larger per side than the stage before every later SDEdit stage of an ``"auto"`` chain may be."""


def plan_stages(
    height: int, width: int, native_size: int, stages: int | str = "auto", multiple: int = 8
) -> list[tuple[int, int]]:
    """The ``(height, width)`` of every stage of a chain to ``height x width`` px.

    Stage 1 has the area of a ``native_size`` square and the target's aspect ratio; the target is
    the last stage. ``stages="auto"`` picks the fewest stages in which the first SDEdit stage is at
    most :data:`FIRST_STAGE_RATIO` (4x) the native side and every later one at most
    :data:`STAGE_RATIO` (2x) the stage before: the SDEdit stages halve back from the target, so 2x
    to 4x the native side is one SDEdit stage, 8x is 4x then 8x, 32x is 4x, 8x, 16x, 32x. A target
    no larger than the native area is one stage.

    Why the first jump may be 4x: the first SDEdit stage settles every edge of the soft native image
    one latent pixel at a time, and a latent pixel of a stage at 2x the native side spans 4 native
    pixels (8x VAEs), at 4x two. On the embedded tiny-shapes model a first stage at 2x redrew many
    objects as other shapes at the native scale (wavy squares that read as stars) where one at 4x
    kept them (chain fidelity, ``bench/quality.py --highres``).

    ``stages`` as an int gives that many stages growing geometrically (per side) from stage 1 to
    the target. Intermediate sizes are rounded to ``multiple``.

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
        num_stages = 1 if side_ratio <= 1 else 2 + _doublings(side_ratio / FIRST_STAGE_RATIO)
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
    target = (height, width)
    if stages == "auto":  # stage 1, then the SDEdit stages halving back from the target
        sides = [first] + [
            tuple(side / STAGE_RATIO**index for side in target) for index in range(num_stages - 2, 0, -1)
        ]
    else:  # geometric from stage 1 to the target
        sides = [
            tuple(
                start * (end / start) ** (index / (num_stages - 1))
                for start, end in zip(first, target, strict=True)
            )
            for index in range(num_stages - 1)
        ]
    rounded = [tuple(max(multiple, multiple * round(side / multiple)) for side in pair) for pair in sides]
    return [*rounded, target]


def stage_scales(sizes: list[tuple[int, int]]) -> list[float]:
    """How much larger per side (the square root of the area ratio) than stage 1 every later stage of
    ``sizes`` (from :func:`plan_stages`) is."""
    (height, width), *later = sizes
    return [math.sqrt(h * w / (height * width)) for h, w in later]


def _doublings(ratio: float) -> int:
    """The fewest doublings that reach ``ratio`` (0 for a ratio of at most 1)."""
    return max(0, math.ceil(math.log(ratio, STAGE_RATIO) - 1e-9))


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nearest(value: object, multiple: int) -> str:
    if not is_int(value) or value < 1:
        return ""
    below = value - value % multiple
    options = sorted({size for size in (below, below + multiple) if size >= multiple})
    return f" (nearest valid: {' or '.join(map(str, options))})"
