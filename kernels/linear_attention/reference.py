"""Plain-PyTorch non-causal linear attention: the reference for the Triton kernels and the CPU path.

Layouts: ``"bnhd"`` means tensors of shape ``(B, N, H, D)`` (what diffusers' projections give
after a free ``view``); ``"bhnd"`` means ``(B, H, N, D)``.

For every query ``i``:

    o_i = phi(q_i) S / (phi(q_i) . z + eps),   S = s * sum_j phi(k_j)^T v_j,   z = s * sum_j phi(k_j)

with ``s = kv_scale`` (``1/N_k`` for the mean-normalised variant of LinFusion). The state ``S, z``
is accumulated in float32 (float64 for float64 inputs), over chunks of the sequence so that memory
beyond the inputs stays bounded by the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu1": _elu1,
    "relu": F.relu,
    "identity": _identity,
}

# Elements of one float32 chunk of (B, chunk, H, D); bounds the extra memory of the reference.
_CHUNK_ELEMENTS = 1 << 23


def _chunks(n: int, per_token: int) -> list[tuple[int, int]]:
    size = max(1, _CHUNK_ELEMENTS // max(per_token, 1))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "elu1",
    eps: float = 1e-4,
    layout: str = "bnhd",
    kv_scale: float | None = 1.0,
) -> torch.Tensor:
    """Normalised non-causal linear attention, computed in float32 chunks.

    Args:
        q: queries, ``(B, N_q, H, D)`` for ``layout="bnhd"`` or ``(B, H, N_q, D)`` for ``"bhnd"``.
        k: keys, same layout, ``N_k`` tokens.
        v: values, same layout, ``N_k`` tokens and value dim ``D_v``.
        feature_map: name in ``FEATURE_MAPS``, applied to q and k.
        eps: added to the denominator.
        kv_scale: multiplies ``S`` and ``z``; ``None`` means ``1 / N_k`` (mean normalisation).

    Returns:
        ``(B, N_q, H, D_v)`` (or ``(B, H, N_q, D_v)``) in the dtype of ``q``.
    """
    phi = FEATURE_MAPS[feature_map]
    if layout == "bhnd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    batch, n_k, heads, dim = k.shape
    n_q, dim_v = q.shape[1], v.shape[-1]
    scale = 1.0 / n_k if kv_scale is None else float(kv_scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    state = q.new_zeros((batch, heads, dim, dim_v), dtype=acc)
    normalizer = q.new_zeros((batch, heads, dim), dtype=acc)
    for start, end in _chunks(n_k, batch * heads * (dim + dim_v)):
        phi_k = phi(k[:, start:end].to(acc))
        state = state + torch.einsum("bnhd,bnhe->bhde", phi_k, v[:, start:end].to(acc))
        normalizer = normalizer + phi_k.sum(dim=1)
    state = state * scale
    normalizer = normalizer * scale

    outputs = []
    for start, end in _chunks(n_q, batch * heads * (dim + dim_v)):
        phi_q = phi(q[:, start:end].to(acc))
        numerator = torch.einsum("bnhd,bhde->bnhe", phi_q, state)
        denominator = torch.einsum("bnhd,bhd->bnh", phi_q, normalizer).unsqueeze(-1) + eps
        outputs.append((numerator / denominator).to(q.dtype))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return out.transpose(1, 2) if layout == "bhnd" else out


def linear_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "elu1",
    eps: float = 1e-4,
    kv_scale: float | None = 1.0,
) -> torch.Tensor:
    """The same operator written as explicit O(N^2) kernel attention, ``(B, N, H, D)`` layout.

    ``o_i = sum_j w_ij v_j / (sum_j w_ij + eps)`` with ``w_ij = s * phi(q_i) . phi(k_j)``. Used by
    tests to check that the linear form equals the kernel-attention formula; never in models.
    """
    phi = FEATURE_MAPS[feature_map]
    scale = 1.0 / k.shape[1] if kv_scale is None else float(kv_scale)
    weights = torch.einsum("bnhd,bmhd->bhnm", phi(q.double()), phi(k.double())) * scale
    numerator = torch.einsum("bhnm,bmhe->bnhe", weights, v.double())
    denominator = weights.sum(-1).transpose(1, 2).unsqueeze(-1) + eps
    return (numerator / denominator).to(q.dtype)
