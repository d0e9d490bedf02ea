"""Tiny CogVideoX / CogVideoX 1.5 and LTX-Video transformers, VAEs and pipelines, built in code.

Nothing is downloaded; the text encoder is the tiny T5 of :mod:`tiny_dit_models` with its
word-level tokenizer, and pipelines encode :data:`TEXT_TOKENS` text tokens per prompt.

- CogVideoX: two heads of width 16 (its 3D RoPE splits a head 4 + 6 + 6), 2x2 patches (and, in
  1.5, 2 frames per patch), a VAE that down-samples 8x in space and 4x in time. ``f`` frames of
  ``h x w`` px give ``((f - 1)/4 + 1) x h/16 x w/16`` tokens (1.5: the latent frames padded to
  even and halved). The VAE decodes ``f = 8k + 1`` frames back to ``f`` (CogVideoX's 49 too).
- LTX-Video: two heads of width 12, 1x1x1 patches, a VAE that down-samples 4x in space and time:
  ``f`` frames of ``h x w`` px give ``((f - 1)/4 + 1) x h/4 x w/4`` tokens.

The ``*_inputs`` helpers return keyword arguments for a bare transformer call at a latent of
``frames x height x width``, with :data:`TEXT_TOKENS` random text tokens. :class:`RecordingSoftmax`,
:func:`output` and :func:`perturb_added` are what both video test files use around them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from tiny_dit_models import HEADS, PROMPT, TEXT_TOKENS, t5_encoder, word_tokenizer
from tiny_models import TEXT_DIM
from torch import nn

from lindiff.attention.base import TokenMixer, Tokens
from lindiff.grid import GridShape

LATENT_CHANNELS = 4
COGVIDEOX_HEAD_DIM = 16
LTX_HEAD_DIM = 12


class RecordingSoftmax(TokenMixer):
    """Softmax attention (what diffusers computes), recording the image slice and grid of each call."""

    method_name = "softmax"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[slice, GridShape]] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        self.calls.append((tokens.image, tokens.grid))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


def output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``model(**inputs)``'s first output, without gradients."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def perturb_added(model: nn.Module, seed: int = 3) -> None:
    """Stand in for training: move every parameter `linearize` added away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lindiff." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- CogVideoX ---------------------------------------------------------------------------------


def cogvideox_transformer(
    rotary: bool = True, patch_size_t: int | None = None, seed: int = 0
) -> CogVideoXTransformer3DModel:
    """CogVideoX: 2 blocks of joint attention ``attn1`` over [text, video], 2x2 patches.

    ``rotary=True`` is the 5B kind (3D RoPE), ``False`` the 2B kind (sin-cos position embeddings);
    ``patch_size_t=2`` (with RoPE) is CogVideoX 1.5. The sample size (the pipeline's default) is
    4 x 6 latent pixels for 1.0 and 12 x 12 for 1.5, whose RoPE is cut from a grid of that size
    (so 1.5 takes latents up to 12 x 12).
    """
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=COGVIDEOX_HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        time_embed_dim=8,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        sample_width=6 if patch_size_t is None else 12,
        sample_height=4 if patch_size_t is None else 12,
        sample_frames=9,
        patch_size=2,
        patch_size_t=patch_size_t,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT_TOKENS,
        use_rotary_positional_embeddings=rotary,
    )


def cogvideox_rotary(
    model: CogVideoXTransformer3DModel, frames: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The RoPE tables ``CogVideoXPipeline`` makes for a latent of ``frames x height x width``
    (``None`` for a model without RoPE)."""
    config = model.config
    if not config.use_rotary_positional_embeddings:
        return None
    p, p_t = config.patch_size, config.patch_size_t
    grid = (height // p, width // p)
    base = (config.sample_height // p, config.sample_width // p)
    if p_t is None:
        crops = get_resize_crop_region_for_grid(grid, base[1], base[0])
        return get_3d_rotary_pos_embed(config.attention_head_dim, crops, grid, frames)
    return get_3d_rotary_pos_embed(
        config.attention_head_dim, None, grid, frames // p_t, grid_type="slice", max_size=base
    )


def cogvideox_inputs(
    model: CogVideoXTransformer3DModel, frames: int, height: int, width: int, batch: int = 1
) -> dict[str, Any]:
    """Inputs of ``model`` at a latent of ``frames x height x width`` (even sides; 1.5: even frames)."""
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, frames, LATENT_CHANNELS, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "image_rotary_emb": cogvideox_rotary(model, frames, height, width),
    }


def cogvideox_vae(seed: int = 0) -> AutoencoderKLCogVideoX:
    """A CogVideoX VAE: 8x spatial (3 down-samplings), 4x temporal, ``LATENT_CHANNELS`` latents."""
    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )


def cogvideox_pipeline(
    rotary: bool = True, patch_size_t: int | None = None, seed: int = 0
) -> CogVideoXPipeline:
    """CogVideoX text-to-video with the transformer of :func:`cogvideox_transformer`."""
    return _quiet(
        CogVideoXPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=t5_encoder(seed=seed),
            vae=cogvideox_vae(seed),
            transformer=cogvideox_transformer(rotary, patch_size_t, seed),
            scheduler=CogVideoXDDIMScheduler(),
        )
    )


def run_cogvideox(
    pipe: CogVideoXPipeline, frames: int, height: int, width: int, seed: int = 0, steps: int = 2
) -> torch.Tensor:
    """Two denoising steps of ``frames`` frames at ``height x width`` px with a fixed generator;
    returns the video ``(1, frames, 3, height, width)``."""
    return pipe(
        prompt=PROMPT,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=2.0,
        max_sequence_length=TEXT_TOKENS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


# --- LTX-Video ---------------------------------------------------------------------------------


def ltx_transformer(seed: int = 0) -> LTXVideoTransformer3DModel:
    """LTX-Video: 2 blocks of self-attention ``attn1`` (RoPE over the full width, 4 frequencies per
    axis) and cross-attention ``attn2``, 1x1x1 patches."""
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=LTX_HEAD_DIM,
        cross_attention_dim=HEADS * LTX_HEAD_DIM,
        num_layers=2,
        caption_channels=TEXT_DIM,
    )


def ltx_inputs(frames: int, height: int, width: int, batch: int = 1) -> dict[str, Any]:
    """Inputs at a latent of ``frames x height x width``: as many packed tokens, frame-major."""
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, frames * height * width, LATENT_CHANNELS, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "timestep": torch.full((batch,), 500.0),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
        "num_frames": frames,
        "height": height,
        "width": width,
        "rope_interpolation_scale": (4 / 25, 4, 4),
    }


def ltx_vae(seed: int = 0) -> AutoencoderKLLTXVideo:
    """An LTX-Video VAE: 4x spatial and 4x temporal (two space-time down-samplings)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return vae


def ltx_pipeline(seed: int = 0) -> LTXPipeline:
    """LTX-Video text-to-video: the tiny T5, the tiny LTX VAE, flow matching."""
    return _quiet(
        LTXPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=t5_encoder(seed=seed),
            vae=ltx_vae(seed),
            transformer=ltx_transformer(seed),
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
    )


def run_ltx(
    pipe: LTXPipeline, frames: int, height: int, width: int, seed: int = 0, steps: int = 2
) -> torch.Tensor:
    """Two denoising steps of ``frames`` frames at ``height x width`` px (multiples of 32) with a
    fixed generator; returns the video ``(1, frames, 3, height, width)``."""
    return pipe(
        prompt=PROMPT,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=2.0,
        max_sequence_length=TEXT_TOKENS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames
