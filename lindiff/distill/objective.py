"""The diffusion side of a training step: timesteps, noised latents and the regression target.

DDPM-family schedulers (epsilon, v_prediction, sample) noise with a ``DDPMScheduler`` built
from the pipeline scheduler's config (as the diffusers training scripts do), so inference-time
schedulers such as Euler that keep per-call state do not matter. Flow-matching schedulers
(``FlowMatch*``, and others configured with ``prediction_type="flow_prediction"`` such as SANA's
DPM-Solver) interpolate ``x_t = (1 - s) x_0 + s noise`` and regress ``noise - x_0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION = "flow_prediction"


@dataclass
class NoisyBatch:
    """Attributes: ``noisy`` ``(B, C, H, W)``, ``timesteps`` ``(B,)`` as the denoiser takes them,
    ``target`` ``(B, C, H, W)`` (what the denoiser should predict)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


class DiffusionObjective:
    """Samples timesteps and noise and builds the target for a pipeline's scheduler.

    Args:
        scheduler: the pipeline's scheduler (only its config and class are used).
        sampling: ``"uniform"`` or ``"logit_normal"`` (``sigmoid(N(logit_mean, logit_std))``) on
            ``[0, 1]``, scaled to the scheduler's ``num_train_timesteps``.
    """

    def __init__(
        self, scheduler: Any, sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0
    ) -> None:
        self.sampling = sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.flow = (
            type(scheduler).__name__.startswith("FlowMatch")
            or scheduler.config.get("prediction_type") == FLOW_PREDICTION
        )
        self.noise_scheduler = None
        if self.flow:
            self.prediction_type = "flow"
        else:
            self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
            if self.prediction_type not in PREDICTION_TYPES:
                raise ValueError(
                    f"scheduler prediction_type={self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
                )
            self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)

    def sample_fractions(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch,)`` noise levels in ``[0, 1)``."""
        if self.sampling == "uniform":
            return torch.rand(batch, generator=generator)
        normal = torch.randn(batch, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * normal).clamp(max=1 - 1e-6)

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> NoisyBatch:
        """Noise ``latents`` ``(B, C, H, W)`` (float32) with randomness drawn from ``generator`` (CPU)."""
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        fractions = self.sample_fractions(latents.shape[0], generator).to(latents.device)
        if self.flow:
            sigma = fractions.view(-1, *([1] * (latents.ndim - 1)))
            noisy = (1 - sigma) * latents + sigma * noise
            return NoisyBatch(noisy, fractions * self.num_train_timesteps, noise - latents)
        timesteps = (fractions * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return NoisyBatch(noisy, timesteps, target)


def upsample_latents(latents: torch.Tensor, scale: int) -> torch.Tensor:
    """``(B, C, H, W)`` or ``(B, C, T, H, W)`` latents on a grid ``scale`` times as wide and high.

    Bilinear in space (frames stay), a stand-in for the latents of an image up-scaled in pixel
    space, which is what the high-resolution chain's SDEdit stages denoise.
    """
    if scale == 1:
        return latents
    if latents.ndim == 4:
        return F.interpolate(latents, scale_factor=scale, mode="bilinear", align_corners=False)
    if latents.ndim == 5:
        return F.interpolate(latents, scale_factor=(1, scale, scale), mode="trilinear", align_corners=False)
    raise ValueError(f"latents must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(latents.shape)}")
