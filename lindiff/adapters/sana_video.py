"""SANA-Video transformers (``SanaVideoTransformer3DModel``: linear-attention video DiTs)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import SanaVideoTransformer3DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from ..attention.base import GRID_ATTRIBUTE, LayerInfo, Tokens
from ..attention.sana import SanaLinearAttention
from ..grid import TokenGrid
from .processors import call_mixer, head_norm, mixer_of, reject_attention_mask, sequence_shard, split_heads
from .video import PatchedVideoAdapter
from .wan import apply_wan_rotary


class SanaVideoMixerAttnProcessor:
    """SANA-Video's self-attention ``attn1`` (diffusers' ``SanaLinearAttnProcessor3_0``) around a
    lindiff mixer.

    Queries and keys: ``to_q``/``to_k`` (inputs through the mixer's ``query_input``/``key_input``)
    and the RMS norms across heads; values: ``to_v``; ``to_out`` after the mixer. The ``"sana"``
    method computes SANA-Video's own attention, ReLU features with the 3D RoPE in the numerator
    only (:meth:`~lindiff.attention.sana.SanaLinearAttention.rotary`); any other method's mixer
    gets the queries and keys rotated by the RoPE (as Wan's softmax attention has them) in place
    of that attention.

    ``hidden_states``: ``(B, N, C)`` with ``N = T * H * W`` video tokens, frame-major; returns
    ``(B, N, C)`` in its dtype. ``rotary_emb``: ``(freqs_cos, freqs_sin)``, each ``(1, N, 1, D)``.
    """

    _parallel_config: Any = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(
                "lindiff's SANA-Video processor converts self-attention (attn1) only, which takes no "
                f"encoder_hidden_states; got a tensor of shape {tuple(encoder_hidden_states.shape)}"
            )
        reject_attention_mask(attention_mask, "lindiff")
        if sequence_shard(self) is not None:
            raise NotImplementedError(
                "lindiff's SANA-Video processor does not run under context parallelism: diffusers has no "
                "context-parallel plan for SanaVideoTransformer3DModel"
            )
        mixer = mixer_of(attn)
        query = head_norm(attn.norm_q, attn.to_q(mixer.query_input(hidden_states)), attn.heads)
        key = head_norm(attn.norm_k, attn.to_k(mixer.key_input(hidden_states)), attn.heads)
        value = split_heads(attn, attn.to_v(hidden_states))
        tokens = Tokens(image=slice(0, query.shape[1]), source=getattr(attn, GRID_ATTRIBUTE, None))
        if rotary_emb is None:
            out = call_mixer(mixer, query, key, value, tokens)
        elif isinstance(mixer, SanaLinearAttention):
            out = mixer.rotary(query, key, value, tokens, lambda x: apply_wan_rotary(x, *rotary_emb))
        else:
            query, key = apply_wan_rotary(query, *rotary_emb), apply_wan_rotary(key, *rotary_emb)
            out = call_mixer(mixer, query, key, value, tokens)
        out = out.flatten(2, 3).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class SanaVideoAdapter(PatchedVideoAdapter):
    """``SanaVideoTransformer3DModel`` (SANA-Video text- and image-to-video).

    Each block's ``attn1`` (kind ``"self"``) is ReLU linear attention over the video tokens with a
    3D RoPE (``"sana"`` runs it as is); ``attn2``, the cross-attention to the text, stays softmax.

    The grid is read at the transformer's entry: ``hidden_states`` ``(B, C, F, H, W)`` over
    ``config.patch_size`` ``(p_t, p_h, p_w)`` (``(1, 2, 2)``), floored as the Conv3d patchify
    does, in frame-major, row-major order.

    Sizes: ``SanaVideoPipeline`` accepts multiples of 32 px (more than the VAE's 8x times the
    2x2 patch). The native size is the area of the pipeline's default ``height x width``
    (832 x 480).
    """

    name = "sana_video"
    title = "SANA-Video"
    role = "transformer"
    models = (SanaVideoTransformer3DModel,)
    pipeline_pixel_multiple = 32

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return [
            LayerInfo(name=f"transformer_blocks.{i}.attn1", module=block.attn1, kind="self", grid=grid)
            for i, block in enumerate(model.transformer_blocks)
        ]

    def processor(self, layer: LayerInfo) -> SanaVideoMixerAttnProcessor:
        return SanaVideoMixerAttnProcessor()
