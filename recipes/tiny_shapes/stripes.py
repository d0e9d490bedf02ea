"""Diagonal stripes inside the objects of scenes: the style of the stripes LoRA's corpus, and a
corruption the benchmark classifier trains under (the LoRA draws them)."""

from __future__ import annotations

import numpy as np
import torch

from lindiff.data import RGB, SHAPE_COLOURS, Scene

STRIPE_PERIOD = 1 / 4
"""Period of the corpus's stripes in fractions of the image side: 32 px at 128 px, four latent
pixels of the 8x VAE (a VAE flattens stripes of one latent pixel)."""

LIGHTENED = torch.tensor([False] + [max(RGB[colour]) < 64 for colour in SHAPE_COLOURS])
"""``bool (1 + len(SHAPE_COLOURS),)`` per colour class: whether its stripes mix with white instead
of black (colours darker than 64 in every channel: black)."""


def colour_classes(scene: Scene) -> np.ndarray:
    """``int64 (1 + len(scene.objects),)``: the colour class of each label of the scene's label map,
    0 for the background, ``1 + SHAPE_COLOURS.index(colour)`` for object ``j`` (label ``j + 1``)."""
    return np.array([0] + [1 + SHAPE_COLOURS.index(obj.colour) for obj in scene.objects])


def stripes(
    images: torch.Tensor,
    colours: torch.Tensor,
    period: torch.Tensor,
    phase: torch.Tensor,
    direction: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """Fill the objects with diagonal stripes: every other band is mixed half with black, or with
    white for the colours of :data:`LIGHTENED`.

    Args:
        images: ``float32 (B, 3, H, W)``, black at ``value_range[0]`` and white at ``value_range[1]``.
        colours: ``int64 (B, H, W)`` colour classes (:func:`colour_classes` of each label).
        period, phase: ``(B,)`` in pixels; a pixel ``(x, y)`` is mixed when
            ``(x + direction * y + phase) mod period < period / 2``.
        direction: ``(B,)``, 1 or -1: the bands run down to the left or to the right.
        value_range: the values of black and white in ``images``.

    Returns:
        ``float32 (B, 3, H, W)``; background pixels and the other bands are ``images``'.
    """
    batch, channels, height, width = images.shape
    if channels != 3 or colours.shape != (batch, height, width):
        raise ValueError(
            f"images must be (B, 3, H, W) matching colours (B, H, W) {tuple(colours.shape)}; "
            f"got {tuple(images.shape)}"
        )
    period, phase, direction = (value.view(-1, 1, 1) for value in (period, phase, direction))
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    band = torch.remainder(xs + direction * ys + phase, period) < 0.5 * period
    black, white = value_range
    lightened = LIGHTENED[colours][:, None]
    mixed = 0.5 * images + torch.where(lightened, 0.5 * white, 0.5 * black)
    return torch.where((band & (colours > 0))[:, None], mixed, images)
