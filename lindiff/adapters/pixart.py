"""PixArt-alpha / PixArt-sigma transformers."""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from ..attention.base import LayerInfo
from ..grid import TokenGrid
from .base import LatentGridAdapter


class PixArtAdapter(LatentGridAdapter):
    """``PixArtTransformer2DModel``: self-attention is each block's ``attn1`` (image tokens only);
    the cross-attention ``attn2`` to the T5 tokens stays softmax.

    The grid is the latent ``hidden_states`` ``(B, C, H, W)`` over ``config.patch_size``.
    """

    name = "pixart"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return isinstance(model, PixArtTransformer2DModel)

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return [
            LayerInfo(name=name, module=module, kind="self", grid=grid)
            for name, module in model.named_modules()
            if isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention
        ]
