"""Synthetic scenes of flat-coloured shapes: palette, geometry and seeded sampling.

A :class:`Scene` keeps its geometry in fractions of the image side (x to the right, y down,
both in ``[0, 1]``), so one scene renders at any resolution (see :mod:`lindiff.data.raster`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SHAPE_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black")
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "yellow": (250, 215, 20),
    "purple": (140, 50, 190),
    "orange": (250, 135, 10),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}

# Inner radius of the five-pointed star relative to its outer radius (0.38 is a pentagram; a
# fuller star stays recognisable at 128 px).
_STAR_INNER = 0.45


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_size(size: Any, name: str = "size") -> int:
    """Return ``size`` if it is a positive int, else raise a ValueError naming ``name``."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")
    return int(size)


def check_seed(seed: Any) -> int:
    """Return ``seed`` if it is a non-negative int, else raise a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    return int(seed)


def _check_subset(name: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    unknown = [v for v in values if v not in allowed]
    if not values or unknown or len(set(values)) != len(values):
        raise ValueError(
            f"{name} must be a non-empty tuple of distinct names from {', '.join(allowed)}; got {values!r}"
        )


def _check_range(name: str, value: tuple, low: float, high: float) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}; got {value!r}")


def _check_fraction(name: str, value: float, high: float = 1.0) -> None:
    if not 0.0 <= value <= high:
        raise ValueError(f"{name} must be in [0, {high}]; got {value!r}")


@dataclass(frozen=True)
class ShapesConfig:
    """How scenes are sampled. Lengths are fractions of the image side.

    Attributes:
        num_objects: (min, max) number of shapes per scene, within 1..3.
        size_range: (min, max) object size: circle diameter, square side, diameter of the
            circle through the corners of a triangle or the points of a star.
        max_rotation: rotations (of all but circles) are drawn uniformly from
            ``[-max_rotation, max_rotation]`` degrees.
        max_iou: largest allowed IoU between the boxes of two objects, each box grown by
            ``min_gap / 2`` on every side (0 keeps shapes apart, so counts stay countable).
        min_gap: see ``max_iou``.
        p_repeat: probability that an object copies the colour and shape of an earlier one, so
            captions such as "two green squares" are common.
        margin: smallest distance from any object to the image border.
        shapes, colours, backgrounds: the names to draw from; a shape never gets the colour of
            its background.
    """

    num_objects: tuple[int, int] = (1, 3)
    size_range: tuple[float, float] = (0.2, 0.42)
    max_rotation: float = 30.0
    max_iou: float = 0.0
    min_gap: float = 0.03
    p_repeat: float = 0.3
    margin: float = 0.03
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = SHAPE_COLOURS
    backgrounds: tuple[str, ...] = BACKGROUNDS

    def __post_init__(self) -> None:
        _check_range("num_objects", self.num_objects, 1, 3)
        if not all(isinstance(n, int) for n in self.num_objects):
            raise ValueError(f"num_objects must be two ints; got {self.num_objects!r}")
        _check_range("size_range", self.size_range, 0.01, 0.9)
        _check_fraction("max_rotation", self.max_rotation, 180.0)
        _check_fraction("max_iou", self.max_iou)
        _check_fraction("min_gap", self.min_gap, 0.2)
        _check_fraction("p_repeat", self.p_repeat)
        _check_fraction("margin", self.margin, 0.2)
        _check_subset("shapes", self.shapes, SHAPES)
        _check_subset("colours", self.colours, SHAPE_COLOURS)
        _check_subset("backgrounds", self.backgrounds, BACKGROUNDS)
        if any(set(self.colours) <= {bg} for bg in self.backgrounds):
            raise ValueError(
                f"colours {self.colours!r} leave no shape colour for some background in {self.backgrounds!r}"
            )


def _regular(corners: int, radius: float, start: float) -> np.ndarray:
    # math (libm) rather than numpy's vectorised trigonometry, whose last bit varies across CPUs.
    angles = [start + 2.0 * math.pi * k / corners for k in range(corners)]
    return radius * np.array([(math.cos(a), math.sin(a)) for a in angles])


def _star() -> np.ndarray:
    points = _regular(10, 0.5, -0.5 * math.pi)
    points[1::2] *= _STAR_INNER
    return points


# Outlines of size 1 centred on the origin, upright, y down. Circles are rasterised exactly;
# their outline is only for drawing and export.
_UNIT_OUTLINES: dict[str, np.ndarray] = {
    "circle": _regular(64, 0.5, 0.0),
    "square": _regular(4, math.sqrt(0.5), -0.75 * math.pi),
    "triangle": _regular(3, 0.5, -0.5 * math.pi),
    "star": _star(),
}


@dataclass(frozen=True)
class ShapeObject:
    """One flat-coloured shape.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`SHAPE_COLOURS`.
        center: ``(x, y)`` of the shape's centre in fractions of the image side, y down.
        size: extent in fractions of the image side (see :class:`ShapesConfig`).
        rotation: counter-clockwise rotation on screen, degrees.
    """

    shape: str
    colour: str
    center: tuple[float, float]
    size: float
    rotation: float = 0.0

    def __post_init__(self) -> None:
        check_choice("shape", self.shape, SHAPES)
        check_choice("colour", self.colour, SHAPE_COLOURS)
        if len(self.center) != 2 or not self.size > 0:
            raise ValueError(f"center must be (x, y) and size positive; got {self.center!r}, {self.size!r}")
        object.__setattr__(self, "center", (float(self.center[0]), float(self.center[1])))

    def outline(self, scale: float = 1.0) -> np.ndarray:
        """Polygon vertices ``(K, 2)`` as ``(x, y)``, in units of ``scale`` (the image side in pixels).

        Circles come as inscribed 64-gons.
        """
        x, y = (_UNIT_OUTLINES[self.shape] * self.size).T
        theta = math.radians(self.rotation)
        cos, sin = math.cos(theta), math.sin(theta)
        rotated = np.stack([x * cos + y * sin, y * cos - x * sin], axis=1)
        return (rotated + np.asarray(self.center)) * scale

    @cached_property
    def box(self) -> tuple[float, float, float, float]:
        """Axis-aligned ``(x0, y0, x1, y1)`` of the shape in fractions of the image side."""
        if self.shape == "circle":
            (x, y), r = self.center, 0.5 * self.size
            return (x - r, y - r, x + r, y + r)
        points = self.outline()
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        return (float(x0), float(y0), float(x1), float(y1))

    def pixel_box(self, size: int) -> tuple[int, int, int, int]:
        """Integer ``(x0, y0, x1, y1)`` (end exclusive) holding every pixel of the shape at ``size``."""
        x0, y0, x1, y1 = self.box
        clip = lambda v: min(max(v, 0), size)
        return (
            clip(math.floor(x0 * size)),
            clip(math.floor(y0 * size)),
            clip(math.ceil(x1 * size)),
            clip(math.ceil(y1 * size)),
        )

    def to_dict(self, size: int | None = None) -> dict[str, Any]:
        """JSON-ready fields plus ``box`` (and ``pixel_box`` at ``size`` when given)."""
        out: dict[str, Any] = {
            "shape": self.shape,
            "colour": self.colour,
            "center": list(self.center),
            "size": self.size,
            "rotation": self.rotation,
            "box": list(self.box),
        }
        if size is not None:
            out["pixel_box"] = list(self.pixel_box(size))
        return out


@dataclass(frozen=True)
class Scene:
    """Shapes on a plain background; ``size`` is the default render size in pixels."""

    background: str
    objects: tuple[ShapeObject, ...]
    size: int = 128
    seed: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_choice("background", self.background, BACKGROUNDS)
        check_size(self.size)
        object.__setattr__(self, "objects", tuple(self.objects))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ground truth: background, size, seed and each object with its boxes."""
        return {
            "background": self.background,
            "size": self.size,
            "seed": self.seed,
            "objects": [obj.to_dict(self.size) for obj in self.objects],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Inverse of :meth:`to_dict` (derived keys such as ``box`` are ignored)."""
        names = {f.name for f in fields(ShapeObject)}
        objects = tuple(
            ShapeObject(**{k: v for k, v in obj.items() if k in names}) for obj in data["objects"]
        )
        return cls(data["background"], objects, int(data.get("size", 128)), data.get("seed"))


def _as_rng(seed: int | np.random.Generator) -> tuple[np.random.Generator, int | None]:
    if isinstance(seed, np.random.Generator):
        return seed, None
    seed = check_seed(seed)
    return np.random.default_rng(seed), seed


def _grown_iou(a: tuple[float, ...], b: tuple[float, ...], grow: float) -> float:
    a = (a[0] - grow, a[1] - grow, a[2] + grow, a[3] + grow)
    b = (b[0] - grow, b[1] - grow, b[2] + grow, b[3] + grow)
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


def _place(
    rng: np.random.Generator, shape: str, colour: str, placed: list[ShapeObject], config: ShapesConfig
) -> ShapeObject | None:
    """Sample size, rotation and centre until the object fits beside ``placed`` (or give up)."""
    for _ in range(50):
        size = float(rng.uniform(*config.size_range))
        rotation = 0.0 if shape == "circle" else float(rng.uniform(-1.0, 1.0) * config.max_rotation)
        x0, y0, x1, y1 = ShapeObject(shape, colour, (0.0, 0.0), size, rotation).box
        low_x, high_x = config.margin - x0, 1.0 - config.margin - x1
        low_y, high_y = config.margin - y0, 1.0 - config.margin - y1
        if low_x > high_x or low_y > high_y:
            continue
        x, y = float(rng.uniform(low_x, high_x)), float(rng.uniform(low_y, high_y))
        box = (x0 + x, y0 + y, x1 + x, y1 + y)
        grow = 0.5 * config.min_gap
        if all(_grown_iou(box, other.box, grow) <= config.max_iou for other in placed):
            return ShapeObject(shape, colour, (x, y), size, rotation)
    return None


def sample_scene(
    seed: int | np.random.Generator, size: int = 128, config: ShapesConfig | None = None
) -> Scene:
    """Draw a random scene; the same ``seed`` (or generator state) always gives the same scene.

    Args:
        seed: a non-negative int (recorded as ``scene.seed``) or a ``numpy.random.Generator``.
        size: default render size in pixels; the geometry itself is resolution-free.
        config: sampling options, :class:`ShapesConfig` defaults when ``None``.
    """
    rng, seed_value = _as_rng(seed)
    size = check_size(size)
    config = config or ShapesConfig()
    background = config.backgrounds[rng.integers(len(config.backgrounds))]
    palette = [c for c in config.colours if c != background]
    count = int(rng.integers(config.num_objects[0], config.num_objects[1] + 1))
    for _ in range(100):
        placed: list[ShapeObject] = []
        while len(placed) < count:
            if placed and rng.random() < config.p_repeat:
                model = placed[rng.integers(len(placed))]
                shape, colour = model.shape, model.colour
            else:
                shape = config.shapes[rng.integers(len(config.shapes))]
                colour = palette[rng.integers(len(palette))]
            obj = _place(rng, shape, colour, placed, config)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == count:
            return Scene(background, tuple(placed), size, seed_value)
    raise RuntimeError(
        f"could not place {count} objects without overlap; lower size_range={config.size_range} "
        f"or min_gap={config.min_gap}, or raise max_iou={config.max_iou}"
    )
