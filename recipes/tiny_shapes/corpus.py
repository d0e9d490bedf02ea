"""Rendered training examples of the shapes world, held in memory as arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lindiff.data import CaptionConfig, ShapesConfig, make_example, rasterize

from .stripes import STRIPE_PERIOD, colour_classes, stripes

MAX_LABELS = 4
"""Labels of a label map: the background and up to three objects (``ShapesConfig.num_objects``)."""


@dataclass
class Corpus:
    """``len(captions)`` examples with seeds ``seed .. seed + n - 1``.

    Attributes:
        images: ``uint8 (N, S, S, 3)``.
        labels: ``uint8 (N, S, S)`` label maps (0 background, ``j + 1`` object ``j``).
        captions: one caption per image.
        label_colours: ``int64 (N, MAX_LABELS)`` colour class of each label
            (:func:`~.stripes.colour_classes`; 0 for labels a scene does not use).
    """

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]
    label_colours: np.ndarray

    def __len__(self) -> int:
        return len(self.captions)

    def tensors(self, index: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Images ``index`` as ``float32 (B, 3, S, S)`` in ``[-1, 1]``."""
        batch = torch.from_numpy(self.images[np.asarray(index)])
        return batch.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def object_counts(self) -> np.ndarray:
        """``int (N,)`` objects in each scene: the highest label, since objects never overlap."""
        return self.labels.reshape(len(self), -1).max(axis=1).astype(np.int64)

    def masks(self, index: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Object masks ``index`` as ``float32 (B, 3, S, S)`` (white objects on black): the ControlNet condition."""
        on = torch.from_numpy(self.labels[np.asarray(index)] > 0).float()
        return on[:, None].expand(-1, 3, -1, -1).contiguous()

    def colours(self, index: np.ndarray) -> torch.Tensor:
        """Colour classes of the pixels of images ``index``, ``int64 (B, S, S)``."""
        index = np.asarray(index)
        scenes = np.arange(len(index))[:, None, None]
        return torch.from_numpy(self.label_colours[index][scenes, self.labels[index]])

    def striped(self, chunk: int = 256) -> Corpus:
        """The same scenes with striped objects (:func:`~.stripes.stripes`, period :data:`STRIPE_PERIOD`)."""
        images = np.empty_like(self.images)
        for start in range(0, len(self), chunk):
            index = np.arange(start, min(start + chunk, len(self)))
            pixels = torch.from_numpy(self.images[index]).permute(0, 3, 1, 2).float()
            period = torch.full((len(index),), STRIPE_PERIOD * self.images.shape[1])
            out = stripes(
                pixels, self.colours(index), period, period / 2, torch.ones(len(index)), (0.0, 255.0)
            )
            images[index] = out.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return Corpus(images, self.labels, self.captions, self.label_colours)


def render_corpus(
    count: int, seed: int, size: int, config: ShapesConfig, caption_config: CaptionConfig | None = None
) -> Corpus:
    """Render ``count`` examples (``make_example(seed + i)``) at ``size`` px."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty((count, size, size), dtype=np.uint8)
    label_colours = np.zeros((count, MAX_LABELS), dtype=np.int64)
    captions = []
    for i in tqdm(range(count), desc="render", leave=False, mininterval=2.0):
        example = make_example(seed + i, size, config, caption_config)
        image, label = rasterize(example.scene)
        images[i], labels[i] = np.asarray(image), label
        classes = colour_classes(example.scene)
        label_colours[i, : len(classes)] = classes
        captions.append(example.text)
    return Corpus(images, labels, captions, label_colours)
