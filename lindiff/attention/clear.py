"""CLEAR: softmax attention restricted to a circular window of the token grid, text tokens global.

CLEAR (Liu et al., NeurIPS 2025) linearises FLUX by letting each image query attend only to the
image keys strictly within ``radius`` tokens of it on the latent grid: query ``(y, x)`` sees key
``(y', x')`` iff ``(y - y')^2 + (x - x')^2 < radius^2`` (CLEAR's "window size" is this radius).
Image queries also see every text key; text queries, which are few, keep full attention over all
text and image keys. Converted layers keep the teacher's projections, q/k norms and RoPE (the
processor applies them before the mixer), so with a radius beyond the grid's diagonal (or
``math.inf``) a converted model computes exactly the original softmax attention; smaller radii
cost ``O(N r^2)`` instead of ``O(N^2)``.

On video (a ``(T, H, W)`` grid of latent frames; lindiff's extension) the window is a cylinder:
query ``(t, y, x)`` sees key ``(t', y', x')`` iff ``|t - t'| <= frames_radius`` and
``(y - y')^2 + (x - x')^2 < radius^2``. ``frames_radius`` counts latent frames inclusively
(frames are discrete, and ``0`` reads as "this frame only"); ``radius`` stays CLEAR's strict
one. The default ``frames_radius=None`` is every frame of the clip: video DiTs have heads that attend to the
same position across all frames (temporal heads; Sparse VideoGen, Xi et al. 2025) besides
spatially local heads within a frame, and a clip has at most some 20-30 latent frames, so a
cylinder over the whole clip keeps both patterns while the cost stays linear in the frame area.
For Wan at 480p x 81 frames (21 x 30 x 52 latent tokens) and radius 8 a query sees a disc of
at most 193 keys (160 on average, the borders clip it) in each of the 21 frames: 10% of the
32,760 keys (at 720p, 4.8%). Images (one frame) ignore ``frames_radius``. A radius beyond a
frame's diagonal with every frame is full attention, the original model.

Option ``down_factor = f`` adds global context for the image queries (not the text ones): the
image keys and values summed over ``f x f`` cells of the grid with one learned weight
``spatial_weight`` ``(f, f)``, shared by keys and values and by all channels and heads, and
initialised to ``1 / f^2`` (the average). Keys are pooled as the processor hands them over, i.e.
after FLUX's RoPE. CLEAR requires grid sides divisible by ``f``; lindiff also pools other grids by
repeating the last row and column up to a multiple of ``f`` (its extension; on divisible grids
the two agree).

Softmax scale: ``1/sqrt(D)``, or with ``train_tokens = T`` CLEAR's length-aware scale for
resolutions above the training one, ``sqrt(log_T(L) / D)``, where ``L`` is the number of text +
image keys of the call, counted ten times in pooled variants (``down_factor``), as CLEAR's
release does. CLEAR's value is ``T = 64 * 64 + 512 = 4608`` (FLUX at 1024 px: 64 x 64 image
tokens and 512 text tokens) for all its variants.

The window is computed by :func:`lindiff.kernels.local_attention`, which builds its masks from
the grid of each call (no global mask), so any resolution works without re-initialisation.
Released CLEAR checkpoints load with ``lindiff.linearize(pipe, "clear", weights=path)`` (see
:mod:`lindiff.clear_format`).

Under diffusers' context parallelism (``tokens.shard``) each process holds a run of the text
tokens and of the row-major image tokens, and computes exactly what one process would:

- the text queries, keys and values are all-gathered (every image query sees every text key);
- image queries attend to a box of whole grid rows, ``floor(radius)`` rows beyond the process's
  tokens and, on video, ``floor(frames_radius)`` frames (every frame by default), fetched from
  the neighbours (:func:`lindiff.parallel.local_attention_sharded`);
- pooled keys and values: each process pools its own tokens (zeros elsewhere) over the cells
  they touch, in float32 (at least), and the processes all-reduce the pooled grid (sum);
- text queries attend over each process's own text and image keys; the processes merge the
  parts through their log-sum-exps (:func:`lindiff.parallel.attention_over_shards`);
- the length-aware scale counts every process's keys.

Collective sizes per process and layer (all-gathers: what a process receives; all-reduces: the
reduced tensor), with ``P`` processes, batch ``B``, ``H`` heads of width ``D`` (values ``D_v``),
``e`` bytes per element, ``M`` text tokens, a grid ``(T, H_g, W)``, ``R = floor(radius)`` and
``R_t = min(floor(frames_radius), T - 1)``: text ``P * ceil(M / P) * B * H * (2D + D_v) * e``
(and ``8P`` for the lengths); window halo at most ``P * 2 * (R + 1) * W * B * H * (D + D_v) * e``
on images and on a part within one frame; a part that crosses frames takes ``R_t`` whole frames
each side (with the default, every frame: the halo is the other processes' whole share of the
keys and values, as in an all-gather); pooled grid ``T * ceil(H_g/f) * ceil(W/f) * B * H *
(D + D_v) * 4``; text-query merge ``B * M * H * (D_v + 2) * 4``. Compute: the box's halo rows
(frames) of queries are computed and discarded (``2R`` rows, or ``2 R_t`` frames, per process);
text queries keep ``B * H * M * n`` float32 probabilities for backward (``n``: the process's keys).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lindiff.kernels import local_attention

from ..grid import GridShape
from ..parallel import (
    GridBox,
    SequenceShard,
    all_reduce_sum,
    attention_over_shards,
    gather_sequence,
    local_attention_sharded,
)
from .base import ADDED_MODULE, AttentionMethod, LayerInfo, TokenMixer, Tokens

POOLED_KEY_FACTOR = 10
"""CLEAR's pooled variants count ``L`` (the length-aware scale's key count) ten times."""

# Squared grid distances are integers; a radius whose square lands a hair above one (sqrt(5) ** 2
# is 5.000000000000001) must still exclude it from the strict window.
_SQUARE_TOLERANCE = 1e-6


@dataclass
class ClearOptions:
    """Options of the ``"clear"`` method.

    Attributes:
        radius: window radius in tokens, ``> 0``: an image query sees the image keys at Euclidean
            grid distance strictly below it within a frame (a radius that is a grid distance up
            to float rounding, like ``math.sqrt(2)``, counts as that distance). ``math.inf``, or
            any radius beyond a frame's diagonal, is full attention (on video, with every frame).
            CLEAR's released FLUX windows are 8, 16 and 32.
        frames_radius: video only (images ignore it): how many latent frames the window reaches
            each way, inclusively (``|dt| <= frames_radius``; ``0``: the query's frame only;
            fractions are floored). ``None``, the default, is every frame of the clip (a window
            over the whole clip in time; see the module docstring for why).
        down_factor: ``None`` or 1 for no pooled tokens; an integer ``f >= 2`` adds the image
            keys and values pooled over ``f x f`` cells (learned ``spatial_weight``) as global
            keys of the image queries. CLEAR's released pooled variants use 4.
        train_tokens: ``None`` for the softmax scale ``1/sqrt(D)``; an integer ``T >= 2``, the
            key count at the training resolution, for CLEAR's length-aware scale
            ``sqrt(log_T(L) / D)`` (``L``: text + image keys of the call, times 10 with
            ``down_factor``). CLEAR uses 4608 (64 x 64 image + 512 text tokens, FLUX at 1024 px).
    """

    radius: float = 16
    down_factor: int | None = None
    train_tokens: int | None = None
    frames_radius: float | None = None

    def __post_init__(self) -> None:
        radius = self.radius
        if not isinstance(radius, numbers.Real) or isinstance(radius, bool) or not radius > 0:
            raise ValueError(
                f"radius must be a number > 0 (tokens; math.inf for full attention), got {radius!r}"
            )
        frames = self.frames_radius
        if frames is not None and (
            not isinstance(frames, numbers.Real) or isinstance(frames, bool) or not frames >= 0
        ):
            raise ValueError(
                "frames_radius must be None (every frame) or a number >= 0 (latent frames each way, "
                f"inclusive; 0: the query's frame only), got {frames!r}"
            )
        factor = self.down_factor
        if factor is not None and (
            not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1
        ):
            raise ValueError(
                f"down_factor must be None or an integer >= 1 (1: no pooled tokens), got {factor!r}"
            )
        tokens = self.train_tokens
        if tokens is not None and (
            not isinstance(tokens, numbers.Integral) or isinstance(tokens, bool) or tokens < 2
        ):
            raise ValueError(
                f"train_tokens must be None (scale 1/sqrt(D)) or an integer >= 2 (CLEAR: 4608), got {tokens!r}"
            )


def closed_radius(radius: float) -> float:
    """The radius whose closed window ``d <= r`` (:func:`local_attention`'s) is CLEAR's strict ``d < radius``.

    Grid distances are square roots of integers, so ``d < radius`` iff ``d^2 <= ceil(radius^2) - 1``.
    """
    square = radius * radius
    if not math.isfinite(square):
        return math.inf
    return math.sqrt(math.ceil(square - _SQUARE_TOLERANCE) - 1)


def text_parts(x: torch.Tensor, image: slice) -> torch.Tensor:
    """The text tokens of ``x`` ``(B, N, ...)``: everything outside ``image``, in order."""
    return torch.cat([x[:, : image.start], x[:, image.stop :]], dim=1)


def pool_tokens(x: torch.Tensor, grid: GridShape, weight: torch.Tensor) -> torch.Tensor:
    """Sum image tokens ``(B, T*H*W, heads, D)`` over ``f x f`` cells of each frame, weighted by ``weight`` ``(f, f)``.

    The grid is padded at its bottom and right edges by repeating the last row and column up to a
    multiple of ``f`` (a partial cell pools copies of its edge tokens, never zeros). Returns
    ``(B, T * ceil(H/f) * ceil(W/f), heads, D)``, pooled cells in row-major order.
    """
    batch, _, heads, dim = x.shape
    frames, height, width = grid
    factor = weight.shape[-1]
    rows, cols = -(-height // factor), -(-width // factor)
    x = x.reshape(batch, frames, height, width, heads * dim)
    if rows * factor != height:
        x = x.index_select(2, torch.arange(rows * factor, device=x.device).clamp_(max=height - 1))
    if cols * factor != width:
        x = x.index_select(3, torch.arange(cols * factor, device=x.device).clamp_(max=width - 1))
    x = x.view(batch, frames, rows, factor, cols, factor, heads * dim)
    pooled = torch.einsum("btiujvc,uv->btijc", x, weight.to(x.dtype))
    return pooled.reshape(batch, frames * rows * cols, heads, dim)


def pool_tokens_sharded(
    x: torch.Tensor, shard: SequenceShard, grid: GridShape, weight: torch.Tensor
) -> torch.Tensor:
    """:func:`pool_tokens` of the whole grid from this process's part ``x`` ``(B, n, heads, D)`` of it.

    Pooling is linear in the tokens, so the whole grid's pooling is the sum over processes of each
    one's pooling with zeros in place of the other processes' tokens. Each process pools only the
    box of whole cell rows its tokens touch (edge rows repeated as :func:`pool_tokens` does), in
    float32 at least, places it in the pooled grid and all-reduces. Returns
    ``(B, T * ceil(H/f) * ceil(W/f), heads, D)`` in the dtype of ``x``.
    """
    frames, height, width = grid
    factor = weight.shape[-1]
    part = shard.part(frames * height * width)
    box = GridBox.around(part, grid, frames=0, rows=0, align=factor)
    own = box.locate(part)
    dtype = torch.promote_types(x.dtype, torch.float32)
    filled = F.pad(x.to(dtype), (0, 0, 0, 0, own.start, box.size - own.stop))
    pooled = pool_tokens(filled, box.shape, weight)
    rows, cols = -(-height // factor), -(-width // factor)
    start = (box.frames.start * rows + box.rows.start // factor) * cols
    pooled = F.pad(pooled, (0, 0, 0, 0, start, frames * rows * cols - start - pooled.shape[1]))
    return all_reduce_sum(pooled, shard).to(x.dtype)


class ClearAttention(TokenMixer):
    """What CLEAR adds to one layer: local window attention, and the pooling weight if any.

    Args:
        radius: window radius in tokens (strict: distances below it).
        down_factor: pooling factor ``f`` of the extra global tokens; ``None`` or 1 for none.
        train_tokens: key count at the training resolution for the length-aware scale; ``None``
            for ``1/sqrt(D)``.
        frames_radius: latent frames the window reaches each way on video (inclusive); ``None``
            for every frame.
    """

    method_name = "clear"
    context_parallel = True

    def __init__(
        self,
        radius: float,
        down_factor: int | None,
        train_tokens: int | None = None,
        frames_radius: float | None = None,
    ) -> None:
        super().__init__()
        self.radius = float(radius)
        self.frames_radius = None if frames_radius is None else float(frames_radius)
        self.down_factor = None if down_factor in (None, 1) else int(down_factor)
        self.train_tokens = None if train_tokens is None else int(train_tokens)
        if self.down_factor is None:
            self.register_parameter("spatial_weight", None)
        else:
            self.spatial_weight = nn.Parameter(
                torch.full((self.down_factor, self.down_factor), self.down_factor**-2)
            )

    def scale(self, num_keys: int, head_dim: int) -> float:
        """The softmax scale for a call with ``num_keys`` text + image keys of width ``head_dim``."""
        if self.train_tokens is None:
            return head_dim**-0.5
        if self.down_factor is not None:
            num_keys *= POOLED_KEY_FACTOR
        # One key gets all the weight whatever the scale; keep it positive for the kernel.
        return math.sqrt(math.log(max(num_keys, 2)) / math.log(self.train_tokens) / head_dim)

    def window(self) -> dict[str, float]:
        """The closed window of :func:`lindiff.kernels.local_attention`: ``radius`` and ``frames_radius``."""
        frames = math.inf if self.frames_radius is None else self.frames_radius
        return {"radius": closed_radius(self.radius), "frames_radius": frames}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """``q, k`` ``(B, N, H, D)``, ``v`` ``(B, N, H, D_v)`` with image tokens at ``tokens.image``; returns ``(B, N, H, D_v)``.

        Image queries: softmax over the image keys in the window, the text keys and the pooled
        tokens. Text queries: softmax over all text and image keys. Scale: :meth:`scale`. Under
        context parallelism (``tokens.shard``): over every process's keys (:meth:`forward_sharded`).
        """
        if tokens.shard is not None:
            return self.forward_sharded(q, k, v, tokens)
        image = tokens.image
        has_text = image.start > 0 or image.stop < q.shape[1]
        grid = tokens.grid
        scale = self.scale(q.shape[1], q.shape[-1])
        k_image, v_image = k[:, image], v[:, image]
        global_k, global_v = [], []
        if has_text:
            global_k.append(text_parts(k, image))
            global_v.append(text_parts(v, image))
        if self.spatial_weight is not None:
            global_k.append(pool_tokens(k_image, grid, self.spatial_weight))
            global_v.append(pool_tokens(v_image, grid, self.spatial_weight))
        global_kv = (torch.cat(global_k, dim=1), torch.cat(global_v, dim=1)) if global_k else None
        out = local_attention(
            q[:, image],
            k_image,
            v_image,
            grid=grid,
            **self.window(),
            global_kv=global_kv,
            scale=scale,
        )
        if not has_text:
            return out
        text_out = F.scaled_dot_product_attention(
            text_parts(q, image).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        ).transpose(1, 2)
        before = image.start
        return torch.cat([text_out[:, :before], out, text_out[:, before:]], dim=1)

    def forward_sharded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens
    ) -> torch.Tensor:
        """:meth:`forward` on this process's part of the sequence (``tokens.shard``; see the module
        docstring): ``q, k`` ``(B, n, H, D)``, ``v`` ``(B, n, H, D_v)``; returns ``(B, n, H, D_v)``."""
        image, shard, grid = tokens.image, tokens.shard, tokens.grid
        dim = q.shape[-1]
        text, own_text = gather_sequence(text_parts(torch.cat([q, k, v], dim=-1), image), shard)
        q_text, k_text, v_text = text.split([dim, dim, v.shape[-1]], dim=-1)
        scale = self.scale(text.shape[1] + tokens.total_image, dim)
        k_image, v_image = k[:, image], v[:, image]
        global_k, global_v = [k_text], [v_text]
        if self.spatial_weight is not None:
            pooled = pool_tokens_sharded(
                torch.cat([k_image, v_image], dim=-1), shard, grid, self.spatial_weight
            )
            global_k.append(pooled[..., :dim])
            global_v.append(pooled[..., dim:])
        global_kv = (torch.cat(global_k, dim=1), torch.cat(global_v, dim=1))
        out = local_attention_sharded(
            q[:, image],
            k_image,
            v_image,
            shard,
            grid,
            **self.window(),
            global_kv=global_kv if global_kv[0].shape[1] else None,
            scale=scale,
        )
        if text.shape[1] == 0:
            return out
        text_out = attention_over_shards(q_text, k, v, shard, scale)[:, own_text]
        before = image.start
        return torch.cat([text_out[:, :before], out, text_out[:, before:]], dim=1)

    def extra_repr(self) -> str:
        return (
            f"radius={self.radius}, down_factor={self.down_factor}, train_tokens={self.train_tokens}, "
            f"frames_radius={self.frames_radius}"
        )


class Clear(AttentionMethod):
    """The ``"clear"`` method (Liu et al., NeurIPS 2025): circular local attention (a cylinder over
    ``frames_radius`` frames on video), text global.

    Converts self, joint (SD3, FLUX double blocks) and single-stream (FLUX) layers; adds no
    parameters unless ``down_factor`` is set.
    """

    name = "clear"
    options_cls = ClearOptions
    kinds = ("self", "joint", "single")

    def convert_layer(self, layer: LayerInfo) -> None:
        like = self.parameter_like(layer.module)
        options = self.options
        mixer = ClearAttention(
            options.radius, options.down_factor, options.train_tokens, options.frames_radius
        )
        setattr(layer.module, ADDED_MODULE, mixer.to(device=like.device, dtype=like.dtype))
