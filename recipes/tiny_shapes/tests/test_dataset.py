"""The recipe's training data: a torch Dataset of rendered examples and an image-folder writer and reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lindiff.data import make_example, render
from recipes.tiny_shapes.dataset import ShapesDataset, read_folder, write_folder


def test_dataset_items() -> None:
    dataset = ShapesDataset(6, seed=10)
    assert len(dataset) == 6
    item = dataset[2]
    assert set(item) == {"image", "text", "label_map", "seed"}
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["label_map"].shape == (128, 128) and item["label_map"].dtype == torch.int64
    example = make_example(12)
    assert item["text"] == example.text and item["seed"] == 12
    expected = torch.from_numpy(np.asarray(render(example.scene)).copy()).permute(2, 0, 1) / 127.5 - 1
    assert torch.equal(item["image"], expected)
    assert dataset.example(-1) == make_example(15)
    with pytest.raises(IndexError):
        dataset[6]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 128, 128) and len(batch["text"]) == 4
    pil = ShapesDataset(2, seed=10, size=64, output="pil")[0]["image"]
    assert isinstance(pil, Image.Image) and pil.size == (64, 64)


def test_write_and_read_folder(tmp_path) -> None:
    out = write_folder(tmp_path / "shapes", count=5, seed=3, size=64)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in lines] == [f"{i:06d}.png" for i in range(5)]
    for i, record in enumerate(lines):
        example = make_example(3 + i, size=64)
        assert record["text"] == example.text == (out / f"{i:06d}.txt").read_text().strip()
        assert record["seed"] == 3 + i and record["size"] == 64
        assert [o["shape"] for o in record["objects"]] == [o.shape for o in example.scene.objects]
        assert record["objects"][0]["pixel_box"] == list(example.scene.objects[0].pixel_box(64))
        with Image.open(out / record["file_name"]) as image:
            assert np.array_equal(np.asarray(image), np.asarray(render(example.scene)))
    for (name, example), record in zip(read_folder(out), lines, strict=True):
        assert name == record["file_name"]
        assert example == make_example(record["seed"], size=64)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: ShapesDataset(4, output="numpy"), "output"),
        (lambda: ShapesDataset(0), "length"),
        (lambda: read_folder("no-such-folder"), "folder"),
    ],
)
def test_bad_arguments_raise_value_errors_that_name_them(call, name) -> None:
    with pytest.raises(ValueError, match=name):
        call()
