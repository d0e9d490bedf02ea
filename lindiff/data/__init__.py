"""The shapes world: seeded synthetic scenes with captions and pixel ground truth.

1-3 flat-coloured shapes on a plain background, captions from a small grammar that
:func:`parse_caption` inverts, and pixel ground truth (boxes, masks, label maps, ControlNet
conditions) at any resolution.

    from lindiff.data import make_example, parse_caption, render
    example = make_example(seed=0)               # example.scene, example.spec, example.text
    image = render(example.scene, size=256)
    clip = sample_clip(0)                        # moving shapes: clip.caption, render_clip(clip)
"""

from .captions import (
    RELATIONS,
    VOCABULARY,
    CaptionConfig,
    ObjectGroup,
    SceneSpec,
    caption,
    describe,
    format_caption,
    parse_caption,
    relation_holds,
    spec_holds,
)
from .examples import Example, make_example, to_tensor
from .motion import (
    MOTION_PHRASES,
    MOTIONS,
    Clip,
    MotionConfig,
    MotionSpec,
    format_motion_caption,
    parse_motion_caption,
    render_clip,
    sample_clip,
)
from .raster import CONDITION_KINDS, condition_image, label_map, masks, rasterize, render
from .shapes import (
    BACKGROUNDS,
    RGB,
    SHAPE_COLOURS,
    SHAPES,
    Scene,
    ShapeObject,
    ShapesConfig,
    sample_scene,
)

__all__ = [
    "BACKGROUNDS",
    "CONDITION_KINDS",
    "MOTIONS",
    "MOTION_PHRASES",
    "RELATIONS",
    "RGB",
    "SHAPES",
    "SHAPE_COLOURS",
    "VOCABULARY",
    "CaptionConfig",
    "Clip",
    "Example",
    "MotionConfig",
    "MotionSpec",
    "ObjectGroup",
    "Scene",
    "SceneSpec",
    "ShapeObject",
    "ShapesConfig",
    "caption",
    "condition_image",
    "describe",
    "format_caption",
    "format_motion_caption",
    "label_map",
    "make_example",
    "masks",
    "parse_caption",
    "parse_motion_caption",
    "rasterize",
    "relation_holds",
    "render",
    "render_clip",
    "sample_clip",
    "sample_scene",
    "spec_holds",
    "to_tensor",
]
