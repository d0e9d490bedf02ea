"""CLEAR: softmax attention restricted to a circular window of the token grid, text tokens global.

CLEAR (Liu et al., 2024) linearises FLUX by letting each image query attend only to the image
keys within ``radius`` tokens of it on the latent grid (a disc, Euclidean distance), plus every
text key. Text queries, which are few, keep full attention over all keys. Converted layers keep
the teacher's projections, q/k norms and RoPE (the processor applies them before the mixer), so
with a radius at least the grid's diagonal a converted model computes exactly the original
softmax attention; smaller radii cost ``O(N r^2)`` instead of ``O(N^2)``.

Option ``down_factor = f`` adds global context: the image keys and values, pooled over
``f x f`` cells of the grid, join the text keys that every image query sees. Each layer learns
its pooling kernel (one ``f x f`` kernel for keys and one for values, shared by all channels,
initialised to the average ``1 / f^2``). Keys are pooled as the processor hands them over, i.e.
after FLUX's RoPE: a pooled key carries the mix of its cell's rotations.

The window is computed by :func:`lindiff.kernels.local_attention`, which builds its masks from
the grid of each call (no global mask), so any resolution works without re-initialisation.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lindiff.kernels import local_attention

from ..grid import GridShape
from .base import ADDED_MODULE, AttentionMethod, LayerInfo, TokenMixer, Tokens


@dataclass
class ClearOptions:
    """Options of the ``"clear"`` method.

    Attributes:
        radius: window radius in tokens (Euclidean, on the grid of image tokens); ``math.inf``
            or any radius at least the grid's diagonal is full attention. CLEAR's default is 16.
        down_factor: ``None`` or 1 for no pooled tokens; an integer ``f >= 2`` adds the image
            keys and values average-pooled over ``f x f`` cells (learned kernel) as global keys.
    """

    radius: float = 16
    down_factor: int | None = None

    def __post_init__(self) -> None:
        radius = self.radius
        if not isinstance(radius, numbers.Real) or isinstance(radius, bool) or not radius >= 0:
            raise ValueError(
                f"radius must be a number >= 0 (tokens; math.inf for full attention), got {radius!r}"
            )
        factor = self.down_factor
        if factor is not None and (
            not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1
        ):
            raise ValueError(
                f"down_factor must be None or an integer >= 1 (1: no pooled tokens), got {factor!r}"
            )


def text_parts(x: torch.Tensor, image: slice) -> torch.Tensor:
    """The text tokens of ``x`` ``(B, N, ...)``: everything outside ``image``, in order."""
    return torch.cat([x[:, : image.start], x[:, image.stop :]], dim=1)


def pool_tokens(x: torch.Tensor, grid: GridShape, kernel: torch.Tensor) -> torch.Tensor:
    """Pool image tokens ``(B, T*H*W, heads, D)`` over ``f x f`` cells of each frame with ``kernel`` ``(f, f)``.

    The grid is padded at its bottom and right edges by repeating the last row and column up to a
    multiple of ``f`` (a partial cell pools copies of its edge tokens, never zeros). Returns
    ``(B, T * ceil(H/f) * ceil(W/f), heads, D)``, pooled cells in row-major order.
    """
    batch, _, heads, dim = x.shape
    frames, height, width = grid
    factor = kernel.shape[-1]
    rows, cols = -(-height // factor), -(-width // factor)
    x = x.reshape(batch, frames, height, width, heads * dim)
    if rows * factor != height:
        x = x.index_select(2, torch.arange(rows * factor, device=x.device).clamp_(max=height - 1))
    if cols * factor != width:
        x = x.index_select(3, torch.arange(cols * factor, device=x.device).clamp_(max=width - 1))
    x = x.view(batch, frames, rows, factor, cols, factor, heads * dim)
    pooled = torch.einsum("btiujvc,uv->btijc", x, kernel.to(x.dtype))
    return pooled.reshape(batch, frames * rows * cols, heads, dim)


class ClearAttention(TokenMixer):
    """What CLEAR adds to one layer: local window attention, and the pooling kernels if any.

    Args:
        radius: window radius in tokens.
        down_factor: pooling factor ``f`` of the extra global tokens; ``None`` or 1 for none.
    """

    def __init__(self, radius: float, down_factor: int | None) -> None:
        super().__init__()
        self.radius = float(radius)
        self.down_factor = None if down_factor in (None, 1) else int(down_factor)
        if self.down_factor is None:
            self.register_parameter("pool", None)
        else:
            # pool[0] pools the keys, pool[1] the values; the average to start with.
            self.pool = nn.Parameter(
                torch.full((2, self.down_factor, self.down_factor), self.down_factor**-2)
            )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """``q, k`` ``(B, N, H, D)``, ``v`` ``(B, N, H, D_v)`` with image tokens at ``tokens.image``; returns ``(B, N, H, D_v)``.

        Image queries: softmax over the image keys in the window, the text keys and the pooled
        tokens. Text queries: softmax over all keys. Scale ``1/sqrt(D)``, as the teacher's.
        """
        image = tokens.image
        has_text = image.start > 0 or image.stop < q.shape[1]
        grid = tokens.grid
        k_image, v_image = k[:, image], v[:, image]
        global_k, global_v = [], []
        if has_text:
            global_k.append(text_parts(k, image))
            global_v.append(text_parts(v, image))
        if self.pool is not None:
            global_k.append(pool_tokens(k_image, grid, self.pool[0]))
            global_v.append(pool_tokens(v_image, grid, self.pool[1]))
        global_kv = (torch.cat(global_k, dim=1), torch.cat(global_v, dim=1)) if global_k else None
        out = local_attention(
            q[:, image], k_image, v_image, grid=grid, radius=self.radius, global_kv=global_kv
        )
        if not has_text:
            return out
        text_out = F.scaled_dot_product_attention(
            text_parts(q, image).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
        before = image.start
        return torch.cat([text_out[:, :before], out, text_out[:, before:]], dim=1)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, down_factor={self.down_factor}"


class Clear(AttentionMethod):
    """The ``"clear"`` method (Liu et al., 2024): circular local attention, text global.

    Converts self, joint (SD3, FLUX double blocks) and single-stream (FLUX) layers; adds no
    parameters unless ``down_factor`` is set.
    """

    name = "clear"
    options_cls = ClearOptions
    kinds = ("self", "joint", "single")

    def convert_layer(self, layer: LayerInfo) -> None:
        like = self.parameter_like(layer.module)
        mixer = ClearAttention(self.options.radius, self.options.down_factor)
        setattr(layer.module, ADDED_MODULE, mixer.to(device=like.device, dtype=like.dtype))
