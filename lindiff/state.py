"""What `linearize` records on a converted denoiser, so `restore` and weight I/O can undo or save it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters.base import ModelAdapter
from .attention.base import AttentionMethod, AttentionModule
from .grid import TokenGrid

STATE_ATTRIBUTE = "_lindiff_state"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def base_linear(attn: AttentionModule, projection: str) -> nn.Linear:
    """The ``nn.Linear`` behind ``attn.<projection>``, looking through a PEFT LoRA wrapper."""
    module = attn.get_submodule(projection)
    return getattr(module, "base_layer", module)


def projections_of(attn: AttentionModule) -> tuple[str, ...]:
    """The :data:`PROJECTIONS` a layer has (FLUX single-stream layers have no ``to_out``)."""
    return tuple(p for p in PROJECTIONS if p != "to_out.0" or getattr(attn, "to_out", None) is not None)


@dataclass
class LinearizedState:
    """Everything `linearize` changed on one denoiser.

    Attributes:
        method: the attention method instance (its options included).
        adapter: the model-family adapter.
        grid: the TokenGrid shared by all converted layers.
        layers: converted attention layers by module path.
        original_processors: the processor each converted layer had before conversion.
        hook_id: id of the grid-recording pre-forward hook on the denoiser.
        processors: the method's processor installed on each converted layer.
        projection_backup: the teacher's q/k/v/out weights, kept once something overwrites them
            (loaded LinFusion checkpoints, distillation that trains projections), so `restore`
            can give back the original model exactly.
    """

    method: AttentionMethod
    adapter: ModelAdapter
    grid: TokenGrid
    layers: dict[str, AttentionModule]
    original_processors: dict[str, Any]
    hook_id: int
    processors: dict[str, Any] = field(default_factory=dict)
    projection_backup: dict[str, torch.Tensor] | None = field(default=None)

    @property
    def projections_modified(self) -> bool:
        return self.projection_backup is not None

    def backup_projections(self) -> None:
        """Keep a CPU copy of the self-attention projections before anything changes them."""
        if self.projection_backup is not None:
            return
        backup = {}
        for name, attn in self.layers.items():
            for projection in projections_of(attn):
                for param_name, param in base_linear(attn, projection).named_parameters():
                    backup[f"{name}.{projection}.{param_name}"] = param.detach().to("cpu", copy=True)
        self.projection_backup = backup

    def reinstall_processors(self) -> dict[str, type]:
        """Put the method's processor back on converted layers where something replaced it.

        diffusers swaps processors wholesale (``enable_attention_slicing``,
        ``set_default_attn_processor``, ``set_attn_processor``), which would silently bring back
        softmax attention on converted layers; only `restore` should do that. Layers whose
        processor is of the installed class (IP-Adapter loading re-creates them with ``cls()``)
        are left alone.

        Returns:
            The replaced layers' names and the processor class found on each.
        """
        replaced = {
            name: type(self.layers[name].processor)
            for name, processor in self.processors.items()
            if type(self.layers[name].processor) is not type(processor)
        }
        for name in replaced:
            self.layers[name].set_processor(self.processors[name])
        return replaced


def get_state(model: nn.Module) -> LinearizedState | None:
    return getattr(model, STATE_ATTRIBUTE, None)
