"""High-resolution generation by a progressive SDEdit chain (LinFusion's recipe, DemoFusion's skip residual).

Stage 1 generates at the model's native area (with the target's aspect ratio); every later stage
upscales the previous image (bicubic, in pixel space) and re-denoises it with image-to-image
strength ``s`` (SDEdit: noise to ``s`` of the schedule, then run ``int(num_inference_steps * s)``
steps). With ``stages="auto"`` the first SDEdit stage is at most 4x the native side and every later
one 2x the one before (:func:`~lindiff.pipelines.stages.plan_stages`); the default strengths fall
with each stage's scale (:func:`~lindiff.pipelines.sdedit.default_strengths`), and by default the
SDEdit stages run without classifier-free guidance (``sdedit_guidance_scale``): the prompt already
shaped stage 1, and guidance in a low-noise pass amplifies its push to add what the prompt names,
which drew stray objects and star points on star points in every stage. Together they keep the
content of stage 1 while the stages sharpen it.

Families with an image-to-image pipeline in diffusers (SD 1.x/2.x, SDXL, SD3, FLUX, and their
ControlNet variants where diffusers has one) run the SDEdit stages through it
(``AutoPipelineForImage2Image.from_pipe``). The others (PixArt, SANA, SD3 ControlNet, SANA
ControlNet) run them through their own text-to-image pipeline: the upscaled image is encoded, noised
to the first timestep of the truncated schedule and passed as ``latents``, and a copy of the
scheduler keeps only that tail of the schedule (:mod:`lindiff.pipelines.sdedit`). Every helper
pipeline shares the components of the pipeline it was made from; no weights are copied. The skip
residual is in :mod:`lindiff.pipelines.skip_residual`.

Video pipelines (a family whose adapter gives frames, see
:meth:`~lindiff.adapters.ModelAdapter.frame_multiple`) run the same chain on videos: stage 1 renders
all ``num_frames`` frames at the native area, and every later stage upscales each frame and
re-denoises the whole video through the family's video-to-video pipeline
(:meth:`~lindiff.adapters.ModelAdapter.video_to_video`: ``WanVideoToVideoPipeline``,
``CogVideoXVideoToVideoPipeline``, ``AnimateDiffVideoToVideoPipeline``) at the stage's strength.
Families without one are refused.

Memory and time: each stage decides for its own size whether the VAE encodes and decodes in tiles
(``vae.enable_tiling()``; every supported family's VAE has it), with local attention in its middle
block (:mod:`lindiff.pipelines.vae_attention`) and in bfloat16 on a CPU that computes it
(:mod:`lindiff.pipelines.vae_precision`); the denoiser (and ControlNet) can run the two halves of
the classifier-free-guidance batch in turn above a pixel count, every ``FeedForward`` can run over
chunks of tokens, and ``enable_model_cpu_offload`` works as in diffusers. The per-call changes
(:mod:`lindiff.pipelines.memory`) are undone when the call ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
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

from ..denoisers import main_denoiser, pipeline_adapter
from . import vae_attention, vae_precision
from .memory import chunked_feed_forward, sequential_halves, vae_tile_size, vae_tiling
from .sdedit import sdedit_scheduler, stage_strengths
from .skip_residual import SkipResidual
from .stages import Stage, chain_stages, is_int, plan_stages

logger = logging.getLogger(__name__)

SKIP_RESIDUAL_POWER = 3.0
"""DemoFusion's exponent of the cosine skip-residual weight (``skip_residual=True``)."""
OUTPUT_TYPES = ("pil", "np", "pt")
# Arguments HighResPipeline sets on the stage pipelines itself; `**kwargs` may not pass them.
_RESERVED = {
    "prompt",
    "height",
    "width",
    "image",
    "video",
    "num_frames",
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
    ``(B, 3, H, W)`` tensor in [0, 1]; videos: a list of frame lists, ``(B, F, H, W, 3)`` or
    ``(B, F, 3, H, W)``); ``stages``: with ``return_stages``, each stage's images in the same format,
    the last being ``images``."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    stages: list[Any] | None = None


