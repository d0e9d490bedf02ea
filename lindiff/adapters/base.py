"""What a model-family adapter knows: its self-attention layers and the token grid of a call."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..attention.base import LayerInfo
from ..attention.processors import SelfAttnProcessor
from ..grid import TokenGrid


class ModelAdapter:
    """Base class of a model-family adapter (one per family, one file each).

    Subclasses set ``name`` (the family, recorded in saved weights), ``role`` (the pipeline
    attribute the denoiser usually sits in: ``"unet"``, ``"transformer"``, ``"controlnet"``) and
    implement :meth:`handles`, :meth:`layers` and :meth:`record_grid`; families with joint
    attention also override :meth:`processor`.
    """

    name: ClassVar[str]
    role: ClassVar[str]

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family."""
        raise NotImplementedError

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


def first_tensor_argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> torch.Tensor:
    """The denoiser input passed positionally first or as ``name=``."""
    value = args[0] if args else kwargs.get(name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected the {name!r} tensor as the first argument, got {type(value).__name__}")
    return value


def tensor_argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, position: int) -> torch.Tensor:
    """The denoiser argument ``name``, passed as ``name=`` or positionally at ``position``."""
    value = args[position] if len(args) > position else kwargs.get(name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor as the denoiser's {name!r} argument, got {type(value).__name__}")
    return value


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
