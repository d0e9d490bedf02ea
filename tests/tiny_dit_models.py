"""Tiny diffusion transformers (PixArt, SD3/SD3.5, FLUX + ControlNet, SANA, Wan) and their pipelines.

Everything is built from configs in code; nothing is downloaded. Every attention layer has two
heads of width 8. The KL VAEs down-sample 2x and the DiTs use 2x2 patches (FLUX packs 2x2 latent
pixels); SANA's DC-AE down-samples 4x and SANA uses 1x1 patches. So an image of ``h x w`` px
gives ``h/4 x w/4`` tokens in every image family; SANA needs ``h`` and ``w`` divisible by 32.
Wan (video) has two heads of width 12 (its 3D RoPE splits a head 4 + 4 + 4), a VAE that
down-samples 8x in space and 4x in time, and 1x2x2 patches: ``f`` frames of ``h x w`` px give
``((f - 1)/4 + 1) x h/16 x w/16`` tokens.

Text encoders are tiny T5 / Gemma2 / CLIP models; T5 and Gemma get a word-level tokenizer built
in code, CLIP the BPE fixture of ``tiny_models``. Pipelines encode :data:`TEXT_TOKENS` T5/Gemma
tokens per prompt (SD3 adds its 77 CLIP tokens).

The ``*_inputs(height, width, batch)`` helpers return keyword arguments for a bare denoiser call
at a latent size of ``height x width`` (any even size, square or not), with :data:`TEXT_TOKENS`
random text tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SanaControlNetModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tiny_models import TEXT_DIM, text_config, tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

PROMPT = "a red circle above a blue square"
HEADS = 2
HEAD_DIM = 8
WIDTH = HEADS * HEAD_DIM
LATENT_CHANNELS = 4
# Text tokens per prompt in the tiny pipelines (T5 / Gemma ``max_sequence_length``).
TEXT_TOKENS = 8
WORDS = ["<pad>", "</s>", "<unk>", "<bos>", *sorted(set(PROMPT.split())), "cat", "dog", "green", "house"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` that appends ``</s>`` (stands in for T5's and Gemma's)."""
    model = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<bos>"
    )


def t5_encoder(d_model: int = TEXT_DIM, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def gemma_encoder(seed: int = 0) -> Gemma2Model:
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=len(WORDS),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    return Gemma2Model(config).eval()


def kl_vae(
    latent_channels: int = LATENT_CHANNELS, shift_factor: float | None = None, seed: int = 0
) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        shift_factor=shift_factor,
        scaling_factor=1.5,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )


def dc_vae(seed: int = 0) -> AutoencoderDC:
    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=LATENT_CHANNELS,
        attention_head_dim=8,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16, 16),
        decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41,
    )


# --- denoisers ---------------------------------------------------------------------------------


def pixart_transformer(seed: int = 0) -> PixArtTransformer2DModel:
    """PixArt-alpha: 2 blocks, patch 2, self-attention ``attn1`` and cross-attention ``attn2``."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        num_layers=2,
        cross_attention_dim=WIDTH,
        caption_channels=TEXT_DIM,
        sample_size=8,
        patch_size=2,
        norm_num_groups=8,
    )


def pixart_inputs(height: int, width: int, batch: int = 1) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, LATENT_CHANNELS, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


SD3_JOINT_DIM = 2 * TEXT_DIM  # the two CLIP encoders' widths side by side (and T5's width)


def sd3_transformer(dual_attention: bool = False, seed: int = 0) -> SD3Transformer2DModel:
    """SD3 (3 joint blocks, the last ``context_pre_only``); ``dual_attention`` gives SD3.5's
    extra self-attention ``attn2`` in the first two blocks and RMS q/k norms."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=3,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=SD3_JOINT_DIM,
        caption_projection_dim=WIDTH,
        pooled_projection_dim=SD3_JOINT_DIM,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=32,
        dual_attention_layers=(0, 1) if dual_attention else (),
        qk_norm="rms_norm" if dual_attention else None,
    )


def sd3_inputs(height: int, width: int, batch: int = 1) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, LATENT_CHANNELS, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, SD3_JOINT_DIM, generator=generator),
        "pooled_projections": torch.randn(batch, SD3_JOINT_DIM, generator=generator),
        "timestep": torch.full((batch,), 500.0),
    }


