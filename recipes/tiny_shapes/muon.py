"""Muon for weight matrices and convolution kernels, with AdamW for every other parameter.

Muon (Jordan et al., 2024) replaces a weight's momentum update by the nearest semi-orthogonal
matrix, found with a few Newton–Schulz iterations, so that every direction of the update moves
by about the same amount. ``torch.optim.Muon`` takes 2-D parameters only; this optimizer also
flattens convolution kernels ``(C_out, C_in, k, k)`` to ``(C_out, C_in k k)``, as Muon's CIFAR-10
runs do, and keeps biases, norms and embedding tables on AdamW, so that one optimizer (one
learning-rate schedule, one checkpoint) drives the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
"""Coefficients ``(a, b, c)`` of the quintic iteration ``X <- a X + (b A + c A^2) X``, ``A = X X^T``."""


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately semi-orthogonal ``(M, N)`` matrix with the singular vectors of ``matrix``.

    The quintic Newton–Schulz iteration, without an SVD, pushes the singular values of the
    matrix divided by its Frobenius norm towards 1: after five steps those above about 1/300
    lie in about [0.7, 1.2].
    """
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D; got shape {tuple(matrix.shape)}")
    a, b, c = NEWTON_SCHULZ
    x = matrix / (matrix.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def uses_muon(name: str, parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` goes to Muon: 2-D and 4-D weights, except in modules named ``*embedding*``."""
    return parameter.ndim in (2, 4) and "embedding" not in name


class MuonAdamW(torch.optim.Optimizer):
    """Muon (Nesterov momentum 0.95) on ``matrices``, AdamW (betas 0.9, 0.999) on ``others``.

    Both share ``lr`` and decoupled ``weight_decay``. A Muon update of a ``(M, N)`` weight is
    scaled by ``0.2 sqrt(max(M, N))``, which gives it about the root-mean-square size of an AdamW
    update, so the learning rate tuned for AdamW carries over (Liu et al., "Muon is Scalable for
    LLM Training", 2025). :meth:`for_module` splits a module's parameters with :func:`uses_muon`.
    """

    def __init__(
        self,
        matrices: Iterable[torch.nn.Parameter],
        others: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ) -> None:
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0; got {lr}, {weight_decay}")
        matrices, others = list(matrices), list(others)
        flat = [tuple(p.shape) for p in matrices if p.ndim not in (2, 4)]
        if flat:
            raise ValueError(f"matrices must be 2-D or 4-D weights; got shapes {flat}")
        groups = [{"params": matrices, "muon": True}, {"params": others, "muon": False}]
        super().__init__([g for g in groups if g["params"]], {"lr": lr, "weight_decay": weight_decay})

    @classmethod
    def for_module(cls, module: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.01) -> MuonAdamW:
        """Muon on the parameters of ``module`` that :func:`uses_muon` picks, AdamW on the others."""
        named = list(module.named_parameters())
        return cls(
            [p for n, p in named if uses_muon(n, p)],
            [p for n, p in named if not uses_muon(n, p)],
            lr=lr,
            weight_decay=weight_decay,
        )

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("MuonAdamW does not take a closure")
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - lr * weight_decay)
                if group["muon"]:
                    self._muon(p, lr)
                else:
                    self._adamw(p, lr)

    def _muon(self, p: torch.Tensor, lr: float) -> None:
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p)
        momentum = state["momentum"]
        momentum.lerp_(p.grad, 0.05)
        update = p.grad.lerp(momentum, 0.95).reshape(len(p), -1)
        scale = 0.2 * math.sqrt(max(update.shape))
        p.add_(orthogonalize(update).view_as(p), alpha=-lr * scale)

    def _adamw(self, p: torch.Tensor, lr: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        k = state["step"]
        state["m"].lerp_(p.grad, 0.1)
        state["v"].mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
        denom = (state["v"] / (1 - 0.999**k)).sqrt_().add_(1e-8)
        p.addcdiv_(state["m"], denom, value=-lr / (1 - 0.9**k))