@dataclass(frozen=True)
class HighResRequest:
    """The options of one :class:`HighResPipeline` call that every stage shares, checked on creation.

    The fields are the call's arguments of the same names (see :meth:`HighResPipeline.__call__`);
    ``strengths`` are the SDEdit strengths of stages 2, 3, ..., ``sdedit_guidance_scale`` their
    guidance scale (resolved: ``None`` for the call's ``guidance_scale``), ``num_frames`` a video's
    frames (``None`` for images) and ``kwargs`` the extra arguments passed to every stage pipeline.

    Raises:
        ValueError: an option is out of range, or ``kwargs`` names an argument the chain sets itself.
    """

    prompt: str | list[str]
    negative_prompt: str | list[str] | None
    num_inference_steps: int
    guidance_scale: float | None
    generator: torch.Generator | list[torch.Generator] | None
    strengths: list[float]
    sdedit_guidance_scale: float | None = None
    skip_residual: bool | float = False
    tile_vae: bool | str = "auto"
    local_vae_attention: bool | str = "auto"
    bf16_vae: bool | str = "auto"
    image: Any = None
    controlnet_conditioning_scale: float | list[float] = 1.0
    cross_attention_kwargs: dict[str, Any] | None = None
    sequential_cfg_above: int | None = None
    feed_forward_chunk_size: int | None = None
    output_type: str = "pil"
    on_progress: Callable[[HighResProgress], None] | None = None
    num_frames: int | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        steps = self.num_inference_steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
        short = [s for s in self.strengths if int(steps * s) < 1]
        if short:
            raise ValueError(
                f"num_inference_steps={steps} gives no step at strength {short[0]} "
                f"(int(steps * strength) must be >= 1); raise num_inference_steps"
            )
        sdedit_guidance = self.sdedit_guidance_scale
        if sdedit_guidance is not None and (
            not isinstance(sdedit_guidance, (int, float)) or isinstance(sdedit_guidance, bool)
        ):
            raise ValueError(
                f"sdedit_guidance_scale must be 'auto', None or a number, got {sdedit_guidance!r}"
            )
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {self.output_type!r}")
        above = self.sequential_cfg_above
        if above is not None and (not is_int(above) or above < 0):
            raise ValueError(f"sequential_cfg_above must be None or a pixel count >= 0, got {above!r}")
        chunk = self.feed_forward_chunk_size
        if chunk is not None and (not is_int(chunk) or chunk < 1):
            raise ValueError(f"feed_forward_chunk_size must be None or a positive int, got {chunk!r}")
        skip = self.skip_residual
        if not isinstance(skip, bool) and (not isinstance(skip, (int, float)) or skip <= 0):
            raise ValueError(f"skip_residual must be a bool or a positive exponent, got {skip!r}")
        if not isinstance(self.tile_vae, bool) and self.tile_vae != "auto":
            raise ValueError(f"tile_vae must be True, False or 'auto', got {self.tile_vae!r}")
        for name in ("local_vae_attention", "bf16_vae"):
            value = getattr(self, name)
            if not isinstance(value, bool) and value != "auto":
                raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
        reserved = sorted(_RESERVED & self.kwargs.keys())
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)} are set by HighResPipeline; use its own arguments instead"
            )

    @property
    def skip_residual_power(self) -> float | None:
        """The skip residual's exponent, ``None`` without it."""
        if not self.skip_residual:
            return None
        return SKIP_RESIDUAL_POWER if self.skip_residual is True else float(self.skip_residual)

    @property
    def batch_size(self) -> int:
        """Images the call renders."""
        prompts = 1 if isinstance(self.prompt, str) else len(self.prompt)
        return prompts * self.kwargs.get("num_images_per_prompt", 1)

    def common(self) -> dict[str, Any]:
        """The arguments every stage pipeline gets as they are."""
        common = {
            "prompt": self.prompt,
            "num_inference_steps": self.num_inference_steps,
            "generator": self.generator,
            **self.kwargs,
        }
        for name in ("negative_prompt", "guidance_scale"):
            if getattr(self, name) is not None:
                common[name] = getattr(self, name)
        return common


