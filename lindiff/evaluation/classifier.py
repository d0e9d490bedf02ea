"""A small classifier of shape images: the colour of every pixel, the shape of every object, image features.

Two parts, saved together:

- a fully-convolutional encoder-decoder (a small U-Net with additive skips) labels every pixel
  with a colour or the background. Inputs are resized to ``input_size`` pixels (128 by
  default; the shapes world is resolution-free), the U-Net runs at half that size down to a
  bottleneck that sees the whole image (it has to: a white pixel is an object on a gray
  background but background on a white one). A per-pixel head reads, at each half-size
  position, the U-Net features and the 2x2 block of full-size pixels, as they are and relative
  to the colour of the image border (the background's: shapes keep a margin), and names all
  four pixels: edges and corners stay sharp, and absolute colours are never lost to GroupNorm
  (the first level is not normalised either). The pooled bottleneck gives the features of
  Fréchet distances.
- a silhouette network names the shape of one object from its mask, cropped around the object
  and resized to ``silhouette_size``. A whole silhouette is a much easier target than the shape
  of each pixel, and it does not care about colours, stripes or blur.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from lindiff.data import SHAPE_COLOURS, SHAPES

SILHOUETTE_MARGIN = 1.15
"""A silhouette crop is the object's box, made square and grown by this factor."""


@dataclass
class ClassifierOutput(BaseOutput):
    """Per-pixel colour logits ``(B, 1 + len(colours), S, S)`` at ``input_size``; class 0 is the background."""

    colour_logits: torch.Tensor


