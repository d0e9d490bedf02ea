"""What the patchifying video families share (Wan, CogVideoX, HunyuanVideo, SANA-Video).

Their transformers take a 5-D latent and cut it into ``(p_t, p_h, p_w)`` cells at their entry, so
the token grid of a call is the latent's ``(F, H, W)`` floored by the patch, read in the
transformer's forward pre-hook; sizes are multiples of the VAE's spatial factor times the spatial
patch, and the native size is the area of the pipeline's default ``height x width``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..grid import GridShape, TokenGrid
from .base import PIPELINE_PIXEL_MULTIPLE, VideoAdapter, call_default, tensor_argument


def token_grid(latent_shape: torch.Size | tuple[int, int, int], patch: tuple[int, int, int]) -> GridShape:
    """``(T, H, W)`` tokens of a latent of ``(F, H, W)`` pixels cut into ``patch`` ``(p_t, p_h, p_w)``
    cells (floored, as a strided Conv3d patchify)."""
    frames, height, width = (int(n) for n in latent_shape)
    return frames // patch[0], height // patch[1], width // patch[2]


def config_patch(model: nn.Module) -> tuple[int, int, int]:
    """``(p_t, p_h, p_w)`` of ``model.config``: a 3-tuple ``patch_size`` (Wan, SANA-Video), or an int
    ``patch_size`` with ``patch_size_t`` (CogVideoX 1.5, HunyuanVideo; ``None`` or absent: 1)."""
    patch = model.config.patch_size
    if isinstance(patch, (tuple, list)):
        p_t, p_h, p_w = (int(p) for p in patch)
        return p_t, p_h, p_w
    return int(getattr(model.config, "patch_size_t", None) or 1), int(patch), int(patch)


class PatchedVideoAdapter(VideoAdapter):
    """A video family whose transformer patchifies its 5-D ``hidden_states`` at its entry.

    ``title`` names the family in messages; ``frames_first`` says the latent is ``(B, F, C, H, W)``
    (CogVideoX) rather than ``(B, C, F, H, W)``.
    """

    title: ClassVar[str]
    frames_first: ClassVar[bool] = False

    def __init__(self) -> None:
        self.patch_size: tuple[int, int, int] = (1, 2, 2)

    def new_grid(self, model: nn.Module) -> TokenGrid:
        self.patch_size = config_patch(model)
        return TokenGrid(patch_size=1)

    def record_grid(self, grid: TokenGrid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        latent = tensor_argument(args, kwargs, "hidden_states", 0)
        layout = "(B, F, C, H, W)" if self.frames_first else "(B, C, F, H, W)"
        if latent.ndim != 5:
            raise ValueError(
                f"expected the {self.title} transformer's hidden_states as {layout}, got shape "
                f"{tuple(latent.shape)}"
            )
        frames = latent.shape[1] if self.frames_first else latent.shape[2]
        grid.set_tokens(*token_grid((frames, *latent.shape[3:]), self.patch_size))

    def latent_multiple(self, denoiser: nn.Module) -> int:
        _, p_h, p_w = config_patch(denoiser)
        return math.lcm(p_h, p_w)

    def size_multiple(self, pipe: Any) -> int:
        """The VAE's spatial factor times the spatial patch (16 px for these families), and a
        multiple of the pipeline's own pixel rule."""
        vae_factor = int(getattr(pipe, "vae_scale_factor_spatial", PIPELINE_PIXEL_MULTIPLE))
        return math.lcm(vae_factor * self.latent_multiple(pipe.transformer), self.pipeline_pixel_multiple)

    def native_size(self, pipe: Any) -> int:
        """Side of the square with the area of the pipeline's default ``height x width`` (px)."""
        return round(math.sqrt(call_default(pipe, "height") * call_default(pipe, "width")))
