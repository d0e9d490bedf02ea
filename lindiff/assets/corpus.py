"""Rendered training examples of the shapes world, held in memory as arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import CaptionConfig, ShapesConfig, make_example, rasterize
from ..data.styles import stripes


@dataclass
class Corpus:
    """``len(captions)`` examples with seeds ``seed .. seed + n - 1``.

    Attributes:
        images: ``uint8 (N, S, S, 3)``.
        labels: ``uint8 (N, S, S)`` label maps (0 background, ``j + 1`` object ``j``).
        captions: one caption per image.
    """

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]

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

    def striped(self) -> Corpus:
        """The same scenes with striped fills (:func:`lindiff.data.styles.stripes`)."""
        images = np.stack([stripes(i, lab) for i, lab in zip(self.images, self.labels, strict=False)])
        return Corpus(images, self.labels, self.captions)


def render_corpus(
    count: int, seed: int, size: int, config: ShapesConfig, caption_config: CaptionConfig | None = None
) -> Corpus:
    """Render ``count`` examples (``make_example(seed + i)``) at ``size`` px."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty((count, size, size), dtype=np.uint8)
    captions = []
    for i in tqdm(range(count), desc="render", leave=False, mininterval=2.0):
        example = make_example(seed + i, size, config, caption_config)
        image, label = rasterize(example.scene)
        images[i], labels[i] = np.asarray(image), label
        captions.append(example.text)
    return Corpus(images, labels, captions)
