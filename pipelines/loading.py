"""Loading a pipeline for rendering: model, attention method, weights, device and dtype; valid sizes.

pipe = load_pipeline()                                    # embedded tiny model, LinFusion weights
pipe = load_pipeline(video=True)                          # its video model (AnimateDiff), the same weights
pipe = load_pipeline("runwayml/stable-diffusion-v1-5", weights="Yuanshi/LinFusion-1-5")
check_size(pipe, 1001, 1024)  # ValueError: height=1001 is not a positive multiple of 8 ...: 1000 or 1008
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import assets
from ..denoisers import pipeline_adapter

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
"""Names accepted for ``dtype``."""

SOFTMAX = "softmax"
"""Method name meaning "keep the model's own attention"."""

DEFAULT_WEIGHTS = "tiny-shapes-linfusion"
"""Asset used as ``weights`` for the embedded model with method ``linfusion``."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (or their ``float*`` names, or a torch dtype) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {device!r}") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use --device cpu")
    return resolved


def resolve_weights(model: str | None, method: str | None, weights: str | None) -> str | None:
    """The weights used: ``weights``, or the embedded model's own for ``model=None, method="linfusion"``."""
    if weights is None and model is None and method == "linfusion":
        return assets.path(DEFAULT_WEIGHTS)
    return weights


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep in name.replace("/", "")


def _from_pretrained(cls: Any, source: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source)`` with a clear ``ValueError`` for a missing folder or hub id."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{what}={source!r} is a file; expected a diffusers folder or a hub id")
        source = str(path)
    elif _looks_local(source):
        raise ValueError(f"{what}={source!r}: no such folder (and not a hub id of the form 'owner/name')")
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:  # hub: not found, offline, gated; folder: incomplete
        raise ValueError(f"{what}={source!r} could not be loaded: {error}") from error


def load_pipeline(
    model: str | None = None,
    *,
    method: str | None = "linfusion",
    weights: str | None = None,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    controlnet: str | None = None,
    offload: bool = False,
    video: bool = False,
) -> Any:
    """A diffusers pipeline ready to render, converted to ``method`` with ``weights``.

    Args:
        model: a diffusers pipeline folder or hub id; ``None`` for the embedded tiny model
            (:func:`lindiff.assets.path`).
        method: a name from :func:`lindiff.methods`, or ``None``/``"softmax"`` to keep the
            model's own attention.
        weights: weights for ``method`` (see :func:`lindiff.linearize`); ``None`` keeps the
            fresh initialisation, except for the embedded model with ``linfusion``, which
            uses its shipped student.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"``; ``None`` keeps the saved dtype.
        controlnet: a ControlNet folder or hub id; the pipeline becomes the model family's
            ControlNet pipeline (``AutoPipelineForText2Image.from_pipe``).
        offload: move each model to ``device`` only while it runs
            (``enable_model_cpu_offload``), to fit big models on small GPUs.
        video: with ``model=None``, the embedded video model
            (:func:`lindiff.assets.motion_pipeline`: tiny-shapes and its motion adapter, whose
            spatial layers take the image student's weights unchanged) instead of the image one.

    Raises:
        ValueError: an argument is invalid, or the model cannot be found or loaded.
        FileNotFoundError: ``model=None`` but the embedded model is not installed.
    """
    from diffusers import AutoPipelineForText2Image, ControlNetModel, DiffusionPipeline

    import lindiff

    torch_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    if method is not None and method != SOFTMAX and method not in lindiff.methods():
        raise ValueError(f"method must be one of {', '.join([SOFTMAX, *lindiff.methods()])}; got {method!r}")
    if weights is not None and method in (None, SOFTMAX):
        raise ValueError(f"weights={weights!r} need a linear attention method; got method={method!r}")
    weights = resolve_weights(model, method, weights)
    kwargs: dict[str, Any] = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    if model is None and video:
        pipe = assets.motion_pipeline(**kwargs)
    else:
        pipe = _from_pretrained(DiffusionPipeline, model or assets.path(), "model", **kwargs)
    if controlnet is not None:
        # from_pretrained keeps the folder's pipeline class; from_pipe switches to its ControlNet variant.
        net = _from_pretrained(ControlNetModel, controlnet, "controlnet", **kwargs)
        try:
            pipe = AutoPipelineForText2Image.from_pipe(pipe, controlnet=net)
        except ValueError as error:
            raise ValueError(
                f"controlnet={controlnet!r} cannot be used with {type(pipe).__name__}: {error}"
            ) from error
    if method not in (None, SOFTMAX):
        lindiff.linearize(pipe, method=method, weights=weights)
    if offload:
        pipe.enable_model_cpu_offload(device=target)
    else:
        pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def valid_sizes(pipe: Any, near: int) -> tuple[int, ...]:
    """The sizes ``pipe`` can render nearest to ``near``: the multiples of its family's size multiple
    (:meth:`~lindiff.adapters.ModelAdapter.size_multiple`) just below and above it (one of them when
    ``near`` is valid or below the first)."""
    multiple = pipeline_adapter(pipe).size_multiple(pipe)
    below = near // multiple * multiple
    if below == near:
        return (near,)
    return tuple(s for s in (below, below + multiple) if s > 0)


def check_size(pipe: Any, height: int, width: int) -> None:
    """Raise a ``ValueError`` naming the nearest valid sizes if ``pipe`` cannot render ``height x width``."""
    multiple = pipeline_adapter(pipe).size_multiple(pipe)
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % multiple:
            nearest = " or ".join(map(str, valid_sizes(pipe, max(size, 1))))
            raise ValueError(
                f"{name}={size} is not a positive multiple of {multiple}, which this model needs; "
                f"nearest valid sizes: {nearest}"
            )
