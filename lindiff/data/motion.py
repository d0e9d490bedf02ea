"""Clips of the shapes world: one or two shapes moving left, right, up or down, or standing still.

A :class:`Clip` is a first :class:`~lindiff.data.Scene` and one velocity per object; frame ``f``
shows every object moved by ``f`` times its velocity (fractions of the image side per frame),
so a clip renders at any size and any frame count. Captions name each object and its motion::

    clip     := part [ "and" part ] [ "on a" BACKGROUND "background" ]
    part     := ("a" | "an") COLOUR SHAPE MOTION
    MOTION   := "moving to the left" | "moving to the right" | "moving up" | "moving down"
              | "standing still"

e.g. "a red circle moving to the right", "a blue square moving up and a green star moving to the
left on a black background". The two objects of a clip always differ in colour or shape, so a
caption names each one unambiguously; their paths over the clip never come close.

    clip = sample_clip(0, frames=8)
    frames = render_clip(clip, size=128)        # 8 PIL images
    parse_motion_caption(clip.caption)          # MotionSpec: groups, motions, background
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .captions import ObjectGroup, SceneSpec
from .raster import render
from .shapes import (
    Scene,
    ShapeObject,
    ShapesConfig,
    _as_rng,
    _grown_iou,
    check_choice,
    check_size,
)

MOTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "still": (0, 0),
}
"""Motion name -> unit direction ``(x, y)`` on screen, y down."""

MOTION_PHRASES: dict[str, str] = {
    "left": "moving to the left",
    "right": "moving to the right",
    "up": "moving up",
    "down": "moving down",
    "still": "standing still",
}
"""How a caption says each motion."""

MOTION_WORDS: tuple[str, ...] = tuple(
    sorted({word for phrase in MOTION_PHRASES.values() for word in phrase.split()})
)
"""Every word of the motion phrases (some, like "to" and "the", are in the image captions too)."""


CLIP_WORLD = ShapesConfig(
    num_objects=(1, 2), size_range=(0.22, 0.36), colours=("red", "green", "blue", "yellow", "purple", "white")
)
"""The scenes of clips: the embedded model's world with smaller objects, so that paths fit in view."""


