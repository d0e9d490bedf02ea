"""Plain-PyTorch non-causal linear attention: the reference for the Triton kernels and the CPU path.

Layouts: ``"bnhd"`` means tensors of shape ``(B, N, H, D)`` (what diffusers' projections give
after a free ``view``); ``"bhnd"`` means ``(B, H, N, D)``.

For every query ``i``:

    o_i = phi(q_i) S / (phi(q_i) . z + eps),   S = s * sum_j phi(k_j)^T v_j,   z = s * sum_j phi(k_j)

with ``s = kv_scale`` (``1/N_k`` for the mean-normalised variant of LinFusion); ``normalize=False``
gives the numerator ``o_i = phi(q_i) S`` alone (no ``z``, no ``eps``), for callers that divide by a
normaliser of their own (SANA-Video's, whose numerator features are rotated and whose normaliser's
are not). The state ``S, z`` is accumulated in float32 (float64 for float64 inputs), over chunks of
the sequence so that memory beyond the inputs and the output stays bounded by the chunk size.

The CPU path runs this code, so it avoids copies of the sequence-sized tensors: inputs are read
through strided views (per-batch ``bmm`` takes them as they are), ``phi`` is computed once, in the
accumulation dtype. Without autograd the chunks accumulate ``[S | z]`` in place, the normaliser
rides along ``S`` as an extra value column, and the division writes straight into the output.
Under autograd (or ``torch.compile``) one out-of-place pass is shaped for a cheap backward.

Two passes, usable on their own: :func:`linear_attention_state_reference` reduces the keys and values to
``[S | z]``, :func:`linear_attention_from_state_reference` applies a state to the queries. Between them a
caller may sum the states of several key/value sets (shards of one sequence on several processes).
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

# Elements of one accumulation-dtype chunk of (B, chunk, H, D + D_v): 4 MiB in float32, small enough
# to stay in the CPU caches between the feature map and the matmul, large enough that per-chunk
# overhead does not show (measured on 2 cores: 2^18..2^22, best at 2^20). Bounds the extra memory.
_CHUNK_ELEMENTS = 1 << 20


def _chunks(n: int, per_token: int) -> list[tuple[int, int]]:
    size = max(1, _CHUNK_ELEMENTS // max(per_token, 1))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _functional(*tensors: torch.Tensor) -> bool:
    """Whether to compute in one pass of out-of-place ops instead of chunks written in place.

    Under autograd (which keeps O(N) activations anyway, and would build a full-size zero gradient
    for every slice of a chunk) and under torch.compile (which wants functional code and plans
    the memory itself).
    """
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    )


def _feature(x: torch.Tensor, feature_map: str, dtype: torch.dtype) -> torch.Tensor:
    """``phi(x)`` in ``dtype``, with one pass over ``x`` (the cast and ``+1`` are fused in place)."""
    x = x.to(dtype)
    if feature_map == "elu1":
        return F.elu(x).add_(1.0)
    return FEATURE_MAPS[feature_map](x)


def linear_attention_state_reference(
    k: torch.Tensor, v: torch.Tensor, feature_map: str = "elu1", kv_scale: float | None = 1.0
) -> torch.Tensor:
    """The key/value state ``[S | z]`` of ``(B, N_k, H, D)`` keys and ``(B, N_k, H, D_v)`` values.

    Returns:
        ``(B, H, D, D_v + 1)`` in float32 (float64 for float64 inputs): ``S`` in the first ``D_v``
        columns and ``z`` in the last, both already multiplied by ``s``.
    """
    batch, n_k, heads, dim = k.shape
    dim_v = v.shape[-1]
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    scale = 1.0 / n_k if kv_scale is None else float(kv_scale)
    if _functional(k, v):
        # Per batch element through unbind (whose backward stacks, where indexing would zero-fill).
        phi_k = _feature(k, feature_map, acc)
        kv = torch.stack(
            [
                torch.bmm(p.permute(1, 2, 0), x.transpose(0, 1))
                for p, x in zip(phi_k.unbind(), v.to(acc).unbind(), strict=True)
            ]
        )
        return torch.cat([kv, phi_k.sum(dim=1).unsqueeze(-1)], dim=-1) * scale

    state = k.new_zeros((batch, heads, dim, dim_v + 1), dtype=acc)
    for start, end in _chunks(n_k, batch * heads * (dim + dim_v)):
        phi_k = _feature(k[:, start:end], feature_map, acc)
        v_chunk = v[:, start:end].to(acc)
        for b in range(batch):
            # (H, D, n) @ (H, n, D_v) accumulated in place; both operands are strided views.
            state[b, :, :, :dim_v].baddbmm_(phi_k[b].permute(1, 2, 0), v_chunk[b].transpose(0, 1))
        state[..., dim_v] += phi_k.sum(dim=1)
    return state.mul_(scale)


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "elu1",
    eps: float = 1e-4,
    layout: str = "bnhd",
    kv_scale: float | None = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Non-causal linear attention, computed in float32 chunks.

    Args:
        q: queries, ``(B, N_q, H, D)`` for ``layout="bnhd"`` or ``(B, H, N_q, D)`` for ``"bhnd"``.
        k: keys, same layout, ``N_k`` tokens.
        v: values, same layout, ``N_k`` tokens and value dim ``D_v``.
        feature_map: name in ``FEATURE_MAPS``, applied to q and k.
        eps: added to the denominator.
        kv_scale: multiplies ``S`` and ``z``; ``None`` means ``1 / N_k`` (mean normalisation).
        normalize: ``False`` returns the numerator ``phi(q_i) S`` (``z`` and ``eps`` unused).

    Returns:
        ``(B, N_q, H, D_v)`` (or ``(B, H, N_q, D_v)``), contiguous, in the dtype of ``q``.
    """
    if layout == "bhnd":
        k, v = (t.transpose(1, 2) for t in (k, v))
    state = linear_attention_state_reference(k, v, feature_map, kv_scale)
    return linear_attention_from_state_reference(q, state, feature_map, eps, layout, normalize)