def _conv_block(channels_in: int, channels_out: int, groups: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution -> GroupNorm -> SiLU."""
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False),
        nn.GroupNorm(groups, channels_out),
        nn.SiLU(),
    )


def crop_silhouettes(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Each mask's object, centred in a square crop (its box grown by :data:`SILHOUETTE_MARGIN`).

    Args:
        masks: ``(N, H, W)``, bool or in ``[0, 1]``.
        size: side of the crops in pixels.

    Returns:
        ``float32 (N, 1, size, size)`` in ``[0, 1]`` (bilinear samples); an empty mask gives an empty crop.
    """
    masks = masks.float()
    count, height, width = masks.shape
    rows, cols = masks.amax(dim=2) > 0.5, masks.amax(dim=1) > 0.5
    index_y = torch.arange(height, device=masks.device)
    index_x = torch.arange(width, device=masks.device)
    y0 = torch.where(rows, index_y, height).amin(dim=1)
    y1 = torch.where(rows, index_y, -1).amax(dim=1) + 1
    x0 = torch.where(cols, index_x, width).amin(dim=1)
    x1 = torch.where(cols, index_x, -1).amax(dim=1) + 1
    empty = y1 <= y0
    half = torch.where(empty, 1.0, torch.maximum((x1 - x0) / width, (y1 - y0) / height) * SILHOUETTE_MARGIN)
    zero = torch.zeros_like(half)
    theta = torch.stack(
        [
            torch.stack([half, zero, torch.where(empty, 0.0, (x0 + x1) / width - 1.0)], dim=1),
            torch.stack([zero, half, torch.where(empty, 0.0, (y0 + y1) / height - 1.0)], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [count, 1, size, size], align_corners=False)
    return F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ShapeClassifier(ModelMixin, ConfigMixin):
    """Per-pixel colour classifier and per-object silhouette shape classifier, with image features.

    Args:
        colours: names of the object colours, in logit order after the background class.
        shapes: names of the shapes, in logit order.
        widths: channels per level of the colour U-Net, from ``input_size / 2`` down; each level
            after the first halves the resolution, so ``input_size`` must be divisible by
            ``2 ** len(widths)``.
        input_size: side, in pixels, that every image is resized to, and of the colour logits.
        silhouette_widths: channels per level of the silhouette network; each level halves
            the resolution of the ``silhouette_size`` crop.
        silhouette_size: side of a silhouette crop, divisible by ``2 ** len(silhouette_widths)``.
        norm_groups: GroupNorm groups; every width must be divisible by it.
    """

    @register_to_config
    def __init__(
        self,
        colours: Sequence[str] = SHAPE_COLOURS,
        shapes: Sequence[str] = SHAPES,
        widths: Sequence[int] = (16, 24, 48, 64, 96),
        input_size: int = 128,
        silhouette_widths: Sequence[int] = (16, 32, 64),
        silhouette_size: int = 32,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        widths, silhouette_widths = tuple(int(w) for w in widths), tuple(int(w) for w in silhouette_widths)
        for name, values in (("widths", widths), ("silhouette_widths", silhouette_widths)):
            if len(values) < 2 or any(w < 1 or w % norm_groups for w in values):
                raise ValueError(
                    f"{name} must be at least 2 positive multiples of norm_groups={norm_groups}; got {values!r}"
                )
        for name, value, factor in (
            ("input_size", input_size, 2 ** len(widths)),
            ("silhouette_size", silhouette_size, 2 ** len(silhouette_widths)),
        ):
            if value < 1 or value % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor}; got {value!r}")
        if not colours or not shapes:
            raise ValueError(f"colours and shapes must be non-empty; got {colours!r} and {shapes!r}")
        # No normalisation on the first level, so absolute colours reach the deeper features.
        self.encoder = nn.ModuleList([nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.SiLU())])
        for previous, width in pairwise(widths):
            self.encoder.append(
                nn.Sequential(
                    _conv_block(previous, width, norm_groups, stride=2),
                    _conv_block(width, width, norm_groups),
                )
            )
        self.context = nn.Linear(widths[-1] + 6, widths[-1])
        self.lateral = nn.ModuleList(nn.Conv2d(w_in, w_out, 1) for w_out, w_in in pairwise(widths))
        self.decoder = nn.ModuleList(_conv_block(w, w, norm_groups) for w in widths[:-1])
        # Per-pixel layers on channels-last tensors: plain GEMMs, much faster on CPUs than 1x1 convolutions.
        self.head = nn.Sequential(nn.Linear(widths[0] + 24, 2 * widths[0]), nn.SiLU())
        self.colour_head = nn.Linear(2 * widths[0], 4 * (1 + len(colours)))
        levels = [nn.Conv2d(1, silhouette_widths[0], 3, padding=1), nn.SiLU()]
        for previous, width in pairwise((silhouette_widths[0], *silhouette_widths)):
            levels += [
                _conv_block(previous, width, norm_groups, stride=2),
                _conv_block(width, width, norm_groups),
            ]
        side = silhouette_size // 2 ** len(silhouette_widths)
        levels += [nn.Flatten(), nn.Linear(silhouette_widths[-1] * side * side, len(shapes))]
        self.silhouette = nn.Sequential(*levels)

    @property
    def colours(self) -> tuple[str, ...]:
        """Object colour names; colour class ``1 + i`` is ``colours[i]``, class 0 the background."""
        return tuple(self.config.colours)

    @property
    def shapes(self) -> tuple[str, ...]:
        """Shape names in logit order."""
        return tuple(self.config.shapes)

    @property
    def feature_dim(self) -> int:
        """Length ``F`` of :meth:`features`."""
        return int(self.config.widths[-1])

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check ``images`` ``(B, 3, H, W)`` in ``[-1, 1]`` and resize them to ``(B, 3, S, S)``, ``S = input_size``."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, H, W) tensor in [-1, 1]; got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1]; got dtype {images.dtype}")
        images = images.to(device=self.device, dtype=self.dtype)
        size = self.config.input_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        return images

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The resized images, their border colour ``(B, 3)`` and the U-Net's feature maps, finest first.

        The border colour (the mean of the outermost 2 pixels, where shapes never reach) is the
        background's. The last level gets a global context: a projection of its own spatial
        mean, the image's mean colour and the border colour.
        """
        images = self.prepare(images)
        inner = images[:, :, 2:-2, 2:-2]
        border = (images.sum(dim=(2, 3)) - inner.sum(dim=(2, 3))) / (
            images[0, 0].numel() - inner[0, 0].numel()
        )
        x, levels = F.avg_pool2d(images, 2), []
        for block in self.encoder:
            x = block(x)
            levels.append(x)
        bottom = levels[-1]
        summary = torch.cat([bottom.mean(dim=(2, 3)), images.mean(dim=(2, 3)), border], dim=1)
        levels[-1] = bottom + self.context(summary)[:, :, None, None]
        return images, border, levels

    def forward(self, images: torch.Tensor) -> ClassifierOutput:
        """Per-pixel colour logits of ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``, at ``input_size``."""
        images, border, levels = self._encode(images)
        x = levels[-1]
        for index in reversed(range(len(self.decoder))):
            x = F.interpolate(self.lateral[index](x), scale_factor=2.0, mode="nearest")
            x = self.decoder[index](x + levels[index])
        # Each half-size position sees its 2x2 block of full-size pixels, also relative to the
        # background colour, and names all four.
        block = F.pixel_unshuffle(images, 2)
        relative = block - border.repeat_interleave(4, dim=1)[:, :, None, None]
        x = torch.cat([x, block, relative], dim=1).permute(0, 2, 3, 1)
        logits = self.colour_head(self.head(x)).permute(0, 3, 1, 2)
        return ClassifierOutput(colour_logits=F.pixel_shuffle(logits, 2))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Bottleneck features averaged over space, ``(B, F)`` with ``F = feature_dim``, for Fréchet distances."""
        return self._encode(images)[2][-1].mean(dim=(2, 3))

    def shape_logits(self, masks: torch.Tensor | np.ndarray, crops: bool = False) -> torch.Tensor:
        """Shape logits ``(N, len(shapes))`` of objects given by their masks ``(N, H, W)`` (bool or ``[0, 1]``).

        With ``crops=True``, ``masks`` are already silhouette crops ``(N, 1, s, s)`` from
        :func:`crop_silhouettes` with ``s = silhouette_size``.
        """
        masks = torch.as_tensor(masks)
        if crops:
            expected = (1, self.config.silhouette_size, self.config.silhouette_size)
            if masks.ndim != 4 or tuple(masks.shape[1:]) != expected:
                raise ValueError(
                    f"crops must be (N, {', '.join(map(str, expected))}); got {tuple(masks.shape)}"
                )
        elif masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W); got shape {tuple(masks.shape)}")
        else:
            masks = crop_silhouettes(masks.to(self.device), self.config.silhouette_size)
        return self.silhouette(masks.to(device=self.device, dtype=self.dtype) * 2.0 - 1.0)
