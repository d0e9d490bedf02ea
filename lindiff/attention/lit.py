"""LiT: few-head ReLU linear attention plus a depthwise convolution, inherited from a softmax DiT.

LiT (Wang et al., 2025) replaces a DiT's softmax self-attention with

    o_i = relu(q_i) mean_j(relu(k_j)^T v_j) / (relu(q_i) . mean_j relu(k_j) + eps)  +  DWC(v)_i

computed in a few wide heads (2 by default) rather than the teacher's many narrow ones, and adds
a depthwise ``k x k`` convolution over the values laid out on the image-token grid, which gives
back the local detail linear attention blurs. Means instead of sums keep the output scale
independent of the token count, so one model runs at any resolution.

Weight inheritance: every parameter is the teacher's (``to_q/to_k/to_v/to_out`` untouched, the
wider heads are a regrouping of the same channels); the only new parameters are the
convolution's. They start at zero, so a fresh conversion is exactly pure linear attention on
the teacher's projections: the distillation's starting point is the linear-attention part
alone, nothing random is added to a model that already produces images, and the gradient of the
output with respect to a zero kernel (the neighbouring values) is not zero, so the branch still
learns from the first step.

Text tokens of joint and single-stream layers take part in the linear attention as queries and
keys; only image tokens go through the convolution.

Video (a ``(T, H, W)`` grid with ``T > 1``): the linear attention spans all ``T * H * W`` tokens,
and the convolution stays 2-D, applied to each frame on its own (frames folded into the batch),
so it adds the same local spatial detail LiT adds to an image and no value crosses frames.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from ..grid import GridShape
from ..parallel import linear_attention_sharded, rows_around
from .base import ADDED_MODULE, AttentionMethod, LayerInfo, TokenMixer, Tokens


def _positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclass
class LiTOptions:
    """Options of the ``"lit"`` method.

    Attributes:
        heads: number of linear-attention heads; the layer's ``H`` heads of width ``D`` are
            regrouped into ``heads`` heads of width ``H * D / heads`` (must divide ``H * D``).
        kernel_size: side of the depthwise convolution on the value grid (odd, >= 1).
        eps: added to the attention denominator.
    """

    heads: int = 2
    kernel_size: int = 5
    eps: float = 1e-4

    def __post_init__(self) -> None:
        if not _positive_int(self.heads):
            raise ValueError(f"heads must be an integer >= 1, got {self.heads!r}")
        if not _positive_int(self.kernel_size) or self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be an odd integer >= 1 (1, 3, 5, ...), got {self.kernel_size!r}"
            )
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {self.eps!r}")


def grid_conv(conv: nn.Conv2d, x: torch.Tensor, grid: GridShape) -> torch.Tensor:
    """Apply a 2-D convolution to image tokens ``(B, T*H*W, heads, D)`` laid out on ``grid``, frame by frame.

    Frames are folded into the batch; returns the same shape (``heads * D`` channels in and out).
    """
    batch, _, heads, dim = x.shape
    frames, height, width = grid
    planes = x.reshape(batch * frames, height, width, heads * dim).permute(0, 3, 1, 2)
    out = conv(planes.contiguous(memory_format=torch.channels_last))
    return out.permute(0, 2, 3, 1).reshape(batch, frames * height * width, heads, dim)


def grid_conv_sharded(conv: nn.Conv2d, x: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """:func:`grid_conv` of this process's part ``x`` ``(B, n, heads, D)`` of the image tokens under
    context parallelism: the grid rows the kernel reaches beyond the part come from the other
    processes (:func:`lindiff.parallel.rows_around`), and frames are convolved separately."""
    grid = tokens.grid
    width = grid[2]
    block = rows_around(x, tokens.shard, grid, conv.kernel_size[0] // 2)
    pieces = [
        grid_conv(conv, block.tokens[:, first * width : stop * width], (1, stop - first, width))
        for first, stop in block.frame_segments(grid)
    ]
    return torch.cat(pieces, dim=1)[:, block.local]


class LiTAttention(TokenMixer):
    """What LiT adds to one layer: the depthwise convolution, and the few-head linear attention.

    Args:
        channels: value width of the layer (``H * D_v``).
        heads: linear-attention heads (regrouped channels).
        kernel_size: side of the depthwise convolution.
        eps: denominator epsilon.
    """

    method_name = "lit"
    context_parallel = True

    def __init__(self, channels: int, heads: int, kernel_size: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.dwc = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        nn.init.zeros_(self.dwc.weight)
        nn.init.zeros_(self.dwc.bias)

    def regroup(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, H, D)`` -> ``(B, N, heads, H*D/heads)`` (a view when ``x`` is contiguous)."""
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """``q, k`` ``(B, N, H, D)``, ``v`` ``(B, N, H, D_v)`` with image tokens at ``tokens.image``; returns ``(B, N, H, D_v)``.

        Under context parallelism (``tokens.shard``) the attention and the convolution cover every
        process's tokens, as on one process.
        """
        out = linear_attention_sharded(
            self.regroup(q),
            self.regroup(k),
            self.regroup(v),
            tokens.shard,
            feature_map="relu",
            eps=self.eps,
            kv_scale="mean",
        ).reshape(v.shape)
        image = tokens.image
        if tokens.shard is None:
            local = grid_conv(self.dwc, v[:, image], tokens.grid)
        else:
            local = grid_conv_sharded(self.dwc, v[:, image], tokens)
        local = local.to(out.dtype)
        if image.start == 0 and image.stop == out.shape[1]:
            return out + local
        return torch.cat([out[:, : image.start], out[:, image] + local, out[:, image.stop :]], dim=1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, eps={self.eps}"


class LiT(AttentionMethod):
    """The ``"lit"`` method (Wang et al., 2025): few-head ReLU linear attention + depthwise conv."""

    name = "lit"
    options_cls = LiTOptions
    kinds = ("self", "joint", "single")

    def convert_layer(self, layer: LayerInfo) -> None:
        attn = layer.module
        like = self.parameter_like(attn)
        widths = {
            name: getattr(getattr(attn, name), "base_layer", getattr(attn, name)).out_features
            for name in ("to_q", "to_v")
        }
        heads = self.options.heads
        if any(width % heads for width in widths.values()):
            raise ValueError(
                f"heads={heads} must divide the query/key width {widths['to_q']} and the value width "
                f"{widths['to_v']} of layer {layer.name!r}; choose heads among the common divisors"
            )
        mixer = LiTAttention(widths["to_v"], heads, self.options.kernel_size, float(self.options.eps))
        setattr(attn, ADDED_MODULE, mixer.to(device=like.device, dtype=like.dtype))
