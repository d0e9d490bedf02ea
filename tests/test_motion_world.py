"""Clips of the shapes world and their scoring: captions, paths in view, tracking and fitted motion."""

from __future__ import annotations

import numpy as np
import pytest

from lindiff.data import (
    MOTIONS,
    MotionConfig,
    MotionSpec,
    format_motion_caption,
    parse_motion_caption,
    render_clip,
    sample_clip,
)
from lindiff.data.captions import ObjectGroup
from lindiff.data.motion import motion_of
from lindiff.evaluation import DetectedObject, fitted_velocity, score_clip, track_object


def test_clips_are_seeded_captioned_and_stay_in_view() -> None:
    assert sample_clip(7) == sample_clip(7) and sample_clip(7) != sample_clip(8)
    seen = set()
    for seed in range(150):
        clip = sample_clip(seed, frames=8)
        spec = parse_motion_caption(clip.caption)
        assert spec.motions == clip.motions and format_motion_caption(spec) == clip.caption
        assert [(g.colour, g.shape) for g in spec.groups] == [(o.colour, o.shape) for o in clip.scene.objects]
        assert len({(o.colour, o.shape) for o in clip.scene.objects}) == len(clip.scene.objects)
        for frame in (0, 7):
            for obj in clip.scene_at(frame).objects:
                x0, y0, x1, y1 = obj.box
                assert x0 >= 0.0 and x1 <= 1.0 and y0 >= 0.0 and y1 <= 1.0
        for index, motion in enumerate(clip.motions):
            dx, dy = clip.velocity(index)
            assert motion_of((dx, dy), 0.01) == motion
        seen.update(clip.motions)
    assert seen == set(MOTIONS)


def test_motion_captions_read_back_and_bad_ones_name_the_part() -> None:
    text = "a blue square moving up and a green star moving to the left on a black background"
    spec = parse_motion_caption(text)
    assert spec == MotionSpec(
        (ObjectGroup(1, "blue", "square"), ObjectGroup(1, "green", "star")), ("up", "left"), "black"
    )
    assert format_motion_caption(spec) == text
    assert spec.still.groups == spec.groups and spec.still.relation is None
    with pytest.raises(ValueError, match="cannot read 'a red circle flying'"):
        parse_motion_caption("a red circle flying")
    with pytest.raises(ValueError, match="motion must be one of"):
        MotionSpec((ObjectGroup(1, "red", "circle"),), ("sideways",))
    with pytest.raises(ValueError, match="speed_range"):
        MotionConfig(speed_range=(0.0, 0.1))


def test_rendered_frames_show_the_motion() -> None:
    clip = sample_clip(3, frames=6)
    frames = [np.asarray(f) for f in render_clip(clip, size=64)]
    assert len(frames) == 6 and frames[0].shape == (64, 64, 3)
    moving = any(m != "still" for m in clip.motions)
    assert moving == (not np.array_equal(frames[0], frames[-1]))


def _object(colour: str, shape: str, x: float, y: float, area: float = 0.05) -> DetectedObject:
    return DetectedObject(
        colour, shape, (x, y), (x - 0.1, y - 0.1, x + 0.1, y + 0.1), area, np.zeros((1, 1), bool)
    )


def test_tracking_follows_the_nearest_object_of_the_colour_and_fits_its_velocity() -> None:
    group = ObjectGroup(1, "red", "circle")
    frames = [
        [
            _object("red", "circle", 0.3 + 0.04 * f, 0.5),
            _object("red", "square", 0.8, 0.2),
            _object("blue", "circle", 0.1, 0.1),
        ]
        for f in range(8)
    ]
    frames[4] = [_object("red", "square", 0.8, 0.2)]  # circle missing: the track takes the colour
    track = track_object(group, frames)
    assert [obj.shape for obj in track if obj is not None].count("circle") == 7
    centers = [None if obj is None or obj.shape != "circle" else obj.center for obj in track]
    dx, dy = fitted_velocity(centers)
    assert dx == pytest.approx(0.04) and dy == pytest.approx(0.0, abs=1e-12)
    assert fitted_velocity([None] * 5 + [(0.1, 0.1)] * 3) is None  # fewer than half the frames


def test_score_clip_on_the_clip_truth_and_on_a_wrong_direction() -> None:
    spec = parse_motion_caption("a red circle moving to the right and a blue star standing still")
    right = [
        [_object("red", "circle", 0.2 + 0.04 * f, 0.3), _object("blue", "star", 0.7, 0.7)] for f in range(8)
    ]
    score = score_clip(spec, right)
    assert score.motions == ("right", "still") and score.all_motions_correct
    assert score.frame_accuracy == 1.0 and score.consistent
    wrong = [
        [_object("red", "circle", 0.5, 0.6 - 0.04 * f), _object("blue", "star", 0.7, 0.7)] for f in range(8)
    ]
    wrong[2].append(_object("green", "square", 0.1, 0.1))
    score = score_clip(spec, wrong)
    assert score.motions == ("up", "still") and score.motions_correct == (False, True)
    assert score.frame_accuracy == pytest.approx(7 / 8)
    changing = [[_object("red", "circle" if f < 4 else "square", 0.2 + 0.04 * f, 0.3)] for f in range(8)]
    assert not score_clip(parse_motion_caption("a red circle moving to the right"), changing).consistent
    with pytest.raises(ValueError, match="at least 2 frames"):
        score_clip(spec, right[:1])
