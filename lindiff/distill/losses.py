"""Distillation losses: diffusion objective, output KD, per-layer attention transfer, LiT variance.

All terms are mean squared errors computed in float32. A denoiser "predicts variance" when its
output has twice the input channels (PixArt, DiT): the first half is the prediction the
diffusion and output terms use, the second half the learned variance the variance term matches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; a term with weight 0 is not computed."""

    diffusion: float = 1.0
    output: float = 0.5
    attention: float = 0.5
    variance: float = 0.0


class AttentionCapture:
    """Forward hooks keeping the outputs of named attention modules, only inside :meth:`active`.

    Outside it the hooks do nothing, so gradient-checkpointing recomputation in backward does
    not store anything.

    Args:
        model: the denoiser (teacher or student).
        names: module paths of the attention layers (the converted layers' names).
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names = names
        self.outputs: dict[str, Any] = {}
        self._active = False
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._active:
                self.outputs[name] = output

        return hook

    @contextmanager
    def active(self) -> Iterator[dict[str, Any]]:
        """Capture during the ``with`` block; yields the ``{name: output}`` dict it fills."""
        self.outputs = {}
        self._active = True
        try:
            yield self.outputs
        finally:
            self._active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _tensors(output: Any) -> list[torch.Tensor]:
    return (
        [output] if isinstance(output, torch.Tensor) else [t for t in output if isinstance(t, torch.Tensor)]
    )


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())


def attention_transfer(student: dict[str, Any], teacher: dict[str, Any]) -> torch.Tensor:
    """Mean over layers of the MSE between student and teacher attention outputs ``(B, N, C)``."""
    missing = sorted(set(teacher) ^ set(student))
    if missing or not student:
        raise RuntimeError(f"attention outputs were not captured for layers {missing or 'any'}")
    losses = [
        _mse(s, t.detach())
        for name in student
        for s, t in zip(_tensors(student[name]), _tensors(teacher[name]), strict=True)
    ]
    return torch.stack(losses).mean()


def split_variance(
    prediction: torch.Tensor, predicts_variance: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, 2C, H, W)`` -> prediction ``(B, C, H, W)`` and variance ``(B, C, H, W)`` (or ``None``)."""
    if not predicts_variance:
        return prediction, None
    mean, variance = prediction.chunk(2, dim=1)
    return mean, variance


def distillation_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
    predicts_variance: bool = False,
    student_attention: dict[str, Any] | None = None,
    teacher_attention: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted loss terms of one batch.

    Args:
        student, teacher: denoiser outputs ``(B, C, H, W)`` (``2C`` channels with variance).
        target: the diffusion target ``(B, C, H, W)``.
        student_attention, teacher_attention: captured attention outputs by layer name
            (needed when ``weights.attention > 0``).

    Returns:
        ``{"loss": weighted sum, <term>: unweighted value}`` for each term with non-zero weight.
    """
    student_mean, student_var = split_variance(student, predicts_variance)
    teacher_mean, teacher_var = split_variance(teacher, predicts_variance)
    terms: dict[str, torch.Tensor] = {}
    if weights.diffusion:
        terms["diffusion"] = _mse(student_mean, target)
    if weights.output:
        terms["output"] = _mse(student_mean, teacher_mean.detach())
    if weights.attention:
        terms["attention"] = attention_transfer(student_attention or {}, teacher_attention or {})
    if weights.variance and student_var is not None:
        terms["variance"] = _mse(student_var, teacher_var.detach())
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return {"loss": total, **terms}
