"""SANA: ReLU linear attention, run on lindiff's fused kernel.

SANA models (Xie et al., 2024) are trained with linear self-attention

    o_i = relu(q_i) sum_j(relu(k_j)^T v_j) / (relu(q_i) . sum_j relu(k_j) + eps),

which diffusers' ``SanaLinearAttnProcessor2_0`` computes with two float32 matmuls on a value
padded with a row of ones. The ``"sana"`` method computes the same with
:func:`lindiff.kernels.linear_attention` (float32 accumulation, one pass over the tokens) and
adds no parameters; the output matches diffusers' up to rounding.

SANA-Video rotates the ReLU features by a 3D RoPE ``R`` in the numerator only,

    o_i = (R_i relu(q_i)) S_R / (relu(q_i) . z + eps),   S_R = sum_j (R_j relu(k_j))^T v_j,

with ``z = sum_j relu(k_j)`` as above (:meth:`SanaLinearAttention.rotary`). The fused Triton
kernel computes its normaliser from the features of its numerator, so this form runs the
operator's two-pass form instead (:func:`linear_attention_state`, then
:func:`linear_attention_from_state`: PyTorch matmuls on every device) on concatenated features:
queries ``[R relu(q) | relu(q)]`` against the float32 state ``[[S_R, 0], [0, z]]`` give exactly
that numerator over that normaliser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lindiff.kernels.linear_attention import linear_attention_from_state, linear_attention_state

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
        batch, _, heads, dim = q.shape
        dim_v = v.shape[-1]
        numerator = linear_attention_state(rotate(phi_k), v, feature_map="identity")
        state = numerator.new_zeros(batch, heads, 2 * dim, dim_v + 1)
        state[:, :, :dim, :dim_v] = numerator[..., :dim_v]
        state[:, :, dim:, dim_v] = phi_k.sum(dim=1, dtype=state.dtype)
        if tokens.shard is not None:
            state = all_reduce_sum(state, tokens.shard)
        features = torch.cat([rotate(phi_q), phi_q], dim=-1)
        return linear_attention_from_state(features, state, feature_map="identity", eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class Sana(AttentionMethod):
    """The ``"sana"`` method: SANA's own linear self-attention on lindiff's linear-attention
    operator (SANA and SANA-Video models only; SANA on the fused kernel)."""

    name = "sana"
    options_cls = SanaOptions
    families = ("sana", "sana_video")

    def convert_layer(self, layer: LayerInfo) -> None:
        setattr(layer.module, ADDED_MODULE, SanaLinearAttention(float(self.options.eps)))
