"""Attention processors of converted layers: the original layer's plumbing around a method's mixer.

A processor reproduces what diffusers' processor of that layer shape does before and after the
attention itself (input norms, projections, q/k norms, rotary embeddings, output projection,
residual), and hands ``q, k, v`` ``(B, N, H, D)`` to the :class:`~lindiff.attention.base.TokenMixer`
that the method put under ``attn.lindiff``. Processors are stateless and constructible with no
arguments (IP-Adapter loading re-creates them with ``cls()``).

Where processors live: a processor is family plumbing, so it lives in ``lindiff/adapters/``.
The self-attention processor of diffusers' plain ``Attention`` (UNet ``attn1``, PixArt, SANA,
SD3.5 ``attn2``) and the parts every processor shares are here; a processor that reproduces one
family's diffusers processor (SD3 joint attention, FLUX) lives in that family's adapter file.

Context parallelism: every processor declares ``_parallel_config = None``, so diffusers'
``enable_parallelism`` sets it as it does on its own processors; :func:`call_mixer` then passes
the sequence shard to the mixer (see :mod:`lindiff.parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.models.attention_processor import Attention

from ..attention.base import ADDED_MODULE, GRID_ATTRIBUTE, TokenMixer, Tokens
from ..parallel import SequenceShard, not_supported, shard_of


@dataclass
class AttentionCall:
    """State carried from :func:`begin_attention` to :func:`end_attention`."""

    residual: torch.Tensor
    input_ndim: int
    spatial_shape: tuple[int, int, int] | None  # (C, H, W) for 4-D inputs


def begin_attention(
    attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None
) -> tuple[torch.Tensor, AttentionCall]:
    """diffusers' ``AttnProcessor2_0`` preamble (spatial norm, 4-D inputs, group norm); returns
    tokens ``(B, N, C)`` and the call state."""
    call = AttentionCall(residual=hidden_states, input_ndim=hidden_states.ndim, spatial_shape=None)
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        call.spatial_shape = (channels, height, width)
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, call


def end_attention(attn: Attention, hidden_states: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """The epilogue: output projection, dropout, shape restore, residual and rescale; ``(B, N, H*D)`` in."""
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if call.spatial_shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(hidden_states.shape[0], *call.spatial_shape)
    if attn.residual_connection:
        hidden_states = hidden_states + call.residual
    return hidden_states / attn.rescale_output_factor


def split_heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``(B, N, H*D)`` -> ``(B, N, H, D)`` as a view."""
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, attn.heads, inner // attn.heads)


def reject_attention_mask(attention_mask: torch.Tensor | None, method: str) -> None:
    if attention_mask is not None:
        raise ValueError(
            f"attention_mask is not supported by the {method!r} self-attention (it attends to every "
            "image token); pass attention_mask=None to the denoiser or restore softmax attention"
        )


def mixer_of(attn: torch.nn.Module) -> TokenMixer:
    """The method's mixer of a converted layer."""
    mixer = getattr(attn, ADDED_MODULE, None)
    if not isinstance(mixer, TokenMixer):
        raise RuntimeError(
            f"{type(attn).__name__} has a lindiff processor but no lindiff mixer under "
            f"`{ADDED_MODULE}`; convert models with lindiff.linearize() instead of setting processors by hand"
        )
    return mixer


def sequence_shard(processor: Any) -> SequenceShard | None:
    """The shard of the sequence a processor's calls hold under context parallelism (else ``None``)."""
    return shard_of(processor._parallel_config)


def call_mixer(
    mixer: TokenMixer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tokens: Tokens
) -> torch.Tensor:
    """``mixer(query, key, value, tokens)``, refused on a shard when the mixer cannot run sharded.

    Raises:
        NotImplementedError: ``tokens.shard`` is set and the mixer's method does not support it.
    """
    if tokens.shard is not None and not mixer.context_parallel:
        raise not_supported(mixer.method_name)
    return mixer(query, key, value, tokens)


def head_norm(norm: torch.nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Apply a q/k norm to ``x`` ``(B, N, H*D)`` as diffusers does: per head, or across heads
    when the norm spans the whole width (SANA's ``rms_norm_across_heads``); returns ``(B, N, H, D)``."""
    batch, tokens, inner = x.shape
    if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape[-1] == inner:
        x = norm(x)
        norm = None
    x = x.view(batch, tokens, heads, inner // heads)
    return x if norm is None else norm(x)


def image_qkv(
    attn: Attention, mixer: TokenMixer, hidden_states: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries from ``hidden_states`` and keys/values from ``context`` ``(B, N, C)`` through the
    layer's own projections and q/k norms (their inputs through the mixer's hooks); each ``(B, N, H, D)``."""
    query = head_norm(attn.norm_q, attn.to_q(mixer.query_input(hidden_states)), attn.heads)
    key = head_norm(attn.norm_k, attn.to_k(mixer.key_input(context)), attn.heads)
    return query, key, split_heads(attn, attn.to_v(context))


class SelfAttnProcessor:
    """Self-attention of a diffusers ``Attention`` (UNet ``attn1``, PixArt, SANA, SD3.5 ``attn2``).

    ``hidden_states``: ``(B, N, C)`` or ``(B, C, H, W)``; returns the same shape. Subclasses set
    :attr:`clip_float16` to clip float16 outputs to the finite range (SANA's processor does).
    """

    clip_float16: ClassVar[bool] = False
    _parallel_config: Any = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        reject_attention_mask(attention_mask, "lindiff")
        mixer = mixer_of(attn)
        hidden_states, call = begin_attention(attn, hidden_states, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = image_qkv(attn, mixer, hidden_states, context)
        tokens = Tokens(
            image=slice(0, query.shape[1]),
            source=getattr(attn, GRID_ATTRIBUTE, None),
            shard=sequence_shard(self),
        )
        out = call_mixer(mixer, query, key, value, tokens)
        out = end_attention(attn, out.reshape(out.shape[0], out.shape[1], -1).to(query.dtype), call)
        if self.clip_float16 and out.dtype == torch.float16:
            return out.clip(-65504, 65504)
        return out
