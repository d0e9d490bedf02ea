"""Non-causal linear attention: public entry point.

The op dispatches on the device of its inputs: CUDA tensors run the fused Triton kernels
(when Triton is installed), anything else runs the plain-PyTorch reference in
``reference.py``, which is also what the Triton kernels are tested against.
"""

from __future__ import annotations

import torch

from .reference import FEATURE_MAPS, linear_attention_quadratic, linear_attention_reference

LAYOUTS = ("bnhd", "bhnd")

__all__ = [
    "FEATURE_MAPS",
    "LAYOUTS",
    "linear_attention",
    "linear_attention_quadratic",
    "linear_attention_reference",
]


def _check_inputs(q, k, v, feature_map, eps, layout, kv_scale) -> None:
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
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if kv_scale != "mean" and (not isinstance(kv_scale, (int, float)) or kv_scale <= 0):
        raise ValueError(f"kv_scale must be a positive number or 'mean', got {kv_scale!r}")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu1",
    eps: float = 1e-4,
    layout: str = "bnhd",
    kv_scale: float | str = 1.0,
) -> torch.Tensor:
    """Normalised non-causal linear attention ``o_i = phi(q_i) S / (phi(q_i) . z + eps)``.

    ``S = s * sum_j phi(k_j)^T v_j`` and ``z = s * sum_j phi(k_j)``, accumulated in float32.

    Args:
        q: ``(B, N_q, H, D)`` for ``layout="bnhd"``, ``(B, H, N_q, D)`` for ``layout="bhnd"``.
        k: ``(B, N_k, H, D)`` / ``(B, H, N_k, D)``.
        v: ``(B, N_k, H, D_v)`` / ``(B, H, N_k, D_v)``.
        feature_map: ``"elu1"`` (ELU + 1, LinFusion), ``"relu"`` (SANA, LiT) or ``"identity"``.
        eps: added to the denominator.
        layout: ``"bnhd"`` or ``"bhnd"``; strided views are accepted as they are.
        kv_scale: a positive factor ``s`` on ``S`` and ``z``, or ``"mean"`` for ``s = 1 / N_k``.

    Returns:
        The attention output in the layout and dtype of ``q``, value dim ``D_v``.
    """
    _check_inputs(q, k, v, feature_map, eps, layout, kv_scale)
    scale = None if kv_scale == "mean" else float(kv_scale)
    return linear_attention_reference(
        q, k, v, feature_map=feature_map, eps=float(eps), layout=layout, kv_scale=scale
    )
