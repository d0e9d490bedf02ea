"""LinFusion: generalized linear attention distilled into a UNet's self-attention.

Each converted layer keeps the teacher's ``to_q/to_k/to_v/to_out`` and adds, under
``attn.lindiff``, a residual MLP on the query input and one on the key input
(Linear -> LayerNorm -> LeakyReLU -> Linear; the last layer starts at zero so a fresh
conversion uses the teacher's own projections). Attention is then

    o_i = phi(q_i) mean_j(phi(k_j)^T v_j) / (phi(q_i) . mean_j phi(k_j) + eps),  phi = ELU + 1,

which costs O(N) and whose output scale does not depend on the number of tokens.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import linear_attention_sharded
from .base import ADDED_MODULE, AttentionMethod, LayerInfo, TokenMixer, Tokens


@dataclass
class LinFusionOptions:
    """Options of the ``"linfusion"`` method.

    Attributes:
        mid_dim: width of the hidden layer of the q/k MLPs; ``None`` means the layer's own
            width (as in most released LinFusion checkpoints), ``0`` means no MLP. A dict
            ``{layer path: width}`` (widths as above) gives each layer its own, e.g.
            ``{"down_blocks.0.attentions.0.transformer_blocks.0.attn1": 160, ...}`` (released
            LinFusion configs whose ``projection_mid_dim`` differs between layers); it must
            name every converted layer (a ControlNet's layers share the UNet's paths).
        eps: added to the attention denominator.
    """

    mid_dim: int | dict[str, int | None] | None = None
    eps: float = 1e-4

    def __post_init__(self) -> None:
        widths = self.mid_dim.values() if isinstance(self.mid_dim, dict) else [self.mid_dim]
        if isinstance(self.mid_dim, dict) and not all(isinstance(k, str) for k in self.mid_dim):
            raise ValueError(f"mid_dim as a dict must map layer paths (str) to widths, got {self.mid_dim!r}")
        if not all(_is_width(width) for width in widths):
            raise ValueError(
                "mid_dim must be None, an integer >= 0, or a dict {layer path: None or integer >= 0}, "
                f"got {self.mid_dim!r}"
            )
        if not isinstance(self.eps, (int, float)) or self.eps < 0:
            raise ValueError(f"eps must be a non-negative number, got {self.eps!r}")


def _is_width(width: object) -> bool:
    return width is None or (
        isinstance(width, numbers.Integral) and not isinstance(width, bool) and width >= 0
    )


def residual_mlp(dim: int, mid_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> LeakyReLU -> Linear, ``(..., dim) -> (..., dim)``, last layer zero."""
    mlp = nn.Sequential(
        nn.Linear(dim, mid_dim), nn.LayerNorm(mid_dim), nn.LeakyReLU(), nn.Linear(mid_dim, dim)
    )
    nn.init.zeros_(mlp[3].weight)
    nn.init.zeros_(mlp[3].bias)
    return mlp


def add_residual_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``x + mlp(x)`` for ``x`` ``(..., dim)``, with the residual added inside the last GEMM.

    The LeakyReLU runs in place on the LayerNorm output (whose backward does not need it). A
    last layer that is not a plain ``nn.Linear`` (e.g. wrapped by PEFT) is called as a module.
    """
    hidden = F.leaky_relu_(mlp[1](mlp[0](x)), mlp[2].negative_slope)
    last = mlp[3]
    if type(last) is not nn.Linear:
        return x + last(hidden)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.addmm(flat + last.bias, hidden.reshape(-1, hidden.shape[-1]), last.weight.t())
    return out.view(x.shape)


class LinFusionModules(TokenMixer):
    """What LinFusion adds to one layer: residual MLPs on the q and k inputs, and the attention.

    Args:
        dim: input width of the layer (``to_q.in_features``).
        mid_dim: hidden width of the MLPs; 0 disables them.
        eps: denominator epsilon.
    """

    method_name = "linfusion"
    context_parallel = True

    def __init__(self, dim: int, mid_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.q_mlp = residual_mlp(dim, mid_dim) if mid_dim > 0 else None
        self.k_mlp = residual_mlp(dim, mid_dim) if mid_dim > 0 else None

    def query_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.q_mlp is None else add_residual_mlp(self.q_mlp, x)

    def key_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.k_mlp is None else add_residual_mlp(self.k_mlp, x)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """Mean-normalised ELU+1 linear attention over all tokens (of every process under context
        parallelism), ``(B, N, H, D)`` in and out."""
        return linear_attention_sharded(
            q, k, v, tokens.shard, feature_map="elu1", eps=self.eps, kv_scale="mean"
        )


class LinFusion(AttentionMethod):
    """The ``"linfusion"`` method (Liu et al., 2024) for UNet self-attention layers."""

    name = "linfusion"
    options_cls = LinFusionOptions
    kinds = ("self", "joint", "single")

    def convert_layer(self, layer: LayerInfo) -> None:
        attn = layer.module
        like = self.parameter_like(attn)
        dim = like.shape[1]
        mid_dim = self.options.mid_dim
        if isinstance(mid_dim, dict):
            if layer.name not in mid_dim:
                raise ValueError(
                    f"mid_dim gives no width for layer {layer.name!r}; it names {len(mid_dim)} layers: "
                    f"{sorted(mid_dim)[:4]}{' ...' if len(mid_dim) > 4 else ''}"
                )
            mid_dim = mid_dim[layer.name]
        mid_dim = dim if mid_dim is None else int(mid_dim)
        modules = LinFusionModules(dim, mid_dim, float(self.options.eps))
        setattr(attn, ADDED_MODULE, modules.to(device=like.device, dtype=like.dtype))