def sd3_controlnet(use_pos_embed: bool = True, seed: int = 0) -> SD3ControlNetModel:
    """An SD3 ControlNet (2 joint blocks) with random output projections; ``use_pos_embed=False``
    gives the SD3.5 kind, which takes ``hidden_states`` already patched by the transformer."""
    torch.manual_seed(seed)
    net = SD3ControlNetModel(
        use_pos_embed=use_pos_embed,
        sample_size=8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=SD3_JOINT_DIM,
        caption_projection_dim=WIDTH,
        pooled_projection_dim=SD3_JOINT_DIM,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=32,
    )
    _randomize([net.pos_embed_input.proj, *net.controlnet_blocks])
    return net


def sd3_controlnet_inputs(height: int, width: int, batch: int = 1) -> dict[str, Any]:
    """:func:`sd3_inputs` plus the latent ``controlnet_cond``."""
    inputs = sd3_inputs(height, width, batch)
    inputs["controlnet_cond"] = _latent_like(inputs["hidden_states"])
    return inputs


def _latent_like(hidden_states: torch.Tensor) -> torch.Tensor:
    """A fixed random ``controlnet_cond`` shaped like ``hidden_states``."""
    return torch.randn(hidden_states.shape, generator=torch.Generator().manual_seed(2))


def _randomize(modules: list[torch.nn.Module]) -> None:
    """Random weights for a ControlNet's zero-initialised projections, so it changes outputs."""
    with torch.no_grad():
        for module in modules:
            module.weight.normal_(0, 0.1)


FLUX_CHANNELS = 4 * LATENT_CHANNELS  # 2x2 latent pixels packed into one token


def flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """FLUX: 2 double-stream and 2 single-stream blocks, RoPE over axes of 2 + 2 + 4 dims."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=FLUX_CHANNELS,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    )


def flux_controlnet(seed: int = 0) -> FluxControlNetModel:
    """A FLUX ControlNet (1 double, 1 single block) with random output projections, so it changes outputs."""
    torch.manual_seed(seed)
    net = FluxControlNetModel(
        patch_size=1,
        in_channels=FLUX_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    )
    _randomize([net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks])
    return net


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """``img_ids`` ``(H*W, 3)`` of a packed ``height x width`` token grid, as FluxPipeline makes them."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def flux_inputs(height: int, width: int, batch: int = 1) -> dict[str, Any]:
    """Inputs at a ``height x width`` latent (even sizes): ``height/2 x width/2`` packed tokens."""
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 latent pixels; height and width must be even, got {height}x{width}")
    generator = torch.Generator().manual_seed(1)
    tokens = (height // 2) * (width // 2)
    return {
        "hidden_states": torch.randn(batch, tokens, FLUX_CHANNELS, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "pooled_projections": torch.randn(batch, TEXT_DIM, generator=generator),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": flux_image_ids(height // 2, width // 2),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }


def flux_controlnet_inputs(height: int, width: int, batch: int = 1) -> dict[str, Any]:
    """:func:`flux_inputs` plus the packed ``controlnet_cond`` a FluxControlNetModel takes."""
    inputs = flux_inputs(height, width, batch)
    inputs["controlnet_cond"] = _latent_like(inputs["hidden_states"])
    return inputs


def sana_transformer(qk_norm: str | None = None, seed: int = 0) -> SanaTransformer2DModel:
    """SANA: 2 blocks of ReLU linear self-attention ``attn1`` and softmax cross-attention ``attn2``,
    patch 1; ``qk_norm="rms_norm_across_heads"`` as in SANA 1.5 / Sprint."""
    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=WIDTH,
        caption_channels=TEXT_DIM,
        mlp_ratio=2.0,
        sample_size=8,
        patch_size=1,
        qk_norm=qk_norm,
    )


def sana_controlnet(seed: int = 0) -> SanaControlNetModel:
    """A SANA ControlNet (2 blocks) with random output projections."""
    torch.manual_seed(seed)
    net = SanaControlNetModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM,
        cross_attention_dim=WIDTH,
        caption_channels=TEXT_DIM,
        mlp_ratio=2.0,
        sample_size=8,
        patch_size=1,
    )
    _randomize([net.input_block, *net.controlnet_blocks])
    return net


def sana_controlnet_inputs(height: int, width: int, batch: int = 1) -> dict[str, Any]:
    """:func:`sana_inputs` plus the latent ``controlnet_cond``."""
    inputs = sana_inputs(height, width, batch)
    inputs["controlnet_cond"] = _latent_like(inputs["hidden_states"])
    return inputs


def sana_inputs(height: int, width: int, batch: int = 1) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, LATENT_CHANNELS, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "timestep": torch.full((batch,), 500.0),
    }


WAN_HEAD_DIM = 12


