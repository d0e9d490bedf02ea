"""What every attention method provides: options, per-layer conversion, a stateless processor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.models.attention_processor import Attention

from ..grid import TokenGrid

# Name of the submodule a method adds to each converted ``Attention``. Keeping everything new
# under one child leaves ``to_q/to_k/to_v/to_out`` untouched for LoRA, and `restore` removes it.
ADDED_MODULE = "lindiff"
# Plain attribute holding the model's shared TokenGrid on each converted ``Attention``.
GRID_ATTRIBUTE = "lindiff_grid"


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer to convert, as the model-family adapter sees it.

    Attributes:
        name: module path inside the denoiser (``down_blocks.0.attentions.0.transformer_blocks.0.attn1``).
        module: the diffusers ``Attention``.
        kind: ``"self"`` (image tokens only), ``"joint"`` (image + text tokens, text as extra
            keys/values: SD3, FLUX double blocks) or ``"single"`` (text and image concatenated in
            one sequence: FLUX single blocks).
        grid: the model's TokenGrid (shared by every layer of one denoiser).
    """

    name: str
    module: Attention
    kind: str
    grid: TokenGrid


class AttentionMethod:
    """Base class of a registered attention method.

    A subclass sets ``name``, ``options_cls`` (a dataclass of its options with defaults) and
    ``kinds`` (the layer kinds it converts), and implements :meth:`convert_layer` and
    :meth:`processor`. Processors must be stateless and constructible with no arguments
    (IP-Adapter loading re-creates them with ``cls()``): everything they need lives on the
    ``Attention`` module, under :data:`ADDED_MODULE`.
    """

    name: ClassVar[str]
    options_cls: ClassVar[type]
    kinds: ClassVar[tuple[str, ...]] = ("self",)

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
        """Add this method's new submodule (if any) to ``layer.module``; never touch its projections."""
        raise NotImplementedError

    def processor(self, layer: LayerInfo) -> Any:
        """The processor instance for a converted layer."""
        raise NotImplementedError

    @staticmethod
    def parameter_like(attn: Attention) -> torch.Tensor:
        """A parameter of the layer whose device and dtype new submodules should follow."""
        linear = attn.to_q
        return getattr(linear, "base_layer", linear).weight
