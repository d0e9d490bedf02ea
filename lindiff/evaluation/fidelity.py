"""Chain fidelity: whether the high-resolution chain keeps the content of its native stage.

``HighResPipeline`` renders at the native size first, then re-denoises upscaled copies of that
image (SDEdit stages). Prompt accuracy of the final image alone can hide what the stages add: a
large star redrawn as a cluster of small stars still passes as "a star" when the classifier
sees the whole image shrunk. Here the final image, downsampled to the native size (area
average), is compared with the native stage's image, both through the classifier:

- pixel agreement: the fraction of pixels whose most likely colour class (background included)
  is the same in both colour maps (at the classifier's ``input_size``);
- objects (:func:`~lindiff.evaluation.detect_from_logits` on the same logits): per
  ``(colour, shape)`` kind, the final image's count minus the native stage's where positive,
  summed, are its extra objects; the other way round, its missing objects.

    fidelity = chain_fidelity(classifier, output.stages[0], output.images)   # tensors, or PIL lists
    fidelity.summary()   # {"pixel_agreement": ..., "no_extra_objects": ..., "same_objects": ..., ...}
"""

from __future__ import annotations

import functools
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .classifier import ShapeClassifier
from .detection import MIN_AREA, as_batch, detect_from_logits, shape_names


@dataclass(frozen=True)
class ChainFidelity:
    """How well the final images of a batch keep their native stage's content, per image.

    Attributes:
        pixel_agreement: the fraction of colour-map pixels whose argmax class (background
            included) agrees between the downsampled final image and the native stage.
        extra_objects: objects of the final image not matched in the native stage: per
            ``(colour, shape)``, the final count minus the native count where positive, summed.
        missing_objects: objects of the native stage not matched in the final image (the
            native count minus the final count where positive, summed).
    """

    pixel_agreement: tuple[float, ...]
    extra_objects: tuple[int, ...]
    missing_objects: tuple[int, ...]

    def __post_init__(self) -> None:
        lengths = {len(self.pixel_agreement), len(self.extra_objects), len(self.missing_objects)}
        if len(lengths) != 1:
            raise ValueError(
                "pixel_agreement, extra_objects and missing_objects must have one length; got "
                f"{len(self.pixel_agreement)}, {len(self.extra_objects)} and {len(self.missing_objects)}"
            )

    def __len__(self) -> int:
        return len(self.pixel_agreement)

    @property
    def same_objects(self) -> tuple[bool, ...]:
        """Per image, whether both show the same ``(colour, shape)`` multiset (no extra, none missing)."""
        return tuple(
            extra == 0 and missing == 0
            for extra, missing in zip(self.extra_objects, self.missing_objects, strict=True)
        )

    def summary(self) -> dict[str, float | int]:
        """Means over the images: ``pixel_agreement``, the shares with ``no_extra_objects``,
        ``no_missing_objects`` and ``same_objects``, and ``num_images``."""
        return {
            "pixel_agreement": statistics.fmean(self.pixel_agreement),
            "no_extra_objects": statistics.fmean(extra == 0 for extra in self.extra_objects),
            "no_missing_objects": statistics.fmean(missing == 0 for missing in self.missing_objects),
            "same_objects": statistics.fmean(self.same_objects),
            "num_images": len(self),
        }


def downsample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``images`` ``(B, 3, H, W)`` averaged over areas to ``(B, 3, *size)`` (float32); unchanged at ``size``."""
    images = images.float()
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="area")


def _check_images(name: str, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    images = as_batch(images)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"{name} must be a non-empty float (B, 3, H, W) batch in [-1, 1] or PIL images; "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    return images


@torch.no_grad()
def chain_fidelity(
    classifier: ShapeClassifier,
    native: torch.Tensor | Sequence[Image.Image],
    final: torch.Tensor | Sequence[Image.Image],
    *,
    min_area: float = MIN_AREA,
    batch_size: int = 32,
) -> ChainFidelity:
    """Compare each final image of a high-resolution chain with its native stage.

    Args:
        classifier: the :class:`ShapeClassifier` whose colour maps and shapes are compared.
        native: the native stage, ``(B, 3, h, w)`` in ``[-1, 1]`` or ``B`` PIL images of one size.
        final: the final images, ``(B, 3, H, W)`` with ``H >= h`` and ``W >= w``, or PIL images;
            they are area-averaged to ``(h, w)`` before the classifier sees them.
        min_area: the smallest object, as in :func:`~lindiff.evaluation.detect_from_logits`.
        batch_size: images per classifier call.

    Returns:
        A :class:`ChainFidelity` with one entry per image.

    Raises:
        ValueError: a batch is not ``(B, 3, H, W)`` images, the batch sizes differ, or ``final``
            is smaller than ``native`` on a side.
    """
    native, final = _check_images("native", native), _check_images("final", final)
    if native.shape[0] != final.shape[0]:
        raise ValueError(
            f"native and final must hold the same number of images; got {native.shape[0]} and {final.shape[0]}"
        )
    (height, width), (final_height, final_width) = native.shape[-2:], final.shape[-2:]
    if final_height < height or final_width < width:
        raise ValueError(
            f"final ({final_height}x{final_width} px) must be at least as large as native "
            f"({height}x{width} px) on both sides"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    detect = functools.partial(
        detect_from_logits,
        colours=classifier.colours,
        name_shapes=functools.partial(shape_names, classifier),
        min_area=min_area,
    )
    agreement, extra, missing = [], [], []
    for start in range(0, native.shape[0], batch_size):
        before = classifier(native[start : start + batch_size]).colour_logits
        after = classifier(downsample(final[start : start + batch_size], (height, width))).colour_logits
        agreement += (before.argmax(dim=1) == after.argmax(dim=1)).float().mean(dim=(1, 2)).tolist()
        for first, last in zip(detect(before), detect(after), strict=True):
            kinds_before = Counter((obj.colour, obj.shape) for obj in first)
            kinds_after = Counter((obj.colour, obj.shape) for obj in last)
            extra.append((kinds_after - kinds_before).total())
            missing.append((kinds_before - kinds_after).total())
    return ChainFidelity(tuple(agreement), tuple(extra), tuple(missing))
