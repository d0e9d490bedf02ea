"""Objects in shape images: per-pixel colours -> connected components -> coloured, shaped objects.

Object pixels are those whose most likely colour class (logits upsampled bilinearly to
``size``) is not the background. Their 8-connected components are the objects (shapes of this
world never touch); components smaller than ``min_area`` are dropped, each remaining one takes
the colour with the largest summed probability over its pixels, and its mask is named a shape
(by the classifier's silhouette network). Voting per object, as GenEval classifies the colour
of a whole detected object, keeps a few wrongly coloured pixels (blurry edges, stripes) from
splitting an object in two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lindiff.data import to_tensor

from .classifier import ShapeClassifier

DETECTION_SIZE = 128
"""Default side, in pixels, of the maps that objects are found on (and of their masks)."""

MIN_AREA = 0.004
"""Default smallest object, in fractions of the image area (the smallest drawn shape covers ~0.013)."""


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image.

    Attributes:
        colour: a colour name of the classifier.
        shape: a shape name of the classifier.
        center: ``(x, y)`` centroid in fractions of the image side, y down.
        box: ``(x0, y0, x1, y1)`` in fractions of the image side (end exclusive).
        area: pixel count over the image's pixel count.
        mask: ``bool (size, size)``, the object's pixels.
    """

    colour: str
    shape: str
    center: tuple[float, float]
    box: tuple[float, float, float, float]
    area: float
    mask: np.ndarray


