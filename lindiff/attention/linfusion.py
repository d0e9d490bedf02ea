"""LinFusion: generalized linear attention distilled into a UNet's self-attention.

Each converted layer keeps the teacher's ``to_q/to_k/to_v/to_out`` and adds, under
``attn.lindiff``, a residual MLP on the query input and one on the key input
(Linear -> LayerNorm -> LeakyReLU -> Linear; the last layer starts at zero so a fresh
conversion uses the teacher's own projections). Attention is then

    o_i = phi(q_i) mean_j(phi(k_j)^T v_j) / (phi(q_i) . mean_j phi(k_j) + eps),  phi = ELU + 1,

which costs O(N) and whose output scale does not depend on the number of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from lindiff.kernels import linear_attention

from .base import ADDED_MODULE, AttentionMethod, LayerInfo
from .common import begin_attention, end_attention, reject_attention_mask, split_heads


@dataclass
class LinFusionOptions:
    """Options of the ``"linfusion"`` method.

    Attributes:
        mid_dim: width of the hidden layer of the q/k MLPs; ``None`` means the layer's own
            width (as in the released LinFusion checkpoints), ``0`` means no MLP.
        eps: added to the attention denominator.
    """

    mid_dim: int | None = None
    eps: float = 1e-4

    def __post_init__(self) -> None:
        if self.mid_dim is not None and (not isinstance(self.mid_dim, int) or self.mid_dim < 0):
            raise ValueError(f"mid_dim must be None or an integer >= 0, got {self.mid_dim!r}")
        if not isinstance(self.eps, (int, float)) or self.eps < 0:
            raise ValueError(f"eps must be a non-negative number, got {self.eps!r}")


def residual_mlp(dim: int, mid_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> LeakyReLU -> Linear, ``(..., dim) -> (..., dim)``, last layer zero."""
    mlp = nn.Sequential(
        nn.Linear(dim, mid_dim), nn.LayerNorm(mid_dim), nn.LeakyReLU(), nn.Linear(mid_dim, dim)
    )
    nn.init.zeros_(mlp[3].weight)
    nn.init.zeros_(mlp[3].bias)
    return mlp


class LinFusionModules(nn.Module):
    """The parameters LinFusion adds to one ``Attention``: residual MLPs on the q and k inputs.

    Args:
        dim: input width of the layer (``to_q.in_features``).
        mid_dim: hidden width of the MLPs; 0 disables them.
        eps: denominator epsilon, kept here so the processor stays stateless.
    """

    def __init__(self, dim: int, mid_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.q_mlp = residual_mlp(dim, mid_dim) if mid_dim > 0 else None
        self.k_mlp = residual_mlp(dim, mid_dim) if mid_dim > 0 else None

    def query_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.q_mlp is None else x + self.q_mlp(x)

    def key_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.k_mlp is None else x + self.k_mlp(x)


class LinFusionAttnProcessor:
    """Processor of a LinFusion self-attention layer; reads its parameters from ``attn.lindiff``."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states``: ``(B, N, C)`` or ``(B, C, H, W)``; returns the same shape."""
        reject_attention_mask(attention_mask, "linfusion")
        modules: LinFusionModules = getattr(attn, ADDED_MODULE)
        hidden_states, call = begin_attention(attn, hidden_states, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        query = split_heads(attn, attn.to_q(modules.query_input(hidden_states)))
        key = split_heads(attn, attn.to_k(modules.key_input(context)))
        value = split_heads(attn, attn.to_v(context))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = linear_attention(query, key, value, feature_map="elu1", eps=modules.eps, kv_scale="mean")
        out = out.reshape(out.shape[0], out.shape[1], -1).to(query.dtype)
        return end_attention(attn, out, call)


class LinFusion(AttentionMethod):
    """The ``"linfusion"`` method (Liu et al., 2024) for UNet self-attention layers."""

    name = "linfusion"
    options_cls = LinFusionOptions

    def convert_layer(self, layer: LayerInfo) -> None:
        attn = layer.module
        like = self.parameter_like(attn)
        dim = like.shape[1]
        mid_dim = dim if self.options.mid_dim is None else self.options.mid_dim
        modules = LinFusionModules(dim, mid_dim, float(self.options.eps))
        setattr(attn, ADDED_MODULE, modules.to(device=like.device, dtype=like.dtype))

    def processor(self, layer: LayerInfo) -> LinFusionAttnProcessor:
        return LinFusionAttnProcessor()
