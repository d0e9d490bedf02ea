"""Validation grids: the teacher's and the student's samples for fixed prompts and seeds.

The pipeline runs twice per prompt, once with its own (teacher) denoiser and once with the
student swapped in; the teacher row is computed once per run. The PNG has the teacher in the
top row and the student in the bottom row, one column per prompt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils import make_image_grid
from PIL import Image
from torch import nn

from ..adapters import ModelAdapter
from .sources import control_arguments, has_controlnet


class Validator:
    """Writes ``folder/step-XXXXXXXX.png`` grids of teacher vs student samples.

    Args:
        pipe: the pipeline (its ``role`` attribute is the teacher denoiser).
        role: the pipeline attribute of the denoiser (``"unet"``, ``"transformer"``).
        prompts: one column each; prompt ``i`` is sampled with seed ``seed + i``.
        autocast: context-manager factory for mixed precision (``accelerator.autocast``).
        arguments: extra pipeline arguments per prompt (the frame count of a video pipeline, a
            ControlNet pipeline's control image).
        adapter: the family's adapter, which picks one image per sample out of the pipeline's
            output (a video's first frame); ``None``: the output's ``images``.
    """

    def __init__(
        self,
        pipe: Any,
        role: str,
        prompts: list[str],
        folder: Path,
        seed: int,
        steps: int,
        size: int,
        guidance_scale: float,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        arguments: list[dict[str, Any]] | None = None,
        adapter: ModelAdapter | None = None,
    ) -> None:
        self.pipe = pipe
        self.role = role
        self.prompts = prompts
        self.folder = Path(folder)
        self.seed = seed
        self.steps = steps
        self.size = size
        self.guidance_scale = guidance_scale
        self.autocast = autocast
        self.arguments = arguments or [{} for _ in prompts]
        self.adapter = adapter
        self._teacher: list[Image.Image] | None = None

    def _sample(self) -> list[Image.Image]:
        images = []
        for i, prompt in enumerate(self.prompts):
            with self.autocast():
                out = self.pipe(
                    prompt=prompt,
                    height=self.size,
                    width=self.size,
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance_scale,
                    generator=torch.Generator().manual_seed(self.seed + i),
                    output_type="pil",
                    **self.arguments[i],
                )
            images.append(self.adapter.sampled_images(out)[0] if self.adapter else out.images[0])
        return images

    def run(self, student: nn.Module, step: int) -> Path:
        """Sample with the teacher (once) and with ``student``; returns the grid's path."""
        if self._teacher is None:
            self._teacher = self._sample()
        teacher = getattr(self.pipe, self.role)
        was_training = student.training
        student.eval()
        setattr(self.pipe, self.role, student)
        try:
            student_images = self._sample()
        finally:
            setattr(self.pipe, self.role, teacher)
            student.train(was_training)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:08d}.png"
        make_image_grid([*self._teacher, *student_images], rows=2, cols=len(self.prompts)).save(path)
        return path


def sampling_arguments(
    pipe: Any,
    adapter: ModelAdapter,
    count: int,
    size: int,
    controls: list[torch.Tensor] | None = None,
    num_frames: int | None = None,
) -> list[dict[str, Any]]:
    """Extra ``pipe(...)`` arguments for ``count`` validation samples of ``size`` px: the family's
    sampling options and frame count (``num_frames``, video) and, for a ControlNet pipeline, its
    control image.

    Args:
        controls: control images ``(3, H, W)`` in [0, 1], one per sample, when the ControlNet is
            what trains; ``None`` samples with the ControlNet off (a blank image at scale 0).
    """
    options = {**adapter.generation_options(pipe), **adapter.frame_options(num_frames)}
    if not has_controlnet(pipe):
        return [options] * count
    if controls is None:
        blank = Image.new("RGB", (size, size))
        return [{**options, **control_arguments(pipe, blank), "controlnet_conditioning_scale": 0.0}] * count
    resized = [F.interpolate(c[None].float(), size=(size, size), mode="bilinear") for c in controls]
    return [{**options, **control_arguments(pipe, image)} for image in resized]
