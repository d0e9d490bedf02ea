"""DemoFusion's skip residual: the SDEdit stages of a high-resolution chain pulled towards the previous stage.

:class:`SkipResidual` is called after every denoising step of a stage (through the pipeline's
``callback_on_step_end``) and returns the latents to continue from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline


@dataclass
class SkipResidual:
    """DemoFusion's skip residual in one SDEdit stage.

    After step ``i`` the latents are pulled towards the previous stage noised to the next timestep
    ``t``: ``c * noised + (1 - c) * latents`` with ``c = ((1 + cos(pi (T - t) / T)) / 2) ** power``.
    ``clean``/``noise``: latents of the upscaled previous stage and a fixed noise draw, in the layout
    the pipeline denoises (:meth:`~lindiff.adapters.ModelAdapter.pack_latents`).
    """

    clean: torch.Tensor
    noise: torch.Tensor
    power: float

    def __call__(
        self, pipe: DiffusionPipeline, step: int, num_steps: int, latents: torch.Tensor
    ) -> torch.Tensor:
        if step + 1 >= num_steps:
            return latents
        scheduler = pipe.scheduler
        timestep = scheduler.timesteps[len(scheduler.timesteps) - num_steps + step + 1 :][:1]
        if hasattr(scheduler, "add_noise"):
            noised = scheduler.add_noise(self.clean, self.noise, timestep)
        else:
            noised = scheduler.scale_noise(self.clean, timestep, self.noise)
        total = scheduler.config.num_train_timesteps
        weight = ((1 + math.cos(math.pi * (total - float(timestep[0])) / total)) / 2) ** self.power
        return weight * noised.to(latents.dtype) + (1 - weight) * latents
