"""HunyuanVideo transformers (``HunyuanVideoTransformer3DModel``: text- and image-to-video)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..attention.base import GRID_ATTRIBUTE, LayerInfo, TokenMixer, Tokens
from ..grid import TokenGrid
from .processors import call_mixer, mixer_of, sequence_shard
from .video import PatchedVideoAdapter


class HunyuanVideoMixerAttnProcessor:
    """HunyuanVideo attention (diffusers' ``HunyuanVideoAttnProcessor2_0``) around a lindiff mixer.

    Tokens are ``[video, text]``: video first (the reverse of FLUX), so ``Tokens.image`` is
    ``slice(0, N_video)``. Dual-stream layers (``attn.add_q_proj`` set): video through
    ``to_q/to_k/to_v`` (inputs through the mixer's ``query_input``/``key_input``), text through
    ``add_q/add_k/add_v_proj``, RMS norms per head and side, RoPE on the video queries and keys,
    then ``[video, text]`` concatenated; outputs go back through ``to_out`` and ``to_add_out``.
    Single-stream layers project ``[video, text]`` with ``to_q/to_k/to_v``, rotate the video part,
    and return both parts unprojected (the block's ``proj_out`` follows).

    ``attention_mask`` is the model's ``(B, 1, 1, N)`` boolean key mask: every video token and the
    first ``L_b`` text tokens of batch item ``b`` are kept (``L_b``, the ones in
    ``encoder_attention_mask``), the padded tail of the text is masked. The mixer gets each batch
    item's kept tokens only (items of one length in one call), so padded text keys and values take
    no part, as in diffusers' softmax. The outputs of padded text tokens are zero: no later layer
    reads them (they are masked keys everywhere), and the model's output is the video tokens alone.

    ``hidden_states``: ``(B, N_video, C)``; ``encoder_hidden_states``: ``(B, N_text, C)``;
    ``image_rotary_emb``: ``(freqs_cos, freqs_sin)``, each ``(N_video, D)``. Returns the video and
    text outputs, ``(B, N_video, C)`` and ``(B, N_text, C)``.
    """

    _parallel_config: Any = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if sequence_shard(self) is not None:
            raise NotImplementedError(
                "lindiff's HunyuanVideo processor does not run under context parallelism: diffusers has "
                "no context-parallel plan for HunyuanVideoTransformer3DModel"
            )
        mixer = mixer_of(attn)
        num_video = hidden_states.shape[1]
        dual = attn.add_q_proj is not None and encoder_hidden_states is not None
        if not dual and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = _norm(attn.norm_q, _heads(attn, attn.to_q(mixer.query_input(hidden_states))))
        key = _norm(attn.norm_k, _heads(attn, attn.to_k(mixer.key_input(hidden_states))))
        value = _heads(attn, attn.to_v(hidden_states))
        if image_rotary_emb is not None:
            query = _rotate_video(query, image_rotary_emb, num_video)
            key = _rotate_video(key, image_rotary_emb, num_video)
        if dual:
            text_query = _norm(attn.norm_added_q, _heads(attn, attn.add_q_proj(encoder_hidden_states)))
            text_key = _norm(attn.norm_added_k, _heads(attn, attn.add_k_proj(encoder_hidden_states)))
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, _heads(attn, attn.add_v_proj(encoder_hidden_states))], dim=1)

        tokens = Tokens(image=slice(0, num_video), source=getattr(attn, GRID_ATTRIBUTE, None))
        lengths = kept_lengths(attention_mask, query.shape[0], query.shape[1], num_video)
        out = mix_kept(mixer, query, key, value, tokens, lengths).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        video_out, text_out = out[:, :num_video], out[:, num_video:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def kept_lengths(mask: torch.Tensor | None, batch: int, total: int, num_video: int) -> list[int] | None:
    """How many leading tokens of each batch item's ``[video, text]`` sequence ``mask`` keeps as keys
    (``None``: all of every item's).

    Args:
        mask: HunyuanVideo's boolean key mask ``(B, 1, 1, N)`` (or ``(B, N)``), ``True`` = attend.
        batch, total: ``B`` and ``N`` of the call.
        num_video: the video tokens at the start of the sequence, which must all be kept.

    Raises:
        ValueError: the mask is not boolean, has another shape, masks a video token or is not a
            kept prefix followed by a masked tail (what the model builds from right-padded text).
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.numel() != batch * total or mask.shape[-1] != total:
        raise ValueError(
            f"attention_mask must be HunyuanVideo's boolean key mask of shape ({batch}, 1, 1, {total}); "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    mask = mask.reshape(batch, total)
    counts = mask.sum(dim=1)
    prefix = mask == (torch.arange(total, device=mask.device) < counts[:, None])
    well_formed = prefix.all(dim=1) & (counts >= num_video)
    counts, well_formed = torch.stack([counts, well_formed.long()]).tolist()  # one host sync
    if not all(well_formed):
        raise ValueError(
            "attention_mask must keep every video token and a prefix of the text tokens of each batch item "
            f"(right-padded text), as HunyuanVideoTransformer3DModel builds it; got kept-key counts {counts} "
            f"of {total} tokens ({num_video} video) with keys masked in the middle or among the video tokens"
        )
    return None if all(count == total for count in counts) else counts


def mix_kept(
    mixer: TokenMixer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    tokens: Tokens,
    lengths: list[int] | None,
) -> torch.Tensor:
    """The mixer over each batch item's first ``lengths[b]`` tokens (``None``: all), batch items of
    one length in one call; ``(B, N, H, D)`` in, ``(B, N, H, D_v)`` out with zeros past each length."""
    if lengths is None:
        return call_mixer(mixer, query, key, value, tokens)
    out: torch.Tensor | None = None
    for length in sorted(set(lengths)):
        rows = torch.tensor([b for b, n in enumerate(lengths) if n == length], device=query.device)
        part = call_mixer(mixer, query[rows, :length], key[rows, :length], value[rows, :length], tokens)
        if out is None:
            out = part.new_zeros(*query.shape[:3], part.shape[-1])
        out[rows, :length] = part
    return out


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``(B, N, H*D)`` -> ``(B, N, H, D)``."""
    return x.unflatten(2, (attn.heads, -1))


def _norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def _rotate_video(
    x: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor], num_video: int
) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` on the first ``num_video`` tokens of ``x`` ``(B, N, H, D)``."""
    if x.shape[1] == num_video:
        return apply_rotary_emb(x, rotary_emb, sequence_dim=1)
    video = apply_rotary_emb(x[:, :num_video], rotary_emb, sequence_dim=1)
    return torch.cat([video, x[:, num_video:]], dim=1)


class HunyuanVideoAdapter(PatchedVideoAdapter):
    """``HunyuanVideoTransformer3DModel`` (HunyuanVideo text-to-video and its image-to-video variants).

    Dual-stream blocks (``transformer_blocks.*.attn``, kind ``"joint"``) attend over video then
    text tokens through separate projections; single-stream blocks
    (``single_transformer_blocks.*.attn``, kind ``"single"``) over ``[video, text]`` concatenated.
    The token refiner's text self-attention (``context_embedder``) stays softmax.

    The grid is read at the transformer's entry: ``hidden_states`` ``(B, C, F, H, W)`` over
    ``(config.patch_size_t, config.patch_size, config.patch_size)`` (``(1, 2, 2)``), floored as the
    Conv3d patchify does, in frame-major, row-major order.

    Sizes: height and width are multiples of the VAE's spatial factor (8) times the patch (2),
    16 px, which ``HunyuanVideoPipeline`` also demands. The native size is the area of the
    pipeline's default ``height x width`` (1280 x 720). Frame counts are ``4k + 1``.
    """

    name = "hunyuan_video"
    title = "HunyuanVideo"
    role = "transformer"
    models = (HunyuanVideoTransformer3DModel,)

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        dual = [
            LayerInfo(name=f"transformer_blocks.{i}.attn", module=block.attn, kind="joint", grid=grid)
            for i, block in enumerate(model.transformer_blocks)
        ]
        single = [
            LayerInfo(name=f"single_transformer_blocks.{i}.attn", module=block.attn, kind="single", grid=grid)
            for i, block in enumerate(model.single_transformer_blocks)
        ]
        return dual + single

    def processor(self, layer: LayerInfo) -> HunyuanVideoMixerAttnProcessor:
        return HunyuanVideoMixerAttnProcessor()
