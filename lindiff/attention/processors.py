"""Attention processors of converted layers: the original layer's plumbing around a method's mixer.

A processor reproduces what diffusers' processor of that layer shape does before and after the
attention itself (input norms, projections, q/k norms, rotary embeddings, output projection,
residual), and hands ``q, k, v`` ``(B, N, H, D)`` to the :class:`~lindiff.attention.base.TokenMixer`
that the method put under ``attn.lindiff``. Processors are stateless and constructible with no
arguments (IP-Adapter loading re-creates them with ``cls()``).

The model-family adapters choose the processor of each layer; processors for joint attention
(SD3, FLUX) live with their families' adapters.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from .base import ADDED_MODULE, GRID_ATTRIBUTE, TokenMixer, Tokens
from .common import begin_attention, end_attention, reject_attention_mask, split_heads


def mixer_of(attn: torch.nn.Module) -> TokenMixer:
    """The method's mixer of a converted layer."""
    mixer = getattr(attn, ADDED_MODULE, None)
    if not isinstance(mixer, TokenMixer):
        raise RuntimeError(
            f"{type(attn).__name__} has a lindiff processor but no lindiff mixer under "
            f"`{ADDED_MODULE}`; convert models with lindiff.linearize() instead of setting processors by hand"
        )
    return mixer


def head_norm(norm: torch.nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Apply a q/k norm to ``x`` ``(B, N, H*D)`` as diffusers does: per head, or across heads
    when the norm spans the whole width (SANA's ``rms_norm_across_heads``); returns ``(B, N, H, D)``."""
    batch, tokens, inner = x.shape
    if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape[-1] == inner:
        x = norm(x)
        norm = None
    x = x.view(batch, tokens, heads, inner // heads)
    return x if norm is None else norm(x)


class SelfAttnProcessor:
    """Self-attention of a diffusers ``Attention`` (UNet ``attn1``, PixArt, SANA, SD3.5 ``attn2``).

    ``hidden_states``: ``(B, N, C)`` or ``(B, C, H, W)``; returns the same shape.
    """

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

        query = head_norm(attn.norm_q, attn.to_q(mixer.query_input(hidden_states)), attn.heads)
        key = head_norm(attn.norm_k, attn.to_k(mixer.key_input(context)), attn.heads)
        value = split_heads(attn, attn.to_v(context))

        tokens = Tokens(image=slice(0, query.shape[1]), source=getattr(attn, GRID_ATTRIBUTE, None))
        out = mixer(query, key, value, tokens)
        out = out.reshape(out.shape[0], out.shape[1], -1).to(query.dtype)
        return end_attention(attn, out, call)
