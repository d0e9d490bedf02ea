"""LTX-Video transformers (``LTXVideoTransformer3DModel``)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import LTXAttention, apply_rotary_emb
from torch import nn

from ..attention.base import GRID_ATTRIBUTE, LayerInfo, Tokens
from ..grid import TokenGrid
from .base import Batch, MicroConditions, VideoAdapter, call_default, tensor_argument
from .processors import call_mixer, mixer_of, reject_attention_mask, sequence_shard
from .video import config_patch, token_grid

GRID_ARGUMENTS = ("num_frames", "height", "width")
"""The arguments of ``LTXVideoTransformer3DModel.forward`` that give the latent's ``(F, H, W)``."""


class LTXMixerAttnProcessor:
    """LTX-Video's self-attention ``attn1`` (diffusers' ``LTXVideoAttnProcessor``) around a lindiff mixer.

    Queries and keys: ``to_q``/``to_k`` (inputs through the mixer's ``query_input``/``key_input``),
    RMS norms across all heads (``norm_q``/``norm_k``) and LTX's RoPE on the full width, before the
    split into heads; values: ``to_v``. The mixer replaces softmax attention over the video tokens
    (all of them image tokens, frame-major), and ``to_out`` follows.

    ``hidden_states``: ``(B, N, C)`` with ``N = T * H * W`` tokens; returns ``(B, N, C)``.
    ``image_rotary_emb``: ``(freqs_cos, freqs_sin)``, each ``(B, N, C)``.

    Under context parallelism (``_parallel_config`` set by diffusers' ``enable_parallelism``)
    LTX's plan splits the video tokens and the RoPE tables alike along the sequence (the text,
    split too, only reaches the softmax cross-attention ``attn2``), so a call holds this process's
    consecutive part of the frame-major video tokens with their own rotations, and the mixer gets
    the shard in ``Tokens.shard``.
    """

    _parallel_config: Any = None

    def __call__(
        self,
        attn: LTXAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(
                "lindiff's LTX-Video processor converts self-attention (attn1) only, which takes no "
                f"encoder_hidden_states; got a tensor of shape {tuple(encoder_hidden_states.shape)}"
            )
        reject_attention_mask(attention_mask, "lindiff")
        mixer = mixer_of(attn)
        query = attn.norm_q(attn.to_q(mixer.query_input(hidden_states)))
        key = attn.norm_k(attn.to_k(mixer.key_input(hidden_states)))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        tokens = Tokens(
            image=slice(0, query.shape[1]),
            source=getattr(attn, GRID_ATTRIBUTE, None),
            shard=sequence_shard(self),
        )
        out = call_mixer(mixer, query, key, value, tokens).flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class LTXAdapter(VideoAdapter):
    """``LTXVideoTransformer3DModel`` (LTX-Video 0.9.x, text- and image-to-video).

    Each block's ``attn1`` (kind ``"self"``) attends over the video tokens only; ``attn2``, the
    cross-attention to the text tokens, stays softmax.

    LTX takes packed tokens ``(B, N, C)``; the latent's ``(F, H, W)`` come as the forward
    arguments ``num_frames``, ``height`` and ``width`` (as ``LTXPipeline`` passes them), which over
    ``config.patch_size_t`` and ``config.patch_size`` (1 in the released models) give the
    ``(F / p_t, H / p, W / p)`` tokens in frame-major, row-major order. A call with
    ``video_coords`` instead (``LTXConditionPipeline``, whose conditioning tokens join the
    sequence) is refused.

    Sizes: ``LTXPipeline`` wants height and width divisible by 32 (the VAE's spatial factor, 32
    in the released models, times ``p``). The native size is the area of its default 512 x 704
    px. Frame counts are ``8k + 1`` (the VAE's temporal factor 8, its first frame kept).

    Distillation (text-to-video) calls the transformer as ``LTXPipeline`` does when it samples:
    T5 embeddings padded to ``max_sequence_length`` tokens with their attention mask, timesteps
    ``sigma x 1000``, latents packed frame-major and the latent ``(F, H, W)`` beside them, and the
    RoPE interpolation scale ``(t / frame_rate, s, s)`` of the VAE's factors ``t`` and ``s`` and the
    pipeline's default ``frame_rate``. The teacher's latents (``output_type="latent"``: packed, in
    the denoiser's normalised space, the VAE's ``latents_mean``/``latents_std`` applied only before
    decoding) are unpacked to ``(B, C, F, H, W)`` for the cache and packed again for each call.
    """

    name = "ltx"
    role = "transformer"
    models = (LTXVideoTransformer3DModel,)
    pipeline_pixel_multiple = 32
    frame_rate = 24

    def __init__(self) -> None:
        self.patch_size: tuple[int, int, int] = (1, 1, 1)
        self.positions: dict[str, int] = {}

    def new_grid(self, model: nn.Module) -> TokenGrid:
        self.patch_size = config_patch(model)
        parameters = list(inspect.signature(model.forward).parameters)
        self.positions = {name: parameters.index(name) for name in GRID_ARGUMENTS}
        return TokenGrid(patch_size=1)

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        return [
            LayerInfo(name=f"transformer_blocks.{i}.attn1", module=block.attn1, kind="self", grid=grid)
            for i, block in enumerate(model.transformer_blocks)
        ]

    def record_grid(self, grid: TokenGrid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        latent = [_argument(args, kwargs, name, position) for name, position in self.positions.items()]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in latent):
            given = ", ".join(f"{name}={value!r}" for name, value in zip(GRID_ARGUMENTS, latent, strict=True))
            raise ValueError(
                "lindiff needs the latent size of each LTX-Video transformer call as positive ints "
                f"num_frames, height and width (as LTXPipeline passes them); got {given}. Calls that give "
                "video_coords instead (LTXConditionPipeline) are not supported"
            )
        shape = token_grid(latent, self.patch_size)
        tokens = tensor_argument(args, kwargs, "hidden_states", 0)
        if tokens.ndim != 3 or tokens.shape[1] != math.prod(shape):
            raise ValueError(
                f"expected the LTX-Video transformer's hidden_states as (B, {math.prod(shape)}, C): "
                f"num_frames x height x width = {' x '.join(map(str, latent))} latent pixels in patches of "
                f"{self.patch_size} give {' x '.join(map(str, shape))} tokens; got shape {tuple(tokens.shape)}"
            )
        grid.set_tokens(*shape)

    def processor(self, layer: LayerInfo) -> LTXMixerAttnProcessor:
        return LTXMixerAttnProcessor()

    def latent_multiple(self, denoiser: nn.Module) -> int:
        return config_patch(denoiser)[1]

    def size_multiple(self, pipe: Any) -> int:
        """The VAE's spatial factor times the spatial patch, and a multiple of 32 (``LTXPipeline``'s rule)."""
        vae_factor = int(getattr(pipe, "vae_spatial_compression_ratio", self.pipeline_pixel_multiple))
        return math.lcm(vae_factor * self.latent_multiple(pipe.transformer), self.pipeline_pixel_multiple)

    def native_size(self, pipe: Any) -> int:
        """Side of the square with the area of the pipeline's default ``height x width`` (px):
        600 for LTXPipeline's 512 x 704."""
        return round(math.sqrt(call_default(pipe, "height") * call_default(pipe, "width")))

    def frame_multiple(self, pipe: Any) -> int | None:
        """The VAE's temporal factor (``vae_temporal_compression_ratio``, 8): ``8k + 1`` frames."""
        return int(pipe.vae_temporal_compression_ratio)

    def video_to_video(self, pipe: Any) -> type | None:
        """None: diffusers' LTX refiner, ``LTXConditionPipeline``, calls the transformer with
        ``video_coords``, which this adapter refuses (see the class docstring)."""
        return None

    def spatial_factor(self, pipe: Any) -> int:
        """The VAE's spatial factor (``vae_spatial_compression_ratio``, 32)."""
        return int(pipe.vae_spatial_compression_ratio)

    def latent_shape(self, pipe: Any, size: int, num_frames: int | None) -> tuple[int, ...]:
        """``(F, H, W)`` latent pixels; records the patch ``pipe`` packs with, which
        :meth:`sampled_latents` unpacks."""
        self.patch_size = config_patch(pipe.transformer)
        return super().latent_shape(pipe, size, num_frames)

    def sampled_latents(self, output: Any, shape: tuple[int, ...]) -> torch.Tensor:
        """``LTXPipeline(output_type="latent")``'s packed ``(B, N, C x p_t x p x p)`` -> ``(B, C, F, H, W)``."""
        return unpack(output.frames, shape, self.patch_size)

    def encode_prompts(
        self, pipe: Any, denoiser: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
    ) -> Batch:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt=prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=call_default(pipe, "max_sequence_length"),
            device=device,
        )
        # integers, so that casting the conditions to the training dtype leaves 1 / frame_rate exact
        factors = [
            pipe.vae_temporal_compression_ratio,
            call_default(pipe, "frame_rate"),
            self.spatial_factor(pipe),
        ]
        rope = torch.tensor([factors] * len(prompts), dtype=torch.long, device=device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "rope_factors": rope}

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        """``noisy``: ``(B, C, F, H, W)``; returns the prediction in the same layout."""
        patch = config_patch(denoiser)
        temporal, frame_rate, spatial = batch["rope_factors"][0].tolist()
        frames, height, width = noisy.shape[2:]
        out = denoiser(
            hidden_states=pack(noisy, patch),
            encoder_hidden_states=batch["prompt_embeds"],
            timestep=timesteps,
            encoder_attention_mask=batch["prompt_attention_mask"],
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=(temporal / frame_rate, spatial, spatial),
            return_dict=False,
        )[0]
        return unpack(out, (frames, height, width), patch)


def pack(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """``(B, C, F, H, W)`` -> ``(B, F/p_t x H/p x W/p, C x p_t x p x p)``, as ``LTXPipeline`` packs:
    frame-major tokens, each the channels then the ``(p_t, p, p)`` patch."""
    b, c, f, h, w = latents.shape
    p_t, p, _ = patch
    tokens = latents.reshape(b, c, f // p_t, p_t, h // p, p, w // p, p)
    return tokens.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens: torch.Tensor, shape: tuple[int, ...], patch: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of :func:`pack`: ``(B, N, D)`` -> ``(B, C, F, H, W)`` for ``shape = (F, H, W)``."""
    f, h, w = shape
    p_t, p, _ = patch
    latents = tokens.reshape(tokens.shape[0], f // p_t, h // p, w // p, -1, p_t, p, p)
    return latents.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int) -> Any:
    """The denoiser argument ``name``, passed as ``name=`` or positionally at ``position``."""
    return args[position] if len(args) > position else kwargs.get(name)
