"""PixArt-alpha / PixArt-sigma transformers."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtTransformer2DModel
from torch import nn

from ..attention.base import LayerInfo
from ..grid import TokenGrid
from .base import (
    GATHER_TOKENS_OUT,
    SPLIT_TOKENS_OUT,
    Batch,
    LatentGridAdapter,
    MicroConditions,
    attn1_layers,
    micro_tensor,
)


class PixArtAdapter(LatentGridAdapter):
    """``PixArtTransformer2DModel``: self-attention is each block's ``attn1`` (image tokens only);
    the cross-attention ``attn2`` to the T5 tokens stays softmax.

    The grid is the latent ``hidden_states`` ``(B, C, H, W)`` over ``config.patch_size``.
    Distillation feeds PixArt-alpha's resolution and aspect-ratio conditions when the model uses them.

    Context parallelism (diffusers has no plan for PixArt) splits the image tokens leaving
    ``pos_embed`` and gathers them leaving ``proj_out``; the text is not split, so each process's
    image queries cross-attend to every text token.
    """

    name = "pixart"
    models = (PixArtTransformer2DModel,)

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return attn1_layers(model, grid)

    def context_parallel_plan(self, model: nn.Module) -> dict[str, Any]:
        return {"pos_embed": SPLIT_TOKENS_OUT, "proj_out": GATHER_TOKENS_OUT}

    def encode_prompts(
        self, pipe: Any, denoiser: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
    ) -> Batch:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, device=device
        )
        batch = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if denoiser.use_additional_conditions:
            sizes = micro_tensor(micro, embeds)
            batch["resolution"] = sizes[:, 4:6]
            batch["aspect_ratio"] = sizes[:, 4:5] / sizes[:, 5:6]
        return batch

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        added = {"resolution": batch.get("resolution"), "aspect_ratio": batch.get("aspect_ratio")}
        return denoiser(
            noisy,
            encoder_hidden_states=batch["prompt_embeds"],
            encoder_attention_mask=batch["prompt_attention_mask"],
            timestep=timesteps,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def scale_conditions(self, batch: Batch, scale: int) -> Batch:
        if scale == 1 or "resolution" not in batch:
            return batch
        return {**batch, "resolution": batch["resolution"] * scale}
