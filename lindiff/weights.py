"""Saving and loading what `linearize` added (safetensors), and importing released LinFusion and CLEAR checkpoints.

lindiff format: one ``lindiff.safetensors`` whose tensors are keyed ``{role}.{module path}.{param}``
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.lindiff.q_mlp.0.weight``) and whose
metadata carries the config (method, options, family of each component, lindiff version); the
folder form adds the same config as ``lindiff.json`` for people to read.

LinFusion format (as released): a folder with ``config.json`` holding ``modules_list`` (entries
``module_name``, ``dim_n``, ``heads``, ``projection_mid_dim``) and
``diffusion_pytorch_model.safetensors`` with keys ``{i}.to_q_.0.weight`` ... where ``i`` indexes
``modules_list``; layers may differ in ``projection_mid_dim`` (read as a per-layer ``mid_dim``).

CLEAR format (as released, FLUX): one ``clear_local_{r}[_down_{f}].safetensors``; see
:mod:`lindiff.clear_format`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters import weights_family
from .attention.base import ADDED_MODULE
from .clear_format import is_clear_file, read_clear_file
from .denoisers import denoisers
from .model_card import write_model_card
from .state import LinearizedState, base_linear, get_state
from .version import __version__

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "lindiff.safetensors"
CONFIG_NAME = "lindiff.json"
FORMAT_VERSION = 1
LINFUSION_CONFIG = "config.json"
LINFUSION_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class Checkpoint:
    """Weights for converted layers, whatever format they came from.

    Attributes:
        method: the attention method they belong to.
        options: that method's options.
        components: role -> model family (``{"unet": "unet", "controlnet": "unet"}``); weights
            load into a model of a family with the same ``weights_family`` (AnimateDiff and UNet).
        tensors: ``{role}.{module path}.{param}`` -> tensor.
        source: where they were read from, for messages.
        missing_options: options the weights depend on but their source does not record (a
            released CLEAR file not named ``clear_local_{r}...``), each with what to pass;
            :meth:`merged_options` requires them from the caller.
    """

    method: str
    options: dict[str, Any]
    components: dict[str, str]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    source: str = ""
    missing_options: dict[str, str] = field(default_factory=dict)

    def option_conflicts(self, options: dict[str, Any]) -> str:
        """``"name=given (weights have saved), ..."`` for the ``options`` that differ from the weights'; ``""`` if none."""
        return ", ".join(
            f"{k}={v!r} (weights have {self.options[k]!r})"
            for k, v in options.items()
            if k in self.options and self.options[k] != v
        )

    def merged_options(self, method: str, options: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's options overridden by none of ``options``; conflicts and missing options raise."""
        if method != self.method:
            raise ValueError(f"weights {self.source} are for method {self.method!r}, but method={method!r}")
        conflicts = self.option_conflicts(options)
        if conflicts:
            raise ValueError(f"options conflict with weights {self.source}: {conflicts}")
        missing = [f"{k} ({hint})" for k, hint in self.missing_options.items() if k not in options]
        if missing:
            raise ValueError(f"weights {self.source} do not record option(s) {'; '.join(missing)}")
        return {**self.options, **options}


def _config(method: str, options: dict[str, Any], components: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "format": "lindiff",
        "format_version": FORMAT_VERSION,
        "lindiff_version": __version__,
        "method": method,
        "options": options,
        "components": components,
    }


def _added_tensors(state: LinearizedState) -> tuple[dict[str, torch.Tensor], int]:
    """What `linearize` added, and the projection parameters changed since, by ``{module path}.{param}``.

    Every converted layer's ``lindiff`` submodule is saved whole. Of the q/k/v/out projections,
    each parameter that differs from the teacher's (:meth:`LinearizedState.changed_projections`,
    however it was changed: lindiff's distillation, a loaded checkpoint, your own training loop, a
    merged LoRA) is saved, and only those: an unchanged one is reproduced bit-exactly by
    `linearize` on the same base model, so saving it, or the rest of its layer, would only grow
    the file (by the size of the teacher's attention).

    Returns:
        The tensors, and how many layers have projection parameters among them.
    """
    tensors = {}
    for name, attn in state.layers.items():
        added = getattr(attn, ADDED_MODULE, None)
        if isinstance(added, nn.Module):
            for key, value in added.state_dict().items():
                tensors[f"{name}.{ADDED_MODULE}.{key}"] = value
    changed = set(state.changed_projections())
    tensors.update({key: param for key, param in state.projection_parameters() if key in changed})
    layers = [name for name in state.layers if any(key.startswith(name + ".") for key in changed)]
    return tensors, len(layers)


def save_weights(
    pipe_or_model: Any, path: str | os.PathLike, *, training: Mapping[str, Any] | None = None
) -> Path:
    """Save only what `linearize` added or training changed, as safetensors plus a JSON config and a
    model card.

    Args:
        pipe_or_model: a linearized pipeline or denoiser.
        path: output folder (created); ``lindiff.safetensors``, ``lindiff.json`` and ``README.md``
            (the model card, see :mod:`lindiff.model_card`; replaced if there) are written in it.
        training: a summary of how the weights were trained (steps, data, losses, config) for the
            model card: a mapping of simple values, lists and mappings.

    Returns:
        The path of the safetensors file.
    """
    if training is not None and not isinstance(training, Mapping):
        raise TypeError(
            f"training must be a dict (a training summary) or None, got {type(training).__name__}"
        )
    targets = [(role, model, get_state(model)) for role, model in denoisers(pipe_or_model)]
    targets = [(role, model, state) for role, model, state in targets if state is not None]
    if not targets:
        raise ValueError(f"{type(pipe_or_model).__name__} is not linearized; nothing to save")
    methods = {
        (state.method.name, json.dumps(state.method.options_dict(), sort_keys=True))
        for _, _, state in targets
    }
    if len(methods) > 1:
        raise ValueError(f"components were linearized with different methods/options: {sorted(methods)}")
    state0 = targets[0][2]
    tensors: dict[str, torch.Tensor] = {}
    components = {}
    for role, model, state in targets:
        added, projection_layers = _added_tensors(state)
        components[role] = {
            "family": state.adapter.name,
            "class": type(model).__name__,
            "layers": len(state.layers),
            "projection_layers": projection_layers,
        }
        for key, value in added.items():
            tensors[f"{role}.{key}"] = value.detach().contiguous().cpu()
    config = _config(state0.method.name, state0.method.options_dict(), components)

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path = folder / WEIGHTS_NAME
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"lindiff_config": json.dumps(config)})
    os.replace(tmp, weights_path)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    write_model_card(folder, config, pipe_or_model, training)
    return weights_path


