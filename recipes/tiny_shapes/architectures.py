"""Configurations of the tiny-shapes models: 128 px images, 16x16x4 latents.

Sizes follow the CPU budget in DESIGN.md: a UNet of a few million parameters on 16x16 latents,
so that the whole build trains in about an hour on two cores.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DPMSolverMultistepScheduler,
    MotionAdapter,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lindiff.data import MotionConfig, ShapesConfig

NATIVE_SIZE = 128
LATENT_CHANNELS = 4
TEXT_WIDTH = 128
UNET_CHANNELS = (32, 64, 128)
HEAD_DIM = 32
"""Channels of every attention head of the UNet (and so of its ControlNet and student)."""

TRAINING_WORLD = ShapesConfig(
    num_objects=(1, 2),
    size_range=(0.25, 0.45),
    colours=("red", "green", "blue", "yellow", "purple", "white"),
)
"""The part of the shapes world the embedded model learns: one or two objects, six colours."""

BETAS = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
}


def vae() -> AutoencoderKL:
    """8x down-sampling autoencoder, 4 latent channels, about 1M parameters (narrow at full resolution)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=NATIVE_SIZE,
    )


def text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """Three-layer CLIP text transformer, width 128."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config)


def unet() -> UNet2DConditionModel:
    """Three-level UNet with self- and cross-attention at 16x16 and 8x8, about 3.2M parameters.

    Every attention head is :data:`HEAD_DIM` channels wide. UNet2DConditionModel reads
    ``attention_head_dim`` as the number of heads per block (a misnomer diffusers keeps for
    compatibility), so it gets ``channels // HEAD_DIM`` per block; a single 32 there would make
    32 heads of one to four channels, whose rank-one attention maps cannot compare queries with keys.
    """
    return UNet2DConditionModel(
        sample_size=NATIVE_SIZE // 8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=tuple(channels // HEAD_DIM for channels in UNET_CHANNELS),
        norm_num_groups=8,
    )


def controlnet(base: UNet2DConditionModel) -> ControlNetModel:
    """A ControlNet copying ``base``'s encoder; its condition embedding maps 128 px to 16x16."""
    return ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(16, 32, 64, 64))


MOTION_WORLD = MotionConfig()
"""The clips the motion adapter learns: one or two objects of the training world's colours, a
little smaller so that their paths fit in view (:data:`lindiff.data.motion.CLIP_WORLD`)."""

TRAINING_FRAMES = 8
"""Frames per training clip; the adapter's positions reach :data:`MAX_FRAMES`."""

MAX_FRAMES = 32


def motion_adapter() -> MotionAdapter:
    """AnimateDiff motion modules for :func:`unet`: one temporal transformer per block, a head per 32 channels."""
    return MotionAdapter(
        block_out_channels=UNET_CHANNELS,
        motion_layers_per_block=1,
        motion_mid_block_layers_per_block=1,
        motion_num_attention_heads=tuple(c // HEAD_DIM for c in UNET_CHANNELS),
        motion_norm_num_groups=8,
        motion_max_seq_length=MAX_FRAMES,
        use_motion_mid_block=True,
    )


def scheduler() -> DPMSolverMultistepScheduler:
    """The sampler shipped with the pipeline (20 steps give clean images)."""
    return DPMSolverMultistepScheduler(**BETAS, prediction_type="epsilon", steps_offset=1)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
