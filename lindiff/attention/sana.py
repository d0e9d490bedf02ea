"""SANA: ReLU linear attention, run on lindiff's fused kernel.

SANA models (Xie et al., 2024) are trained with linear self-attention

    o_i = relu(q_i) sum_j(relu(k_j)^T v_j) / (relu(q_i) . sum_j relu(k_j) + eps),

which diffusers' ``SanaLinearAttnProcessor2_0`` computes with two float32 matmuls on a value
padded with a row of ones. The ``"sana"`` method computes the same with
:func:`lindiff.kernels.linear_attention` (float32 accumulation, one pass over the tokens) and
adds no parameters; the output matches diffusers' up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel import linear_attention_sharded
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

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class Sana(AttentionMethod):
    """The ``"sana"`` method: SANA's own linear self-attention on the fused kernel (SANA models only)."""

    name = "sana"
    options_cls = SanaOptions
    families = ("sana",)

    def convert_layer(self, layer: LayerInfo) -> None:
        setattr(layer.module, ADDED_MODULE, SanaLinearAttention(float(self.options.eps)))
