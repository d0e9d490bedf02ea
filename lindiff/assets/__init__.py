"""Small models shipped with lindiff, trained by the project itself on :mod:`lindiff.data`.

    pipe = StableDiffusionPipeline.from_pretrained(lindiff.assets.path("tiny-shapes"))
    lindiff.linearize(pipe, weights=lindiff.assets.path("tiny-shapes-linfusion"))
    example = lindiff.data.make_example(0, config=lindiff.assets.world())  # a scene the model knows

In a source checkout, ``python -m recipes.tiny_shapes.build --out lindiff/assets`` retrains every
asset from a seed (see ``recipes/tiny_shapes/README.md``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..data import ShapesConfig

ROOT = Path(__file__).resolve().parent
"""Folder holding the shipped assets, one sub-folder each."""

ASSETS: dict[str, str] = {
    "tiny-shapes": "StableDiffusionPipeline (UNet, VAE, CLIP text model, tokenizer, scheduler), 128 px",
    "tiny-shapes-linfusion": "LinFusion student of tiny-shapes, lindiff.save_weights output",
    "tiny-shapes-controlnet": "ControlNetModel on object masks (white on black) for tiny-shapes",
    "tiny-shapes-lora-stripes": "LoRA for tiny-shapes that fills shapes with stripes (load_lora_weights)",
    "tiny-shapes-classifier": "per-pixel colour/shape classifier used by the quality benchmark",
}
"""Name of every shipped asset and what it holds."""

DEFAULT_MODEL = "tiny-shapes"

WORLD_FILE = "world.json"
"""File of a model asset that records the scene distribution it was trained on."""


def path(name: str = DEFAULT_MODEL) -> str:
    """Local folder of the shipped asset ``name`` (see :data:`ASSETS`).

    Raises:
        ValueError: ``name`` is not an asset.
        FileNotFoundError: the asset is not in this installation.
    """
    if name not in ASSETS:
        raise ValueError(f"name must be one of {', '.join(ASSETS)}; got {name!r}")
    folder = ROOT / name
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(
            f"asset {name!r} is missing from {ROOT}; reinstall lindiff, or in a source checkout "
            f"rebuild it with `python -m recipes.tiny_shapes.build --out {ROOT}`"
        )
    return str(folder)


def world(name: str = DEFAULT_MODEL) -> ShapesConfig:
    """The scenes (:class:`lindiff.data.ShapesConfig`) the model asset ``name`` was trained on.

    Raises:
        ValueError: ``name`` is not an asset with a ``world.json``.
        FileNotFoundError: the asset is not in this installation.
    """
    from ..data import ShapesConfig

    file = Path(path(name)) / WORLD_FILE
    if not file.is_file():
        raise ValueError(f"name must be a model asset with a {WORLD_FILE} ({DEFAULT_MODEL}); got {name!r}")
    fields = json.loads(file.read_text(encoding="utf-8"))
    return ShapesConfig(**{key: tuple(v) if isinstance(v, list) else v for key, v in fields.items()})