def _read_lindiff_file(path: Path) -> Checkpoint:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if "lindiff_config" not in metadata:
            raise ValueError(
                f"{path} is a safetensors file without a lindiff config, and its keys are not a released "
                "CLEAR checkpoint's; was it written by save_weights?"
            )
        config = json.loads(metadata["lindiff_config"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses lindiff weight format {config['format_version']}, newer than this lindiff "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade lindiff"
        )
    components = {role: info["family"] for role, info in config["components"].items()}
    return Checkpoint(config["method"], config["options"], components, tensors, source=str(path))


def _linfusion_mid_dim(modules_list: list[dict[str, Any]]) -> int | dict[str, int | None] | None:
    """LinFusion's ``projection_mid_dim`` as lindiff's ``mid_dim``: one width if every layer shares
    it, else layer path -> width. ``-1`` (no MLP) becomes 0; ``None`` stays (the layer's width)."""
    mids = {
        entry["module_name"]: 0 if entry.get("projection_mid_dim") == -1 else entry.get("projection_mid_dim")
        for entry in modules_list
    }
    widths = set(mids.values())
    return widths.pop() if len(widths) == 1 else mids


def _read_linfusion_folder(folder: Path) -> Checkpoint:
    config = json.loads((folder / LINFUSION_CONFIG).read_text())
    modules_list = config.get("modules_list")
    if not isinstance(modules_list, list) or not modules_list:
        raise ValueError(f"{folder / LINFUSION_CONFIG} has no `modules_list`; not a LinFusion checkpoint")
    renames = {"to_q_.": f"{ADDED_MODULE}.q_mlp.", "to_k_.": f"{ADDED_MODULE}.k_mlp."}
    tensors = {}
    with safe_open(str(folder / LINFUSION_WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            index, rest = key.split(".", 1)
            module_name = modules_list[int(index)]["module_name"]
            for old, new in renames.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
            tensors[f"unet.{module_name}.{rest}"] = f.get_tensor(key)
    options = {"mid_dim": _linfusion_mid_dim(modules_list)}
    return Checkpoint("linfusion", options, {"unet": "unet"}, tensors, source=str(folder))


def _is_hub_reference(source: str) -> bool:
    """``owner/name`` (a repository) or ``owner/name/file.safetensors`` (one file in it)."""
    parts = source.split("/")
    if source.startswith((".", "/", "~")) or not all(parts):
        return False
    return len(parts) == 2 or (len(parts) > 2 and source.endswith(".safetensors"))


def _download(reference: str) -> Path:
    """The local path of a hub repository's weight files (``owner/name``) or of one file (``owner/name/file``)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    owner, name, *rest = reference.split("/")
    repo_id, filename = f"{owner}/{name}", "/".join(rest)
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename))
        return Path(
            snapshot_download(
                repo_id, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, LINFUSION_CONFIG, LINFUSION_WEIGHTS]
            )
        )
    except Exception as error:  # the hub raises many types: offline, not found, gated, bad id
        raise ValueError(
            f"weights={reference!r} is not a local file or folder, and loading it as a hub id failed: {error}"
        ) from error


def read_checkpoint(source: str | os.PathLike | Checkpoint) -> Checkpoint:
    """Read weights from a lindiff file/folder, a LinFusion folder, a released CLEAR file, or the hub.

    Hub references: ``owner/name`` (a repository holding lindiff or LinFusion weights) or
    ``owner/name/file.safetensors`` (one lindiff or CLEAR file, e.g.
    ``Huage001/CLEAR/clear_local_8_down_4.safetensors``).
    """
    if isinstance(source, Checkpoint):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"weights must be a path or hub id string, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        if isinstance(source, os.PathLike) or not _is_hub_reference(source):
            raise ValueError(
                f"weights={str(source)!r}: no such file or folder (and not a hub reference "
                "'owner/name' or 'owner/name/file.safetensors')"
            )
        path = _download(source)
    if path.is_file():
        return read_clear_file(path) if is_clear_file(path) else _read_lindiff_file(path)
    if (path / WEIGHTS_NAME).is_file():
        return _read_lindiff_file(path / WEIGHTS_NAME)
    if (path / LINFUSION_CONFIG).is_file() and (path / LINFUSION_WEIGHTS).is_file():
        return _read_linfusion_folder(path)
    raise ValueError(
        f"weights={str(source)!r}: folder holds neither {WEIGHTS_NAME} (lindiff) nor "
        f"{LINFUSION_CONFIG} + {LINFUSION_WEIGHTS} (LinFusion)"
    )


def _component_for(role: str, checkpoint: Checkpoint) -> str | None:
    """Which checkpoint component feeds ``role``: its own, else a ControlNet borrows the UNet's.

    A ControlNet is a copy of its UNet's encoder, with the same module paths, so UNet weights
    (for example a released LinFusion checkpoint) fit its layers.
    """
    if role in checkpoint.components:
        return role
    if role.startswith("controlnet") and "controlnet" in checkpoint.components:
        return "controlnet"
    if role.startswith("controlnet") and "unet" in checkpoint.components:
        logger.info("no %s weights in %s; using the UNet's for matching layers", role, checkpoint.source)
        return "unet"
    return None


def apply_checkpoint(targets: list[tuple[str, nn.Module]], checkpoint: Checkpoint) -> None:
    """Copy checkpoint tensors into linearized models, after checking everything matches."""
    problems: list[str] = []
    plans: list[tuple[LinearizedState, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
    for role, model in targets:
        state = get_state(model)
        if state is None:
            problems.append(f"{role}: not linearized")
            continue
        component = _component_for(role, checkpoint)
        if component is None:
            problems.append(f"{role}: no weights for it (weights have {sorted(checkpoint.components)})")
            continue
        if state.method.name != checkpoint.method:
            problems.append(
                f"{role}: linearized with {state.method.name!r}, weights are for {checkpoint.method!r}"
            )
            continue
        if weights_family(checkpoint.components[component]) != weights_family(state.adapter.name):
            problems.append(
                f"{role}: model family {state.adapter.name!r}, weights are for {checkpoint.components[component]!r}"
            )
            continue
        conflicts = checkpoint.option_conflicts(state.method.options_dict())
        if conflicts:
            problems.append(f"{role}: linearized with {conflicts}")
        plan, role_problems = _match_tensors(role, component, state, checkpoint)
        problems.extend(role_problems)
        plans.append((state, plan))
    if problems:
        shown = "\n  ".join(problems[:25]) + (
            f"\n  ... and {len(problems) - 25} more" if len(problems) > 25 else ""
        )
        raise ValueError(f"weights {checkpoint.source} do not match the model:\n  {shown}")
    with torch.no_grad():
        for state, plan in plans:
            if any(".lindiff." not in key for key in plan):
                state.backup_projections()
            for target, tensor in plan.values():
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def _match_tensors(
    role: str, component: str, state: LinearizedState, checkpoint: Checkpoint
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    prefix = component + "."
    available = {
        key[len(prefix) :]: value for key, value in checkpoint.tensors.items() if key.startswith(prefix)
    }
    expected: dict[str, torch.Tensor] = {}
    for name, attn in state.layers.items():
        added = getattr(attn, ADDED_MODULE, None)
        if isinstance(added, nn.Module):
            expected.update(
                {f"{name}.{ADDED_MODULE}.{k}": v for k, v in added.state_dict(keep_vars=True).items()}
            )
    projection_keys = {key for key in available if f".{ADDED_MODULE}." not in key}
    for key in projection_keys:
        layer, _, rest = _split_layer(key, state.layers)
        if layer is not None:
            projection, param_name = rest.rsplit(".", 1)
            expected[key] = getattr(base_linear(state.layers[layer], projection), param_name)

    borrowed = component != role.split(".")[0] and component != role
    problems = [f"{role}: missing {key}" for key in expected if key not in available]
    if not borrowed:
        problems += [f"{role}: unexpected {key}" for key in available if key not in expected]
    plan = {}
    for key, target in expected.items():
        if key in available:
            if tuple(available[key].shape) != tuple(target.shape):
                problems.append(
                    f"{role}: {key} has shape {tuple(available[key].shape)} in the weights, "
                    f"{tuple(target.shape)} in the model"
                )
            else:
                plan[key] = (target, available[key])
    return plan, problems


def _split_layer(key: str, layers: dict[str, Any]) -> tuple[str | None, str, str]:
    for name in layers:
        if key.startswith(name + "."):
            return name, ".", key[len(name) + 1 :]
    return None, "", key


def load_weights(pipe_or_model: Any, source: str | os.PathLike) -> Any:
    """Load trained weights into an already linearized pipeline or denoiser; returns it.

    Args:
        source: a lindiff folder or ``.safetensors`` file (from :func:`save_weights`), a released
            LinFusion checkpoint folder or CLEAR file, or a hub reference (see :func:`read_checkpoint`).

    Raises:
        ValueError: listing every mismatch (method, options, family, missing/unexpected keys, shapes).
    """
    apply_checkpoint(denoisers(pipe_or_model), read_checkpoint(source))
    return pipe_or_model
