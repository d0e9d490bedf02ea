"""The student: a linearized deep copy of the teacher, what of it trains, and its export.

``trainable`` selects the parameters:

- ``"new"``: only what ``linearize`` added (each converted layer's ``lindiff`` submodule);
- ``"attention"``: plus ``to_q/to_k/to_v/to_out.0`` of the converted self-attention layers;
- ``"lora"``: plus PEFT LoRA adapters on those projections (LoLCATs-style low-rank recovery),
  merged into the projections when exported;
- ``"lora_only"``: only those LoRA adapters (the recovery phase of a two-phase run, see
  :mod:`lindiff.distill.phases`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..attention.base import ADDED_MODULE
from ..convert import linearize
from ..state import PROJECTIONS, get_state, projections_of
from ..weights import save_weights


def build_student(
    teacher: nn.Module, method: str, method_options: dict[str, Any], weights: str | os.PathLike | None
) -> nn.Module:
    """``linearize`` a deep copy of ``teacher`` (optionally from existing lindiff weights)."""
    return linearize(copy.deepcopy(teacher), method=method, weights=weights, **method_options)


def _is_trainable(name: str, layers: list[str], trainable: str) -> bool:
    layer = next((layer for layer in layers if name.startswith(layer + ".")), None)
    if layer is None:
        return False
    rest = name[len(layer) + 1 :]
    if rest.startswith(ADDED_MODULE + "."):
        return trainable != "lora_only"
    if trainable == "attention":
        return any(rest.startswith(projection + ".") for projection in PROJECTIONS)
    return trainable in ("lora", "lora_only") and ".lora_" in "." + rest


def select_trainable(
    student: nn.Module, trainable: str, lora_rank: int = 16, lora_alpha: float | None = None
) -> list[str]:
    """Freeze ``student`` except the ``trainable`` set (adding LoRA adapters for ``"lora"`` and
    ``"lora_only"``).

    Returns:
        The names of the trainable parameters.

    Raises:
        ValueError: if the set is empty (e.g. ``trainable="new"`` with a method that adds nothing).
    """
    state = get_state(student)
    if state is None:
        raise ValueError(f"{type(student).__name__} is not linearized")
    if trainable in ("attention", "lora", "lora_only"):
        state.backup_projections()  # so save_weights exports them and restore() gives the teacher back
    if trainable in ("lora", "lora_only"):
        from peft import LoraConfig

        targets = [
            f"{name}.{projection}"
            for name, attn in state.layers.items()
            for projection in projections_of(attn)
        ]
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=targets)
        student.add_adapter(config)
    layers = sorted(state.layers, key=len, reverse=True)
    names = []
    for name, param in student.named_parameters():
        param.requires_grad_(_is_trainable(name, layers, trainable))
        if param.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(
            f"trainable={trainable!r} selects no parameters for method {state.method.name!r} "
            "(it adds none); use trainable='attention' or 'lora'"
        )
    return names


def cast_for_training(model: nn.Module, frozen_dtype: torch.dtype) -> None:
    """Frozen parameters to ``frozen_dtype`` (the mixed-precision dtype), trainable ones to float32."""
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else frozen_dtype)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (what a checkpoint stores)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpointed trainable parameters into ``model``; every name must match."""
    params = dict(model.named_parameters())
    expected = {name for name, param in params.items() if param.requires_grad}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            "checkpoint does not match the trainable parameters (was it written with other method/"
            f"trainable options?): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def export_student(
    student: nn.Module,
    folder: str | os.PathLike,
    training: dict[str, Any] | None = None,
    clear: bool = False,
) -> Path:
    """``lindiff.save_weights`` of the student, with LoRA adapters merged into the projections.

    Args:
        training: a summary of the run for the model card that ``save_weights`` writes.
        clear: also write CLEAR's released layout (:func:`lindiff.clear_format.save_clear_weights`).

    Returns:
        The ``lindiff.safetensors`` file.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in student.modules()):
        student = copy.deepcopy(student)
        for module in student.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    path = save_weights(student, folder, training=training)
    if clear:
        from ..clear_format import save_clear_weights

        save_clear_weights(student, folder)
    return path
