"""Synthetic training and evaluation data.

The shapes world: 1-3 flat-coloured shapes on a plain background, captions from a small
grammar that :func:`parse_caption` inverts, and pixel ground truth (boxes, masks, label maps,
ControlNet conditions) at any resolution.

    from lindiff.data import ShapesDataset, write_folder, parse_caption
    dataset = ShapesDataset(10_000, seed=0, size=128)
    write_folder("shapes_train", count=10_000, seed=0)
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
from .dataset import Example, ShapesDataset, make_example, read_folder, to_tensor, write_folder
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
    "ShapesDataset",
    "caption",
    "condition_image",
    "describe",
    "format_caption",
    "label_map",
    "make_example",
    "masks",
    "parse_caption",
    "rasterize",
    "read_folder",
    "relation_holds",
    "render",
    "sample_scene",
    "spec_holds",
    "to_tensor",
    "write_folder",
]