@dataclass(frozen=True)
class MotionConfig:
    """How clips are sampled. Lengths are fractions of the image side.

    Attributes:
        scene: the objects and backgrounds (``num_objects`` within 1..2, ``p_repeat`` ignored:
            the objects of a clip always differ).
        speed_range: (min, max) distance an object moves per frame.
        p_still: probability that an object stands still.
        p_background: probability that the caption names the background.
    """

    scene: ShapesConfig = CLIP_WORLD
    speed_range: tuple[float, float] = (0.03, 0.05)
    p_still: float = 0.15
    p_background: float = 0.5

    def __post_init__(self) -> None:
        if self.scene.num_objects[1] > 2:
            raise ValueError(
                f"scene.num_objects must be within 1..2 for clips; got {self.scene.num_objects!r}"
            )
        low, high = self.speed_range
        if not 0.0 < low <= high <= 0.2:
            raise ValueError(
                f"speed_range must be (min, max) with 0 < min <= max <= 0.2; got {self.speed_range!r}"
            )
        for name in ("p_still", "p_background"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Clip:
    """Objects moving at constant velocity over a background.

    Attributes:
        scene: the first frame.
        motions: one motion name (a key of :data:`MOTIONS`) per object of ``scene``.
        speeds: distance per frame of each object (0 for ``"still"``).
        caption: what the clip shows, in the grammar of this module.
        frames: the clip's default frame count.
    """

    scene: Scene
    motions: tuple[str, ...]
    speeds: tuple[float, ...]
    caption: str
    frames: int = 8

    def velocity(self, index: int) -> tuple[float, float]:
        """``(dx, dy)`` per frame of object ``index``."""
        dx, dy = MOTIONS[self.motions[index]]
        return (dx * self.speeds[index], dy * self.speeds[index])

    def scene_at(self, frame: int) -> Scene:
        """The scene of frame ``frame`` (any integer; objects keep moving past the clip's end)."""
        objects = []
        for index, obj in enumerate(self.scene.objects):
            dx, dy = self.velocity(index)
            objects.append(replace(obj, center=(obj.center[0] + frame * dx, obj.center[1] + frame * dy)))
        return replace(self.scene, objects=tuple(objects))


@dataclass(frozen=True)
class MotionSpec:
    """What a motion caption says: one group (count 1) and one motion per object, and a background."""

    groups: tuple[ObjectGroup, ...]
    motions: tuple[str, ...]
    background: str | None = None

    def __post_init__(self) -> None:
        if not self.groups or len(self.groups) != len(self.motions):
            raise ValueError(
                f"need one motion per group; got {len(self.groups)} groups, {len(self.motions)} motions"
            )
        for motion in self.motions:
            check_choice("motion", motion, tuple(MOTIONS))

    @property
    def still(self) -> SceneSpec:
        """The caption without its motions: what every single frame must show."""
        return SceneSpec(self.groups, None, self.background)


def _article(colour: str) -> str:
    return "an" if colour[0] in "aeiou" else "a"


def format_motion_caption(spec: MotionSpec) -> str:
    """The caption of ``spec`` in the grammar of this module."""
    parts = [
        f"{_article(g.colour)} {g.colour} {g.shape} {MOTION_PHRASES[m]}"
        for g, m in zip(spec.groups, spec.motions, strict=True)
    ]
    body = " and ".join(parts)
    return body if spec.background is None else f"{body} on a {spec.background} background"


def parse_motion_caption(text: str) -> MotionSpec:
    """Read a caption of this module's grammar back into a :class:`MotionSpec`.

    Raises:
        ValueError: ``text`` is not a motion caption, naming the part that is not understood.
    """
    body, background = text.strip(), None
    if body.endswith(" background") and " on a " in body:
        body, _, tail = body.rpartition(" on a ")
        background = tail[: -len(" background")]
    phrases = {phrase: name for name, phrase in MOTION_PHRASES.items()}
    groups, motions = [], []
    for part in body.split(" and "):
        words = part.split()
        motion = phrases.get(" ".join(words[3:]))
        if len(words) < 4 or words[0] not in ("a", "an") or motion is None:
            raise ValueError(
                f"text must be a motion caption like 'a red circle moving to the right'; cannot read {part!r} "
                f"(motions: {', '.join(MOTION_PHRASES.values())})"
            )
        groups.append(ObjectGroup(1, words[1], words[2]))
        motions.append(motion)
    return MotionSpec(tuple(groups), tuple(motions), background)


def _path_box(obj: ShapeObject, velocity: tuple[float, float], frames: int) -> tuple[float, ...]:
    """The box covering ``obj`` on every frame of its path."""
    x0, y0, x1, y1 = obj.box
    dx, dy = (v * (frames - 1) for v in velocity)
    return (x0 + min(dx, 0.0), y0 + min(dy, 0.0), x1 + max(dx, 0.0), y1 + max(dy, 0.0))


def _place_moving(
    rng: np.random.Generator,
    shape: str,
    colour: str,
    velocity: tuple[float, float],
    placed: list[tuple[ShapeObject, tuple[float, ...]]],
    frames: int,
    config: ShapesConfig,
) -> tuple[ShapeObject, tuple[float, ...]] | None:
    """An object whose whole path stays inside the margins and away from the paths of ``placed``."""
    for _ in range(50):
        size = float(rng.uniform(*config.size_range))
        rotation = 0.0 if shape == "circle" else float(rng.uniform(-1.0, 1.0) * config.max_rotation)
        x0, y0, x1, y1 = _path_box(ShapeObject(shape, colour, (0.0, 0.0), size, rotation), velocity, frames)
        low_x, high_x = config.margin - x0, 1.0 - config.margin - x1
        low_y, high_y = config.margin - y0, 1.0 - config.margin - y1
        if low_x > high_x or low_y > high_y:
            continue
        x, y = float(rng.uniform(low_x, high_x)), float(rng.uniform(low_y, high_y))
        obj = ShapeObject(shape, colour, (x, y), size, rotation)
        path = _path_box(obj, velocity, frames)
        if all(_grown_iou(path, other, 0.5 * config.min_gap) <= config.max_iou for _, other in placed):
            return obj, path
    return None


def sample_clip(
    seed: int | np.random.Generator, frames: int = 8, size: int = 128, config: MotionConfig | None = None
) -> Clip:
    """Draw a random clip whose objects stay in view for ``frames`` frames; the same seed gives the same clip."""
    rng, seed_value = _as_rng(seed)
    frames, size = check_size(frames, "frames"), check_size(size)
    config = config or MotionConfig()
    world = config.scene
    background = world.backgrounds[rng.integers(len(world.backgrounds))]
    palette = [c for c in world.colours if c != background]
    count = int(rng.integers(world.num_objects[0], world.num_objects[1] + 1))
    motions = [str(m) for m in rng.choice([m for m in MOTIONS if m != "still"], size=count)]
    motions = ["still" if rng.random() < config.p_still else m for m in motions]
    speeds = [0.0 if m == "still" else float(rng.uniform(*config.speed_range)) for m in motions]
    for _ in range(100):
        placed: list[tuple[ShapeObject, tuple[float, ...]]] = []
        for motion, speed in zip(motions, speeds, strict=True):
            while True:
                shape = world.shapes[rng.integers(len(world.shapes))]
                colour = palette[rng.integers(len(palette))]
                if all((shape, colour) != (obj.shape, obj.colour) for obj, _ in placed):
                    break
            velocity = (MOTIONS[motion][0] * speed, MOTIONS[motion][1] * speed)
            found = _place_moving(rng, shape, colour, velocity, placed, frames, world)
            if found is None:
                break
            placed.append(found)
        if len(placed) == count:
            scene = Scene(background, tuple(obj for obj, _ in placed), size, seed_value)
            groups = tuple(ObjectGroup(1, obj.colour, obj.shape) for obj in scene.objects)
            named = background if rng.random() < config.p_background else None
            text = format_motion_caption(MotionSpec(groups, tuple(motions), named))
            return Clip(scene, tuple(motions), tuple(speeds), text, frames)
    raise RuntimeError(
        f"could not place {count} moving objects; lower scene.size_range={world.size_range} or speed_range={config.speed_range}"
    )


def render_clip(clip: Clip, size: int | None = None, frames: int | None = None) -> list[Image.Image]:
    """The clip's frames as RGB images (``frames`` defaults to ``clip.frames``)."""
    frames = clip.frames if frames is None else check_size(frames, "frames")
    return [render(clip.scene_at(f), size) for f in range(frames)]


def motion_of(velocity: tuple[float, float], min_speed: float) -> str:
    """The motion name of a measured ``(dx, dy)`` per frame: ``"still"`` below ``min_speed``,
    else the axis direction nearest to it."""
    dx, dy = velocity
    if math.hypot(dx, dy) < min_speed:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


__all__ = [
    "MOTIONS",
    "MOTION_PHRASES",
    "MOTION_WORDS",
    "Clip",
    "MotionConfig",
    "MotionSpec",
    "format_motion_caption",
    "motion_of",
    "parse_motion_caption",
    "render_clip",
    "sample_clip",
]
