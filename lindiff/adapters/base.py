"""What a model-family adapter knows: layers, token grid, processors, sizes, latents, conditioning."""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
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