def connected_components(classes: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of equal, non-zero class in one map.

    Pixels are grouped into horizontal runs of one class; runs that touch (diagonally included)
    in consecutive rows with the same class are merged by label propagation over the run graph.

    Args:
        classes: ``int (H, W)``; 0 is background.

    Returns:
        ``int64 (H, W)`` labels (0 on background, ``1..n`` numbered in raster order of first
        pixel) and ``n``.
    """
    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise ValueError(f"classes must be (H, W); got shape {classes.shape}")
    height, width = classes.shape
    starts = np.ones((height, width), dtype=bool)
    starts[:, 1:] = classes[:, 1:] != classes[:, :-1]
    run_of = np.cumsum(starts.ravel()).reshape(height, width) - 1
    run_class = classes.ravel()[np.flatnonzero(starts)]
    # Pairs of runs in consecutive rows that touch: pixel (r, c) and (r - 1, c + d), d in -1..1.
    pairs = []
    for shift in (-1, 0, 1):
        below = classes[1:, max(0, -shift) : width - max(0, shift)]
        above = classes[:-1, max(0, shift) : width - max(0, -shift)]
        touch = (below == above) & (below > 0)
        pairs.append(
            np.stack(
                [
                    run_of[1:, max(0, -shift) : width - max(0, shift)][touch],
                    run_of[:-1, max(0, shift) : width - max(0, -shift)][touch],
                ]
            )
        )
    first, second = np.unique(np.concatenate(pairs, axis=1), axis=1)
    root = np.arange(len(run_class))
    while True:
        merged = root.copy()
        np.minimum.at(merged, first, root[second])
        np.minimum.at(merged, second, root[first])
        merged = merged[merged]
        if np.array_equal(merged, root):
            break
        root = merged
    foreground = run_class > 0
    roots = np.unique(root[foreground])
    number = np.zeros(len(run_class), dtype=np.int64)
    number[roots] = np.arange(1, len(roots) + 1)
    run_label = np.where(foreground, number[root], 0)
    return run_label[run_of], len(roots)


def detect_from_logits(
    colour_logits: torch.Tensor,
    colours: Sequence[str],
    name_shapes: Callable[[np.ndarray], Sequence[str]],
    *,
    size: int | None = DETECTION_SIZE,
    min_area: float = MIN_AREA,
) -> list[list[DetectedObject]]:
    """Objects from per-pixel colour logits (the classifier's, or one-hot ground truth).

    Args:
        colour_logits: ``(B, 1 + len(colours), H, W)``; class 0 is the background.
        colours: the colour names.
        name_shapes: the shape names of objects given as masks ``bool (N, size, size)``
            (called once, with the objects of all images).
        size: side the logits are resized to (bilinearly) before the argmax; ``None`` keeps ``H, W``.
        min_area: components smaller than this fraction of the image are dropped.

    Returns:
        Per image, its objects, largest first.
    """
    if (
        not isinstance(colour_logits, torch.Tensor)
        or colour_logits.ndim != 4
        or colour_logits.shape[1] != 1 + len(colours)
    ):
        shape = (
            tuple(colour_logits.shape)
            if isinstance(colour_logits, torch.Tensor)
            else type(colour_logits).__name__
        )
        raise ValueError(f"colour_logits must be a (B, {1 + len(colours)}, H, W) tensor; got {shape}")
    if not 0.0 <= min_area < 1.0:
        raise ValueError(f"min_area must be in [0, 1); got {min_area!r}")
    colour_logits = colour_logits.detach().float().cpu()
    if size is not None and colour_logits.shape[-2:] != (size, size):
        colour_logits = F.interpolate(colour_logits, size=(size, size), mode="bilinear")
    colour_probs = colour_logits.softmax(dim=1)
    all_foreground = (colour_probs.argmax(dim=1) > 0).numpy()
    all_colour_probs = colour_probs[:, 1:].numpy()
    height, width = all_foreground.shape[1:]
    ys, xs = np.mgrid[0:height, 0:width]
    xs, ys = (xs.ravel() + 0.5) / width, (ys.ravel() + 0.5) / height
    found: list[list[dict]] = []
    for foreground, probs in zip(all_foreground, all_colour_probs, strict=True):
        labels, count = connected_components(foreground)
        flat = labels.ravel()
        area = np.bincount(flat, minlength=count + 1)
        votes = np.stack([np.bincount(flat, p.ravel(), count + 1) for p in probs], axis=1)
        center_x = np.bincount(flat, xs, count + 1) / np.maximum(area, 1)
        center_y = np.bincount(flat, ys, count + 1) / np.maximum(area, 1)
        objects = []
        for label in sorted(range(1, count + 1), key=lambda k: -area[k]):
            if area[label] < max(1.0, min_area * height * width):
                continue
            mask = labels == label
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            objects.append(
                {
                    "colour": colours[int(votes[label].argmax())],
                    "center": (float(center_x[label]), float(center_y[label])),
                    "box": (
                        float(cols[0] / width),
                        float(rows[0] / height),
                        float((cols[-1] + 1) / width),
                        float((rows[-1] + 1) / height),
                    ),
                    "area": float(area[label] / (height * width)),
                    "mask": mask,
                }
            )
        found.append(objects)
    masks = [obj["mask"] for objects in found for obj in objects]
    names = iter(name_shapes(np.stack(masks)) if masks else [])
    return [[DetectedObject(shape=next(names), **obj) for obj in objects] for objects in found]


def as_batch(images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    """``images`` as a float ``(B, 3, H, W)`` tensor in ``[-1, 1]``: a tensor passes through, PIL images are stacked.

    PIL images must share one size.
    """
    if isinstance(images, torch.Tensor):
        return images
    if not images or not all(isinstance(image, Image.Image) for image in images):
        raise ValueError("images must be a (B, 3, H, W) tensor or a non-empty sequence of PIL images")
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise ValueError(f"images must all have one size; got {sorted(sizes)}")
    return torch.stack([to_tensor(image.convert("RGB")) for image in images])


@torch.no_grad()
def shape_names(classifier: ShapeClassifier, masks: np.ndarray) -> list[str]:
    """The shape names ``classifier`` gives objects' masks ``bool (N, H, W)`` (its silhouette network)."""
    logits = torch.cat([classifier.shape_logits(chunk) for chunk in torch.from_numpy(masks).split(256)])
    return [classifier.shapes[index] for index in logits.argmax(dim=1).tolist()]


@torch.no_grad()
def detect_objects(
    classifier: ShapeClassifier,
    images: torch.Tensor | Sequence[Image.Image],
    *,
    size: int | None = DETECTION_SIZE,
    min_area: float = MIN_AREA,
    batch_size: int = 32,
) -> list[list[DetectedObject]]:
    """Find the objects of ``images`` (``(B, 3, H, W)`` in ``[-1, 1]``, or PIL images) with ``classifier``.

    See :func:`detect_from_logits` for ``size`` and ``min_area``; masks are ``(size, size)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    images = as_batch(images)
    name_shapes = functools.partial(shape_names, classifier)
    results: list[list[DetectedObject]] = []
    for start in range(0, images.shape[0], batch_size):
        colour_logits = classifier(images[start : start + batch_size]).colour_logits
        results.extend(
            detect_from_logits(colour_logits, classifier.colours, name_shapes, size=size, min_area=min_area)
        )
    return results
