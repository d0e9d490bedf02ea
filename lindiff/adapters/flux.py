"""FLUX.1 transformers and their ControlNets."""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import nn

from ..attention.base import GRID_ATTRIBUTE, LayerInfo, Tokens
from ..grid import TokenGrid
from .base import Batch, MicroConditions, ModelAdapter, call_default, tensor_argument
from .processors import call_mixer, mixer_of, reject_attention_mask, sequence_shard


class FluxMixerAttnProcessor:
    """FLUX attention (diffusers' ``FluxAttnProcessor``) around a lindiff mixer.

    Double-stream layers (``encoder_hidden_states`` given): image tokens through
    ``to_q/to_k/to_v`` (inputs through the mixer's ``query_input``/``key_input``), text tokens
    through ``add_q/add_k/add_v_proj``, RMS norms per side, then ``[text, image]`` concatenated
    (text first) and rotated by RoPE; the output is split back, image through ``to_out``, text
    through ``to_add_out``. Single-stream layers get text and image already concatenated in
    ``hidden_states``; the image tokens are its last ``grid.num_tokens()`` (this process's part of
    them under context parallelism), and the output goes back unprojected (the block's
    ``proj_out`` follows).

    ``hidden_states``: ``(B, N, C)``; returns ``(image, text)`` outputs for double-stream layers,
    ``(B, N, C)`` for single-stream ones.

    Under context parallelism (``_parallel_config`` set by diffusers' ``enable_parallelism``)
    FLUX's plan splits the text and the image tokens, so a call holds this process's part of each
    (text first, as always) and the mixer gets the shard in ``Tokens.shard``.
    """

    _parallel_config: Any = None

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        reject_attention_mask(attention_mask, "lindiff")
        mixer = mixer_of(attn)
        grid = getattr(attn, GRID_ATTRIBUTE, None)
        shard = sequence_shard(self)
        num_image = grid.num_tokens() if shard is None else _length(shard.part(grid.num_tokens()))

        query = attn.norm_q(_heads(attn, attn.to_q(mixer.query_input(hidden_states))))
        key = attn.norm_k(_heads(attn, attn.to_k(mixer.key_input(hidden_states))))
        value = _heads(attn, attn.to_v(hidden_states))

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            num_text = encoder_hidden_states.shape[1]
            text_query = attn.norm_added_q(_heads(attn, attn.add_q_proj(encoder_hidden_states)))
            text_key = attn.norm_added_k(_heads(attn, attn.add_k_proj(encoder_hidden_states)))
            text_value = _heads(attn, attn.add_v_proj(encoder_hidden_states))
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
            image = slice(num_text, num_text + hidden_states.shape[1])
        else:
            total = hidden_states.shape[1]
            image = slice(total - num_image, total)
        if image.start < 0 or _length(image) != num_image:
            raise RuntimeError(_split_unknown(_length(image), num_image))

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = call_mixer(mixer, query, key, value, Tokens(image=image, source=grid, shard=shard))
        out = out.flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        text_out, image_out = out.split_with_sizes([num_text, out.shape[1] - num_text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def _length(part: slice) -> int:
    return part.stop - part.start


def _split_unknown(found: int, expected: int) -> str:
    """The message of a call whose image tokens are not the ones the model's input has."""
    return (
        f"this FLUX attention layer holds {found} image tokens where {expected} were expected from the "
        "model's img_ids: the sequence is split over processes (diffusers' context parallelism) in a way "
        "lindiff's processor was not told about, or not by FLUX's own plan. Call model.enable_parallelism() "
        "after lindiff.linearize(), so that diffusers configures lindiff's processors too"
    )


def _heads(attn: FluxAttention, x: torch.Tensor) -> torch.Tensor:
    """``(B, N, H*D)`` -> ``(B, N, H, D)`` by FLUX's fixed head width (as diffusers splits them)."""
    return x.unflatten(-1, (-1, attn.head_dim))


class FluxAdapter(ModelAdapter):
    """``FluxTransformer2DModel`` and ``FluxControlNetModel``.

    Double-stream blocks (``transformer_blocks.*.attn``, kind ``"joint"``) attend over text then
    image tokens through separate projections; single-stream blocks
    (``single_transformer_blocks.*.attn``, kind ``"single"``) over the concatenated sequence.

    FLUX packs 2x2 latent pixels per token (:meth:`pack_latents`), so latent sides are even and
    the grid is read from ``img_ids`` ``(N, 3)`` (or the deprecated ``(B, N, 3)``): rows are
    ``ids[..., 1]``, columns ``ids[..., 2]``, frames ``ids[..., 0]``; a bare transformer call works
    like a pipeline's.

    Distillation keeps latents unpacked ``(B, 16, H, W)`` (so they can be up-sampled) and packs
    them per call, with the ``img_ids``/``txt_ids`` ``FluxPipeline`` builds, timesteps in
    ``[0, 1]`` and, for guidance-distilled models (``config.guidance_embeds``), the guidance
    scale the training latents were sampled with.
    """

    name = "flux"
    role = "transformer"
    models = (FluxTransformer2DModel,)
    controlnets = (FluxControlNetModel,)
    packing = 2
    """Latent pixels per token side."""

    def __init__(self) -> None:
        self.ids_position = 4
        self._last_ids: tuple[weakref.ref, int, tuple[int, int, int]] | None = None

    def new_grid(self, model: nn.Module) -> TokenGrid:
        self.ids_position = list(inspect.signature(model.forward).parameters).index("img_ids")
        return TokenGrid(patch_size=1)

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        double = [
            LayerInfo(name=f"transformer_blocks.{i}.attn", module=block.attn, kind="joint", grid=grid)
            for i, block in enumerate(model.transformer_blocks)
        ]
        single = [
            LayerInfo(name=f"single_transformer_blocks.{i}.attn", module=block.attn, kind="single", grid=grid)
            for i, block in enumerate(model.single_transformer_blocks)
        ]
        return double + single

    def record_grid(self, grid: TokenGrid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = tensor_argument(args, kwargs, "img_ids", self.ids_position)
        last = self._last_ids
        if last is not None and last[0]() is ids and last[1] == ids._version:
            shape = last[2]  # the pipeline passes the same ids every step: skip the device sync
        else:
            shape = grid_of_ids(ids)
            self._last_ids = (weakref.ref(ids), ids._version, shape)
        grid.set_tokens(*shape)

    def processor(self, layer: LayerInfo) -> FluxMixerAttnProcessor:
        return FluxMixerAttnProcessor()

    def latent_multiple(self, denoiser: nn.Module) -> int:
        return self.packing * int(denoiser.config.get("patch_size") or 1)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)`` tokens, as ``FluxPipeline._pack_latents`` lays them out."""
        batch, channels, height, width = latents.shape
        p = self.packing
        tokens = latents.view(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return tokens.reshape(batch, (height // p) * (width // p), channels * p * p)

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B, H/2 * W/2, 4C)`` tokens -> ``(B, C, H, W)`` (the inverse of :meth:`pack_latents`)."""
        if latents.ndim == 4:
            return latents
        batch, _, packed = latents.shape
        p = self.packing
        tokens = latents.view(batch, height // p, width // p, packed // (p * p), p, p)
        return tokens.permute(0, 3, 1, 4, 2, 5).reshape(batch, packed // (p * p), height, width)

    def encode_prompts(
        self, pipe: Any, denoiser: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
    ) -> Batch:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=device,
            max_sequence_length=call_default(pipe, "max_sequence_length"),
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def guidance_conditions(self, denoiser: nn.Module, guidance_scale: float, batch_size: int) -> Batch:
        if not denoiser.config.get("guidance_embeds"):
            return {}
        return {"guidance": torch.full((batch_size,), float(guidance_scale))}

    def _call_inputs(self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch) -> dict[str, Any]:
        """The keyword arguments FLUX transformers and ControlNets share, for latents ``(B, C, H, W)``."""
        height, width = noisy.shape[-2] // self.packing, noisy.shape[-1] // self.packing
        img_ids = torch.zeros(height, width, 3, device=noisy.device, dtype=noisy.dtype)
        img_ids[..., 1] = torch.arange(height, device=noisy.device)[:, None]
        img_ids[..., 2] = torch.arange(width, device=noisy.device)[None, :]
        text = batch["prompt_embeds"]
        return {
            "hidden_states": self.pack_latents(noisy),
            "timestep": timesteps.to(noisy.dtype) / 1000,
            "guidance": batch.get("guidance"),
            "pooled_projections": batch["pooled_prompt_embeds"],
            "encoder_hidden_states": text,
            "txt_ids": torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            "img_ids": img_ids.reshape(height * width, 3),
        }

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        tokens = denoiser(**self._call_inputs(noisy, timesteps, batch), return_dict=False)[0]
        return self.unpack_latents(tokens, noisy.shape[-2], noisy.shape[-1])


def grid_of_ids(img_ids: torch.Tensor) -> tuple[int, int, int]:
    """``(T, H, W)`` of FLUX image ids ``(N, 3)`` or ``(B, N, 3)`` (frame, row, column per token).

    Tokens are in row-major order (as FLUX packs them), so the width is where the row id first
    changes and the frame size where the frame id first changes. Counting positions rather than
    reading id values keeps this exact for bfloat16 ids, which round rows above 256.

    Raises:
        ValueError: if the ids do not cover ``T x H x W`` tokens in row-major order.
    """
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[-1] != 3 or ids.shape[0] == 0:
        raise ValueError(f"img_ids must have shape (N, 3) or (B, N, 3), got {tuple(img_ids.shape)}")
    total = ids.shape[0]
    changes = torch.stack([_first_change(ids[:, 0]), _first_change(ids[:, 1])])
    frame_size, width = (int(n) for n in changes.tolist())
    width = min(width, frame_size)
    frames, height = total // frame_size, frame_size // width
    if frames * height * width == total:
        rows = ids[:, 1].view(frames, height, width)
        columns = ids[:, 2].view(frames, height, width)
        if bool(((rows == rows[..., :1]).all() & (columns == columns[:, :1]).all()).item()):
            return frames, height, width
    raise ValueError(
        f"img_ids of {total} tokens do not form a frames x rows x columns grid in row-major order "
        f"(first frame {frame_size} tokens, first row {width} tokens)"
    )


def _first_change(column: torch.Tensor) -> torch.Tensor:
    """Index of the first entry that differs from the first one (the length if none does)."""
    differs = column != column[0]
    return torch.where(differs.any(), differs.int().argmax(), column.numel())