def wan_transformer(seed: int = 0) -> WanTransformer3DModel:
    """Wan 2.1: 2 blocks of self-attention ``attn1`` (3D RoPE over 4 + 4 + 4 dims) and
    cross-attention ``attn2``, 1x2x2 patches."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=WAN_HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=32,
    )


def wan_inputs(frames: int, height: int, width: int, batch: int = 1) -> dict[str, Any]:
    """Inputs at a latent of ``frames x height x width`` (even sides): ``frames x height/2 x width/2`` tokens."""
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(batch, LATENT_CHANNELS, frames, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=generator),
        "timestep": torch.full((batch,), 500.0),
    }


def wan_vae(seed: int = 0) -> AutoencoderKLWan:
    """A Wan VAE: 8x spatial (3 down-samplings), 4x temporal (the last two), ``LATENT_CHANNELS`` latents."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )


# --- pipelines ---------------------------------------------------------------------------------


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    return _quiet(
        PixArtAlphaPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=t5_encoder(seed=seed),
            vae=kl_vae(seed=seed),
            transformer=pixart_transformer(seed),
            scheduler=DPMSolverMultistepScheduler(),
        )
    )


def sd3_pipeline(dual_attention: bool = False, seed: int = 0) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(text_config()).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_config()).eval()
    return _quiet(
        StableDiffusion3Pipeline(
            transformer=sd3_transformer(dual_attention, seed),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=kl_vae(shift_factor=0.1, seed=seed),
            text_encoder=text_encoder,
            tokenizer=tokenizer(),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer(),
            text_encoder_3=t5_encoder(SD3_JOINT_DIM, seed),
            tokenizer_3=word_tokenizer(),
        )
    )


def flux_pipeline(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    return _quiet(
        FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=kl_vae(shift_factor=0.1, seed=seed),
            text_encoder=CLIPTextModel(text_config()).eval(),
            tokenizer=tokenizer(),
            text_encoder_2=t5_encoder(seed=seed),
            tokenizer_2=word_tokenizer(),
            transformer=flux_transformer(seed),
        )
    )


def flux_controlnet_pipeline(seed: int = 0) -> FluxControlNetPipeline:
    components = flux_pipeline(seed).components
    components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    return _quiet(FluxControlNetPipeline(**components, controlnet=flux_controlnet(seed + 1)))


def sana_pipeline(qk_norm: str | None = None, seed: int = 0) -> SanaPipeline:
    return _quiet(
        SanaPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=gemma_encoder(seed),
            vae=dc_vae(seed),
            transformer=sana_transformer(qk_norm, seed),
            scheduler=DPMSolverMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
            ),
        )
    )


def wan_pipeline(seed: int = 0) -> WanPipeline:
    """Wan text-to-video: the tiny T5 (``text_dim`` of the transformer), a tiny Wan VAE, flow matching."""
    return _quiet(
        WanPipeline(
            tokenizer=word_tokenizer(),
            text_encoder=t5_encoder(seed=seed),
            vae=wan_vae(seed),
            transformer=wan_transformer(seed),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    )


def run_wan(
    pipe: WanPipeline, frames: int, height: int, width: int, seed: int = 0, steps: int = 2
) -> torch.Tensor:
    """Two denoising steps of ``frames`` frames at ``height x width`` px with a fixed generator and
    :data:`TEXT_TOKENS` text tokens; returns the video ``(1, frames, 3, height, width)``."""
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


def control_image(height: int, width: int, seed: int = 5) -> torch.Tensor:
    """A random ``(1, 3, height, width)`` image in [0, 1]."""
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def run_dit(pipe, height: int, width: int, seed: int = 0, steps: int = 2, **kwargs) -> torch.Tensor:
    """Two denoising steps at ``height x width`` px with a fixed generator; returns the images
    ``(1, 3, height, width)`` (or the latents with ``output_type="latent"``).

    Resolution binning is off, text is :data:`TEXT_TOKENS` tokens, and ControlNet pipelines get a
    random control image unless one is passed.
    """
    parameters = inspect.signature(pipe.__call__).parameters
    defaults = {
        "use_resolution_binning": False,
        "complex_human_instruction": None,
        "clean_caption": False,
        "max_sequence_length": TEXT_TOKENS,
    }
    for name, value in defaults.items():
        if name in parameters:
            kwargs.setdefault(name, value)
    if "control_image" in parameters and "control_image" not in kwargs:
        kwargs["control_image"] = control_image(height, width)
    kwargs.setdefault("output_type", "pt")
    kwargs.setdefault("guidance_scale", 2.0)
    output = pipe(
        prompt=PROMPT,
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return output.images