def linear_attention_from_state_reference(
    q: torch.Tensor,
    state: torch.Tensor,
    feature_map: str = "elu1",
    eps: float = 1e-4,
    layout: str = "bnhd",
    normalize: bool = True,
) -> torch.Tensor:
    """The output pass of linear attention: ``o_i = phi(q_i) S / (phi(q_i) . z + eps)`` for a given state.

    Args:
        q: queries, ``(B, N_q, H, D)`` for ``layout="bnhd"`` or ``(B, H, N_q, D)`` for ``"bhnd"``.
        state: ``[S | z]`` ``(B, H, D, D_v + 1)`` as :func:`linear_attention_state_reference` returns it
            (possibly summed over processes); its dtype is the accumulation dtype.
        feature_map: name in ``FEATURE_MAPS``, applied to q.
        eps: added to the denominator.
        normalize: ``False`` returns the numerator ``phi(q_i) S`` (the ``z`` column and ``eps`` unused).

    Returns:
        ``(B, N_q, H, D_v)`` (or ``(B, H, N_q, D_v)``), contiguous, in the dtype of ``q``.
    """
    if layout == "bhnd":
        q = q.transpose(1, 2)
    batch, n_q, heads, dim = q.shape
    dim_v = state.shape[-1] - 1

    if _functional(q, state):
        # Per batch element through unbind; numerator and denominator as two matmuls (slicing one
        # fused product would give the backward full-size zero-filled gradients).
        rows = []
        for p, st in zip(_feature(q, feature_map, state.dtype).unbind(), state.unbind(), strict=True):
            p = p.transpose(0, 1)
            row = torch.bmm(p, st[..., :dim_v])
            if normalize:
                row = row / (torch.bmm(p, st[..., dim_v:]) + eps)
            rows.append(row if layout == "bhnd" else row.transpose(0, 1))
        return torch.stack(rows).to(q.dtype)

    shape = (batch, heads, n_q, dim_v) if layout == "bhnd" else (batch, n_q, heads, dim_v)
    out = q.new_empty(shape)
    out_bnhd = out.transpose(1, 2) if layout == "bhnd" else out
    for start, end in _chunks(n_q, batch * heads * (dim + dim_v + 1)):
        phi_q = _feature(q[:, start:end], feature_map, state.dtype)
        for b in range(batch):
            target = out_bnhd[b, start:end].transpose(0, 1)
            if not normalize:
                target.copy_(torch.bmm(phi_q[b].transpose(0, 1), state[b, :, :, :dim_v]))
                continue
            # (H, n, D) @ (H, D, D_v + 1): numerator and denominator in one matmul; the division
            # writes the output in place.
            num = torch.bmm(phi_q[b].transpose(0, 1), state[b])
            den = num[..., dim_v:].add_(eps)
            torch.div(num[..., :dim_v], den, out=target)
    return out


def linear_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "elu1",
    eps: float = 1e-4,
    kv_scale: float | None = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """The same operator written as explicit O(N^2) kernel attention, ``(B, N, H, D)`` layout.

    ``o_i = sum_j w_ij v_j / (sum_j w_ij + eps)`` with ``w_ij = s * phi(q_i) . phi(k_j)`` (the
    numerator alone for ``normalize=False``). Used by tests to check that the linear form equals
    the kernel-attention formula; never in models.
    """
    phi = FEATURE_MAPS[feature_map]
    scale = 1.0 / k.shape[1] if kv_scale is None else float(kv_scale)
    weights = torch.einsum("bnhd,bmhd->bhnm", phi(q.double()), phi(k.double())) * scale
    numerator = torch.einsum("bhnm,bmhe->bnhe", weights, v.double())
    if not normalize:
        return numerator.to(q.dtype)
    denominator = weights.sum(-1).transpose(1, 2).unsqueeze(-1) + eps
    return (numerator / denominator).to(q.dtype)
