"""Non-causal linear attention: public entry point.

Four layers: the Triton kernels and, beside them, their launchers (``triton_linear_attention.py``,
with tile sizes, grid splits, dot operand dtypes and their ``LINDIFF_LINEAR_*`` environment
overrides in ``config.py``), the ``torch.library`` custom ops with autograd and fake
implementations (``autograd.py``), and this public function, which validates and dispatches. With ``backend="auto"`` CUDA tensors run the fused Triton kernels (when
Triton is installed); anything else runs the plain-PyTorch reference in ``reference.py``, which is
also what the Triton kernels are tested against.

``normalize=False`` returns the numerator ``phi(q_i) S`` alone, on the fused kernels as well (a
compile-time flag that drops the normaliser from the output and from the gradients), for a
caller whose normaliser is not ``phi(q_i) . z`` of the same features: SANA-Video rotates the
features of its numerator by a RoPE and not those of its normaliser
(:meth:`lindiff.attention.sana.SanaLinearAttention.rotary` divides by its own).

The same operator in two passes, :func:`linear_attention_state` then
:func:`linear_attention_from_state`, lets a caller combine the states of several key/value sets
before the output pass (context parallelism sums the states of a sequence's shards). The two
passes run the PyTorch reference on every device (on CUDA as cuBLAS matmuls); the fused Triton
kernels compute the state and the output in one launch and are single-pass only.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from .autograd import linear_attention_op
from .reference import (
    FEATURE_MAPS,
    linear_attention_from_state_reference,
    linear_attention_quadratic,
    linear_attention_reference,
    linear_attention_state_reference,
)

LAYOUTS = ("bnhd", "bhnd")
BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Checked without importing triton (and without touching the GPU), so importing lindiff stays cheap.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "FEATURE_MAPS",
    "LAYOUTS",
    "linear_attention",
    "linear_attention_from_state",
    "linear_attention_quadratic",
    "linear_attention_reference",
    "linear_attention_state",
]


def _check_inputs(q, k, v, feature_map, eps, layout, kv_scale, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D ({layout!r} layout), got shape {tuple(t.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, got {feature_map!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"q, k, v must be float32, float16, bfloat16 or float64, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    token_dim, head_dim = (1, 2) if layout == "bnhd" else (2, 1)
    batch, heads = q.shape[0], q.shape[head_dim]
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[head_dim] != heads or v.shape[head_dim] != heads:
        raise ValueError(
            f"head counts differ: q {heads}, k {k.shape[head_dim]}, v {v.shape[head_dim]} ({layout!r} layout)"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[token_dim] != v.shape[token_dim]:
        raise ValueError(f"k and v token counts differ: {k.shape[token_dim]} vs {v.shape[token_dim]}")
    if k.shape[token_dim] == 0:
        raise ValueError("k and v must have at least one token")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if kv_scale != "mean" and (
        isinstance(kv_scale, bool) or not isinstance(kv_scale, (int, float)) or not kv_scale > 0
    ):
        raise ValueError(f"kv_scale must be a positive number or 'mean', got {kv_scale!r}")


def _check_normalize(normalize) -> None:
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool (True or False), got {normalize!r}")


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    """Whether this call runs the Triton kernels; raises when ``backend="triton"`` cannot."""
    if backend == "reference":
        return False
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"backend='triton' supports float32, float16 and bfloat16 inputs, got {q.dtype}; "
                "use backend='reference' (or 'auto') for it"
            )
        if q.device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {q.device.type}) or the Triton interpreter "
                "(TRITON_INTERPRET=1 set before lindiff is imported)"
            )
        return True
    if q.device.type != "cuda":
        return False
    if not TRITON_AVAILABLE:
        _log_once("linear_attention: triton is not installed; CUDA inputs run the PyTorch reference (slower)")
        return False
    if q.dtype not in TRITON_DTYPES:
        _log_once(f"linear_attention: {q.dtype} inputs run the PyTorch reference; the kernels take 16/32-bit")
        return False
    return True


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    eps: float = 1e-4,
    layout: str = "bnhd",
    kv_scale: float | str = 1.0,
    backend: str = "auto",
    normalize: bool = True,
) -> torch.Tensor:
    """Normalised non-causal linear attention ``o_i = phi(q_i) S / (phi(q_i) . z + eps)``.

    ``S = s * sum_j phi(k_j)^T v_j`` and ``z = s * sum_j phi(k_j)``, accumulated in float32;
    ``normalize=False`` gives the numerator ``o_i = phi(q_i) S`` alone.

    Args:
        q: ``(B, N_q, H, D)`` for ``layout="bnhd"``, ``(B, H, N_q, D)`` for ``layout="bhnd"``.
        k: ``(B, N_k, H, D)`` / ``(B, H, N_k, D)``.
        v: ``(B, N_k, H, D_v)`` / ``(B, H, N_k, D_v)``.
        feature_map: ``"elu1"`` (ELU + 1, LinFusion), ``"relu"`` (SANA, LiT) or ``"identity"``.
        eps: added to the denominator.
        layout: ``"bnhd"`` or ``"bhnd"``; strided views are accepted as they are.
        kv_scale: a positive factor ``s`` on ``S`` and ``z``, or ``"mean"`` for ``s = 1 / N_k``.
        backend: ``"auto"`` (Triton for CUDA tensors when Triton is installed, else the
            reference), ``"triton"`` (the fused kernels; CUDA or ``TRITON_INTERPRET=1``; float32,
            float16, bfloat16) or ``"reference"`` (plain PyTorch, any device, also float64).
        normalize: ``True`` (the default) divides by ``phi(q_i) . z + eps``; ``False`` returns the
            numerator ``phi(q_i) S`` (``eps`` unused), for a caller that divides by a normaliser of
            its own. Its magnitude grows with ``s * N_k``: for float16 inputs a ``kv_scale`` of
            ``"mean"`` keeps it in range.

    Returns:
        The attention output in the layout and dtype of ``q``, value dim ``D_v``.
    """
    _check_inputs(q, k, v, feature_map, eps, layout, kv_scale, backend)
    _check_normalize(normalize)
    scale = None if kv_scale == "mean" else float(kv_scale)
    if _use_triton(q, backend):
        return linear_attention_op(q, k, v, feature_map, float(eps), layout, scale, normalize)[0]
    return linear_attention_reference(
        q, k, v, feature_map=feature_map, eps=float(eps), layout=layout, kv_scale=scale, normalize=normalize
    )


def linear_attention_state(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    layout: str = "bnhd",
    kv_scale: float | str = 1.0,
) -> torch.Tensor:
    """The first pass of :func:`linear_attention`: the key/value state ``[S | z]``.

    Args:
        k: ``(B, N_k, H, D)`` for ``layout="bnhd"``, ``(B, H, N_k, D)`` for ``layout="bhnd"``.
        v: ``(B, N_k, H, D_v)`` / ``(B, H, N_k, D_v)``.
        feature_map: as in :func:`linear_attention`.
        layout: ``"bnhd"`` or ``"bhnd"``.
        kv_scale: a positive factor ``s``, or ``"mean"`` for ``s = 1 / N_k``. States of several
            key/value sets add up to the state of their concatenation only with a number: sum them
            with ``kv_scale=1.0`` and divide by the total token count for a mean.

    Returns:
        ``(B, H, D, D_v + 1)`` in float32 (float64 for float64 inputs): ``s * sum_j phi(k_j)^T v_j``
        in the first ``D_v`` columns and ``z = s * sum_j phi(k_j)`` in the last.
    """
    _check_inputs(k, k, v, feature_map, 0.0, layout, kv_scale, "reference")
    if layout == "bhnd":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    scale = None if kv_scale == "mean" else float(kv_scale)
    return linear_attention_state_reference(k, v, feature_map=feature_map, kv_scale=scale)


def linear_attention_from_state(
    q: torch.Tensor,
    state: torch.Tensor,
    *,
    feature_map: str = "elu1",
    eps: float = 1e-4,
    layout: str = "bnhd",
    normalize: bool = True,
) -> torch.Tensor:
    """The second pass of :func:`linear_attention`: ``o_i = phi(q_i) S / (phi(q_i) . z + eps)``.

    Args:
        q: ``(B, N_q, H, D)`` for ``layout="bnhd"``, ``(B, H, N_q, D)`` for ``layout="bhnd"``.
        state: ``[S | z]`` ``(B, H, D, D_v + 1)``, float32 or float64, from :func:`linear_attention_state`.
        feature_map: as in :func:`linear_attention` (the one the state was computed with).
        eps: added to the denominator.
        layout: ``"bnhd"`` or ``"bhnd"``.
        normalize: as in :func:`linear_attention`: ``False`` returns ``phi(q_i) S`` (``z`` unused).

    Returns:
        The attention output in the layout and dtype of ``q``, value dim ``D_v``.
    """
    _check_inputs(q, q, q, feature_map, eps, layout, 1.0, "reference")
    _check_normalize(normalize)
    batch, heads = (q.shape[0], q.shape[2]) if layout == "bnhd" else (q.shape[0], q.shape[1])
    if not isinstance(state, torch.Tensor) or state.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"state must be a float32 or float64 tensor, got {getattr(state, 'dtype', type(state))}"
        )
    if state.ndim != 4 or state.shape[:3] != (batch, heads, q.shape[-1]) or state.shape[-1] < 2:
        raise ValueError(
            f"state must have shape (B, H, D, D_v + 1) = ({batch}, {heads}, {q.shape[-1]}, D_v + 1) "
            f"for q of shape {tuple(q.shape)} ({layout!r} layout), got {tuple(state.shape)}"
        )
    return linear_attention_from_state_reference(
        q, state, feature_map=feature_map, eps=float(eps), layout=layout, normalize=normalize
    )
