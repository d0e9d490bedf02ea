"""Local attention in a VAE's middle block at sizes far beyond its training images.

An ``AutoencoderKL`` runs softmax attention over every latent pixel in its middle block, in the
encoder and the decoder. ``linearize`` leaves the VAE as it is, so that attention grows with the
square of the pixel count: a 4096 px image is 262,144 tokens, minutes of a CPU per pass, and more
than the rest of a linear high-resolution chain. Tiling the VAE bounds it too, but every tile is
normalised on its own: the embedded model's encoder moves its latents by a third of their mean
size with 1024 px tiles at 2048 px. Local attention keeps the whole image in one pass and lets
each latent pixel see the disc of pixels as wide as the VAE's training images (its config's
``sample_size``), which is all it ever saw there: at 2048 px, the embedded VAE's latents move
by 0.5% of their mean size and the decoded image by 0.0015 on average (of 2), while encode and
decode take 2-4x less time (bench/README.md, "The VAE's attention at high resolution").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from lindiff.kernels import local_attention

logger = logging.getLogger(__name__)

VAE_ATTENTION_TOKENS = 128 * 128
"""Latent pixels above which the VAE's attention turns local (a 1024 px image of an 8x VAE)."""


def vae_attention_tokens(vae: nn.Module, height: int, width: int) -> int | None:
    """Tokens of the softmax attention in the VAE's middle block for a ``height x width`` px image
    (one per latent pixel), or ``None`` for a VAE without one (or whose config does not say)."""
    config = getattr(vae, "config", {})
    widths = config.get("block_out_channels")
    if (
        not widths
        or not config.get("mid_block_add_attention", True)
        or not hasattr(vae, "set_attn_processor")
    ):
        return None
    factor = 2 ** (len(widths) - 1)
    return (height // factor) * (width // factor)


def vae_attention_radius(vae: nn.Module) -> int:
    """The window radius (latent pixels): the side of the VAE's training images in latent pixels."""
    config = vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    return max(1, int(config.get("sample_size") or 512) // factor)


class LocalVAEAttnProcessor:
    """A VAE attention block whose every latent pixel attends to the disc of ``radius`` pixels
    around it (:func:`lindiff.kernels.local_attention`); a grid of at most ``full_below`` pixels
    (``None``: :data:`VAE_ATTENTION_TOKENS`) gets the exact softmax attention of diffusers'
    ``AttnProcessor2_0``.

    Takes the block's ``(B, C, H, W)`` input, as diffusers' VAE blocks call it.
    """

    def __init__(self, radius: float = 64.0, full_below: int | None = None) -> None:
        self.radius = radius
        self.full_below = full_below

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "LocalVAEAttnProcessor takes a VAE block's (B, C, H, W) self-attention without a mask, "
                f"got hidden_states of shape {tuple(hidden_states.shape)}"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        batch, channels, height, width = hidden_states.shape
        tokens = hidden_states.view(batch, channels, height * width)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens)
        tokens = tokens.transpose(1, 2)
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim) for t in (q, k, v))
        full_below = VAE_ATTENTION_TOKENS if self.full_below is None else self.full_below
        if height * width <= full_below:
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        else:
            out = local_attention(q, k, v, grid=(height, width), radius=self.radius, layout="bnhd")
        out = attn.to_out[1](attn.to_out[0](out.reshape(batch, -1, attn.heads * head_dim).to(q.dtype)))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def local_vae_attention(vae: nn.Module, enabled: bool) -> Iterator[None]:
    """The VAE's attention blocks on :class:`LocalVAEAttnProcessor` (radius
    :func:`vae_attention_radius`) for the duration of the block; their processors afterwards."""
    if not enabled:
        yield
        return
    previous = vae.attn_processors
    radius = vae_attention_radius(vae)
    logger.info("VAE attention above %d latent pixels is local, radius %d", VAE_ATTENTION_TOKENS, radius)
    vae.set_attn_processor(LocalVAEAttnProcessor(radius))
    try:
        yield
    finally:
        vae.set_attn_processor(previous)
