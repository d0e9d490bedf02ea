"""Text conditioning per denoiser class: how prompts are encoded for it, and how it is called.

A distillation sample is a latent plus the tensors :func:`Conditioning.encode` returns for its
prompt; :func:`Conditioning.call` feeds a batch of them to the teacher and to the student the
same way. Micro-conditions are ``(orig_h, orig_w, crop_top, crop_left, h, w)`` in pixels per
sample (SDXL's ``add_time_ids``, PixArt's resolution and aspect ratio).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

Batch = dict[str, torch.Tensor]
MicroConditions = list[tuple[int, int, int, int, int, int]]


@dataclass(frozen=True)
class Conditioning:
    """Prompt encoding and calling convention of one denoiser class.

    Attributes:
        encode: ``(pipe, denoiser, prompts, device, micro) -> {name: (B, ...)}`` without
            classifier-free guidance.
        call: ``(denoiser, noisy (B, C, H, W), timesteps (B,), batch) -> prediction (B, C', H, W)``.
    """

    encode: Callable[[Any, nn.Module, list[str], torch.device, MicroConditions], Batch]
    call: Callable[[nn.Module, torch.Tensor, torch.Tensor, Batch], torch.Tensor]


def _micro_tensor(micro: MicroConditions, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(micro, dtype=dtype)


def _encode_unet(
    pipe: Any, unet: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
) -> Batch:
    out = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    batch = {"prompt_embeds": out[0]}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + size/crop ids
        batch["pooled_prompt_embeds"] = out[2]
        batch["add_time_ids"] = _micro_tensor(micro, out[0].dtype).to(out[0].device)
    return batch


def _call_unet(unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch) -> torch.Tensor:
    added = None
    if "add_time_ids" in batch:
        added = {"text_embeds": batch["pooled_prompt_embeds"], "time_ids": batch["add_time_ids"]}
    return unet(
        noisy,
        timesteps,
        encoder_hidden_states=batch["prompt_embeds"],
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


def _encode_pixart(
    pipe: Any, transformer: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
) -> Batch:
    embeds, mask, _, _ = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, device=device)
    batch = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
    if transformer.use_additional_conditions:
        sizes = _micro_tensor(micro, embeds.dtype).to(embeds.device)
        batch["resolution"] = sizes[:, 4:6]
        batch["aspect_ratio"] = sizes[:, 4:5] / sizes[:, 5:6]
    return batch


def _call_pixart(
    transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
) -> torch.Tensor:
    added = {"resolution": batch.get("resolution"), "aspect_ratio": batch.get("aspect_ratio")}
    return transformer(
        noisy,
        encoder_hidden_states=batch["prompt_embeds"],
        encoder_attention_mask=batch["prompt_attention_mask"],
        timestep=timesteps,
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


def _encode_sd3(
    pipe: Any, transformer: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
) -> Batch:
    out = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
    )
    return {"prompt_embeds": out[0], "pooled_prompt_embeds": out[2]}


def _call_sd3(
    transformer: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
) -> torch.Tensor:
    return transformer(
        noisy,
        encoder_hidden_states=batch["prompt_embeds"],
        pooled_projections=batch["pooled_prompt_embeds"],
        timestep=timesteps,
        return_dict=False,
    )[0]


def scale_sizes(batch: Batch, scale: int) -> Batch:
    """``batch`` for latents up-sampled ``scale`` times: its pixel sizes (SDXL's ``add_time_ids``,
    PixArt's ``resolution``) multiplied by ``scale``; aspect ratios and text stay."""
    if scale == 1:
        return batch
    return {
        name: value * scale if name in ("add_time_ids", "resolution") else value
        for name, value in batch.items()
    }


CONDITIONINGS: dict[type, Conditioning] = {
    UNet2DConditionModel: Conditioning(_encode_unet, _call_unet),
    PixArtTransformer2DModel: Conditioning(_encode_pixart, _call_pixart),
    SD3Transformer2DModel: Conditioning(_encode_sd3, _call_sd3),
}


def conditioning_for(denoiser: nn.Module) -> Conditioning:
    """The :class:`Conditioning` of ``denoiser``'s class.

    Raises:
        TypeError: for a denoiser class distillation does not know how to condition.
    """
    for cls, conditioning in CONDITIONINGS.items():
        if isinstance(denoiser, cls):
            return conditioning
    supported = ", ".join(cls.__name__ for cls in CONDITIONINGS)
    raise TypeError(
        f"distillation does not support {type(denoiser).__name__} denoisers yet; supported: {supported}"
    )
