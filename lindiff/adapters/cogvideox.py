"""CogVideoX and CogVideoX 1.5 video transformers (``CogVideoXTransformer3DModel``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention.base import GRID_ATTRIBUTE, LayerInfo, Tokens
from ..grid import TokenGrid
from .base import PIPELINE_PIXEL_MULTIPLE, call_default
from .processors import call_mixer, mixer_of, reject_attention_mask, sequence_shard, split_heads
from .video import PatchedVideoAdapter


class CogVideoXMixerAttnProcessor:
    """CogVideoX's joint attention ``attn1`` (diffusers' ``CogVideoXAttnProcessor2_0``) around a
    lindiff mixer.

    The block passes the video tokens as ``hidden_states`` and the text tokens as
    ``encoder_hidden_states``; they are concatenated ``[text, video]`` (text first) and go through
    the same ``to_q/to_k/to_v`` (inputs through the mixer's ``query_input``/``key_input``), the
    split into heads and the per-head LayerNorms ``norm_q``/``norm_k``. RoPE (CogVideoX-5B and 1.5;
    the 2B model has none) rotates the video queries and keys only. The mixer replaces softmax
    attention over the whole sequence, with the video tokens as its image tokens, and ``to_out``
    follows.

    ``hidden_states``: ``(B, N, C)`` video tokens, ``N = T * H * W``; ``encoder_hidden_states``:
    ``(B, M, C)`` text tokens. Returns ``(video, text)`` outputs, ``(B, N, C)`` and ``(B, M, C)``.
    ``image_rotary_emb``: ``(freqs_cos, freqs_sin)``, each ``(N, D)``.

    diffusers has no context-parallel plan for CogVideoX; a plan given to ``enable_parallelism``
    reaches the mixer as ``Tokens.shard`` (this process's part of the text and of the video).
    """

    _parallel_config: Any = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reject_attention_mask(attention_mask, "lindiff")
        mixer = mixer_of(attn)
        num_text = encoder_hidden_states.shape[1]
        sequence = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query = split_heads(attn, attn.to_q(mixer.query_input(sequence)))
        key = split_heads(attn, attn.to_k(mixer.key_input(sequence)))
        value = split_heads(attn, attn.to_v(sequence))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = _rotate_video(query, num_text, image_rotary_emb)
            key = _rotate_video(key, num_text, image_rotary_emb)
        tokens = Tokens(
            image=slice(num_text, sequence.shape[1]),
            source=getattr(attn, GRID_ATTRIBUTE, None),
            shard=sequence_shard(self),
        )
        out = call_mixer(mixer, query, key, value, tokens).flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, video_out = out.split_with_sizes([num_text, out.shape[1] - num_text], dim=1)
        return video_out, text_out


def _rotate_video(x: torch.Tensor, num_text: int, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x`` ``(B, M + N, H, D)`` with diffusers' ``apply_rotary_emb`` on the ``N`` video tokens
    (after the ``M`` text tokens, which stay as they are)."""
    video = apply_rotary_emb(x[:, num_text:], rotary, sequence_dim=1)
    return torch.cat([x[:, :num_text], video], dim=1)


class CogVideoXAdapter(PatchedVideoAdapter):
    """``CogVideoXTransformer3DModel`` (CogVideoX 2B / 5B, text- and image-to-video, and 1.5).

    Each block's ``attn1`` (kind ``"joint"``) attends over the text then the video tokens in one
    sequence; there is no separate cross-attention.

    The grid is read at the transformer's entry: ``hidden_states`` ``(B, F, C, H, W)`` (frames
    before channels) over ``config.patch_size`` ``p`` and, in 1.5, ``config.patch_size_t``
    ``p_t``, gives ``(F / p_t, H / p, W / p)`` tokens in frame-major, row-major order (1.0 patches
    each frame alone: ``p_t = 1``). ``CogVideoXPipeline`` pads 1.5's latent frames to a multiple of
    ``p_t``.

    Sizes: height and width are multiples of the VAE's spatial factor (8) times ``p`` (2), i.e. 16 px.
    The native size is the area of the pipeline's default size, which ``CogVideoXPipeline`` takes
    from the transformer's ``sample_height x sample_width`` latents: 480 x 720 px for CogVideoX,
    768 x 1360 for 1.5. Frame counts are ``4k + 1`` (the VAE's temporal factor 4, its first frame
    kept).
    """

    name = "cogvideox"
    title = "CogVideoX"
    frames_first = True
    role = "transformer"
    models = (CogVideoXTransformer3DModel,)
    frame_rate = 8

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return [
            LayerInfo(name=f"transformer_blocks.{i}.attn1", module=block.attn1, kind="joint", grid=grid)
            for i, block in enumerate(model.transformer_blocks)
        ]

    def processor(self, layer: LayerInfo) -> CogVideoXMixerAttnProcessor:
        return CogVideoXMixerAttnProcessor()

    def native_size(self, pipe: Any) -> int:
        """Side of the square with the area of the pipeline's default ``height x width`` (px), which
        ``CogVideoXPipeline`` derives from the transformer's sample size: 588 for 480 x 720."""
        vae_factor = int(getattr(pipe, "vae_scale_factor_spatial", PIPELINE_PIXEL_MULTIPLE))
        config = pipe.transformer.config
        height = call_default(pipe, "height") or config.sample_height * vae_factor
        width = call_default(pipe, "width") or config.sample_width * vae_factor
        return round(math.sqrt(height * width))

    def frame_multiple(self, pipe: Any) -> int | None:
        """The VAE's temporal factor (4): ``4k + 1`` frames."""
        return int(pipe.vae_scale_factor_temporal)

    def video_to_video(self, pipe: Any) -> type | None:
        """``CogVideoXVideoToVideoPipeline`` for a text-to-video ``CogVideoXPipeline``."""
        from diffusers import CogVideoXPipeline, CogVideoXVideoToVideoPipeline  # lazily, as in wan.py

        return CogVideoXVideoToVideoPipeline if isinstance(pipe, CogVideoXPipeline) else None
