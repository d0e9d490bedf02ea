"""What every attention method provides: options, per-layer conversion, a stateless processor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

from ..grid import GridShape, TokenGrid
from ..parallel import SequenceShard

# Name of the submodule a method adds to each converted ``Attention``. Keeping everything new
# under one child leaves ``to_q/to_k/to_v/to_out`` untouched for LoRA, and `restore` removes it.
ADDED_MODULE = "lindiff"
# Plain attribute holding the model's shared TokenGrid on each converted ``Attention``.
GRID_ATTRIBUTE = "lindiff_grid"
# A diffusers attention layer: the classic ``Attention`` (UNet, PixArt, SD3, SANA) or a module built
# on ``AttentionModuleMixin`` (``FluxAttention``). Both have ``to_q/to_k/to_v`` (and usually
# ``to_out``), a ``processor`` and ``set_processor``.
AttentionModule = Attention | AttentionModuleMixin


@dataclass(frozen=True)
class Tokens:
    """Where the image tokens of one attention call sit in its sequence, and their grid.

    Attributes:
        image: the slice of the sequence holding image tokens; everything else is text (joint
            attention: SD3 puts text after the image, FLUX before).
        source: the model's TokenGrid, which places the image tokens on a ``(T, H, W)`` grid.
        shard: under diffusers' context parallelism, the split of the sequence over processes:
            the call holds only this process's part of the text and of the image tokens (its
            image tokens are ``shard.part(total_image)`` of the row-major ``(T, H, W)`` grid), and
            attention over the whole sequence needs the other processes' (see
            :mod:`lindiff.parallel`). ``None``: the call holds all.
    """

    image: slice
    source: TokenGrid | None = None
    shard: SequenceShard | None = None

    @property
    def num_image(self) -> int:
        """Image tokens in this call's sequence."""
        return self.image.stop - self.image.start

    @property
    def total_image(self) -> int:
        """Image tokens of the whole sequence: this call's, or every process's under context parallelism."""
        if self.shard is None:
            return self.num_image
        return self._source().num_tokens()

    @property
    def grid(self) -> GridShape:
        """``(T, H, W)`` of all image tokens; resolved on demand (only grid-aware methods ask)."""
        return self._source().resolve(self.total_image)

    def _source(self) -> TokenGrid:
        if self.source is None:
            raise RuntimeError(
                "this attention layer has no token grid (it was not converted by lindiff.linearize)"
            )
        return self.source


class TokenMixer(nn.Module):
    """What a method adds under ``attn.lindiff``: the attention math, and hooks on the q/k inputs.

    The processors in :mod:`lindiff.adapters.processors` run the original layer's projections,
    norms and rotary embeddings, then call :meth:`forward` in place of softmax attention, so one
    method works on every layer shape (UNet, PixArt, SD3 joint, FLUX double and single blocks).

    A mixer that computes the exact result when ``tokens.shard`` is set (context parallelism)
    sets :attr:`context_parallel`; the processors refuse to call the others on a shard.
    """

    method_name: ClassVar[str]
    """The registered name of the method this mixer belongs to (for messages)."""
    context_parallel: ClassVar[bool] = False
    """Whether :meth:`forward` handles ``tokens.shard`` (see :mod:`lindiff.parallel`)."""

    def query_input(self, x: torch.Tensor) -> torch.Tensor:
        """Transform the hidden states ``(B, N, C)`` that ``to_q`` projects (identity by default)."""
        return x

    def key_input(self, x: torch.Tensor) -> torch.Tensor:
        """Transform the hidden states ``(B, N, C)`` that ``to_k`` projects (identity by default)."""
        return x

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """Attention of ``q, k, v`` ``(B, N, H, D)`` (text and image tokens together); returns ``(B, N, H, D_v)``."""
        raise NotImplementedError


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer to convert, as the model-family adapter sees it.

    Attributes:
        name: module path inside the denoiser (``down_blocks.0.attentions.0.transformer_blocks.0.attn1``).
        module: the diffusers attention layer (``Attention``, ``FluxAttention``, ...).
        kind: ``"self"`` (image tokens only), ``"joint"`` (image + text tokens, text as extra
            keys/values: SD3, FLUX double blocks) or ``"single"`` (text and image concatenated in
            one sequence: FLUX single blocks).
        grid: the model's TokenGrid (shared by every layer of one denoiser).
    """

    name: str
    module: AttentionModule
    kind: str
    grid: TokenGrid


class AttentionMethod:
    """Base class of a registered attention method.

    A subclass sets ``name``, ``options_cls`` (a dataclass of its options with defaults) and
    ``kinds`` (the layer kinds it converts), and implements :meth:`convert_layer`, which puts a
    :class:`TokenMixer` under :data:`ADDED_MODULE` on the layer. The processor around it is the
    model family's (see :meth:`lindiff.adapters.ModelAdapter.processor`). A method that only fits
    some model families lists them in ``families`` (``None``: every family); `linearize` refuses
    the others with a ``ValueError``.
    """

    name: ClassVar[str]
    options_cls: ClassVar[type]
    kinds: ClassVar[tuple[str, ...]] = ("self",)
    families: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, **options: Any) -> None:
        allowed = {f.name for f in dataclasses.fields(self.options_cls)}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; allowed: {sorted(allowed) or 'none'}"
            )
        self.options = self.options_cls(**options)

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def convert_layer(self, layer: LayerInfo) -> None:
        """Put this method's :class:`TokenMixer` on ``layer.module``; never touch its projections."""
        raise NotImplementedError

    @staticmethod
    def parameter_like(attn: AttentionModule) -> torch.Tensor:
        """A parameter of the layer whose device and dtype new submodules should follow."""
        linear = attn.to_q
        return getattr(linear, "base_layer", linear).weight
