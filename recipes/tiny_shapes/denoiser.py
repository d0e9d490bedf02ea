"""Stages that train denoisers on cached latents: the text-to-image UNet with its text
encoder, the mask ControlNet, and the stripes LoRA."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTokenizer

from . import architectures
from .loop import train
from .muon import MuonAdamW

OPTIMIZERS = ("adamw", "muon")

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """``int64 (N, model_max_length)`` padded ids, as the pipeline tokenizes prompts."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class _Batches:
    """Batch ``step`` of latents, ids (with caption dropout) and noisy inputs, drawn from ``(seed, step)``.

    Each batch depends only on its step, so a resumed run sees the batches it would have seen.
    ``weights`` (``(N,)``, non-negative) makes example ``i`` come up in proportion to
    ``weights[i]``; without it every example is equally likely.
    """

    def __init__(
        self,
        latents: torch.Tensor,
        ids: torch.Tensor,
        empty: torch.Tensor,
        seed: int,
        drop: float,
        weights: np.ndarray | None = None,
    ) -> None:
        self.latents, self.ids, self.empty, self.drop, self.seed = latents, ids, empty, drop, seed
        self.noise_scheduler = DDPMScheduler(**architectures.BETAS)
        self.probabilities = None
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (len(latents),) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(
                    f"weights must be {len(latents)} non-negative numbers with a positive sum; "
                    f"got shape {weights.shape}"
                )
            self.probabilities = weights / weights.sum()

    def __call__(
        self, step: int, batch_size: int
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, step))
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        if self.probabilities is None:
            index = rng.integers(len(self.latents), size=batch_size)
        else:
            index = rng.choice(len(self.latents), size=batch_size, p=self.probabilities)
        latents = self.latents[index]
        ids = self.ids[index].clone()
        ids[torch.from_numpy(rng.random(batch_size) < self.drop)] = self.empty
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator
        )
        return index, ids, self.noise_scheduler.add_noise(latents, noise, t), t, noise


def train_text_to_image(
    latents: torch.Tensor,
    ids: torch.Tensor,
    tokenizer: CLIPTokenizer,
    work_dir: Path,
    *,
    steps: int,
    cooldown: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    snr_gamma: float | None = None,
    draw_weights: np.ndarray | None = None,
    optimizer: str = "adamw",
    seed: int = 0,
    device: torch.device,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """Train text encoder and UNet together on epsilon prediction with 10% empty captions.

    The learning rate stays at ``lr`` and falls linearly to zero over the last ``cooldown``
    steps (a constant high rate is where this model learns shapes); the weights after the last
    step are returned. ``snr_gamma`` weights the loss with :func:`min_snr_weights`.
    ``draw_weights`` (``(N,)``) draws latent ``i`` in proportion to ``draw_weights[i]``
    (uniformly without). ``optimizer`` is ``"adamw"`` or ``"muon"`` (:class:`~.muon.MuonAdamW`:
    Muon on the weight matrices and convolution kernels, AdamW on the rest, same ``lr``).
    What each choice measured is in README.md.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict(
        {"text_encoder": architectures.text_encoder(tokenizer), "unet": architectures.unet()}
    )
    model.to(device)
    if optimizer == "muon":
        optim = MuonAdamW.for_module(model, lr=lr, weight_decay=0.01)
    else:
        optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    batches = _Batches(latents, ids, token_ids(tokenizer, [""])[0], seed, drop=0.1, weights=draw_weights)

    loss_weights = (
        None if snr_gamma is None else min_snr_weights(batches.noise_scheduler, snr_gamma).to(device)
    )

    def step(i: int) -> torch.Tensor:
        _, batch_ids, noisy, t, noise = batches(i, batch_size)
        noisy, t, noise = noisy.to(device), t.to(device), noise.to(device)
        text = model["text_encoder"](batch_ids.to(device)).last_hidden_state
        prediction = model["unet"](noisy, t, text).sample
        if loss_weights is None:
            return F.mse_loss(prediction, noise)
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        return (loss_weights[t] * per_sample).mean()

    train("text-to-image", work_dir, model, optim, step, steps, warmup=100, cooldown=cooldown)
    model.cpu().eval()
    return model["text_encoder"], model["unet"]


def min_snr_weights(noise_scheduler: DDPMScheduler, gamma: float) -> torch.Tensor:
    """``(T,)`` Min-SNR-gamma loss weights of epsilon prediction: ``min(SNR(t), gamma) / SNR(t)``.

    Steps with little noise (SNR above ``gamma``) are weighted down, so their gradients stop
    outweighing those of the noisier steps that lay out the image (Hang et al., 2023).
    """
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be positive; got {gamma}")
    snr = compute_snr(noise_scheduler, torch.arange(noise_scheduler.config.num_train_timesteps))
    return snr.clamp(max=gamma) / snr


def train_controlnet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    ids: torch.Tensor,
    conditions: Callable[[np.ndarray], torch.Tensor],
    tokenizer: CLIPTokenizer,
    work_dir: Path,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 5e-4,
    seed: int = 0,
    device: torch.device,
) -> ControlNetModel:
    """Train a ControlNet; ``conditions(index)`` gives the ``(B, 3, S, S)`` masks of latents ``index``.

    UNet and text encoder stay frozen.

    Half of the captions are dropped, so the condition alone must place the shapes.
    """
    torch.manual_seed(seed)
    controlnet = architectures.controlnet(unet).to(device)
    unet.to(device).requires_grad_(False)
    text_encoder.to(device).requires_grad_(False)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr)
    batches = _Batches(latents, ids, token_ids(tokenizer, [""])[0], seed + 1, drop=0.5)

    def step(i: int) -> torch.Tensor:
        index, batch_ids, noisy, t, noise = batches(i, batch_size)
        with torch.no_grad():
            text = text_encoder(batch_ids.to(device)).last_hidden_state
        noisy, t = noisy.to(device), t.to(device)
        down, mid = controlnet(
            noisy, t, text, controlnet_cond=conditions(index).to(device), return_dict=False
        )
        prediction = unet(
            noisy, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        return F.mse_loss(prediction, noise.to(device))

    train("controlnet", work_dir, controlnet, optimizer, step, steps, warmup=50)
    unet.cpu().requires_grad_(True)
    text_encoder.cpu().requires_grad_(True)
    return controlnet.cpu().eval()


def train_lora(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    ids: torch.Tensor,
    tokenizer: CLIPTokenizer,
    work_dir: Path,
    *,
    steps: int,
    rank: int = 8,
    batch_size: int = 16,
    lr: float = 5e-4,
    seed: int = 0,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Train a LoRA (attention projections and ResNet convolutions) on ``latents`` of a new style.

    Returns the PEFT state dict of the adapter; ``unet`` is left without it.
    """
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    unet.to(device)
    text_encoder.to(device).requires_grad_(False)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    batches = _Batches(latents, ids, token_ids(tokenizer, [""])[0], seed + 2, drop=0.1)

    def step(i: int) -> torch.Tensor:
        _, batch_ids, noisy, t, noise = batches(i, batch_size)
        with torch.no_grad():
            text = text_encoder(batch_ids.to(device)).last_hidden_state
        prediction = unet(noisy.to(device), t.to(device), text).sample
        return F.mse_loss(prediction, noise.to(device))

    train("lora", work_dir, unet, optimizer, step, steps, warmup=20)
    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}
    unet.delete_adapters("default")
    unet.cpu().requires_grad_(True)
    text_encoder.cpu().requires_grad_(True)
    return state
