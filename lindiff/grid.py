"""Token grids: which (T, H, W) arrangement a flat sequence of image tokens has.

Attention layers see tokens as ``(B, N, C)``; methods that work on the grid (local windows,
depthwise convolutions) need its shape. A :class:`TokenGrid` is filled in by a pre-forward hook
on the denoiser from the latent it receives, and answers for any layer by matching the layer's
token count to the latent grid down-sampled by a power of two (UNet levels, DiT patches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GridShape = tuple[int, int, int]


@dataclass
class TokenGrid:
    """The latent grid of the current denoiser call, shared by every converted layer of one model.

    Attributes:
        latent: ``(T, H, W)`` of the denoiser input in latent pixels (``T = 1`` for images), or
            ``None`` before the first call.
        patch_size: spatial size of one token at the finest level (1 for UNets, ``p`` for DiTs).
    """

    latent: GridShape | None = None
    patch_size: int = 1
    _cache: dict[tuple[GridShape, int], GridShape] = field(default_factory=dict, repr=False)

    def update(self, height: int, width: int, frames: int = 1) -> None:
        """Record the latent size of the call that is starting."""
        self.latent = (int(frames), int(height), int(width))

    def set_tokens(self, frames: int, height: int, width: int) -> None:
        """Record an explicit token grid (families that pack tokens, e.g. FLUX's ``img_ids``)."""
        self.latent = (int(frames), int(height), int(width))
        self.patch_size = 1

    def num_tokens(self) -> int:
        """Number of image tokens at the finest level: ``T * ceil(H / p) * ceil(W / p)``.

        Raises:
            RuntimeError: if no denoiser call recorded a grid.
        """
        frames, height, width = self._recorded()
        return frames * math.ceil(height / self.patch_size) * math.ceil(width / self.patch_size)

    def resolve(self, num_tokens: int) -> GridShape:
        """Return ``(T, H, W)`` of a layer that sees ``num_tokens`` image tokens.

        Raises:
            RuntimeError: if no denoiser call recorded a grid, or no down-sampling of it by a
                power of two gives ``num_tokens``.
        """
        key = (self._recorded(), num_tokens)
        if key not in self._cache:
            self._cache[key] = self._match(num_tokens)
        return self._cache[key]

    def _recorded(self) -> GridShape:
        if self.latent is None:
            raise RuntimeError(
                "the token grid is unknown: this layer needs the (H, W) of its tokens, which lindiff "
                "records when the converted denoiser is called; call the model, not the layer alone"
            )
        return self.latent

    def _match(self, num_tokens: int) -> GridShape:
        frames, height, width = self.latent
        factor = self.patch_size
        while factor <= max(height, width) * 2:
            grid = (frames, math.ceil(height / factor), math.ceil(width / factor))
            if grid[0] * grid[1] * grid[2] == num_tokens:
                return grid
            factor *= 2
        raise RuntimeError(
            f"cannot place {num_tokens} tokens on the latent grid {self.latent} "
            f"(patch size {self.patch_size}) at any power-of-two down-sampling"
        )
