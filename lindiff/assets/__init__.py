"""Small models shipped with lindiff, trained by the project itself on :mod:`lindiff.data`.

    pipe = StableDiffusionPipeline.from_pretrained(lindiff.assets.path("tiny-shapes"))
    lindiff.linearize(pipe, weights=lindiff.assets.path("tiny-shapes-linfusion"))

``python -m lindiff.assets.build --out DIR`` retrains every asset from a seed.
"""

from __future__ import annotations

from pathlib import Path

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


def path(name: str = DEFAULT_MODEL) -> str:
    """Local folder of the shipped asset ``name`` (see :data:`ASSETS`).

    Raises:
        ValueError: ``name`` is not an asset.
        FileNotFoundError: the asset is not in this installation (rebuild it with
            ``python -m lindiff.assets.build``).
    """
    if name not in ASSETS:
        raise ValueError(f"name must be one of {', '.join(ASSETS)}; got {name!r}")
    folder = ROOT / name
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FileNotFoundError(
            f"asset {name!r} is missing from {ROOT}; rebuild it with "
            f"`python -m lindiff.assets.build --out {ROOT}`"
        )
    return str(folder)
