"""Scoring of generated clips: objects tracked through the frames, their motion against the caption.

Every frame is scored as an image (:func:`~lindiff.evaluation.detect_objects`,
:func:`~lindiff.evaluation.prompt_correct` against the caption without its motions). Each named
object is then tracked by its colour: in every frame, among the detected objects of that colour
(those of its shape first), the one nearest to where it was in the frame before (the largest in
the first frame). A least-squares line through its centroids gives its velocity, and
:func:`lindiff.data.motion.motion_of` names the motion ("still" below ``min_speed`` per frame).

    objects = detect_objects(classifier, frames)           # one list per frame
    score = score_clip(parse_motion_caption(caption), objects)
    score.motions_correct, score.frame_accuracy, score.consistent
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.captions import ObjectGroup
from ..data.motion import MotionSpec, motion_of
from .detection import DetectedObject
from .metrics import prompt_correct

MIN_SPEED = 0.01
"""Slowest tracked speed, in image sides per frame, that counts as moving (a third of the slowest
training clip's 0.03)."""

MIN_TRACKED = 0.5
"""Fraction of the frames an object must be found in for its motion to be measured."""


@dataclass(frozen=True)
class ClipScore:
    """How well one clip shows its caption.

    Attributes:
        frame_accuracy: fraction of frames showing exactly the caption's objects.
        motions: the measured motion of each named object, ``None`` where it was found in fewer
            than :data:`MIN_TRACKED` of the frames.
        motions_correct: per named object, whether the measured motion is the caption's.
        consistent: every named object is found in every frame, with the same shape throughout.
        tracks: per named object, its ``(x, y)`` centroid in each frame (``None`` where missing).
    """

    frame_accuracy: float
    motions: tuple[str | None, ...]
    motions_correct: tuple[bool, ...]
    consistent: bool
    tracks: tuple[tuple[tuple[float, float] | None, ...], ...]

    @property
    def all_motions_correct(self) -> bool:
        """Every named object moves as the caption says."""
        return all(self.motions_correct)


def _distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def track_object(
    group: ObjectGroup, frames: Sequence[Sequence[DetectedObject]]
) -> list[DetectedObject | None]:
    """The object of ``group``'s colour in each frame (see the module docstring), ``None`` where absent."""
    track: list[DetectedObject | None] = []
    previous: DetectedObject | None = None
    for objects in frames:
        same_colour = [obj for obj in objects if obj.colour == group.colour]
        candidates = [obj for obj in same_colour if obj.shape == group.shape] or same_colour
        if not candidates:
            track.append(None)
            continue
        if previous is None:
            chosen = max(candidates, key=lambda obj: obj.area)
        else:
            chosen = min(candidates, key=lambda obj: _distance(obj.center, previous.center))
        track.append(chosen)
        previous = chosen
    return track


def fitted_velocity(centers: Sequence[tuple[float, float] | None]) -> tuple[float, float] | None:
    """Least-squares ``(dx, dy)`` per frame through the centroids found; ``None`` if too few."""
    found = [(f, c) for f, c in enumerate(centers) if c is not None]
    if len(found) < max(2, math.ceil(MIN_TRACKED * len(centers))):
        return None
    t = np.array([f for f, _ in found], dtype=np.float64)
    xy = np.array([c for _, c in found], dtype=np.float64)
    t = t - t.mean()
    slope = (t[:, None] * (xy - xy.mean(axis=0))).sum(axis=0) / (t * t).sum()
    return (float(slope[0]), float(slope[1]))


def score_clip(
    spec: MotionSpec, frames: Sequence[Sequence[DetectedObject]], min_speed: float = MIN_SPEED
) -> ClipScore:
    """Score one generated clip, given the detected objects of each of its frames (at least two)."""
    if len(frames) < 2:
        raise ValueError(f"frames must hold the objects of at least 2 frames; got {len(frames)}")
    still = spec.still
    frame_accuracy = sum(prompt_correct(still, objects) for objects in frames) / len(frames)
    motions, correct, tracks, consistent = [], [], [], True
    for group, said in zip(spec.groups, spec.motions, strict=True):
        track = track_object(group, frames)
        centers = tuple(None if obj is None else obj.center for obj in track)
        velocity = fitted_velocity(centers)
        measured = None if velocity is None else motion_of(velocity, min_speed)
        motions.append(measured)
        correct.append(measured == said)
        tracks.append(centers)
        shapes = {obj.shape for obj in track if obj is not None}
        consistent &= None not in track and len(shapes) == 1
    return ClipScore(frame_accuracy, tuple(motions), tuple(correct), consistent, tuple(tracks))
