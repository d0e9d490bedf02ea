"""SANA: ReLU linear attention, run on lindiff's fused kernel.

SANA models (Xie et al., 2024) are trained with linear self-attention

    o_i = relu(q_i) sum_j(relu(k_j)^T v_j) / (relu(q_i) . sum_j relu(k_j) + eps),

which diffusers' ``SanaLinearAttnProcessor2_0`` computes with two float32 matmuls on a value
padded with a row of ones. The ``"sana"`` method computes the same with
:func:`lindiff.kernels.linear_attention` (float32 accumulation, one pass over the tokens) and
adds no parameters; the output matches diffusers' up to rounding.

SANA-Video rotates the ReLU features by a 3D RoPE ``R`` in the numerator only,

    o_i = (R_i relu(q_i)) S_R / (relu(q_i) . z + eps),   S_R = sum_j (R_j relu(k_j))^T v_j,

with ``z = sum_j relu(k_j)`` as above (:meth:`SanaLinearAttention.rotary`). The numerator is
the operator without its normaliser, ``linear_attention(R relu(q), R relu(k), v,
feature_map="identity", normalize=False)``: the O(N D D_v) work, on the fused kernel for CUDA
tensors (the reference elsewhere). The normaliser ``relu(q_i) . z + eps`` is a ``(B, N, H)``
reduction in float32, and the division is one elementwise pass. Both are taken with
``kv_scale = 1/N`` (the numerator and ``z`` over ``N``, ``eps`` over ``N``): the same quotient,
and a numerator that stays in float16's range. Under context parallelism the numerator's state
``S_R`` and ``z`` are summed over the processes first (:func:`linear_attention_state`, then
:func:`linear_attention_from_state` with ``normalize=False``), and the same division follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lindiff.kernels.linear_attention import (
    linear_attention,
    linear_attention_from_state,
    linear_attention_state,
)

from ..parallel import all_reduce_sum, linear_attention_sharded
from .base import ADDED_MODULE, AttentionMethod, LayerInfo, TokenMixer, Tokens


@dataclass
class SanaOptions:
    """Options of the ``"sana"`` method.

    Attributes:
        eps: added to the attention denominator (SANA's own value by default).
    """

    eps: float = 1e-15

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {self.eps!r}")


class SanaLinearAttention(TokenMixer):
    """ReLU linear attention over all tokens, without parameters.

    Args:
        eps: denominator epsilon.
    """

    method_name = "sana"
    context_parallel = True

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """``(B, N, H, D)`` in and out; over every process's tokens under context parallelism."""
        return linear_attention_sharded(q, k, v, tokens.shard, feature_map="relu", eps=self.eps, kv_scale=1.0)

    def rotary(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        tokens: Tokens,
        rotate: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """SANA-Video's form: ``rotate`` (each token's RoPE on ``(B, N, H, D)``) applied to the ReLU
        features in the numerator only (see the module docstring). ``(B, N, H, D)`` in and out
        (``v``: ``D_v``); under context parallelism the state is summed over the processes."""
        phi_q, phi_k = F.relu(q), F.relu(k)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        z = phi_k.sum(dim=1, dtype=acc)  # (B, H, D)
        if tokens.shard is None:
            count = k.shape[1]
            numerator = linear_attention(
                rotate(phi_q), rotate(phi_k), v, feature_map="identity", kv_scale="mean", normalize=False
            )
        else:
            state = linear_attention_state(rotate(phi_k), v, feature_map="identity")
            local = torch.cat([state.flatten(), z.flatten(), state.new_full((1,), k.shape[1])])
            summed = all_reduce_sum(local, tokens.shard)
            count = summed[-1]
            state = summed[: state.numel()].view(state.shape) / count
            z = summed[state.numel() : -1].view(z.shape)
            numerator = linear_attention_from_state(
                rotate(phi_q), state, feature_map="identity", normalize=False
            )
        # relu(q_i) . z / N + eps / N: (B, N, H), float32 (float64 for float64 inputs).
        denominator = torch.einsum("bnhd,bhd->bnh", phi_q.to(acc), z / count).add(self.eps / count)
        return (numerator / denominator.unsqueeze(-1)).to(q.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class Sana(AttentionMethod):
    """The ``"sana"`` method: SANA's own linear self-attention on lindiff's linear-attention
    operator (SANA and SANA-Video models only; both on the fused kernel)."""

    name = "sana"
    options_cls = SanaOptions
    families = ("sana", "sana_video")

    def convert_layer(self, layer: LayerInfo) -> None:
        setattr(layer.module, ADDED_MODULE, SanaLinearAttention(float(self.options.eps)))
