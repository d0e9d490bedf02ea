"""Which pipeline, denoiser and family adapter a distillation run trains, and the errors that say
its options do not fit them.

:class:`SetupError` marks a user's mistake found once the pipeline is known (a component it does
not have, a size it cannot render, a family that cannot be distilled yet); ``lindiff distill``
prints it in one line and exits 2, while any other exception keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..adapters import FAMILIES, ModelAdapter, adapter_for
from ..denoisers import denoisers


class SetupError(ValueError):
    """The run's options do not fit its pipeline or output folder (a user error, not a bug)."""


class UnsupportedModelError(SetupError, TypeError):
    """The model is not one that distillation can train (not a pipeline, or a family not supported yet)."""


def load_pipeline(model: Any) -> Any:
    """A pipeline object as given, or ``DiffusionPipeline.from_pretrained(model)`` (a folder or hub id).

    Raises:
        SetupError: a local folder that is not a diffusers pipeline (no ``model_index.json``).
        UnsupportedModelError: ``model`` is neither a pipeline nor a path or hub id.
    """
    if isinstance(model, (str, os.PathLike)):
        from diffusers import DiffusionPipeline

        if Path(model).is_dir() and not (Path(model) / "model_index.json").is_file():
            raise SetupError(
                f"model={str(model)!r} is a folder without model_index.json, not a diffusers pipeline "
                "(save one with pipe.save_pretrained(folder))"
            )
        return DiffusionPipeline.from_pretrained(str(model))
    if isinstance(model, torch.nn.Module) or not hasattr(model, "scheduler"):
        raise UnsupportedModelError(
            "model must be a diffusers pipeline (its scheduler, text encoder and VAE are used) or its "
            f"folder or hub id, got {type(model).__name__}"
        )
    return model


def distillation_adapter(teacher: torch.nn.Module, controlnet: bool = False) -> ModelAdapter:
    """The adapter of ``teacher``'s family, which encodes prompts for it and calls it.

    Args:
        controlnet: ``teacher`` is a ControlNet (its residuals feed the frozen base denoiser).

    Raises:
        UnsupportedModelError: the family (or its ControlNets) cannot be distilled yet (the message
            lists those that can).
    """
    adapter = adapter_for(teacher)
    can = "controlnet_distillable" if controlnet else "distillable"
    if not getattr(adapter, can)():
        supported = [name for name in FAMILIES if getattr(FAMILIES.get(name), can)()]
        kind = "ControlNets" if controlnet else "denoisers"
        raise UnsupportedModelError(
            f"distillation does not support {type(teacher).__name__} {kind} (family {adapter.name!r}) "
            f"yet; families whose {kind} it supports: {', '.join(supported)}"
        )
    return adapter


def select_component(pipe: Any, component: str) -> tuple[str, torch.nn.Module, torch.nn.Module]:
    """``(role, teacher, base)``: the denoiser that trains (``component``; ``"auto"`` is the
    ``unet``/``transformer``) and the pipeline's main denoiser, which a ControlNet feeds.

    Raises:
        SetupError: the pipeline has no such component, or it is one net of a multi-ControlNet.
    """
    found = dict(denoisers(pipe))
    main = next(role for role in found if not role.startswith("controlnet"))
    role = main if component == "auto" else component
    if role not in found:
        raise SetupError(
            f"component={component!r} is not a denoiser of {type(pipe).__name__}; choose one of "
            f"{', '.join(['auto', *found])}"
        )
    if role.startswith("controlnet."):
        raise SetupError(
            f"component={component!r}: distilling one net of a multi-ControlNet is not supported; "
            "build the pipeline with that ControlNet alone"
        )
    return role, found[role], found[main]
