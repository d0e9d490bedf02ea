"""Fill styles applied to rendered scenes, used to train and score style LoRAs."""

from __future__ import annotations

import numpy as np

STRIPE_PERIOD = 1 / 4
"""Stripe period in fractions of the image side (32 px at 128 px, four latent pixels of an 8x VAE).

At 1/16 (8 px, one latent pixel) the tiny-shapes VAE flattened the stripes away, and a LoRA
trained on them had nothing to learn."""


def stripes(image: np.ndarray, labels: np.ndarray, period: float = STRIPE_PERIOD) -> np.ndarray:
    """Fill every object with diagonal stripes.

    Args:
        image: ``uint8 (S, S, 3)`` render.
        labels: ``(S, S)`` label map, 0 for background (see :func:`lindiff.data.label_map`).
        period: stripe period in fractions of the side.

    Returns:
        ``uint8 (S, S, 3)``: object pixels alternate between their colour and that colour
        darkened by half (near-black colours are lightened towards white instead).
    """
    if image.ndim != 3 or image.shape[:2] != labels.shape:
        raise ValueError(f"image must be (S, S, 3) matching labels {labels.shape}; got {image.shape}")
    size = labels.shape[0]
    y, x = np.mgrid[:size, :size]
    band = ((x + y) / (period * size)) % 1.0 >= 0.5
    colour = image.astype(np.float32)
    dark = colour.max(axis=-1, keepdims=True) < 64
    shaded = np.where(dark, 0.5 * colour + 127.5, 0.5 * colour)
    on = (labels > 0) & band
    out = np.where(on[..., None], shaded, colour)
    return out.round().astype(np.uint8)
