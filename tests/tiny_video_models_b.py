"""Tiny HunyuanVideo and SANA-Video transformers and pipelines, built from configs in code.

HunyuanVideo: two heads of width 8 (its 3D RoPE splits a head 2 + 2 + 4), one dual- and one
single-stream block, 1x2x2 patches, a Llama text encoder (:data:`~tiny_dit_models.TEXT_DIM`
wide) and the CLIP of ``tiny_models`` for the pooled projection, a VAE that down-samples 8x in
space and 4x in time. SANA-Video: two heads of width 12 (RoPE 4 + 4 + 4), two blocks, 1x2x2
patches, the tiny Gemma2 of ``tiny_dit_models`` and a tiny Wan VAE (8x, 4x). Through either
pipeline ``f`` frames of ``h x w`` px give ``((f - 1)/4 + 1) x h/16 x w/16`` tokens.

Bare-transformer inputs: a latent of ``frames x height x width`` gives
``frames x height/2 x width/2`` video tokens, with :data:`~tiny_dit_models.TEXT_TOKENS` random text
tokens of which batch item ``b`` keeps the first ``kept[b]`` (the rest are padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    SanaVideoPipeline,
    SanaVideoTransformer3DModel,
)
from tiny_dit_models import (
    HEADS,
    LATENT_CHANNELS,
    PROMPT,
    TEXT_TOKENS,
    WORDS,
    gemma_encoder,
    wan_vae,
    word_tokenizer,
)
from tiny_models import TEXT_DIM, text_config, tokenizer
from transformers import CLIPTextModel, LlamaConfig, LlamaModel

HUNYUAN_HEAD_DIM = 8
SANA_VIDEO_HEAD_DIM = 12
# Llama tokens per prompt in the tiny HunyuanVideo pipeline: the prompt's 8 and 4 of padding.
HUNYUAN_TEXT_TOKENS = TEXT_TOKENS + 4
# No system prompt around the user's (the real template's 95 tokens would all be cropped anyway).
HUNYUAN_TEMPLATE = {"template": "{}", "crop_start": 0}


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- HunyuanVideo --------------------------------------------------------------------------------


def hunyuan_video_transformer(
    seed: int = 0, image_condition_type: str | None = None
) -> HunyuanVideoTransformer3DModel:
    """One dual- and one single-stream block, one token-refiner block, guidance embedding;
    ``image_condition_type`` ``"token_replace"`` / ``"latent_concat"``: the image-to-video variants."""
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HUNYUAN_HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        rope_axes_dim=(2, 2, 4),
        image_condition_type=image_condition_type,
    )


def hunyuan_video_inputs(
    frames: int, height: int, width: int, kept: Sequence[int] = (TEXT_TOKENS,)
) -> dict[str, Any]:
    """Inputs for ``len(kept)`` batch items at a latent of ``frames x height x width`` (even sides)."""
    generator = torch.Generator().manual_seed(1)
    batch = len(kept)
    mask = torch.arange(TEXT_TOKENS)[None, :] < torch.tensor(kept)[:, None]
    return {
        "hidden_states": torch.randn(batch, LATENT_CHANNELS, frames, height, width, generator=generator),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "encoder_attention_mask": mask.long(),
        "pooled_projections": torch.randn(batch, TEXT_DIM, generator=generator),
        "guidance": torch.full((batch,), 6000.0),
    }


def llama_encoder(seed: int = 0) -> LlamaModel:
    """Two layers (the pipeline reads the third hidden state from the end)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    return LlamaModel(config).eval()


def hunyuan_vae(seed: int = 0) -> AutoencoderKLHunyuanVideo:
    """8x spatial, 4x temporal, ``LATENT_CHANNELS`` latents, one layer per block."""
    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo(
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
    )


def hunyuan_video_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    torch.manual_seed(seed)
    return _quiet(
        HunyuanVideoPipeline(
            text_encoder=llama_encoder(seed),
            tokenizer=word_tokenizer(),
            transformer=hunyuan_video_transformer(seed),
            vae=hunyuan_vae(seed),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=CLIPTextModel(text_config()).eval(),
            tokenizer_2=tokenizer(),
        )
    )


def run_hunyuan_video(
    pipe: HunyuanVideoPipeline, frames: int, height: int, width: int, seed: int = 0, steps: int = 2
) -> torch.Tensor:
    """Two denoising steps of ``frames`` frames at ``height x width`` px with a fixed generator and
    :data:`HUNYUAN_TEXT_TOKENS` Llama tokens (the last 4 padding); returns ``(1, frames, 3, height, width)``."""
    return pipe(
        prompt=PROMPT,
        prompt_template=HUNYUAN_TEMPLATE,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        max_sequence_length=HUNYUAN_TEXT_TOKENS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


# --- SANA-Video ----------------------------------------------------------------------------------


def sana_video_transformer(seed: int = 0) -> SanaVideoTransformer3DModel:
    """Two blocks of linear self-attention ``attn1`` (ReLU, 3D RoPE over 4 + 4 + 4 dims, RMS q/k
    norms across heads) and cross-attention ``attn2``; 1x2x2 patches."""
    torch.manual_seed(seed)
    inner = HEADS * SANA_VIDEO_HEAD_DIM
    return SanaVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=SANA_VIDEO_HEAD_DIM,
        num_layers=2,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=SANA_VIDEO_HEAD_DIM,
        cross_attention_dim=inner,
        caption_channels=TEXT_DIM,
        sample_size=30,
        patch_size=(1, 2, 2),
        rope_max_seq_len=32,
    )


def sana_video_inputs(frames: int, height: int, width: int, batch: int = 1) -> dict[str, Any]:
    """Inputs at a latent of ``frames x height x width`` (even sides), text fully kept."""
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, LATENT_CHANNELS, frames, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "timestep": torch.full((batch,), 500.0),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.long),
    }


def sana_video_pipeline(seed: int = 0) -> SanaVideoPipeline:
    return _quiet(
        SanaVideoPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=gemma_encoder(seed),
            vae=wan_vae(seed),
            transformer=sana_video_transformer(seed),
            scheduler=DPMSolverMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
            ),
        )
    )


def run_sana_video(
    pipe: SanaVideoPipeline, frames: int, height: int, width: int, seed: int = 0, steps: int = 2
) -> torch.Tensor:
    """Two denoising steps of ``frames`` frames at ``height x width`` px (no resolution binning, no
    prompt enhancement, :data:`TEXT_TOKENS` Gemma tokens); returns ``(1, frames, 3, height, width)``."""
    return pipe(
        prompt=PROMPT,
        frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=2.0,
        use_resolution_binning=False,
        complex_human_instruction=None,
        max_sequence_length=TEXT_TOKENS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames
