"""Stage: train the tiny-shapes AutoencoderKL on random crops of rendered scenes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import architectures
from .corpus import Corpus
from .loop import train

KL_WEIGHT = 1e-6
LATENT_NOISE = 0.5
"""Largest std of the noise added to latents (relative to their std) before decoding in training:
it makes the encoder keep shape identity in coarse codes that a denoiser's error does not move."""


def train_vae(
    corpus: Corpus,
    work_dir: Path,
    *,
    steps: int,
    batch_size: int = 4,
    object_weight: float = 10.0,
    latent_noise: float = LATENT_NOISE,
    seed: int = 0,
    device: torch.device,
) -> AutoencoderKL:
    """Train on the corpus, then set ``scaling_factor``.

    The first two thirds of the steps see the images at half size and twice the batch (the
    model is convolutional, and colours are learnt at any scale), the rest at full size.
    The loss is L1 + MSE reconstruction of the posterior mean (the UNet trains on means), with
    object pixels weighted ``object_weight`` times the background (objects cover a small part
    of each image, and their colours are what captions name), plus a small KL term.
    The decoder sees the latents with Gaussian noise of a random std up to ``latent_noise``
    times the batch's latent std (:func:`_add_latent_noise`), as l-DeTok's latent-denoising
    tokenizers do: a denoiser never lands exactly on a training latent.
    ``scaling_factor`` becomes ``1 / std`` of the latent means of 512 images, as Stable
    Diffusion's VAE defines it.
    """
    torch.manual_seed(seed)
    vae = architectures.vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-4, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    coarse_steps = 2 * steps // 3

    def step(i: int) -> torch.Tensor:
        coarse = i < coarse_steps
        index = rng.integers(len(corpus), size=2 * batch_size if coarse else batch_size)
        images = corpus.tensors(index).to(device)
        weight = _pixel_weight(corpus, index, object_weight).to(device)
        if coarse:
            images, weight = F.avg_pool2d(images, 2), F.avg_pool2d(weight, 2)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(_add_latent_noise(posterior.mode(), latent_noise)).sample
        return _reconstruction_loss(recon, images, weight) + KL_WEIGHT * posterior.kl().mean()

    train("vae", work_dir, vae, optimizer, step, steps, warmup=30, clip=None)
    vae.eval()
    with torch.no_grad():
        sample = corpus.tensors(rng.integers(len(corpus), size=min(512, len(corpus))))
        means = torch.cat([vae.encode(chunk.to(device)).latent_dist.mean for chunk in sample.split(64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae.cpu()


def finetune_decoder(
    vae: AutoencoderKL,
    corpus: Corpus,
    latents: torch.Tensor,
    work_dir: Path,
    *,
    steps: int,
    batch_size: int = 16,
    object_weight: float = 10.0,
    latent_noise: float = 0.0,
    seed: int = 0,
    device: torch.device,
) -> AutoencoderKL:
    """Fine-tune only the decoder on ``latents`` ``(N, 4, S/8, S/8)`` (scaled, from :func:`encode`) -> corpus images.

    The encoder, and so the latents the UNet learns, stay as they are; the decoder sees full
    size images at a larger batch than :func:`train_vae` could afford (as Stable Diffusion's
    ft-MSE decoder was made). Same loss as :func:`train_vae`, without the KL term, and by
    default on clean latents: a decoder trained under latent noise learns to draw the average
    of what nearby latents decode to (rounded stars, merged circles).
    """
    torch.manual_seed(seed)
    vae = vae.to(device).train()
    vae.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    rng = np.random.default_rng(seed + 1)
    scale = vae.config.scaling_factor

    def step(i: int) -> torch.Tensor:
        index = rng.integers(len(corpus), size=batch_size)
        images = corpus.tensors(index).to(device)
        noisy = _add_latent_noise(latents[index].to(device), latent_noise)
        recon = vae.decode(noisy / scale).sample
        return _reconstruction_loss(recon, images, _pixel_weight(corpus, index, object_weight).to(device))

    train("decoder", work_dir, vae, optimizer, step, steps, warmup=20, clip=None)
    vae.requires_grad_(True)
    return vae.cpu().eval()


def _add_latent_noise(latents: torch.Tensor, latent_noise: float) -> torch.Tensor:
    """``latents`` ``(B, C, h, w)`` plus noise of std ``U(0, latent_noise)`` per example, relative to their std."""
    if latent_noise == 0:
        return latents
    level = torch.rand(len(latents), 1, 1, 1, device=latents.device) * latent_noise
    return latents + level * latents.detach().std() * torch.randn_like(latents)


def _pixel_weight(corpus: Corpus, index: np.ndarray, object_weight: float) -> torch.Tensor:
    """``(B, 1, S, S)`` loss weights: ``object_weight`` on object pixels, 1 on background, mean 1."""
    weight = 1.0 + (object_weight - 1.0) * corpus.masks(index)[:, :1]
    return weight / weight.mean()


def _reconstruction_loss(recon: torch.Tensor, images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    error = (recon - images).abs() + (recon - images).square()
    return (weight * error).mean()


@torch.no_grad()
def encode(vae: AutoencoderKL, corpus: Corpus, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """Scaled latent means of every corpus image, ``float32 (N, 4, S/8, S/8)``."""
    vae = vae.to(device).eval()
    chunks = []
    for start in range(0, len(corpus), batch_size):
        images = corpus.tensors(np.arange(start, min(start + batch_size, len(corpus)))).to(device)
        chunks.append(vae.encode(images).latent_dist.mean.mul(vae.config.scaling_factor).cpu())
    vae.cpu()
    return torch.cat(chunks)


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Encode and decode ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``: the VAE's reconstruction."""
    parameter = next(vae.parameters())
    latents = vae.encode(images.to(parameter)).latent_dist.mean
    return vae.decode(latents).sample.clamp(-1, 1).to(images)
