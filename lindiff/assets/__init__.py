"""Small models shipped with lindiff, trained by the project itself on :mod:`lindiff.data`.

    pipe = StableDiffusionPipeline.from_pretrained(lindiff.assets.path("tiny-shapes"))
    lindiff.linearize(pipe, weights=lindiff.assets.path("tiny-shapes-linfusion"))
    example = lindiff.data.make_example(0, config=lindiff.assets.world())  # a scene the model knows
    video = lindiff.assets.motion_pipeline()     # AnimateDiffPipeline: tiny-shapes + its motion adapter

In a source checkout, ``python -m recipes.tiny_shapes.build --out lindiff/assets`` retrains every
asset from a seed (see ``recipes/tiny_shapes/README.md``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..data import MotionConfig, ShapesConfig

ROOT = Path(__file__).resolve().parent
"""Folder holding the shipped assets, one sub-folder each."""

ASSETS: dict[str, str] = {
    "tiny-shapes": "StableDiffusionPipeline (UNet, VAE, CLIP text model, tokenizer, scheduler), 128 px",
    "tiny-shapes-linfusion": "LinFusion student of tiny-shapes, lindiff.save_weights output",
    "tiny-shapes-controlnet": "ControlNetModel on object masks (white on black) for tiny-shapes",
    "tiny-shapes-lora-stripes": "LoRA for tiny-shapes that fills shapes with stripes (load_lora_weights)",
    "tiny-shapes-classifier": "per-pixel colour/shape classifier used by the quality benchmark",
    "tiny-shapes-motion": "AnimateDiff MotionAdapter for tiny-shapes, with its text encoder and tokenizer "
    "(motion words added); load with motion_pipeline()",
}
"""Name of every shipped asset and what it holds."""

DEFAULT_MODEL = "tiny-shapes"

MOTION_MODEL = "tiny-shapes-motion"
"""The motion adapter of :data:`DEFAULT_MODEL`, the embedded video model (:func:`motion_pipeline`)."""

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


def world(name: str = DEFAULT_MODEL) -> ShapesConfig | MotionConfig:
    """What the model asset ``name`` was trained on: the scenes (:class:`lindiff.data.ShapesConfig`)
    of an image model, the clips (:class:`lindiff.data.MotionConfig`) of :data:`MOTION_MODEL`.

    Raises:
        ValueError: ``name`` is not an asset with a ``world.json``.
        FileNotFoundError: the asset is not in this installation.
    """
    from ..data import MotionConfig, ShapesConfig

    file = Path(path(name)) / WORLD_FILE
    if not file.is_file():
        raise ValueError(
            f"name must be a model asset with a {WORLD_FILE} ({DEFAULT_MODEL}, {MOTION_MODEL}); got {name!r}"
        )
    fields = json.loads(file.read_text(encoding="utf-8"))

    def tuples(values: dict[str, Any]) -> dict[str, Any]:  # JSON lists back to the configs' tuples
        return {key: tuple(v) if isinstance(v, list) else v for key, v in values.items()}

    if "scene" in fields:
        return MotionConfig(scene=ShapesConfig(**tuples(fields.pop("scene"))), **tuples(fields))
    return ShapesConfig(**tuples(fields))


def motion_pipeline(**kwargs: Any) -> Any:
    """The embedded video model: ``diffusers.AnimateDiffPipeline`` of tiny-shapes and its motion adapter.

    The image model's UNet, VAE and scheduler (:data:`DEFAULT_MODEL`) with the motion adapter,
    text encoder and tokenizer of :data:`MOTION_MODEL` (the image model's text encoder with rows
    for the motion words, fine-tuned with the adapter). 8 frames of
    128 px are what it was trained on; it runs up to 32 frames. ``kwargs`` go to
    ``from_pretrained`` (e.g. ``torch_dtype``).

    Raises:
        FileNotFoundError: an asset is not in this installation.
    """
    from diffusers import AnimateDiffPipeline, MotionAdapter
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(path(MOTION_MODEL))
    dtype = {"torch_dtype": kwargs["torch_dtype"]} if "torch_dtype" in kwargs else {}
    adapter = MotionAdapter.from_pretrained(folder / "motion_adapter", **dtype)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **dtype)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return AnimateDiffPipeline.from_pretrained(
        path(DEFAULT_MODEL), motion_adapter=adapter, text_encoder=text_encoder, tokenizer=tokenizer, **kwargs
    )
