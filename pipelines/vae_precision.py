"""The VAE in bfloat16 on CPUs that compute it natively, for high-resolution stages.

Above 1024 px the VAE's encode and decode are most of a linear high-resolution chain's time on a
CPU (79% at 2048 px and 85% at 8192 px for the embedded model, ``bench/scaling.py``), nearly all of
it convolutions, group norms and SiLUs over full-resolution activations of few channels. On CPUs
with bfloat16 arithmetic (AVX512-BF16 or AMX), running the encoder and decoder under CPU autocast
to bfloat16 in channels-last memory makes them 2.9x faster (the embedded VAE at 2048 px with local
attention: encode and decode 11.2 s -> 3.9 s) and halves their activations, while the latents move
by 0.5% of their mean size and the decoded image by 0.009 on average (of 2; ``bench/README.md``,
"The VAE's attention at high resolution"). The latent distribution and the quantisation
convolutions stay in float32, and so do the encoder's and decoder's outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .vae_attention import VAE_ATTENTION_TOKENS, vae_attention_tokens

BF16_VAE_TOKENS = VAE_ATTENTION_TOKENS
"""Latent pixels above which ``bf16_vae="auto"`` runs the VAE in bfloat16 (a 1024 px image of an 8x
VAE): smaller stages cost little and stay exactly as in float32."""


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX), where bfloat16 convolutions
    are faster than float32 ones rather than emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def wants_bf16_vae(vae: nn.Module, height: int, width: int, device: torch.device) -> bool:
    """``bf16_vae="auto"``: a float32 VAE on a CPU with bfloat16 arithmetic, for an image of more
    than :data:`BF16_VAE_TOKENS` latent pixels."""
    tokens = vae_attention_tokens(vae, height, width)
    return (
        torch.device(device).type == "cpu"
        and getattr(vae, "dtype", None) == torch.float32
        and tokens is not None
        and tokens > BF16_VAE_TOKENS
        and cpu_computes_bf16()
    )


def _in_bf16(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``forward`` under CPU autocast to bfloat16, its output cast back to float32."""

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = forward(*args, **kwargs)
        return output.float()

    return run


@contextlib.contextmanager
def bf16_vae(vae: nn.Module, enabled: bool) -> Iterator[None]:
    """The VAE's ``encoder`` and ``decoder`` under CPU bfloat16 autocast with channels-last weights
    for the duration of the block (nothing when not ``enabled``); as before afterwards.

    Raises:
        ValueError: ``enabled`` for a VAE without an ``encoder`` and a ``decoder`` module.
    """
    if not enabled:
        yield
        return
    parts = [getattr(vae, name, None) for name in ("encoder", "decoder")]
    if not all(isinstance(part, nn.Module) for part in parts):
        raise ValueError(
            f"bf16_vae=True needs a VAE with encoder and decoder modules; {type(vae).__name__} has none"
        )
    own = [part.__dict__.get("forward") for part in parts]  # a forward set on the instance (hooks)
    for part in parts:
        part.forward = _in_bf16(part.forward)
        part.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for part, forward in zip(parts, own, strict=True):
            if forward is None:
                del part.forward  # the class's forward again
            else:
                part.forward = forward
            part.to(memory_format=torch.contiguous_format)
