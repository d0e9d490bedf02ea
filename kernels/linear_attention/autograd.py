"""``torch.library`` custom ops around the Triton kernels, with autograd and fake implementations.

``lindiff::linear_attention`` runs the forward kernels and ``lindiff::linear_attention_backward``
the backward ones. Custom ops (rather than an ``autograd.Function``) let ``torch.compile`` trace
calls with ``fullgraph=True``: Dynamo sees opaque ops whose output shapes come from the fake
implementations, and AOTAutograd traces the backward through the backward op. Triton is imported
at the first real call, so registering the ops costs nothing where it is missing.

The forward op also returns the reduced state ``S`` ``(B*H, D, D_v)`` and ``z`` ``(B*H, D)``
(float32, already multiplied by ``s``): the backward needs them and they are small. They are
internal; the public function returns only the attention output. ``normalize=False`` (the
numerator ``phi(q) S`` alone) is a trailing argument of both ops with a default, so calls that
leave it out keep the normalised form.
"""

from __future__ import annotations

import torch

Tensors3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _shape(like: torch.Tensor, layout: str, tokens: int, dim: int) -> tuple[int, int, int, int]:
    """Shape in ``layout`` of a tensor with ``like``'s batch and heads, ``tokens`` and ``dim``."""
    if layout == "bnhd":
        return (like.shape[0], tokens, like.shape[2], dim)
    return (like.shape[0], like.shape[1], tokens, dim)


def _tokens(t: torch.Tensor, layout: str) -> int:
    return t.shape[1] if layout == "bnhd" else t.shape[2]


@torch.library.custom_op("lindiff::linear_attention", mutates_args=())
def linear_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str,
    eps: float,
    layout: str,
    kv_scale: float | None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(o, S, z)``; arguments as in ``linear_attention`` (``None`` scale = mean)."""
    from .triton_linear_attention import linear_attention_forward

    return linear_attention_forward(q, k, v, feature_map, eps, layout, kv_scale, normalize)


@linear_attention_op.register_fake
def _(q, k, v, feature_map, eps, layout, kv_scale, normalize=True) -> Tensors3:
    heads = q.shape[0] * (q.shape[2] if layout == "bnhd" else q.shape[1])
    dim, dim_v = q.shape[-1], v.shape[-1]
    out = q.new_empty(_shape(q, layout, _tokens(q, layout), dim_v))
    state = q.new_empty((heads, dim, dim_v), dtype=torch.float32)
    norm = q.new_empty((heads, dim), dtype=torch.float32)
    return out, state, norm


@torch.library.custom_op("lindiff::linear_attention_backward", mutates_args=())
def linear_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    norm: torch.Tensor,
    feature_map: str,
    eps: float,
    layout: str,
    kv_scale: float | None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dq, dk, dv)`` from ``dO`` and the forward's inputs and state."""
    from .triton_linear_attention import linear_attention_backward

    return linear_attention_backward(
        grad_out, q, k, v, state, norm, feature_map, eps, layout, kv_scale, normalize
    )


@linear_attention_backward_op.register_fake
def _(grad_out, q, k, v, state, norm, feature_map, eps, layout, kv_scale, normalize=True) -> Tensors3:
    return (
        q.new_empty(_shape(q, layout, _tokens(q, layout), q.shape[-1])),
        k.new_empty(_shape(k, layout, _tokens(k, layout), k.shape[-1])),
        v.new_empty(_shape(v, layout, _tokens(v, layout), v.shape[-1])),
    )


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, feature_map, eps, layout, kv_scale, normalize = inputs
    _, state, norm = output
    ctx.save_for_backward(q, k, v, state, norm)
    ctx.args = (feature_map, eps, layout, kv_scale, normalize)


def _backward(ctx, grad_out, grad_state, grad_norm):
    # S and z are internal outputs that the public function never returns: their gradients are
    # always zero and are ignored.
    q, k, v, state, norm = ctx.saved_tensors
    dq, dk, dv = linear_attention_backward_op(grad_out, q, k, v, state, norm, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


linear_attention_op.register_autograd(_backward, setup_context=_setup_context)
