"""Stable Diffusion UNets (SD 1.x, 2.x, XL) and their ControlNets."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from ..attention.base import LayerInfo
from ..grid import TokenGrid
from .base import (
    CONTROL,
    Batch,
    MicroConditions,
    ModelAdapter,
    attn1_layers,
    micro_tensor,
    tensor_argument,
)


class UNetAdapter(ModelAdapter):
    """``UNet2DConditionModel`` and ``ControlNetModel``: self-attention is every ``attn1``.

    The token grid of a layer is the latent ``(H, W)`` halved (rounding up) once per UNet level;
    it is read from ``sample``, the denoiser's first argument. Any latent size works (the UNet
    up-samples to the skip connections' sizes), so images need only be multiples of 8 px.
    Distillation feeds SDXL UNets (``addition_embed_type="text_time"``) the pooled text embedding
    and the size/crop ids as well; a ControlNet being distilled gets the same inputs plus the
    control image, and its residuals go into the frozen UNet, whose prediction is compared.
    """

    name = "unet"
    role = "unet"
    models = (UNet2DConditionModel,)
    controlnets = (ControlNetModel,)

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return attn1_layers(model, grid)

    def record_grid(self, grid: TokenGrid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = tensor_argument(args, kwargs, "sample", 0)
        grid.update(height=sample.shape[-2], width=sample.shape[-1])

    def encode_prompts(
        self, pipe: Any, denoiser: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
    ) -> Batch:
        out = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        batch = {"prompt_embeds": out[0]}
        if denoiser.config.addition_embed_type == "text_time":
            batch["pooled_prompt_embeds"] = out[2]
            batch["add_time_ids"] = micro_tensor(micro, out[0])
        return batch

    def predict(
        self,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        batch: Batch,
        **residuals: Any,
    ) -> torch.Tensor:
        return denoiser(
            noisy,
            timesteps,
            encoder_hidden_states=batch["prompt_embeds"],
            added_cond_kwargs=_added_conditions(batch),
            return_dict=False,
            **residuals,
        )[0]

    def predict_controlled(
        self,
        controlnet: nn.Module,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        batch: Batch,
    ) -> torch.Tensor:
        down, mid = controlnet(
            noisy,
            timesteps,
            encoder_hidden_states=batch["prompt_embeds"],
            controlnet_cond=batch[CONTROL],
            added_cond_kwargs=_added_conditions(batch),
            return_dict=False,
        )
        return self.predict(
            denoiser,
            noisy,
            timesteps,
            batch,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )

    def scale_conditions(self, batch: Batch, scale: int) -> Batch:
        if scale == 1 or "add_time_ids" not in batch:
            return batch
        return {**batch, "add_time_ids": batch["add_time_ids"] * scale}


def _added_conditions(batch: Batch) -> dict[str, torch.Tensor] | None:
    """SDXL's ``added_cond_kwargs`` (pooled text embedding and size/crop ids), if the batch has them."""
    if "add_time_ids" not in batch:
        return None
    return {"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["add_time_ids"]}
