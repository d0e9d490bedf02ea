"""Released CLEAR checkpoints (Huage001/CLEAR, FLUX.1-dev): reading them, and writing that layout.

A CLEAR file is a safetensors fragment of a FLUX transformer's state dict, without metadata:

- ``transformer_blocks.{i}.attn.{to_q,to_k,to_v,to_out.0}.{weight,bias}`` (double-stream layers),
- ``single_transformer_blocks.{i}.attn.{to_q,to_k,to_v}.{weight,bias}`` (single-stream layers),
- with pooled tokens, ``{layer}.processor.spatial_weight`` of shape ``(1, 1, 1, f, 1, f, 1)`` in
  each layer (the pooling weight of the image tokens laid out as ``(B, heads, H/f, f, W/f, f, D)``).

The file name carries the options: ``clear_local_{r}.safetensors`` or
``clear_local_{r}_down_{f}.safetensors`` (window radius ``r``, pooling factor ``f``). In lindiff
the projections keep their paths (``transformer.{layer}.to_q.weight``) and the pooling weight is
``transformer.{layer}.lindiff.spatial_weight`` ``(f, f)`` of the ``"clear"`` method.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from safetensors.torch import save_file

from .attention.base import ADDED_MODULE
from .denoisers import denoisers
from .state import get_state

if TYPE_CHECKING:
    from .weights import Checkpoint

ROLE = "transformer"
FAMILY = "flux"
_LAYER = r"(?:single_)?transformer_blocks\.\d+\.attn"
_KEY = re.compile(
    rf"^({_LAYER})\.(?:(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)|(processor\.spatial_weight))$"
)
_NAME = re.compile(r"^clear_local_(\d+)(?:_down_(\d+))?\.safetensors$")
_SPATIAL = "processor.spatial_weight"


def clear_file_name(radius: int, down_factor: int | None) -> str:
    """CLEAR's file name for a window ``radius`` and pooling factor (``None``: no pooled tokens)."""
    return f"clear_local_{radius}" + (f"_down_{down_factor}" if down_factor else "") + ".safetensors"


def options_from_name(name: str) -> dict[str, int | None] | None:
    """``{"radius": r, "down_factor": f or None}`` from a CLEAR file name; ``None`` if it is not one."""
    match = _NAME.match(name)
    if match is None:
        return None
    return {"radius": int(match[1]), "down_factor": None if match[2] is None else int(match[2])}


def is_clear_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file without lindiff metadata whose keys are all CLEAR's."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
    return "lindiff_config" not in metadata and bool(keys) and all(_KEY.match(key) for key in keys)


def read_clear_file(path: Path) -> Checkpoint:
    """A released CLEAR file as a ``"clear"`` checkpoint for the FLUX transformer.

    ``down_factor`` comes from the ``spatial_weight`` shapes (and must agree with the file name);
    ``radius`` from the file name, or, for other names, from the caller's options.

    Raises:
        ValueError: malformed ``spatial_weight`` shapes, or a name that disagrees with them.
    """
    from .weights import Checkpoint

    tensors, factors = {}, set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            tensor = f.get_tensor(key)
            layer = _KEY.match(key)[1]
            if key.endswith(_SPATIAL):
                shape = tuple(tensor.shape)
                if (
                    len(shape) != 7
                    or shape[3] != shape[5]
                    or shape[3] < 2
                    or math.prod(shape) != shape[3] ** 2
                ):
                    raise ValueError(
                        f"{path}: {key} has shape {shape}; CLEAR's spatial_weight is (1, 1, 1, f, 1, f, 1), f >= 2"
                    )
                factors.add(shape[3])
                tensors[f"{ROLE}.{layer}.{ADDED_MODULE}.spatial_weight"] = tensor.reshape(shape[3], shape[3])
            else:
                tensors[f"{ROLE}.{key}"] = tensor
    if len(factors) > 1:
        raise ValueError(f"{path}: spatial_weight pooling factors differ between layers: {sorted(factors)}")
    options: dict[str, Any] = {"down_factor": factors.pop() if factors else None}
    named = options_from_name(path.name)
    missing = {}
    if named is None:
        missing["radius"] = (
            "the file name is not clear_local_{r}[_down_{f}].safetensors; pass CLEAR's window "
            "size, e.g. linearize(pipe, 'clear', weights=path, radius=16)"
        )
    elif named["down_factor"] != options["down_factor"]:
        has = (
            "no spatial_weight" if options["down_factor"] is None else f"down_factor {options['down_factor']}"
        )
        raise ValueError(
            f"{path}: the file name says down_factor={named['down_factor']}, its tensors have {has}"
        )
    else:
        options["radius"] = named["radius"]
    return Checkpoint("clear", options, {ROLE: FAMILY}, tensors, source=str(path), missing_options=missing)


def save_clear_weights(pipe_or_model: Any, path: str | os.PathLike) -> Path:
    """Write a linearized FLUX transformer's ``"clear"`` layers in CLEAR's released layout.

    Writes every converted layer's projections (``to_q/to_k/to_v``, and ``to_out.0`` where the
    layer has one; the base weights under any LoRA) and, with pooled tokens, its
    ``spatial_weight`` as ``(1, 1, 1, f, 1, f, 1)``. ``train_tokens`` is not recorded (CLEAR's
    files do not record the scale either).

    Args:
        pipe_or_model: a FLUX pipeline or ``FluxTransformer2DModel`` linearized with ``"clear"``.
        path: a folder (created), which gets ``clear_local_{r}[_down_{f}].safetensors``, or a
            file path ending in ``.safetensors``.

    Returns:
        The path of the written file.

    Raises:
        ValueError: not linearized, not FLUX, not ``"clear"``, or a radius that is not an integer.
    """
    role, model = denoisers(pipe_or_model)[0]
    state = get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not linearized; nothing to save")
    if role != ROLE or state.adapter.name != FAMILY:
        raise ValueError(
            f"the CLEAR layout holds a FLUX transformer; got {type(model).__name__} "
            f"(role {role!r}, family {state.adapter.name!r})"
        )
    if state.method.name != "clear":
        raise ValueError(
            f"the CLEAR layout holds the 'clear' method; {role} is linearized with {state.method.name!r}"
        )
    radius, factor = state.method.options.radius, state.method.options.down_factor
    if not (isinstance(radius, numbers.Integral) or (math.isfinite(radius) and float(radius).is_integer())):
        raise ValueError(f"CLEAR files name an integer window size; the model has radius={radius!r}")
    factor = None if factor in (None, 1) else int(factor)
    tensors = dict(state.projection_parameters())
    for name, attn in state.layers.items():
        weight = getattr(attn, ADDED_MODULE).spatial_weight
        if weight is not None:
            tensors[f"{name}.{_SPATIAL}"] = weight.reshape(1, 1, 1, factor, 1, factor, 1)
    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}

    target = Path(path)
    if target.suffix != ".safetensors":
        target.mkdir(parents=True, exist_ok=True)
        target = target / clear_file_name(int(radius), factor)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, target)
    return target
