"""Wan 2.x video transformers (``WanTransformer3DModel``: text-to-video and image-to-video)."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention
from torch import nn

from ..attention.base import GRID_ATTRIBUTE, LayerInfo, Tokens
from ..grid import TokenGrid
from .base import (
    Batch,
    MicroConditions,
    call_default,
)
from .processors import call_mixer, mixer_of, reject_attention_mask, sequence_shard
from .video import PatchedVideoAdapter


def apply_wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's 3D RoPE on ``x`` ``(B, N, H, D)`` with ``freqs_cos``/``freqs_sin`` ``(1, N, 1, D)``
    (``WanRotaryPosEmbed``'s output, each frequency repeated twice along ``D``).

    Channels ``(2i, 2i + 1)`` are rotated as a pair by the angle of frequency ``i``, in the
    frequencies' dtype (float64 by default), and the result is cast back to ``x``'s dtype, exactly
    as diffusers' ``WanAttnProcessor`` does (FLUX's ``apply_rotary_emb`` keeps ``x``'s dtype).
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanMixerAttnProcessor:
    """Wan's self-attention ``attn1`` (diffusers' ``WanAttnProcessor``) around a lindiff mixer.

    Queries and keys: ``to_q``/``to_k`` (inputs through the mixer's ``query_input``/``key_input``),
    RMS norms across all heads (``norm_q``/``norm_k``), the split into heads, then the 3D RoPE
    (:func:`apply_wan_rotary`); values: ``to_v``. The mixer replaces softmax attention over the
    video tokens (all of them image tokens, frame-major), and ``to_out`` follows.

    ``hidden_states``: ``(B, N, C)`` with ``N = T * H * W`` tokens; returns ``(B, N, C)``.
    ``rotary_emb``: ``(freqs_cos, freqs_sin)``, each ``(1, N, 1, D)``.

    Under context parallelism (``_parallel_config`` set by diffusers' ``enable_parallelism``)
    Wan's plan splits the tokens entering ``blocks.0`` and the RoPE tables alike along the
    sequence, so a call holds this process's consecutive part of the frame-major video tokens with
    their own rotations, and the mixer gets the shard in ``Tokens.shard``.
    """

    _parallel_config: Any = None

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(
                "lindiff's Wan processor converts self-attention (attn1) only, which takes no "
                f"encoder_hidden_states; got a tensor of shape {tuple(encoder_hidden_states.shape)}"
            )
        reject_attention_mask(attention_mask, "lindiff")
        mixer = mixer_of(attn)
        query = attn.norm_q(attn.to_q(mixer.query_input(hidden_states))).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(mixer.key_input(hidden_states))).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_wan_rotary(query, *rotary_emb)
            key = apply_wan_rotary(key, *rotary_emb)
        tokens = Tokens(
            image=slice(0, query.shape[1]),
            source=getattr(attn, GRID_ATTRIBUTE, None),
            shard=sequence_shard(self),
        )
        out = call_mixer(mixer, query, key, value, tokens).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanAdapter(PatchedVideoAdapter):
    """``WanTransformer3DModel`` (Wan 2.1 / 2.2, text- and image-to-video).

    Each block's ``attn1`` (kind ``"self"``) attends over the video tokens only; ``attn2``, the
    cross-attention to the text (and, image-to-video, the image) tokens, stays softmax.

    The grid is read at the transformer's entry: ``hidden_states`` ``(B, C, F, H, W)`` over
    ``config.patch_size`` ``(p_t, p_h, p_w)`` (Wan: ``(1, 2, 2)``), floored as Wan's patchify
    does, gives ``(F / p_t, H / p_h, W / p_w)`` tokens in frame-major, row-major order.

    Sizes: height and width are multiples of the VAE's spatial factor (8; 16 in Wan 2.2 TI2V-5B)
    times the spatial patch (2), i.e. 16 px. The native size is the area of the pipeline's default
    ``height x width`` (832 x 480 for the 480p models; the 720p ones share that default). Frame
    counts are ``4k + 1`` (the VAE's temporal factor 4, its first frame kept), which ``WanPipeline``
    itself rounds to.

    Distillation (text-to-video): prompts are encoded as ``WanPipeline`` does when it samples (T5,
    padded to ``max_sequence_length`` tokens, no mask), and the teacher's latents stay in the
    denoiser's normalised space (the pipeline applies the VAE's ``latents_mean``/``latents_std``
    only before decoding). Image-to-video transformers (image tokens, condition channels) are refused.
    """

    name = "wan"
    title = "Wan"
    role = "transformer"
    models = (WanTransformer3DModel,)
    frame_rate = 16

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return [
            LayerInfo(name=f"blocks.{i}.attn1", module=block.attn1, kind="self", grid=grid)
            for i, block in enumerate(model.blocks)
        ]

    def processor(self, layer: LayerInfo) -> WanMixerAttnProcessor:
        return WanMixerAttnProcessor()

    def video_to_video(self, pipe: Any) -> type | None:
        """``WanVideoToVideoPipeline`` for a text-to-video ``WanPipeline`` with one transformer (not
        image-to-video, not Wan 2.2's two experts, which it has no place for)."""
        from diffusers import WanPipeline, WanVideoToVideoPipeline  # pipelines import transformers: lazily

        if not isinstance(pipe, WanPipeline) or getattr(pipe, "transformer_2", None) is not None:
            return None
        if importlib.util.find_spec("ftfy") is None:  # diffusers 0.42 calls it without checking
            raise ImportError(
                "WanVideoToVideoPipeline cleans prompts with ftfy, which is not installed: "
                "pip install 'lindiff[video]' (or ftfy)"
            )
        return WanVideoToVideoPipeline

    def check_distillation(self, pipe: Any, num_frames: int | None) -> None:
        super().check_distillation(pipe, num_frames)
        config = pipe.transformer.config
        if config.image_dim is not None or config.in_channels != config.out_channels:
            raise ValueError(
                f"{type(pipe).__name__}: distillation trains Wan text-to-video transformers; this one takes "
                f"image conditions (image_dim={config.image_dim}, in_channels={config.in_channels}, "
                f"out_channels={config.out_channels})"
            )

    def encode_prompts(
        self, pipe: Any, denoiser: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
    ) -> Batch:
        embeds, _ = pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=call_default(pipe, "max_sequence_length"),
            device=device,
        )
        return {"prompt_embeds": embeds}

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=batch["prompt_embeds"],
            return_dict=False,
        )[0]
