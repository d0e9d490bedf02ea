"""Scores of generated shape images: prompt and position accuracy, Fréchet distance, mask IoU, stripes.

Prompt accuracy follows GenEval (every named object present with the right colour, shape and
exact count) but is stricter about extra objects: a caption of the shapes world names every
object in the scene, so any object that the caption does not name, of a named kind or not,
makes the image wrong.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lindiff.data import SceneSpec, relation_holds, to_tensor

from .detection import DetectedObject

EVAL_SEEDS = 10_000_000
"""Seed of the benchmark's first prompt, ``make_example(EVAL_SEEDS + i)``: the generator trains on
seeds below 1_000_000 and the classifier from 30_000_000, so no prompt was seen in training."""

POSITION_SEPARATION = 0.1
"""Default ``min_separation`` of :func:`position_correct`: half the captioner's 0.2, so a relation
that was plain to see in the prompt's scene need not be exaggerated in the generated one."""


def prompt_correct(spec: SceneSpec, objects: Sequence[DetectedObject]) -> bool:
    """Whether the objects are exactly those ``spec`` names: same (colour, shape) kinds, same counts."""
    said = Counter({(group.colour, group.shape): group.count for group in spec.groups})
    return Counter((obj.colour, obj.shape) for obj in objects) == said


def position_correct(
    spec: SceneSpec, objects: Sequence[DetectedObject], min_separation: float = POSITION_SEPARATION
) -> bool | None:
    """Whether the relation of ``spec`` holds between the detected objects; ``None`` without a relation.

    Both named kinds must be present, and every object of the first kind must stand in the
    relation to every object of the second (:func:`lindiff.data.relation_holds`); objects of
    other kinds and the counts are ignored here (:func:`prompt_correct` checks them).
    """
    if spec.relation is None:
        return None
    first, second = (
        [obj.center for obj in objects if (obj.colour, obj.shape) == (group.colour, group.shape)]
        for group in spec.groups
    )
    if not first or not second:
        return False
    return all(relation_holds(a, b, spec.relation, min_separation) for a in first for b in second)


def prompt_scores(
    specs: Sequence[SceneSpec],
    detections: Sequence[Sequence[DetectedObject]],
    min_separation: float = POSITION_SEPARATION,
) -> dict[str, float | int | list | None]:
    """Prompt and position accuracy of images whose prompts state ``specs``.

    Returns:
        ``prompt_accuracy`` (fraction of all images), ``position_accuracy`` (fraction of the
        images whose spec has a relation; ``None`` if none has), ``num_prompts``,
        ``num_with_relation``, and per image ``prompt_correct`` and ``position_correct``.
    """
    if len(specs) != len(detections):
        raise ValueError(
            f"specs and detections must have the same length; got {len(specs)} and {len(detections)}"
        )
    prompt = [prompt_correct(spec, objects) for spec, objects in zip(specs, detections, strict=True)]
    position = [
        position_correct(spec, objects, min_separation)
        for spec, objects in zip(specs, detections, strict=True)
    ]
    related = [p for p in position if p is not None]
    return {
        "prompt_accuracy": sum(prompt) / len(prompt) if prompt else None,
        "position_accuracy": sum(related) / len(related) if related else None,
        "num_prompts": len(prompt),
        "num_with_relation": len(related),
        "prompt_correct": prompt,
        "position_correct": position,
    }


def _features(name: str, features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be (N, F) with N >= 2 samples; got shape {features.shape}")
    return features


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets, each ``(N, F)``.

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a^1/2 C_b C_a^1/2)^1/2)``, with square roots
    from symmetric eigendecompositions (float64). Like FID it is biased upwards for small N.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same F; got {a.shape[1]} and {b.shape[1]}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (middle + middle.T)), 0.0, None)).sum()
    distance = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    return float(max(distance, 0.0))


def _bool_mask(name: str, mask: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    """A boolean ``(H, W)`` array; images count pixels brighter than half as on."""
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L")) > 127
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or a PIL image; got shape {mask.shape}")
    return mask.astype(bool)


def mask_iou(
    pred_mask: np.ndarray | torch.Tensor, condition_mask: np.ndarray | torch.Tensor | Image.Image
) -> float:
    """Intersection over union of two ``(H, W)`` masks (a condition image counts its white pixels).

    The condition is resized to the predicted mask's size first (box filter, on where at least
    half on). Two empty masks give 1.
    """
    pred = _bool_mask("pred_mask", pred_mask)
    condition = _bool_mask("condition_mask", condition_mask)
    if condition.shape != pred.shape:
        resized = Image.fromarray(condition.astype(np.uint8) * 255).resize(
            (pred.shape[1], pred.shape[0]), Image.Resampling.BOX
        )
        condition = np.asarray(resized) >= 128
    union = np.logical_or(pred, condition).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, condition).sum() / union)


def stripe_score(
    image: torch.Tensor | Image.Image,
    mask: np.ndarray | torch.Tensor,
    erosion: int = 2,
    min_pixels: int = 16,
) -> float:
    """How much the luminance varies inside objects: ~0 for flat fills, ~0.1-0.2 for stripes.

    Args:
        image: ``(3, H, W)`` in ``[-1, 1]`` or a PIL image; resized to the mask's size.
        mask: one object's pixels ``bool (h, w)``, or several objects ``bool (N, h, w)``.
        erosion: pixels taken off each mask's border first (edges are blurry in any image).
        min_pixels: objects with fewer pixels left are skipped.

    Returns:
        The standard deviation of luminance (in ``[0, 1]`` units) inside each eroded mask,
        averaged over the objects; NaN when no object is left.
    """
    if isinstance(image, Image.Image):
        image = to_tensor(image.convert("RGB"))
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError("image must be a (3, H, W) tensor in [-1, 1] or a PIL image")
    masks = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    masks = masks[None] if masks.ndim == 2 else masks
    if masks.ndim != 3:
        raise ValueError(f"mask must be (h, w) or (N, h, w); got shape {tuple(masks.shape)}")
    image = image.detach().float().cpu()
    if image.shape[1:] != masks.shape[1:]:
        image = F.interpolate(image[None], size=masks.shape[1:], mode="bilinear", antialias=True)[0]
    luminance = (torch.tensor([0.299, 0.587, 0.114]) @ (image.clamp(-1, 1) * 0.5 + 0.5).flatten(1)).view(
        masks.shape[1:]
    )
    if erosion > 0:
        masks = -F.max_pool2d(-masks[:, None].float(), 2 * erosion + 1, stride=1, padding=erosion)[:, 0] > 0.5
    scores = [float(luminance[m].std()) for m in masks if int(m.sum()) >= max(min_pixels, 2)]
    return sum(scores) / len(scores) if scores else math.nan
