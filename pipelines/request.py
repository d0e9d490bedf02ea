"""One image (or video) to render, and the one path that renders it: ``lindiff render`` and the demo
both use it.

    renderer = ImageRenderer(pipe)
    image = renderer(ImageRequest("a red star", width=128, height=128, steps=20, guidance=7.5, seed=42))
    frames = ImageRenderer(video_pipe)(ImageRequest("a red star", 64, 64, 20, 5.0, seed=42, frames=9))

The noise comes from a CPU generator seeded with the request's seed, so a request renders the
same image on every device, and a PNG written from it reproduces with
``lindiff render --reproduce``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .highres import HighResPipeline, HighResProgress
from .memory import vae_tiling
from .metadata import generation_params

ProgressCallback = Callable[[HighResProgress], None]
"""Called after every denoising step; a render without the high-resolution chain is stage 1 of 1."""
Rendered = Image.Image | list[Image.Image]
"""What a request renders: an image, or a video's frames (a request with ``frames``)."""


@dataclass(frozen=True)
class ImageRequest:
    """One image: the generation call and how it runs.

    Attributes:
        prompt, negative_prompt, seed, width, height, steps, guidance: the generation call.
        highres: render through :class:`~lindiff.pipelines.highres.HighResPipeline` (native size
            first, then SDEdit stages) instead of the pipeline's own call at the full size.
        stages, strengths: the high-resolution pipeline's ``stages`` and ``strength_schedule``
            (``None``: the default schedule, which fits any number of stages).
        tile: tiled VAE (less memory at large sizes) in either path; ``None`` tiles the
            high-resolution chain's VAE only when memory is short (``tile_vae="auto"``) and leaves
            the plain call's VAE as it is.
        condition, controlnet_scale: a ControlNet condition image (for a ControlNet pipeline).
        frames, fps: a video's frame count (the pipeline's ``num_frames``; ``None`` for an image)
            and the frame rate it is written at (recorded only).
    """

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    negative_prompt: str = ""
    highres: bool = False
    stages: int | str = "auto"
    strengths: tuple[float, ...] | None = None
    tile: bool | None = None
    condition: Image.Image | None = None
    controlnet_scale: float = 1.0
    frames: int | None = None
    fps: float | None = None

    def params(self, model: str | None, method: str | None, weights: str | None) -> dict[str, Any]:
        """The generation parameters recorded in the request's PNG (see :func:`generation_params`)."""
        return generation_params(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            steps=self.steps,
            guidance=self.guidance,
            width=self.width,
            height=self.height,
            model=model,
            method=method,
            weights=weights,
            highres=self.highres,
            stages=self.stages,
            strengths=self.strengths,
            frames=self.frames,
            fps=self.fps,
        )


class ImageRenderer:
    """Renders :class:`ImageRequest` s with ``pipe`` (a text-to-image pipeline, or its ControlNet
    variant for requests with a condition; a text-to-video pipeline for requests with frames); the
    high-resolution pipeline is made on first use."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._highres: HighResPipeline | None = None

    def __call__(self, request: ImageRequest, progress: ProgressCallback | None = None) -> Rendered:
        """Render ``request``: its image, or its frames when it has ``frames``; ``progress`` is called
        after every denoising step (an exception it raises stops the run and propagates)."""
        progress = progress or (lambda _: None)
        call: dict[str, Any] = {
            "prompt": request.prompt,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance,
            "generator": torch.Generator("cpu").manual_seed(request.seed),  # same noise on every device
        }
        if request.negative_prompt:
            call["negative_prompt"] = request.negative_prompt
        if request.condition is not None:
            call["image"] = request.condition.convert("RGB")
            call["controlnet_conditioning_scale"] = request.controlnet_scale
        if request.frames is not None:
            call["num_frames"] = request.frames
        if request.highres:
            if self._highres is None:
                self._highres = HighResPipeline.from_pipe(self.pipe)
            tile = "auto" if request.tile is None else request.tile
            return self._highres(
                stages=request.stages,
                strength_schedule=request.strengths,
                tile_vae=tile,
                on_progress=progress,
                **call,
            ).images[0]

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            total = getattr(pipe, "num_timesteps", None) or request.steps
            progress(HighResProgress(1, 1, step + 1, total, request.height, request.width))
            return tensors

        tiling = contextlib.nullcontext() if request.tile is None else vae_tiling(self.pipe.vae, request.tile)
        with tiling:
            if request.frames is None:
                return self.pipe(callback_on_step_end=on_step_end, **call).images[0]
            # Video pipelines return frames, as arrays unless asked for PIL images.
            return list(self.pipe(callback_on_step_end=on_step_end, output_type="pil", **call).frames[0])
