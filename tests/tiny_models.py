"""Tiny diffusers models and pipelines built from configs in code (no downloads).

Widths are chosen so every attention layer has at least two heads and the UNet has
self-attention at two resolutions (so token grids at several levels are exercised).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TEXT_DIM = 32


def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(FIXTURES, model_max_length=77)


def text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    tok = tokenizer()
    return CLIPTextConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tok),
        max_position_embeddings=77,
        projection_dim=projection_dim or TEXT_DIM,
    )


def unet(cross_attention_dim: int = TEXT_DIM, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD 1.x pipeline (the VAE down-samples 2x; any size that is a multiple of 4 px works)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config())
    pipe = StableDiffusionPipeline(
        vae=vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer(),
        unet=unet(seed=seed),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_pipeline(seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    """The tiny SD 1.x pipeline's components in an image-to-image pipeline."""
    pipe = StableDiffusionImg2ImgPipeline(**sd_pipeline(seed).components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config())
    text_encoder_2 = CLIPTextModelWithProjection(text_config(projection_dim=TEXT_DIM))
    torch.manual_seed(seed)
    xl_unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
        cross_attention_dim=2 * TEXT_DIM,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(),
        unet=xl_unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", timestep_spacing="leading"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet(base: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet initialised from ``base`` with randomised zero-convs, so it changes outputs."""
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            module.weight.normal_(0, 0.1)
    return net


def sd_controlnet_pipeline(num_controlnets: int = 1, seed: int = 0) -> StableDiffusionControlNetPipeline:
    base = sd_pipeline(seed)
    nets = [controlnet(base.unet, seed + i) for i in range(num_controlnets)]
    pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k not in ("image_encoder",)},
        controlnet=nets[0] if num_controlnets == 1 else MultiControlNetModel(nets),
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed: int = 0, steps: int = 2, **kwargs) -> torch.Tensor:
    """Two denoising steps at 32x32 px (16x16 latents); returns the output as a tensor.

    Pipelines without ``height``/``width`` arguments (image-to-image) take their size from ``image``.
    """
    if "height" in inspect.signature(pipe.__call__).parameters:
        kwargs.setdefault("height", 32)
        kwargs.setdefault("width", 32)
    return pipe(
        prompt="a red circle above a blue square",
        num_inference_steps=steps,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    ).images
