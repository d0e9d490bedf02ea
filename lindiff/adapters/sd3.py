"""Stable Diffusion 3 / 3.5 transformers (MMDiT) and their ControlNets."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from ..attention.base import GRID_ATTRIBUTE, LayerInfo, Tokens
from ..grid import TokenGrid
from .base import (
    GATHER_TOKENS_OUT,
    SPLIT_TOKENS_OUT,
    Batch,
    LatentGridAdapter,
    MicroConditions,
    tensor_argument,
)
from .processors import (
    SelfAttnProcessor,
    call_mixer,
    head_norm,
    image_qkv,
    mixer_of,
    reject_attention_mask,
    sequence_shard,
)


class JointAttnProcessor:
    """SD3's joint attention (diffusers' ``JointAttnProcessor2_0``) around a lindiff mixer.

    Image tokens go through ``to_q/to_k/to_v`` (their inputs through the mixer's
    ``query_input``/``key_input``), text tokens through ``add_q/add_k/add_v_proj``; each side gets
    its own q/k norms, and the mixer sees ``[image, text]`` concatenated, image first. The output
    is split back: image through ``to_out``, text through ``to_add_out`` (unless the layer is
    ``context_pre_only``, SD3's last block, whose text output is unused).

    ``hidden_states``: ``(B, N_img, C)``; ``encoder_hidden_states``: ``(B, N_txt, C)`` or ``None``
    (then it is plain self-attention). Returns ``(image, text)`` outputs, or the image output alone.
    """

    _parallel_config: Any = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        reject_attention_mask(attention_mask, "lindiff")
        mixer = mixer_of(attn)
        num_image = hidden_states.shape[1]

        query, key, value = image_qkv(attn, mixer, hidden_states, hidden_states)

        if encoder_hidden_states is not None:
            text_query = head_norm(attn.norm_added_q, attn.add_q_proj(encoder_hidden_states), attn.heads)
            text_key = head_norm(attn.norm_added_k, attn.add_k_proj(encoder_hidden_states), attn.heads)
            text_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

        tokens = Tokens(
            image=slice(0, num_image), source=getattr(attn, GRID_ATTRIBUTE, None), shard=sequence_shard(self)
        )
        out = call_mixer(mixer, query, key, value, tokens)
        out = out.reshape(out.shape[0], out.shape[1], -1).to(query.dtype)

        image_out = attn.to_out[1](attn.to_out[0](out[:, :num_image]))
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, num_image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class SD3Adapter(LatentGridAdapter):
    """``SD3Transformer2DModel`` and ``SD3ControlNetModel``.

    Each block's ``attn`` is joint image + text attention (kind ``"joint"``, the last block's
    included); SD3.5's extra ``attn2`` (dual attention) and the blocks of ControlNets without a
    text stream are image self-attention (kind ``"self"``). The grid is the latent
    ``hidden_states`` ``(B, C, H, W)`` (ControlNets: ``controlnet_cond`` when ``hidden_states`` is
    already patched) over ``config.patch_size``.

    Context parallelism (diffusers has no plan for SD3) splits the image tokens leaving ``pos_embed``
    and the text tokens leaving ``context_embedder`` (each text token on one process, as the
    joint attention's mixers expect: FLUX's plan splits its text too) and gathers the image
    leaving ``proj_out``; both lengths must divide by the processes (SD3's 333 text tokens need
    ``uneven=True``). ControlNets get no plan.
    """

    name = "sd3"
    models = (SD3Transformer2DModel,)
    controlnets = (SD3ControlNetModel,)

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        found = []
        for index, block in enumerate(model.transformer_blocks):
            prefix = f"transformer_blocks.{index}"
            kind = "joint" if block.attn.added_kv_proj_dim is not None else "self"
            found.append(LayerInfo(name=f"{prefix}.attn", module=block.attn, kind=kind, grid=grid))
            if getattr(block, "attn2", None) is not None:
                found.append(LayerInfo(name=f"{prefix}.attn2", module=block.attn2, kind="self", grid=grid))
        return found

    def latent(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """``hidden_states``, or for ControlNets that receive it patched (SD3.5 ones without
        ``pos_embed``) their latent ``controlnet_cond``."""
        latent = tensor_argument(args, kwargs, "hidden_states", 0)
        return latent if latent.ndim == 4 else tensor_argument(args, kwargs, "controlnet_cond", 1)

    def processor(self, layer: LayerInfo) -> JointAttnProcessor | SelfAttnProcessor:
        return JointAttnProcessor() if layer.kind == "joint" else SelfAttnProcessor()

    def context_parallel_plan(self, model: nn.Module) -> dict[str, Any] | None:
        if not isinstance(model, self.models):
            return None
        return {
            "pos_embed": SPLIT_TOKENS_OUT,
            "context_embedder": SPLIT_TOKENS_OUT,
            "proj_out": GATHER_TOKENS_OUT,
        }

    def encode_prompts(
        self, pipe: Any, denoiser: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
    ) -> Batch:
        out = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": out[0], "pooled_prompt_embeds": out[2]}

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        return denoiser(
            noisy,
            encoder_hidden_states=batch["prompt_embeds"],
            pooled_projections=batch["pooled_prompt_embeds"],
            timestep=timesteps,
            return_dict=False,
        )[0]
