"""SANA transformers (linear-attention DiTs) and their ControlNets."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SanaControlNetModel, SanaTransformer2DModel
from diffusers.models._modeling_parallel import ContextParallelInput
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
    call_default,
)
from .processors import SelfAttnProcessor

SPLIT_ROWS_OUT = {0: ContextParallelInput(split_dim=2, expected_dims=4, split_output=True)}
"""Context-parallel plan entry of a module whose output ``(B, C, H, W)`` is split by rows."""


class SanaSelfAttnProcessor(SelfAttnProcessor):
    """:class:`SelfAttnProcessor` plus what diffusers' ``SanaLinearAttnProcessor2_0`` does after
    the output projection: clip float16 outputs to the finite range."""

    clip_float16 = True


class SanaAdapter(LatentGridAdapter):
    """``SanaTransformer2DModel`` and ``SanaControlNetModel``: self-attention is each block's
    ``attn1`` (ReLU linear attention already); the cross-attention ``attn2`` stays softmax.

    The grid is the latent ``hidden_states`` ``(B, C, H, W)`` over ``config.patch_size``. SANA's
    pipelines accept only multiples of 32 px. Distillation encodes prompts as ``SanaPipeline``
    does by default when it samples (Gemma with its complex human instruction, padded to
    ``max_sequence_length`` tokens with an attention mask) and scales timesteps by
    ``config.timestep_scale`` as the pipeline does.

    Context parallelism (diffusers has no plan for SANA) splits the image tokens leaving
    ``patch_embed`` and gathers them leaving ``proj_out``; the text is not split. Each block's
    Mix-FFN (``ff``) convolves the token grid 3 x 3, so the plan gathers the tokens leaving ``norm2``
    and splits the FFN's output ``(B, C, H, W)`` by rows: the FFN runs on the whole image in every
    process (attention is what the split saves), the latent height in tokens must divide by the
    processes, and gradients through the FFN are not exact (diffusers' gather keeps only this
    process's part of the gradient); inference only.
    """

    name = "sana"
    models = (SanaTransformer2DModel,)
    controlnets = (SanaControlNetModel,)
    pipeline_pixel_multiple = 32

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return attn1_layers(model, grid)

    def processor(self, layer: LayerInfo) -> SanaSelfAttnProcessor:
        return SanaSelfAttnProcessor()

    def context_parallel_plan(self, model: nn.Module) -> dict[str, Any] | None:
        if not isinstance(model, self.models):
            return None
        return {
            "patch_embed": SPLIT_TOKENS_OUT,
            "transformer_blocks.*.norm2": GATHER_TOKENS_OUT,
            "transformer_blocks.*.ff": SPLIT_ROWS_OUT,
            "proj_out": GATHER_TOKENS_OUT,
        }

    def encode_prompts(
        self, pipe: Any, denoiser: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
    ) -> Batch:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            device=device,
            max_sequence_length=call_default(pipe, "max_sequence_length"),
            complex_human_instruction=call_default(pipe, "complex_human_instruction"),
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        return denoiser(
            noisy,
            encoder_hidden_states=batch["prompt_embeds"],
            encoder_attention_mask=batch["prompt_attention_mask"],
            timestep=timesteps * denoiser.config.timestep_scale,
            return_dict=False,
        )[0]
