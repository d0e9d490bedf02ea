"""What a model-family adapter knows: layers, token grid, processors, sizes, latents, conditioning."""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_processor import Attention
from torch import nn

from ..attention.base import LayerInfo
from ..grid import TokenGrid
from .processors import SelfAttnProcessor

Batch = dict[str, torch.Tensor]
"""Text conditioning of a batch for one denoiser call: name -> ``(B, ...)`` tensor."""
CONTROL = "control"
"""Batch key of a ControlNet's control image ``(B, 3, H_px, W_px)`` in [0, 1] (ControlNet distillation)."""
MicroConditions = list[tuple[int, int, int, int, int, int]]
"""Per sample ``(orig_h, orig_w, crop_top, crop_left, h, w)`` in pixels (SDXL's ``add_time_ids``,
PixArt's resolution and aspect ratio)."""

PIPELINE_PIXEL_MULTIPLE = 8
"""What diffusers' pipelines require of every height and width (their ``check_inputs``)."""
SPLIT_TOKENS_OUT = {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)}
"""Context-parallel plan entry of a module whose output ``(B, N, C)`` is split along the tokens."""
GATHER_TOKENS_OUT = ContextParallelOutput(gather_dim=1, expected_dims=3)
"""Context-parallel plan entry of a module whose output ``(B, N_shard, C)`` is gathered along the tokens."""


