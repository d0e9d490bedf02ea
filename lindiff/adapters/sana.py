"""SANA transformers (linear-attention DiTs) and their ControlNets."""

from __future__ import annotations

import torch
from diffusers import SanaControlNetModel, SanaTransformer2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from ..attention.base import LayerInfo
from ..attention.processors import SelfAttnProcessor
from ..grid import TokenGrid
from .base import LatentGridAdapter


class SanaSelfAttnProcessor(SelfAttnProcessor):
    """:class:`SelfAttnProcessor` plus what diffusers' ``SanaLinearAttnProcessor2_0`` does after
    the output projection: clip float16 outputs to the finite range."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out.clip(-65504, 65504) if out.dtype == torch.float16 else out


class SanaAdapter(LatentGridAdapter):
    """``SanaTransformer2DModel`` and ``SanaControlNetModel``: self-attention is each block's
    ``attn1`` (ReLU linear attention already); the cross-attention ``attn2`` stays softmax.

    The grid is the latent ``hidden_states`` ``(B, C, H, W)`` over ``config.patch_size``.
    """

    name = "sana"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return isinstance(model, (SanaTransformer2DModel, SanaControlNetModel))

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return [
            LayerInfo(name=name, module=module, kind="self", grid=grid)
            for name, module in model.named_modules()
            if isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention
        ]

    def processor(self, layer: LayerInfo) -> SanaSelfAttnProcessor:
        return SanaSelfAttnProcessor()
