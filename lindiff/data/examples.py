"""Seeded examples of the shapes world: a scene, the spec its caption states, and the caption.

Example ``s`` is ``make_example(s)``: one numpy Generator seeded with ``s`` draws the scene, then
the caption, so any example can be rebuilt from its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .captions import CaptionConfig, SceneSpec, describe, format_caption
from .shapes import Scene, ShapesConfig, check_seed, sample_scene


@dataclass(frozen=True)
class Example:
    """A scene with the spec its caption states and the caption text."""

    scene: Scene
    spec: SceneSpec
    text: str


def make_example(
    seed: int,
    size: int = 128,
    config: ShapesConfig | None = None,
    caption_config: CaptionConfig | None = None,
) -> Example:
    """The example of ``seed``: its scene (with ``scene.seed == seed``), spec and caption."""
    seed = check_seed(seed)
    rng = np.random.default_rng(seed)
    scene = replace(sample_scene(rng, size, config), seed=seed)
    spec = describe(scene, rng, caption_config)
    return Example(scene, spec, format_caption(spec))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as ``float32 (3, H, W)`` in ``[-1, 1]``."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return array.permute(2, 0, 1).float().div(127.5).sub(1.0)