class ModelAdapter:
    """Base class of a model-family adapter (one per family, one file each).

    The adapter is the only place that knows a family. Subclasses set ``name`` (the family,
    recorded in saved weights), ``role`` (the pipeline attribute the denoiser sits in:
    ``"unet"`` or ``"transformer"``), ``models`` and ``controlnets`` (the denoiser and ControlNet
    classes of the family), and implement :meth:`layers` and :meth:`record_grid`. Families with
    their own attention plumbing override :meth:`processor`; those that pack latents, need a
    coarser size multiple or can be distilled override the methods of those sections.
    """

    name: ClassVar[str]
    role: ClassVar[str]
    models: ClassVar[tuple[type[nn.Module], ...]]
    controlnets: ClassVar[tuple[type[nn.Module], ...]] = ()
    pipeline_pixel_multiple: ClassVar[int] = PIPELINE_PIXEL_MULTIPLE
    """What the family's diffusers pipelines require of every height and width (px)."""
    frame_rate: ClassVar[int] = 16
    """Frames per second a video of the family is written at unless told otherwise (video families)."""
    weights_family: ClassVar[str | None] = None
    """The family whose converted layers this family's are, by module path and shape, so weights
    saved from either load into the other (AnimateDiff: ``"unet"``, the image UNet it is built
    from); ``None``: its own. See :func:`lindiff.adapters.weights_family`."""

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""
        return isinstance(model, cls.models + cls.controlnets)

    def role_of(self, model: nn.Module) -> str:
        """The pipeline attribute ``model`` sits in: ``"controlnet"`` or the family's :attr:`role`."""
        return "controlnet" if isinstance(model, self.controlnets) else self.role

    # Conversion: which layers, the grid of each call, the processor of a converted layer.

    def new_grid(self, model: nn.Module) -> TokenGrid:
        """A fresh TokenGrid for ``model`` (with its patch size)."""
        return TokenGrid()

    def layers(self, model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
        """The attention layers a method may replace, in module order."""
        raise NotImplementedError

    def record_grid(self, grid: TokenGrid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Fill ``grid`` from the arguments of a denoiser call."""
        raise NotImplementedError

    def processor(self, layer: LayerInfo) -> Any:
        """The processor of a converted layer (stateless; it calls the method's mixer)."""
        if layer.kind != "self":
            raise NotImplementedError(f"{type(self).__name__} has no processor for {layer.kind!r} layers")
        return SelfAttnProcessor()

    def context_parallel_plan(self, model: nn.Module) -> dict[str, Any] | None:
        """diffusers' context-parallel plan (``_cp_plan`` format: module name -> its
        ``ContextParallelInput``s or ``ContextParallelOutput``) that splits ``model``'s tokens, for
        a model class that has none; ``None`` (the default): the class's own ``_cp_plan``, if any.

        A family that supplies one splits the tokens where they are still ``(B, N, C)`` and gathers
        them before they are un-patched; its self-attention must run lindiff processors, as
        diffusers' own processors of classes without a plan attend over their shard alone.
        """
        return None

    # Rendering: the sizes a pipeline of this family can render, and how its latents are laid out.

    def latent_multiple(self, denoiser: nn.Module) -> int:
        """What the latent height and width must be a multiple of (1: any size)."""
        return 1

    def size_multiple(self, pipe: Any) -> int:
        """What image height and width must be a multiple of (px) for ``pipe``: the VAE factor times
        :meth:`latent_multiple`, and a multiple of :attr:`pipeline_pixel_multiple`."""
        vae_factor = int(getattr(pipe, "vae_scale_factor", PIPELINE_PIXEL_MULTIPLE))
        return math.lcm(
            vae_factor * self.latent_multiple(getattr(pipe, self.role)), self.pipeline_pixel_multiple
        )

    def native_size(self, pipe: Any) -> int:
        """Side of the square the model was trained at (px): the pipeline's default sample size (else
        the denoiser's ``sample_size``) times the VAE factor.

        Raises:
            ValueError: neither the pipeline nor the denoiser's config gives an integer sample size.
        """
        denoiser = getattr(pipe, self.role)
        sample = getattr(pipe, "default_sample_size", None) or denoiser.config.get("sample_size")
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        if not isinstance(sample, int):
            raise ValueError(
                f"{type(pipe).__name__} gives no integer sample size (pipeline default_sample_size or "
                f"{type(denoiser).__name__}.config.sample_size), so its native size is unknown"
            )
        return sample * int(getattr(pipe, "vae_scale_factor", PIPELINE_PIXEL_MULTIPLE))

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, H, W)`` in the layout the family's pipelines denoise (unchanged by default)."""
        return latents

    # Video: the frame counts a pipeline of this family renders, and its video-to-video pipeline.

    def frame_multiple(self, pipe: Any) -> int | None:
        """``None`` when ``pipe`` renders images; for a video pipeline (one that takes ``num_frames``),
        ``m`` such that it renders ``k * m + 1`` frames: its VAE's temporal factor (the pipeline's
        ``vae_scale_factor_temporal``, else 1), the first frame kept."""
        if not accepts(pipe, "num_frames"):
            return None
        return int(getattr(pipe, "vae_scale_factor_temporal", 1))

    def resolve_frames(self, pipe: Any, num_frames: int | None) -> int | None:
        """The frames ``pipe`` renders for ``num_frames``: ``None`` for an image pipeline; for a video
        pipeline ``num_frames``, or the pipeline's default ``num_frames`` when ``None``.

        Raises:
            ValueError: frames asked of an image pipeline, or a count the video pipeline cannot
                render (the message gives the nearest valid ones).
        """
        multiple = self.frame_multiple(pipe)
        if multiple is None:
            if num_frames is not None:
                raise ValueError(
                    f"frames={num_frames!r}: {type(pipe).__name__} renders images; leave frames unset"
                )
            return None
        if num_frames is None:
            return int(call_default(pipe, "num_frames"))
        counted = isinstance(num_frames, int) and not isinstance(num_frames, bool) and num_frames >= 1
        if not counted or (num_frames - 1) % multiple:
            below = (num_frames - 1) // multiple * multiple + 1 if counted else 1
            raise ValueError(
                f"frames={num_frames!r}: {type(pipe).__name__} renders {multiple}k + 1 frames "
                f"(1, {multiple + 1}, {2 * multiple + 1}, ...); nearest valid: {below} or {below + multiple}"
            )
        return num_frames

    def video_to_video(self, pipe: Any) -> type | None:
        """The diffusers video-to-video pipeline class that refines ``pipe``'s videos (SDEdit, with a
        ``video`` and a ``strength``), or ``None`` when the family has none."""
        return None

    # Distillation: what the trainer feeds the teacher and the student.

    @classmethod
    def distillable(cls) -> bool:
        """Whether :func:`lindiff.distill.distill` knows how to condition this family."""
        return cls.encode_prompts is not ModelAdapter.encode_prompts

    @classmethod
    def controlnet_distillable(cls) -> bool:
        """Whether :func:`lindiff.distill.distill` can train this family's ControlNets."""
        return cls.predict_controlled is not ModelAdapter.predict_controlled

    def generation_options(self, pipe: Any) -> dict[str, Any]:
        """Extra arguments of the ``pipe(...)`` call that samples training latents, so they come out
        at exactly the requested size: resolution binning (PixArt, SANA) off."""
        return {"use_resolution_binning": False} if accepts(pipe, "use_resolution_binning") else {}

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """What ``pipe(output_type="latent")`` returns -> latents ``(B, C, height, width)`` (the inverse
        of :meth:`pack_latents`; unchanged by default)."""
        return latents

    def check_distillation(self, pipe: Any, num_frames: int | None) -> None:
        """Raise ``ValueError`` unless distillation can sample ``pipe`` with ``num_frames`` frames per
        sample (``None``: images, all that an image family takes)."""
        if num_frames is not None:
            raise ValueError(
                f"num_frames={num_frames!r}: {type(pipe).__name__} renders images; leave num_frames None"
            )

    def frame_options(self, num_frames: int | None) -> dict[str, Any]:
        """Arguments of a ``pipe(...)`` call for ``num_frames`` frames per sample (none for images)."""
        return {}

    def latent_shape(self, pipe: Any, size: int, num_frames: int | None) -> tuple[int, ...]:
        """The latent grid ``(h, w)`` of a ``size`` px square sample (video families: ``(f, h, w)``)."""
        side = size // int(getattr(pipe, "vae_scale_factor", PIPELINE_PIXEL_MULTIPLE))
        return side, side

    def sampled_latents(self, output: Any, shape: tuple[int, ...]) -> torch.Tensor:
        """The latents ``(B, C, *shape)`` of a ``pipe(output_type="latent")`` call's ``output``."""
        return self.unpack_latents(output.images, *shape)

    def sampled_images(self, output: Any) -> list[Any]:
        """One PIL image per sample of a ``pipe(output_type="pil")`` call's ``output`` (video: its
        first frame)."""
        return list(output.images)

    def encode_prompts(
        self, pipe: Any, denoiser: nn.Module, prompts: list[str], device: torch.device, micro: MicroConditions
    ) -> Batch:
        """The conditioning of ``prompts`` for ``denoiser``, without classifier-free guidance."""
        raise NotImplementedError(f"distillation does not support the {self.name!r} family yet")

    def guidance_conditions(self, denoiser: nn.Module, guidance_scale: float, batch_size: int) -> Batch:
        """Conditions that carry the guidance scale into the denoiser (FLUX's guidance embedding);
        none by default (classifier-free guidance happens outside the denoiser)."""
        return {}

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, batch: Batch
    ) -> torch.Tensor:
        """``denoiser``'s prediction ``(B, C', H, W)`` for latents ``(B, C, H, W)`` at ``timesteps`` ``(B,)``."""
        raise NotImplementedError(f"distillation does not support the {self.name!r} family yet")

    def predict_controlled(
        self,
        controlnet: nn.Module,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        batch: Batch,
    ) -> torch.Tensor:
        """Like :meth:`predict`, with ``controlnet``'s residuals for the control image
        ``batch[CONTROL]`` ``(B, 3, H_px, W_px)`` in [0, 1] added to ``denoiser``."""
        raise NotImplementedError(f"distillation does not support {self.name!r} ControlNets yet")

    def scale_conditions(self, batch: Batch, scale: int) -> Batch:
        """``batch`` for latents up-sampled ``scale`` times (pixel-size conditions scaled; none by default)."""
        return batch


def accepts(pipe: Any, argument: str) -> bool:
    """Whether ``pipe.__call__`` takes ``argument``."""
    return argument in inspect.signature(pipe.__call__).parameters


def call_default(pipe: Any, argument: str) -> Any:
    """The default of ``pipe.__call__``'s ``argument`` (how the pipeline encodes prompts when sampling)."""
    return inspect.signature(pipe.__call__).parameters[argument].default


def attn1_layers(model: nn.Module, grid: TokenGrid) -> list[LayerInfo]:
    """Every ``attn1`` self-attention ``Attention`` of ``model`` (UNets, PixArt, SANA), in module order."""
    return [
        LayerInfo(name=name, module=module, kind="self", grid=grid)
        for name, module in model.named_modules()
        if isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention
    ]


def tensor_argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int) -> torch.Tensor:
    """The denoiser argument ``name``, passed as ``name=`` or positionally at ``position``."""
    value = args[position] if len(args) > position else kwargs.get(name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor as the denoiser's {name!r} argument, got {type(value).__name__}")
    return value


def micro_tensor(micro: MicroConditions, like: torch.Tensor) -> torch.Tensor:
    """``micro`` as a ``(B, 6)`` tensor with ``like``'s dtype and device."""
    return torch.tensor(micro, dtype=like.dtype).to(like.device)


class LatentGridAdapter(ModelAdapter):
    """A DiT whose input is a latent ``hidden_states`` ``(B, C, H, W)`` cut into ``p x p`` patches.

    The grid is read from the latent (never assumed square), with the model's
    ``config.patch_size``: ``(H / p, W / p)`` tokens sit at the finest level.
    """

    role = "transformer"

    def new_grid(self, model: nn.Module) -> TokenGrid:
        return TokenGrid(patch_size=int(model.config.patch_size))

    def latent(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The latent of a denoiser call: its first argument, ``hidden_states``."""
        return tensor_argument(args, kwargs, "hidden_states", 0)

    def record_grid(self, grid: TokenGrid, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        latent = self.latent(args, kwargs)
        if latent.ndim != 4:
            raise ValueError(
                f"expected the denoiser's latent hidden_states as (B, C, H, W), got shape {tuple(latent.shape)}"
            )
        grid.update(height=latent.shape[-2], width=latent.shape[-1])

    def latent_multiple(self, denoiser: nn.Module) -> int:
        return int(denoiser.config.get("patch_size") or 1)


class VideoAdapter(ModelAdapter):
    """A video family whose pipelines take ``num_frames`` and return ``.frames``, with latents
    ``(B, C, F, H, W)``: ``F = (num_frames - 1) / t + 1`` for the VAE's temporal factor ``t``
    (its first frame kept), and ``num_frames`` a multiple of ``t`` plus one.

    ``t`` is :meth:`frame_multiple`. A family whose pipeline names these differently, or packs its
    latents, overrides :meth:`frame_multiple`, :meth:`spatial_factor` or :meth:`sampled_latents`.
    """

    def spatial_factor(self, pipe: Any) -> int:
        """Pixels per latent pixel (the pipeline's ``vae_scale_factor_spatial``)."""
        return int(pipe.vae_scale_factor_spatial)

    def check_distillation(self, pipe: Any, num_frames: int | None) -> None:
        step = self.frame_multiple(pipe) or 1
        if num_frames is None or (num_frames - 1) % step:
            raise ValueError(
                f"num_frames={num_frames!r}: {type(pipe).__name__} renders videos, so distillation needs "
                f"the frames of each teacher sample as {step}k + 1 (e.g. {2 * step + 1}); "
                "image folders cannot train a video family"
            )

    def frame_options(self, num_frames: int | None) -> dict[str, Any]:
        return {"num_frames": num_frames}

    def latent_shape(self, pipe: Any, size: int, num_frames: int | None) -> tuple[int, ...]:
        side = size // self.spatial_factor(pipe)
        return (num_frames - 1) // (self.frame_multiple(pipe) or 1) + 1, side, side

    def sampled_latents(self, output: Any, shape: tuple[int, ...]) -> torch.Tensor:
        return output.frames

    def sampled_images(self, output: Any) -> list[Any]:
        return [frames[0] for frames in output.frames]
