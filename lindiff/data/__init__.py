"""The shapes world: seeded synthetic scenes with captions and pixel ground truth.

1-3 flat-coloured shapes on a plain background, captions from a small grammar that
:func:`parse_caption` inverts, and pixel ground truth (boxes, masks, label maps, ControlNet
conditions) at any resolution.

    from lindiff.data import make_example, parse_caption, render
    example = make_example(seed=0)               # example.scene, example.spec, example.text
    image = render(example.scene, size=256)
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
    "RELATIONS",
    "RGB",
    "SHAPES",
    "SHAPE_COLOURS",
    "VOCABULARY",
    "CaptionConfig",
    "Example",
    "ObjectGroup",
    "Scene",
    "SceneSpec",
    "ShapeObject",
    "ShapesConfig",
    "caption",
    "condition_image",
    "describe",
    "format_caption",
    "label_map",
    "make_example",
    "masks",
    "parse_caption",
    "rasterize",
    "relation_holds",
    "render",
    "sample_scene",
    "spec_holds",
    "to_tensor",
]
