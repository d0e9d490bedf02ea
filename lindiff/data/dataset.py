"""Seeded examples of the shapes world: a torch Dataset and an image-folder writer and reader.

Example ``i`` of a dataset or folder with base seed ``s`` is ``make_example(s + i)``: one numpy
Generator seeded with ``s + i`` draws the scene, then the caption, so any example can be
rebuilt from its seed alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .captions import CaptionConfig, SceneSpec, describe, format_caption, parse_caption
from .raster import rasterize, render
from .shapes import Scene, ShapesConfig, check_choice, check_seed, check_size, sample_scene

OUTPUTS: tuple[str, ...] = ("tensor", "pil")


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


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` captioned shape images; item ``i`` is ``make_example(seed + i)``, rendered.

    Items are dicts that the default collate function batches:

    - ``image``: ``float32 (3, size, size)`` in ``[-1, 1]``, or a PIL image when ``output="pil"``;
    - ``text``: the caption;
    - ``label_map``: ``int64 (size, size)``, 0 for background, ``j + 1`` for object ``j``;
    - ``seed``: the example's seed.

    The full ground truth (colours, shapes, boxes) of item ``i`` is ``dataset.example(i).scene``.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        size: int = 128,
        config: ShapesConfig | None = None,
        caption_config: CaptionConfig | None = None,
        output: str = "tensor",
    ) -> None:
        self.length = check_size(length, "length")
        self.seed = check_seed(seed)
        self.size = check_size(size)
        self.config = config or ShapesConfig()
        self.caption_config = caption_config or CaptionConfig()
        self.output = check_choice("output", output, OUTPUTS)

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> Example:
        """The scene, spec and caption of item ``index`` (negative indices count from the end)."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} is out of range for a dataset of length {self.length}")
        return make_example(self.seed + index % self.length, self.size, self.config, self.caption_config)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.example(index)
        image, labels = rasterize(example.scene)
        return {
            "image": to_tensor(image) if self.output == "tensor" else image,
            "text": example.text,
            "label_map": torch.from_numpy(labels.astype(np.int64)),
            "seed": example.scene.seed,
        }


def write_folder(
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    size: int = 128,
    config: ShapesConfig | None = None,
    caption_config: CaptionConfig | None = None,
) -> Path:
    """Write ``count`` examples as an image folder that training scripts read.

    Writes ``NNNNNN.png`` and its caption ``NNNNNN.txt`` for example ``i`` (seed ``seed + i``),
    and ``metadata.jsonl`` with one line per image: ``file_name``, ``text`` and the scene's
    ground truth (``background``, ``size``, ``seed``, ``objects`` with ``box`` in fractions of
    the side and ``pixel_box`` in pixels). Existing files of the same names are replaced.

    Returns:
        The folder.
    """
    dataset = ShapesDataset(count, seed, size, config, caption_config, output="pil")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(count - 1)))
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as metadata:
        for index in range(count):
            example = dataset.example(index)
            stem = f"{index:0{digits}d}"
            render(example.scene).save(out / f"{stem}.png", compress_level=1)
            (out / f"{stem}.txt").write_text(example.text + "\n", encoding="utf-8")
            record = {"file_name": f"{stem}.png", "text": example.text, **example.scene.to_dict()}
            metadata.write(json.dumps(record) + "\n")
    return out


def read_folder(folder: str | Path) -> list[tuple[str, Example]]:
    """Read a folder written by :func:`write_folder`: ``(file_name, example)`` per metadata line."""
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        raise ValueError(f"folder must hold a metadata.jsonl written by write_folder; {path} does not exist")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [
        (r["file_name"], Example(Scene.from_dict(r), parse_caption(r["text"]), r["text"])) for r in records
    ]
