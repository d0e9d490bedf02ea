"""SANA transformers (linear-attention DiTs) and their ControlNets."""

from __future__ import annotations

from diffusers import SanaControlNetModel, SanaTransformer2DModel
from torch import nn

from ..attention.base import LayerInfo
from ..grid import TokenGrid
from .base import LatentGridAdapter, attn1_layers
from .processors import SelfAttnProcessor


class SanaSelfAttnProcessor(SelfAttnProcessor):
    """:class:`SelfAttnProcessor` plus what diffusers' ``SanaLinearAttnProcessor2_0`` does after
    the output projection: clip float16 outputs to the finite range."""

    clip_float16 = True


class SanaAdapter(LatentGridAdapter):
    """``SanaTransformer2DModel`` and ``SanaControlNetModel``: self-attention is each block's
    ``attn1`` (ReLU linear attention already); the cross-attention ``attn2`` stays softmax.

    The grid is the latent ``hidden_states`` ``(B, C, H, W)`` over ``config.patch_size``. SANA's
    pipelines accept only multiples of 32 px.
    """

    name = "sana"
    models = (SanaTransformer2DModel,)
    controlnets = (SanaControlNetModel,)
    pipeline_pixel_multiple = 32

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return attn1_layers(model, grid)

    def processor(self, layer: LayerInfo) -> SanaSelfAttnProcessor:
        return SanaSelfAttnProcessor()
