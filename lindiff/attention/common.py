"""The parts of a diffusers attention call that every lindiff processor shares.

diffusers' ``AttnProcessor2_0`` wraps the attention math in a fixed preamble (spatial norm,
4-D inputs, group norm) and epilogue (output projection, residual, rescale). Processors here
reuse these two functions so only the attention math differs between methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention


@dataclass
class AttentionCall:
    """State carried from :func:`begin_attention` to :func:`end_attention`."""

    residual: torch.Tensor
    input_ndim: int
    spatial_shape: tuple[int, int, int] | None  # (C, H, W) for 4-D inputs


def begin_attention(
    attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None
) -> tuple[torch.Tensor, AttentionCall]:
    """Apply the module's input normalisations; returns tokens ``(B, N, C)`` and the call state."""
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
    """Output projection, dropout, shape restore, residual and rescale; ``(B, N, H*D)`` in."""
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
