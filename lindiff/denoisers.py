"""The denoisers of a pipeline: what `linearize` converts, weights I/O saves and pipelines call."""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapters import ModelAdapter, adapter_for

DENOISER_ROLES = ("unet", "transformer", "transformer_2")
"""Pipeline attributes a denoiser sits in, the main one first; ``transformer_2`` is the low-noise
expert of Wan 2.2."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind a ``torch.compile`` wrapper."""
    return getattr(model, "_orig_mod", model)


def main_denoiser(pipe: Any) -> nn.Module:
    """The pipeline's ``unet`` or ``transformer`` (as the pipeline holds it).

    Raises:
        TypeError: ``pipe`` has neither.
    """
    for role in DENOISER_ROLES:
        model = getattr(pipe, role, None)
        if isinstance(model, nn.Module):
            return model
    raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def pipeline_adapter(pipe: Any) -> ModelAdapter:
    """The adapter of the family of ``pipe``'s main denoiser: where its sizes, latent layout and
    conditioning come from.

    Raises:
        TypeError: ``pipe`` has no denoiser, or one of no supported family.
    """
    return adapter_for(main_denoiser(pipe))


def denoisers(pipe_or_model: Any) -> list[tuple[str, nn.Module]]:
    """The models `linearize` converts, with their role names.

    A pipeline gives its ``unet`` or ``transformer`` (and ``transformer_2``, Wan 2.2's second
    expert, when it has one) and each of its ControlNets
    (``"controlnet"``, or ``"controlnet.0"``, ``"controlnet.1"``, ... for a multi-ControlNet).
    A bare model gives itself, under its family's role.
    """
    if isinstance(pipe_or_model, nn.Module) and not hasattr(pipe_or_model, "nets"):
        model = unwrap(pipe_or_model)
        return [(adapter_for(model).role_of(model), model)]
    found: list[tuple[str, nn.Module]] = []
    if isinstance(pipe_or_model, nn.Module):
        controlnet = pipe_or_model
    else:
        for role in DENOISER_ROLES:
            model = getattr(pipe_or_model, role, None)
            if isinstance(model, nn.Module):
                found.append((role, unwrap(model)))
        controlnet = getattr(pipe_or_model, "controlnet", None)
    if isinstance(controlnet, nn.Module):
        nets = getattr(controlnet, "nets", None)
        if nets is None:
            found.append(("controlnet", unwrap(controlnet)))
        else:
            found.extend((f"controlnet.{i}", unwrap(net)) for i, net in enumerate(nets))
    if not found:
        raise TypeError(
            "pipe_or_model must be a diffusers pipeline with a `unet` or `transformer`, or a denoiser "
            f"model; got {type(pipe_or_model).__name__}"
        )
    return found
