"""Stable Diffusion UNets (SD 1.x, 2.x, XL) and their ControlNets."""

from __future__ import annotations

from typing import Any

from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from ..attention.base import LayerInfo
from ..grid import TokenGrid
from .base import ModelAdapter, first_tensor_argument


class UNetAdapter(ModelAdapter):
    """``UNet2DConditionModel`` and ``ControlNetModel``: self-attention is every ``attn1``.

    The token grid of a layer is the latent ``(H, W)`` halved (rounding up) once per UNet level;
    it is read from ``sample``, the denoiser's first argument.
    """

    name = "unet"
    role = "unet"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return isinstance(model, (UNet2DConditionModel, ControlNetModel))

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return [
            LayerInfo(name=name, module=module, kind="self", grid=grid)
            for name, module in model.named_modules()
            if isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention
        ]

    def record_grid(self, grid: TokenGrid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = first_tensor_argument(args, kwargs, "sample")
        grid.update(height=sample.shape[-2], width=sample.shape[-1])