def _parameters(pipe: DiffusionPipeline) -> frozenset[str]:
    return _call_parameters(type(pipe))


@functools.cache
def _call_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__call__).parameters)


def _sibling(pipe: DiffusionPipeline, cls: type, **overrides: Any) -> DiffusionPipeline:
    """A ``cls`` pipeline on those of ``pipe``'s components and config that ``cls`` takes (nothing
    copied or cast), quiet like ``pipe``."""
    expected, optional = cls._get_signature_keys(cls)
    components = {key: value for key, value in pipe.components.items() if key in {*expected, *optional}}
    config = {key: pipe.config[key] for key in optional if key in pipe.config and key not in components}
    sibling = cls(**{**components, **config, **overrides})
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


def _upscale(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 3, h, w)`` images or ``(B, F, 3, h, w)`` videos in [0, 1] at ``height x width`` (bicubic)."""
    frames = images.flatten(0, 1) if images.ndim == 5 else images
    frames = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False).clamp_(0, 1)
    return frames.unflatten(0, images.shape[:2]) if images.ndim == 5 else frames


def _convert(images: torch.Tensor, output_type: str) -> Any:
    """``(B, 3, H, W)`` images (or ``(B, F, 3, H, W)`` videos) in [0, 1] as ``output_type``."""
    if output_type == "pt":
        return images
    if images.ndim == 5:
        videos = [_convert(video, output_type) for video in images]
        return np.stack(videos) if output_type == "np" else videos
    array = VaeImageProcessor.pt_to_numpy(images.float().cpu())
    return array if output_type == "np" else VaeImageProcessor.numpy_to_pil(array)


class HighResPipeline:
    """Progressive SDEdit to high resolution on top of any text-to-image pipeline lindiff converts
    (and the text-to-video pipelines of families with a video-to-video pipeline).

    Build it with :meth:`from_pipe`; the pipeline may be converted by :func:`lindiff.linearize`
    before or after, and may carry LoRA adapters and a ControlNet (one or several).
    """

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self.pipe = pipe
        self.adapter = pipeline_adapter(pipe)
        self.text2img = _sibling(pipe, type(pipe))
        self.video = self.adapter.frame_multiple(pipe) is not None
        if self.video:
            refiner = self.adapter.video_to_video(pipe)
            if refiner is None:
                raise ValueError(
                    f"HighResPipeline refines videos through a video-to-video pipeline, and diffusers has "
                    f"none for {type(pipe).__name__} (the {self.adapter.name!r} family); render at the "
                    "native size instead"
                )
            self.img2img, self.sdedit = _sibling(pipe, refiner), None
            return
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
        main_denoiser(pipe)  # a TypeError naming the pipeline when it has no unet or transformer
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
        return main_denoiser(self.pipe)

    @property
    def native_size(self) -> int:
        """Side of the model's native square (px), as its family adapter reads it."""
        return self.adapter.native_size(self.pipe)

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether the pipeline's ``guidance_scale`` is classifier-free guidance, not a condition that
        the denoiser embeds (FLUX's guidance embedding), as its family adapter says."""
        return not self.adapter.guidance_conditions(self.denoiser, 1.0, 1)

    @property
    def size_multiple(self) -> int:
        """What every stage's height and width must be a multiple of (px), as its family adapter says."""
        return self.adapter.size_multiple(self.pipe)

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

    def check_inputs(self, request: HighResRequest) -> None:
        """Validates a call against the stage pipelines before anything runs (``request`` checked
        its own options when it was made)."""
        has_controlnet = getattr(self.pipe, "controlnet", None) is not None
        if has_controlnet and request.image is None:
            raise ValueError(f"{type(self.pipe).__name__} has a ControlNet: pass its condition as image")
        if not has_controlnet and request.image is not None:
            raise ValueError(
                f"image is a ControlNet condition but {type(self.pipe).__name__} has no controlnet"
            )
        refines = bool(request.strengths)
        if self.video and request.skip_residual:
            raise ValueError("skip_residual is supported on images only; leave it False for a video pipeline")
        if refines and self.sdedit is not None and self.sdedit.scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(
                f"{type(self.pipe).__name__} has no image-to-image pipeline and its scheduler shifts its schedule "
                "by image size (use_dynamic_shifting), which its SDEdit stages cannot reproduce; use stages=1"
            )
        for pipe in [self.text2img] + ([self._refiner] if refines else []):
            parameters = _parameters(pipe)
            if request.negative_prompt is not None and "negative_prompt" not in parameters:
                raise ValueError(f"negative_prompt is not supported by {type(pipe).__name__}")
            if request.cross_attention_kwargs is not None and not parameters & set(_ATTENTION_KWARGS):
                raise ValueError(f"cross_attention_kwargs is not supported by {type(pipe).__name__}")
            unknown = sorted(request.kwargs.keys() - parameters)
            if unknown:
                raise ValueError(f"{type(pipe).__name__} takes no argument(s) {', '.join(unknown)}")
            if "callback_on_step_end" not in parameters:
                if request.skip_residual and refines:
                    raise ValueError(
                        f"skip_residual needs callback_on_step_end, which {type(pipe).__name__} lacks"
                    )
                if request.on_progress is not None and "callback" not in parameters:
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
        strength_schedule: Sequence[float] | None = None,
        native_size: int | None = None,
        skip_residual: bool | float = False,
        tile_vae: bool | str = "auto",
        local_vae_attention: bool | str = "auto",
        bf16_vae: bool | str = "auto",
        image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        cross_attention_kwargs: dict[str, Any] | None = None,
        sequential_cfg_above: int | None = None,
        feed_forward_chunk_size: int | None = None,
        output_type: str = "pil",
        return_stages: bool = False,
        on_progress: Callable[[HighResProgress], None] | None = None,
        num_frames: int | None = None,
        sdedit_guidance_scale: float | str | None = "auto",
        **kwargs: Any,
    ) -> HighResPipelineOutput:
        """Generates ``height x width`` px images through the SDEdit chain.

        Args:
            prompt, negative_prompt, guidance_scale, generator: as in the wrapped pipeline, used by
                every stage (``guidance_scale=None`` keeps the pipeline's default), except that the
                SDEdit stages take their guidance scale from ``sdedit_guidance_scale``.
            num_inference_steps: steps of a full schedule; stage 1 runs all of them, an SDEdit
                stage of strength ``s`` runs ``int(num_inference_steps * s)``.
            stages: ``"auto"`` or the number of stages (see :func:`plan_stages`).
            strength_schedule: SDEdit strengths of stages 2, 3, ... (the first ``stages - 1`` are
                used); ``None``: each stage gets LinFusion's strength for its scale, 0.4 up to 2x the
                native side, 0.3 up to 4x, 0.2 up to 8x, 0.1 above, so every size works (the
                ``"auto"`` chain to 8x runs 0.3 at 4x, then 0.2;
                :func:`~lindiff.pipelines.sdedit.default_strengths`).
            native_size: side of the native square (px); default :attr:`native_size`.
            skip_residual: DemoFusion's skip residual in the SDEdit stages; ``True`` uses the
                exponent :data:`SKIP_RESIDUAL_POWER`, a float sets it.
            tile_vae: tiled VAE encode/decode; ``"auto"`` tiles a stage only when an untiled pass
                at its size would take more than half the free memory, in tiles as large as that
                allows (:func:`~lindiff.pipelines.memory.vae_tile_size`).
            local_vae_attention: the VAE's middle-block attention as local attention on grids of
                more than :data:`~lindiff.pipelines.vae_attention.VAE_ATTENTION_TOKENS` latent
                pixels (:mod:`~lindiff.pipelines.vae_attention`: linear time, results within
                rounding of the full attention at 2048 px); ``"auto"``: in the stages that have
                that many, for a VAE that has such a block.
            bf16_vae: the VAE's encoder and decoder in bfloat16 (CPU autocast, channels-last;
                :mod:`~lindiff.pipelines.vae_precision`: 2.9x faster on a CPU with bfloat16
                arithmetic, the image within 0.01 of float32 on average); ``"auto"``: in the stages
                above 1024 px (8x VAE) of a float32 VAE on such a CPU.
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
            num_frames: a video pipeline's frames (stage 1 renders them, later stages keep them);
                ``None``: the pipeline's default. Image pipelines take none.
            sdedit_guidance_scale: guidance scale of the SDEdit stages. ``"auto"``: 1.0 (no
                classifier-free guidance, and one denoiser pass per step) where the pipeline's
                guidance is classifier-free, ``guidance_scale`` where the denoiser embeds it (FLUX
                with a guidance embedding); ``None``: ``guidance_scale``, as stage 1; a number sets it.
            **kwargs: passed to every stage's pipeline call (e.g. ``max_sequence_length``).

        Returns:
            :class:`HighResPipelineOutput` with images at ``(width, height)``.
        """
        sizes = plan_stages(
            height, width, native_size or self.native_size, stages, multiple=self.size_multiple
        )
        strengths = stage_strengths(strength_schedule, sizes)
        if sdedit_guidance_scale == "auto":
            sdedit_guidance_scale = 1.0 if self.classifier_free_guidance else guidance_scale
        request = HighResRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            strengths=strengths,
            sdedit_guidance_scale=sdedit_guidance_scale,
            skip_residual=skip_residual,
            tile_vae=tile_vae,
            local_vae_attention=local_vae_attention,
            bf16_vae=bf16_vae,
            image=image,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
            cross_attention_kwargs=cross_attention_kwargs,
            sequential_cfg_above=sequential_cfg_above,
            feed_forward_chunk_size=feed_forward_chunk_size,
            output_type=output_type,
            on_progress=on_progress,
            num_frames=self.adapter.resolve_frames(self.pipe, num_frames),
            kwargs=kwargs,
        )
        self.check_inputs(request)
        stage_images = []
        with self._memory_savers(request):
            images = None
            for stage in chain_stages(sizes, strengths):
                if images is not None:  # the previous stage, upscaled in pixel space
                    images = _upscale(images, stage.height, stage.width)
                above = request.sequential_cfg_above
                sequential = above is not None and stage.height * stage.width > above
                with contextlib.ExitStack() as settings:
                    settings.enter_context(self._vae_settings(request, stage))
                    if sequential:
                        settings.enter_context(sequential_halves(self._denoising_models))
                    images = self._run_stage(request, stage, images)
                if return_stages:  # earlier stages wait on the CPU
                    last = stage.index == stage.num_stages - 1
                    stage_images.append(_convert(images if last else images.cpu(), output_type))
        self.pipe.maybe_free_model_hooks()
        final = stage_images[-1] if return_stages else _convert(images, output_type)
        return HighResPipelineOutput(images=final, stages=stage_images if return_stages else None)

    @contextlib.contextmanager
    def _memory_savers(self, request: HighResRequest) -> Iterator[None]:
        """Feed-forward chunking for the call."""
        with contextlib.ExitStack() as stack:
            if request.feed_forward_chunk_size is not None:
                stack.enter_context(
                    chunked_feed_forward(self._denoising_models, request.feed_forward_chunk_size)
                )
            yield

    @contextlib.contextmanager
    def _vae_settings(self, request: HighResRequest, stage: Stage) -> Iterator[None]:
        """VAE tiling, local attention and bfloat16 for one stage (its encode and decode are at its
        size), each decided for that size where ``"auto"``: a chain's stages are those of a shorter
        chain's, whatever the target."""
        vae, height, width = self.pipe.vae, stage.height, stage.width
        device = self.pipe._execution_device
        tile, tile_size = request.tile_vae, None
        if tile == "auto":
            frames = request.batch_size * (request.num_frames or 1)  # a video frame costs about an image
            tile_size = vae_tile_size(vae, frames, height, width, device)
            tile = tile_size is not None
        local = request.local_vae_attention
        tokens = vae_attention.vae_attention_tokens(vae, height, width)
        if local is True and tokens is None:
            raise ValueError(
                f"local_vae_attention=True needs a VAE with a middle-block attention; {type(vae).__name__} has none"
            )
        if local == "auto":
            local = tokens is not None and tokens > vae_attention.VAE_ATTENTION_TOKENS
        bf16 = request.bf16_vae
        if bf16 == "auto":
            bf16 = vae_precision.wants_bf16_vae(vae, height, width, device)
        with contextlib.ExitStack() as stack:
            stack.enter_context(vae_tiling(vae, tile, tile_size))
            stack.enter_context(vae_attention.local_vae_attention(vae, local))
            stack.enter_context(vae_precision.bf16_vae(vae, bf16))
            yield

    def _stage_call(self, request: HighResRequest, stage: Stage, pipe: DiffusionPipeline) -> dict[str, Any]:
        """The arguments of ``pipe`` for ``stage`` that do not depend on the previous stage."""
        parameters = _parameters(pipe)
        call = dict(request.common(), output_type="pt")
        if not stage.first and request.sdedit_guidance_scale is not None and "guidance_scale" in parameters:
            call["guidance_scale"] = request.sdedit_guidance_scale
        if "height" in parameters:
            call.update(height=stage.height, width=stage.width)
        if "use_resolution_binning" in parameters:
            call["use_resolution_binning"] = False
        if stage.first and request.num_frames is not None:
            call["num_frames"] = request.num_frames
        if request.cross_attention_kwargs is not None:
            name = next(name for name in _ATTENTION_KWARGS if name in parameters)
            call[name] = request.cross_attention_kwargs
        if request.image is not None:
            condition = _resize(request.image, stage.height, stage.width)
            call["control_image" if "control_image" in parameters else "image"] = condition
            call["controlnet_conditioning_scale"] = request.controlnet_conditioning_scale
        return call

    def _run_stage(
        self, request: HighResRequest, stage: Stage, upscaled: torch.Tensor | None
    ) -> torch.Tensor:
        """One stage, from ``upscaled``: the previous stage's images at this stage's size (``None`` for
        stage 1); returns its images ``(B, 3, h, w)`` (videos ``(B, F, 3, h, w)``) in [0, 1] on the
        execution device."""
        pipe = self.text2img if stage.first else self._refiner
        call = self._stage_call(request, stage, pipe)
        power = request.skip_residual_power
        residual = None
        if not stage.first and self.video:
            call.update(video=upscaled, strength=stage.strength)
        elif not stage.first:
            if self.img2img is not None:
                call.update(image=upscaled, strength=stage.strength)
            if self.img2img is None or power is not None:
                clean = self._encode(upscaled)
                noise = randn_tensor(
                    clean.shape, generator=request.generator, device=clean.device, dtype=clean.dtype
                )
                if self.img2img is None:
                    call["latents"] = self._noised_start(
                        clean, noise, stage.strength, request.num_inference_steps
                    )
                if power is not None:
                    residual = SkipResidual(
                        self.adapter.pack_latents(clean), self.adapter.pack_latents(noise), power
                    )
        call.update(self._step_callbacks(request, stage, pipe, residual))
        output = pipe(**call)
        return output.frames if self.video else output.images

    def _step_callbacks(
        self, request: HighResRequest, stage: Stage, pipe: DiffusionPipeline, residual: SkipResidual | None
    ) -> dict[str, Any]:
        """The step-callback arguments of ``pipe`` that report progress and apply the skip residual."""
        on_progress = request.on_progress
        expected_steps = int(request.num_inference_steps * stage.strength)
        progress = functools.partial(
            HighResProgress, stage.index + 1, stage.num_stages, height=stage.height, width=stage.width
        )

        def num_steps(stage_pipe: DiffusionPipeline) -> int:
            return getattr(stage_pipe, "num_timesteps", None) or expected_steps

        if "callback_on_step_end" in _parameters(pipe) and (on_progress is not None or residual is not None):

            def on_step_end(stage_pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict) -> dict:
                total = num_steps(stage_pipe)
                if on_progress is not None:
                    on_progress(progress(step + 1, total))
                if residual is None:
                    return {}
                return {"latents": residual(stage_pipe, step, total, tensors["latents"])}

            return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}
        if on_progress is not None:
            return {
                "callback": lambda step, timestep, latents: on_progress(progress(step + 1, num_steps(pipe))),
                "callback_steps": 1,
            }
        return {}

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
