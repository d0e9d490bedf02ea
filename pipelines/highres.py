"""High-resolution generation by a progressive SDEdit chain (LinFusion's recipe, DemoFusion's skip residual).

Stage 1 generates at the model's native area (with the target's aspect ratio); every later stage
upscales the previous image (bicubic, in pixel space) and re-denoises it with image-to-image
strength ``s`` (SDEdit: noise to ``s`` of the schedule, then run ``int(num_inference_steps * s)``
steps). With ``stages="auto"`` each stage is at most 2x the previous one per side.

Families with an image-to-image pipeline in diffusers (SD 1.x/2.x, SDXL, SD3, FLUX, and their
ControlNet variants where diffusers has one) run the SDEdit stages through it
(``AutoPipelineForImage2Image.from_pipe``). The others (PixArt, SANA, SD3 ControlNet, SANA
ControlNet) run them through their own text-to-image pipeline: the upscaled image is encoded, noised
to the first timestep of the truncated schedule and passed as ``latents``, and a copy of the
scheduler keeps only that tail of the schedule (:mod:`lindiff.pipelines.sdedit`). Every helper
pipeline shares the components of the pipeline it was made from; no weights are copied. The skip
residual is in :mod:`lindiff.pipelines.skip_residual`.

Memory: the VAE encodes and decodes in tiles (``vae.enable_tiling()``; every supported family's
VAE has it), the denoiser (and ControlNet) can run the two halves of the classifier-free-guidance
batch in turn above a pixel count, every ``FeedForward`` can run over chunks of tokens, and
``enable_model_cpu_offload`` works as in diffusers. The per-call changes
(:mod:`lindiff.pipelines.memory`) are undone when the call ends.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .memory import chunked_feed_forward, sequential_halves, vae_needs_tiling, vae_tiling
from .sdedit import sdedit_scheduler, stage_strengths
from .skip_residual import SkipResidual

logger = logging.getLogger(__name__)

DEFAULT_STRENGTHS = (0.4, 0.3, 0.2, 0.1)
"""SDEdit strengths of stages 2, 3, ... (LinFusion's published chain)."""
SKIP_RESIDUAL_POWER = 3.0
"""DemoFusion's exponent of the cosine skip-residual weight (``skip_residual=True``)."""
OUTPUT_TYPES = ("pil", "np", "pt")
# The check_inputs of SD, SDXL, PixArt and SD3 ControlNet demand multiples of 8 px, SANA's of 32 px,
# whatever the VAE and patch size.
_PIPELINE_PIXEL_MULTIPLE = 8
_SANA_PIXEL_MULTIPLE = 32
# Arguments HighResPipeline sets on the stage pipelines itself; `**kwargs` may not pass them.
_RESERVED = {
    "prompt",
    "height",
    "width",
    "image",
    "control_image",
    "strength",
    "latents",
    "num_inference_steps",
    "output_type",
    "callback",
    "callback_steps",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "cross_attention_kwargs",
    "joint_attention_kwargs",
    "attention_kwargs",
    "return_dict",
}
_ATTENTION_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


@dataclass(frozen=True)
class HighResProgress:
    """Where a :class:`HighResPipeline` call is, reported after every denoising step (all counts 1-based)."""

    stage: int
    num_stages: int
    step: int
    num_steps: int
    height: int
    width: int


@dataclass
class HighResPipelineOutput(BaseOutput):
    """``images``: the final images at the requested size (list of PIL images, ``(B, H, W, 3)`` array or
    ``(B, 3, H, W)`` tensor in [0, 1]); ``stages``: with ``return_stages``, each stage's images in the
    same format, the last being ``images``."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stages: list[Any] | None = None


def plan_stages(
    height: int, width: int, native_size: int, stages: int | str = "auto", multiple: int = 8
) -> list[tuple[int, int]]:
    """The ``(height, width)`` of every stage of a chain to ``height x width`` px.

    Stage 1 has the area of a ``native_size`` square and the target's aspect ratio; the stages grow
    geometrically (per side) to the target, which is the last stage. ``stages="auto"`` picks the
    fewest stages with at most 2x per side between stages; a target no larger than the native area
    is one stage. Intermediate sizes are rounded to ``multiple``.

    Raises:
        ValueError: ``height``/``width`` is not a positive multiple of ``multiple`` (the message gives
            the nearest valid sizes), ``native_size`` is not positive, or ``stages`` is neither
            ``"auto"`` nor a positive int (more than 1 only when the target is larger than native).
    """
    if not _is_int(multiple) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value < multiple or value % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} px for this model, got {value!r}"
                + _nearest(value, multiple)
            )
    if not _is_int(native_size) or native_size < 1:
        raise ValueError(f"native_size must be a positive int (px), got {native_size!r}")
    side_ratio = math.sqrt(height * width) / native_size
    if stages == "auto":
        num_stages = 1 if side_ratio <= 1 else 1 + math.ceil(math.log2(side_ratio) - 1e-9)
    elif _is_int(stages) and stages >= 1:
        if stages > 1 and side_ratio <= 1:
            raise ValueError(
                f"stages must be 1 (or 'auto') when the target {height}x{width} px is not larger than the "
                f"native {native_size}x{native_size} px, got {stages}"
            )
        num_stages = stages
    else:
        raise ValueError(f"stages must be 'auto' or a positive int, got {stages!r}")
    if num_stages == 1:
        return [(height, width)]
    first = (native_size * math.sqrt(height / width), native_size * math.sqrt(width / height))
    sizes = []
    for index in range(num_stages - 1):
        fraction = index / (num_stages - 1)
        sizes.append(
            tuple(
                max(multiple, multiple * round(start * (end / start) ** fraction / multiple))
                for start, end in zip(first, (height, width), strict=True)
            )
        )
    return [*sizes, (height, width)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nearest(value: object, multiple: int) -> str:
    if not _is_int(value) or value < 1:
        return ""
    below = value - value % multiple
    options = sorted({size for size in (below, below + multiple) if size >= multiple})
    return f" (nearest valid: {' or '.join(map(str, options))})"


def _parameters(pipe: DiffusionPipeline) -> frozenset[str]:
    return _call_parameters(type(pipe))


@functools.cache
def _call_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__call__).parameters)


def _sibling(pipe: DiffusionPipeline, cls: type, **overrides: Any) -> DiffusionPipeline:
    """A ``cls`` pipeline on ``pipe``'s components and config (nothing copied or cast), quiet like ``pipe``."""
    _, optional = cls._get_signature_keys(cls)
    config = {key: pipe.config[key] for key in optional if key in pipe.config}
    sibling = cls(**{**pipe.components, **config, **overrides})
    sibling.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return sibling


def _resize(image: Any, height: int, width: int) -> Any:
    """A ControlNet condition (PIL image, ``(B, 3, H, W)``/``(3, H, W)`` tensor, or a list of them) at ``height x width``."""
    if isinstance(image, PIL.Image.Image):
        return image.resize((width, height), PIL.Image.Resampling.LANCZOS)
    if isinstance(image, torch.Tensor):
        batched = image if image.ndim == 4 else image[None]
        resized = F.interpolate(batched.float(), size=(height, width), mode="bilinear", antialias=True)
        resized = resized.to(image.dtype)
        return resized if image.ndim == 4 else resized[0]
    if isinstance(image, (list, tuple)):
        return [_resize(item, height, width) for item in image]
    raise TypeError(f"image must be a PIL image, a tensor or a list of them, got {type(image).__name__}")


def _convert(images: torch.Tensor, output_type: str) -> Any:
    """``(B, 3, H, W)`` images in [0, 1] as ``output_type``."""
    if output_type == "pt":
        return images
    array = VaeImageProcessor.pt_to_numpy(images.float().cpu())
    return array if output_type == "np" else VaeImageProcessor.numpy_to_pil(array)


class HighResPipeline:
    """Progressive SDEdit to high resolution on top of any text-to-image pipeline lindiff converts.

    Build it with :meth:`from_pipe`; the pipeline may be converted by :func:`lindiff.linearize`
    before or after, and may carry LoRA adapters and a ControlNet (one or several).
    """

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self.pipe = pipe
        self.text2img = _sibling(pipe, type(pipe))
        try:
            self.img2img = AutoPipelineForImage2Image.from_pipe(pipe)
        except ValueError:
            # No image-to-image pipeline for this family: SDEdit through text-to-image with given latents.
            self.img2img = None
            logger.info(
                "%s has no image-to-image pipeline in diffusers; HighResPipeline runs its SDEdit stages "
                "through it with a truncated schedule",
                type(pipe).__name__,
            )
            self.sdedit = _sibling(pipe, type(pipe), scheduler=sdedit_scheduler(pipe.scheduler))
        else:
            self.img2img.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
            self.sdedit = None

    @classmethod
    def from_pipe(cls, pipe: DiffusionPipeline, **kwargs: Any) -> HighResPipeline:
        """A high-resolution pipeline sharing ``pipe``'s components (no weights are copied).

        ``kwargs`` replace components as in ``AutoPipelineForText2Image.from_pipe`` (e.g.
        ``controlnet=`` gives the family's ControlNet pipeline).
        """
        if not isinstance(pipe, DiffusionPipeline):
            raise TypeError(f"pipe must be a diffusers DiffusionPipeline, got {type(pipe).__name__}")
        if kwargs:
            pipe = AutoPipelineForText2Image.from_pipe(pipe, **kwargs)
        if not any(isinstance(getattr(pipe, role, None), nn.Module) for role in ("unet", "transformer")):
            raise TypeError(f"pipe must have a `unet` or `transformer` denoiser, got {type(pipe).__name__}")
        if not {"height", "latents"} <= _parameters(pipe):
            raise TypeError(f"pipe must be a text-to-image pipeline, got {type(pipe).__name__}")
        return cls(pipe)

    @property
    def components(self) -> dict[str, Any]:
        """The shared components (those of the pipeline given to :meth:`from_pipe`)."""
        return self.pipe.components

    @property
    def denoiser(self) -> nn.Module:
        """The pipeline's ``unet`` or ``transformer``."""
        unet = getattr(self.pipe, "unet", None)
        return unet if isinstance(unet, nn.Module) else self.pipe.transformer

    @property
    def native_size(self) -> int:
        """Side of the model's native square (px): the denoiser's sample size times the VAE's scale factor."""
        sample_size = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.get(
            "sample_size"
        )
        if not isinstance(sample_size, int):
            raise ValueError(
                f"{type(self.denoiser).__name__} has no integer sample_size in its config; pass native_size (px)"
            )
        return sample_size * self.pipe.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """What every stage's height and width must be a multiple of (px)."""
        patch = self.denoiser.config.get("patch_size") or 1
        packed = 2 if hasattr(self.pipe, "_pack_latents") else 1  # FLUX packs 2x2 latent pixels per token
        multiple = math.lcm(self.pipe.vae_scale_factor * patch * packed, _PIPELINE_PIXEL_MULTIPLE)
        if type(self.pipe).__name__.startswith("Sana"):
            multiple = math.lcm(multiple, _SANA_PIXEL_MULTIPLE)
        return multiple

    def to(self, *args: Any, **kwargs: Any) -> HighResPipeline:
        """Moves the shared components (``DiffusionPipeline.to``); returns ``self``."""
        self.pipe.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Model CPU offload of the shared components (``DiffusionPipeline.enable_model_cpu_offload``)."""
        kwargs = {} if device is None else {"device": device}
        self.pipe.enable_model_cpu_offload(gpu_id=gpu_id, **kwargs)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Progress-bar options (tqdm's) of every stage pipeline."""
        for pipe in (self.pipe, self.text2img, self.img2img or self.sdedit):
            pipe.set_progress_bar_config(**kwargs)

    @property
    def _refiner(self) -> DiffusionPipeline:
        return self.img2img if self.img2img is not None else self.sdedit

    @property
    def _denoising_models(self) -> list[nn.Module]:
        """The denoiser and the ControlNet (one module for several), where the memory hooks go."""
        controlnet = getattr(self.pipe, "controlnet", None)
        return [self.denoiser] + ([controlnet] if isinstance(controlnet, nn.Module) else [])

    def check_inputs(
        self,
        negative_prompt: Any,
        num_inference_steps: int,
        strengths: list[float],
        skip_residual: bool | float,
        tile_vae: bool | str,
        image: Any,
        cross_attention_kwargs: dict[str, Any] | None,
        sequential_cfg_above: int | None,
        feed_forward_chunk_size: int | None,
        output_type: str,
        on_progress: Callable[[HighResProgress], None] | None,
        kwargs: dict[str, Any],
    ) -> None:
        """Validates a call's arguments against the stage pipelines before anything runs."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        short = [s for s in strengths if int(num_inference_steps * s) < 1]
        if short:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} gives no step at strength {short[0]} "
                f"(int(steps * strength) must be >= 1); raise num_inference_steps"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if sequential_cfg_above is not None and (
            not _is_int(sequential_cfg_above) or sequential_cfg_above < 0
        ):
            raise ValueError(
                f"sequential_cfg_above must be None or a pixel count >= 0, got {sequential_cfg_above!r}"
            )
        if feed_forward_chunk_size is not None and (
            not _is_int(feed_forward_chunk_size) or feed_forward_chunk_size < 1
        ):
            raise ValueError(
                f"feed_forward_chunk_size must be None or a positive int, got {feed_forward_chunk_size!r}"
            )
        if not isinstance(skip_residual, bool) and (
            not isinstance(skip_residual, (int, float)) or skip_residual <= 0
        ):
            raise ValueError(f"skip_residual must be a bool or a positive exponent, got {skip_residual!r}")
        if not isinstance(tile_vae, bool) and tile_vae != "auto":
            raise ValueError(f"tile_vae must be True, False or 'auto', got {tile_vae!r}")
        reserved = sorted(_RESERVED & kwargs.keys())
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)} are set by HighResPipeline; use its own arguments instead"
            )
        has_controlnet = getattr(self.pipe, "controlnet", None) is not None
        if has_controlnet and image is None:
            raise ValueError(f"{type(self.pipe).__name__} has a ControlNet: pass its condition as image")
        if not has_controlnet and image is not None:
            raise ValueError(
                f"image is a ControlNet condition but {type(self.pipe).__name__} has no controlnet"
            )
        if strengths and self.sdedit is not None and self.sdedit.scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(
                f"{type(self.pipe).__name__} has no image-to-image pipeline and its scheduler shifts its schedule "
                "by image size (use_dynamic_shifting), which its SDEdit stages cannot reproduce; use stages=1"
            )
        stage_pipes = [self.text2img] + ([self._refiner] if strengths else [])
        for pipe in stage_pipes:
            parameters = _parameters(pipe)
            if negative_prompt is not None and "negative_prompt" not in parameters:
                raise ValueError(f"negative_prompt is not supported by {type(pipe).__name__}")
            if cross_attention_kwargs is not None and not parameters & set(_ATTENTION_KWARGS):
                raise ValueError(f"cross_attention_kwargs is not supported by {type(pipe).__name__}")
            unknown = sorted(kwargs.keys() - parameters)
            if unknown:
                raise ValueError(f"{type(pipe).__name__} takes no argument(s) {', '.join(unknown)}")
            if "callback_on_step_end" not in parameters:
                if skip_residual and strengths:
                    raise ValueError(
                        f"skip_residual needs callback_on_step_end, which {type(pipe).__name__} lacks"
                    )
                if on_progress is not None and "callback" not in parameters:
                    raise ValueError(f"on_progress needs a step callback, which {type(pipe).__name__} lacks")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int,
        width: int,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        stages: int | str = "auto",
        strength_schedule: Sequence[float] = DEFAULT_STRENGTHS,
        native_size: int | None = None,
        skip_residual: bool | float = False,
        tile_vae: bool | str = "auto",
        image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        sequential_cfg_above: int | None = None,
        feed_forward_chunk_size: int | None = None,
        output_type: str = "pil",
        return_stages: bool = False,
        on_progress: Callable[[HighResProgress], None] | None = None,
        **kwargs: Any,
    ) -> HighResPipelineOutput:
        """Generates ``height x width`` px images through the SDEdit chain.

        Args:
            prompt, negative_prompt, guidance_scale, generator: as in the wrapped pipeline, used by
                every stage (``guidance_scale=None`` keeps the pipeline's default).
            num_inference_steps: steps of a full schedule; stage 1 runs all of them, an SDEdit
                stage of strength ``s`` runs ``int(num_inference_steps * s)``.
            stages: ``"auto"`` or the number of stages (see :func:`plan_stages`).
            strength_schedule: SDEdit strengths of stages 2, 3, ... (the first ``stages - 1`` are used).
            native_size: side of the native square (px); default :attr:`native_size`.
            skip_residual: DemoFusion's skip residual in the SDEdit stages; ``True`` uses the
                exponent :data:`SKIP_RESIDUAL_POWER`, a float sets it.
            tile_vae: tiled VAE encode/decode; ``"auto"`` tiles only when an untiled pass at the
                final size would take more than half the free memory (:func:`vae_needs_tiling`).
            image: the ControlNet condition (one per ControlNet), resized to every stage's size.
            controlnet_conditioning_scale: as in the ControlNet pipelines.
            cross_attention_kwargs: e.g. ``{"scale": 0.5}`` for LoRA; passed as the pipeline's
                ``cross_attention_kwargs``, ``joint_attention_kwargs`` or ``attention_kwargs``.
            sequential_cfg_above: stages with more pixels than this run the denoiser (and
                ControlNet) on the two halves of their batch in turn; ``None`` never.
            feed_forward_chunk_size: run every ``FeedForward`` over at most this many tokens at a
                time; ``None`` all at once.
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            return_stages: also return every stage's images.
            on_progress: called with a :class:`HighResProgress` after every denoising step; an
                exception it raises stops the run and propagates.
            **kwargs: passed to every stage's pipeline call (e.g. ``max_sequence_length``).

        Returns:
            :class:`HighResPipelineOutput` with images at ``(width, height)``.
        """
        sizes = plan_stages(
            height, width, native_size or self.native_size, stages, multiple=self.size_multiple
        )
        strengths = stage_strengths(strength_schedule, len(sizes))
        self.check_inputs(
            negative_prompt,
            num_inference_steps,
            strengths,
            skip_residual,
            tile_vae,
            image,
            cross_attention_kwargs,
            sequential_cfg_above,
            feed_forward_chunk_size,
            output_type,
            on_progress,
            kwargs,
        )
        power = SKIP_RESIDUAL_POWER if skip_residual is True else float(skip_residual)
        common = {
            "prompt": prompt,
            "num_inference_steps": num_inference_steps,
            "generator": generator,
            **kwargs,
        }
        for name, value in (("negative_prompt", negative_prompt), ("guidance_scale", guidance_scale)):
            if value is not None:
                common[name] = value
        stage_images = []
        with contextlib.ExitStack() as stack:
            if tile_vae == "auto":
                prompts = 1 if isinstance(prompt, str) else len(prompt)
                batch = prompts * kwargs.get("num_images_per_prompt", 1)
                final_height, final_width = sizes[-1]
                tile_vae = vae_needs_tiling(
                    self.pipe.vae, batch, final_height, final_width, self.pipe._execution_device
                )
            stack.enter_context(vae_tiling(self.pipe.vae, tile_vae))
            if feed_forward_chunk_size is not None:
                stack.enter_context(chunked_feed_forward(self._denoising_models, feed_forward_chunk_size))
            images = None
            for index, (stage_height, stage_width) in enumerate(sizes):
                if images is not None:  # the previous stage, upscaled in pixel space
                    size = (stage_height, stage_width)
                    images = F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp_(
                        0, 1
                    )
                sequential = (
                    sequential_cfg_above is not None and stage_height * stage_width > sequential_cfg_above
                )
                with sequential_halves(self._denoising_models) if sequential else contextlib.nullcontext():
                    images = self._run_stage(
                        index,
                        sizes,
                        [1.0, *strengths][index],
                        images,
                        common,
                        image,
                        controlnet_conditioning_scale,
                        cross_attention_kwargs,
                        power if skip_residual else None,
                        on_progress,
                    )
                if return_stages:  # earlier stages wait on the CPU
                    last = index == len(sizes) - 1
                    stage_images.append(_convert(images if last else images.cpu(), output_type))
        self.pipe.maybe_free_model_hooks()
        final = stage_images[-1] if return_stages else _convert(images, output_type)
        return HighResPipelineOutput(images=final, stages=stage_images if return_stages else None)

    def _run_stage(
        self,
        index: int,
        sizes: list[tuple[int, int]],
        strength: float,
        upscaled: torch.Tensor | None,
        common: dict[str, Any],
        condition: Any,
        conditioning_scale: float | list[float],
        attention_kwargs: dict[str, Any] | None,
        power: float | None,
        on_progress: Callable[[HighResProgress], None] | None,
    ) -> torch.Tensor:
        """One stage, from ``upscaled``: the previous stage's images at this stage's size (``None`` for
        stage 1); returns its images ``(B, 3, h, w)`` in [0, 1] on the execution device."""
        height, width = sizes[index]
        first = upscaled is None
        pipe = self.text2img if first else self._refiner
        parameters = _parameters(pipe)
        call = dict(common, output_type="pt")
        if "height" in parameters:
            call.update(height=height, width=width)
        if "use_resolution_binning" in parameters:
            call["use_resolution_binning"] = False
        if attention_kwargs is not None:
            call[next(name for name in _ATTENTION_KWARGS if name in parameters)] = attention_kwargs
        if condition is not None:
            call["control_image" if "control_image" in parameters else "image"] = _resize(
                condition, height, width
            )
            call["controlnet_conditioning_scale"] = conditioning_scale
        residual = None
        if not first:
            if self.img2img is not None:
                call.update(image=upscaled, strength=strength)
            if self.img2img is None or power is not None:
                clean = self._encode(upscaled)
                noise = randn_tensor(
                    clean.shape, generator=common["generator"], device=clean.device, dtype=clean.dtype
                )
                if self.img2img is None:
                    call["latents"] = self._noised_start(
                        clean, noise, strength, common["num_inference_steps"]
                    )
                if power is not None:
                    residual = SkipResidual(clean, noise, power)
        expected_steps = int(common["num_inference_steps"] * strength)
        progress = functools.partial(HighResProgress, index + 1, len(sizes), height=height, width=width)

        def num_steps(stage_pipe: DiffusionPipeline) -> int:
            return getattr(stage_pipe, "num_timesteps", None) or expected_steps

        if "callback_on_step_end" in parameters and (on_progress is not None or residual is not None):

            def on_step_end(stage_pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict) -> dict:
                total = num_steps(stage_pipe)
                if on_progress is not None:
                    on_progress(progress(step + 1, total))
                if residual is None:
                    return {}
                return {"latents": residual(stage_pipe, step, total, tensors["latents"])}

            call.update(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
        elif on_progress is not None:
            call.update(
                callback=lambda step, timestep, latents: on_progress(progress(step + 1, num_steps(pipe))),
                callback_steps=1,
            )
        return pipe(**call).images

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, h, w)`` images in [0, 1] -> the pipeline's normalised latents ``(B, C, h/f, w/f)`` (posterior mode)."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            encoded = vae.encode((images * 2 - 1).to(device=self.pipe._execution_device, dtype=vae.dtype))
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latent
        shift = vae.config.get("shift_factor") or 0.0
        dtype = self.denoiser.dtype
        return ((latents - shift) * vae.config.scaling_factor).to(dtype)

    def _noised_start(
        self, clean: torch.Tensor, noise: torch.Tensor, strength: float, num_inference_steps: int
    ) -> torch.Tensor:
        """``clean`` latents noised to the first timestep of the SDEdit tail, as ``latents=`` of the pipeline."""
        scheduler = self.sdedit.scheduler
        scheduler.strength = strength
        scheduler.set_timesteps(num_inference_steps, device=clean.device)
        start = scheduler.timesteps[:1]
        if hasattr(scheduler, "add_noise"):
            noised = scheduler.add_noise(clean, noise, start)
        else:
            noised = scheduler.scale_noise(clean, start, noise)
        return noised / getattr(scheduler, "init_noise_sigma", 1.0)
