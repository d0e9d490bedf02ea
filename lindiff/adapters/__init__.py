"""Model-family adapters, one file each, registered by family name in :data:`FAMILIES`.

An adapter is the only place that knows a family: which attention layers it has and of what
kind, how the token grid of a call is read, the processors of its converted layers (family
plumbing lives here; see :mod:`lindiff.adapters.processors`), the image sizes its pipelines
accept and its native size, how its latents are packed, and what the distillation trainer feeds
it. Pipelines, the trainer, the demo and the CLI ask the adapter
(:func:`lindiff.denoisers.pipeline_adapter`); they never test class names.
"""

from __future__ import annotations

from torch import nn

from ..registry import Registry
from .animatediff import AnimateDiffAdapter
from .base import ModelAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .ltx import LTXAdapter
from .pixart import PixArtAdapter
from .sana import SanaAdapter
from .sana_video import SanaVideoAdapter
from .sd3 import SD3Adapter
from .unet import UNetAdapter
from .wan import WanAdapter

FAMILIES: Registry[type[ModelAdapter]] = Registry("model family")
FAMILIES.register(UNetAdapter.name, UNetAdapter)
FAMILIES.register(PixArtAdapter.name, PixArtAdapter)
FAMILIES.register(SD3Adapter.name, SD3Adapter)
FAMILIES.register(FluxAdapter.name, FluxAdapter)
FAMILIES.register(SanaAdapter.name, SanaAdapter)
FAMILIES.register(WanAdapter.name, WanAdapter)
FAMILIES.register(CogVideoXAdapter.name, CogVideoXAdapter)
FAMILIES.register(LTXAdapter.name, LTXAdapter)
FAMILIES.register(HunyuanVideoAdapter.name, HunyuanVideoAdapter)
FAMILIES.register(SanaVideoAdapter.name, SanaVideoAdapter)
FAMILIES.register(AnimateDiffAdapter.name, AnimateDiffAdapter)


def families() -> list[str]:
    """Names of the supported model families, sorted."""
    return FAMILIES.names()


def weights_family(family: str) -> str:
    """The family whose layer layout the weights of ``family`` follow: its adapter's
    ``weights_family``, else ``family`` itself (also for a name no adapter registers)."""
    if family not in FAMILIES:
        return family
    return FAMILIES.get(family).weights_family or family


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of the family ``model`` belongs to.

    Raises:
        TypeError: if no registered family handles ``type(model)``.
    """
    for name in FAMILIES:
        adapter_cls = FAMILIES.get(name)
        if adapter_cls.handles(model):
            return adapter_cls()
    raise TypeError(
        f"{type(model).__name__} is not a supported denoiser; supported families: {', '.join(families())}"
    )


__all__ = ["FAMILIES", "ModelAdapter", "adapter_for", "families", "weights_family"]
