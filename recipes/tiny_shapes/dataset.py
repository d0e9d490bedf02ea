"""Training data of the shapes world: a torch Dataset and an image-folder writer and reader.

Item ``i`` of a dataset or folder with base seed ``s`` is :func:`lindiff.data.make_example`
``(s + i)``, so any item can be rebuilt from its seed alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lindiff.data import (
    CaptionConfig,
    Example,
    Scene,
    ShapesConfig,
    make_example,
    parse_caption,
    rasterize,
    render,
    to_tensor,
)
from lindiff.data.shapes import check_choice, check_seed, check_size

OUTPUTS: tuple[str, ...] = ("tensor", "pil")


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
