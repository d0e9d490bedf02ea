"""The model card (``README.md``) that `save_weights` writes beside the weights.

YAML front matter for the Hugging Face Hub (``library_name: lindiff``, ``base_model`` when the
base model came from the hub, ``tags``), then Markdown: how to load the weights, what they hold
(method, options, converted layers per component) and, when given, a training summary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .denoisers import denoisers

CARD_NAME = "README.md"
_HUB_CACHE_FOLDER = re.compile(r"^models--(.+)$")


def _hub_id(name_or_path: Any) -> str | None:
    """``name_or_path`` as a hub repo id: itself if it is one (and no local folder), the repo of a
    hub cache folder (``.../models--owner--name/snapshots/<hash>/unet``), else ``None``."""
    if not isinstance(name_or_path, str) or not name_or_path:
        return None
    for part in Path(name_or_path).parts:
        match = _HUB_CACHE_FOLDER.match(part)
        if match:
            return match.group(1).replace("--", "/")
    if Path(name_or_path).exists():
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def base_model_of(pipe_or_model: Any) -> str | None:
    """The hub id the pipeline, or else its first denoiser, was loaded from; ``None`` for local
    folders and models built in code."""
    candidates = [getattr(pipe_or_model, "name_or_path", None)]
    candidates += [getattr(model, "config", {}).get("_name_or_path") for _, model in denoisers(pipe_or_model)]
    return next((hub_id for hub_id in map(_hub_id, candidates) if hub_id), None)


def _cell(value: Any) -> str:
    """One Markdown table cell: numbers compact, lists comma-joined, mappings as inline JSON."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)) and all(not isinstance(v, (Mapping, list, tuple)) for v in value):
        text = ", ".join(_cell(v) for v in value)
    elif isinstance(value, (Mapping, list, tuple)):
        text = "`" + json.dumps(value, default=str) + "`"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _summary(values: Mapping[str, Any], title: str) -> list[str]:
    """A ``## title`` section: a key/value table of the simple values, then a ``###`` table per
    mapping value (deeper mappings inline as JSON)."""
    simple = [[key, value] for key, value in values.items() if not isinstance(value, Mapping)]
    parts = [f"## {title}"]
    if simple:
        parts.append(_table(simple, ["", "value"]))
    for key, value in values.items():
        if isinstance(value, Mapping):
            parts += [f"### {key}", _table([[k, v] for k, v in value.items()], ["", "value"])]
    return parts


def render_model_card(
    config: Mapping[str, Any], base_model: str | None = None, training: Mapping[str, Any] | None = None
) -> str:
    """The card for weights saved with lindiff ``config`` (the ``lindiff.json`` contents).

    Args:
        config: ``method``, ``options``, ``lindiff_version`` and ``components``: role ->
            ``{"family", "class", "layers", "projection_layers"}``.
        base_model: hub id of the model the weights belong to, if known.
        training: a summary of how the weights were trained (steps, data, losses, config): any
            mapping of simple values, lists and mappings.

    Returns:
        ``README.md`` text, front matter included, ready for ``huggingface_hub.upload_folder``.
    """
    method = config["method"]
    data = ModelCardData(library_name="lindiff", base_model=base_model, tags=["lindiff", method, "diffusers"])
    load = base_model or "<base model>"
    rows = [
        [role, info["class"], info["family"], info["layers"], info.get("projection_layers", 0)]
        for role, info in config["components"].items()
    ]
    options = (
        "Method options (`linearize` takes them from the weights):\n\n"
        + _table([[key, value] for key, value in config["options"].items()], ["option", "value"])
        if config["options"]
        else "The method has no options."
    )
    parts = [
        f"# {method} attention for {base_model or 'a diffusion model'}",
        f"lindiff weights: the `{method}` attention that replaces the attention of the layers it "
        "converts. They hold only what lindiff added and the projections that training changed; "
        "the rest comes from the base model.",
        "## Use",
        "```python\nimport lindiff\nfrom diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{load}")\n'
        f'lindiff.linearize(pipe, "{method}", weights="<this folder or its hub id>")\n```',
        "## Contents",
        _table(rows, ["component", "model", "family", "converted layers", "layers with saved q/k/v/out"]),
        options,
        f"Saved with lindiff {config['lindiff_version']}.",
    ]
    if training:
        parts += _summary(training, "Training")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n"


def write_model_card(
    folder: Path, config: Mapping[str, Any], pipe_or_model: Any, training: Mapping[str, Any] | None
) -> Path:
    """Write :func:`render_model_card` to ``folder / README.md`` (replacing one there); returns its path."""
    path = folder / CARD_NAME
    path.write_text(render_model_card(config, base_model_of(pipe_or_model), training), encoding="utf-8")
    return path
