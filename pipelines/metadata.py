"""Generation parameters stored inside the PNGs lindiff writes (and, through
:mod:`~lindiff.pipelines.video`, its MP4s: :func:`read_params` reads both).

Each PNG carries two text chunks: ``lindiff`` (the parameters as JSON, read back by
:func:`read_params` and ``lindiff render --reproduce``) and ``parameters`` (the same as plain
text, for people and for other tools that show PNG text chunks).

    params = generation_params(prompt="a red star", seed=42, steps=20, guidance=7.5, width=128,
                               height=128, model=None, method="linfusion", weights=None)
    save_png(image, "out/00000-a-red-star-s42.png", params)
    read_params("out/00000-a-red-star-s42.png")["seed"]  # 42
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..version import __version__
from .atomic import atomic_write
from .loading import resolve_weights
from .video import read_video_params

VIDEO_SUFFIX = ".mp4"
"""File suffix of the videos lindiff writes (see :mod:`~lindiff.pipelines.video`)."""

METADATA_KEY = "lindiff"
"""PNG text chunk holding the parameters as JSON."""

TEXT_KEY = "parameters"
"""PNG text chunk holding the parameters as human-readable text."""

HASH_LENGTH = 12
"""Hex digits kept of a weights file's SHA-256."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


@functools.lru_cache(maxsize=16)
def _digest(path: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    # ``stamp`` (name, size, mtime of every file) only keys the cache, so edited files are re-hashed.
    sha = hashlib.sha256()
    for file in _files_of(path):
        sha.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        with file.open("rb") as f:
            for block in iter(functools.partial(f.read, 1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:HASH_LENGTH]


def weights_sha256(weights: str | os.PathLike | None) -> str | None:
    """Short SHA-256 of a local weights file, or of a folder's weight and config files.

    Returns ``None`` for ``None`` and for anything that is not a local path (a hub id).
    """
    if weights is None or not Path(weights).exists():
        return None
    path = Path(weights).resolve()
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _files_of(path))
    return _digest(path, stamp)


def generation_params(
    *,
    prompt: str,
    negative_prompt: str | None = None,
    seed: int,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    model: str | None,
    method: str | None,
    weights: str | None,
    highres: bool = False,
    stages: int | str | None = None,
    strengths: Sequence[float] | None = None,
    frames: int | None = None,
    fps: float | None = None,
) -> dict[str, Any]:
    """The parameters recorded with an image or a video, as a JSON-ready dict.

    Args:
        prompt, negative_prompt, seed, steps, guidance, width, height: the generation call.
        model: the model folder or hub id as given; ``None`` for the embedded default model.
        method: the attention method; ``None`` or ``"softmax"`` for the unconverted model.
        weights: the weights as given; ``None`` for none (or the default model's own).
        highres: whether :class:`~lindiff.pipelines.highres.HighResPipeline` rendered it.
        stages: its ``stages`` argument (``None`` when ``highres`` is false).
        strengths: its ``strength_schedule``; ``None`` for the default one (and when ``highres`` is
            false).
        frames, fps: a video's frame count and frame rate, recorded only for videos (``frames`` not
            ``None``).

    ``weights_sha256`` is the short hash of the weights actually used (see
    :func:`~lindiff.pipelines.loading.resolve_weights`), ``None`` without local weights.
    """
    params = {
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "seed": int(seed),
        "steps": int(steps),
        "guidance": float(guidance),
        "width": int(width),
        "height": int(height),
        "model": model,
        "method": method or "softmax",
        "weights": weights,
        "weights_sha256": weights_sha256(resolve_weights(model, method, weights)),
        "highres": bool(highres),
        "stages": stages if highres else None,
        "strengths": [float(s) for s in strengths] if highres and strengths is not None else None,
        "lindiff_version": __version__,
    }
    if frames is not None:
        params.update(frames=int(frames), fps=float(fps) if fps is not None else None)
    return params


def format_params(params: dict[str, Any]) -> str:
    """``params`` as text: the prompt, the negative prompt, then ``Key: value`` pairs."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = {
        "Steps": params.get("steps"),
        "Guidance": params.get("guidance"),
        "Seed": params.get("seed"),
        "Size": f"{params.get('width')}x{params.get('height')}",
        "Frames": params.get("frames"),
        "FPS": params.get("fps"),
        "Model": params.get("model") or "embedded tiny-shapes",
        "Method": params.get("method"),
        "Weights": params.get("weights"),
        "Weights hash": params.get("weights_sha256"),
        "High-res stages": params.get("stages") if params.get("highres") else None,
        "High-res strengths": " ".join(map(str, params["strengths"])) if params.get("strengths") else None,
        "lindiff": params.get("lindiff_version"),
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, params: dict[str, Any]) -> Path:
    """Write ``image`` as a PNG carrying ``params``, atomically; returns the path.

    The image goes to a temporary file in the same folder, which then replaces ``path``, so
    ``path`` is either absent or complete, never partial.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(params, ensure_ascii=True))
    info.add_text(TEXT_KEY, format_params(params))  # falls back to iTXt for non-Latin-1 prompts
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def read_params(path: str | os.PathLike) -> dict[str, Any]:
    """The parameters :func:`save_png` stored in the PNG at ``path``, or
    :func:`~lindiff.pipelines.video.save_video` in the MP4 at ``path`` (a ``.mp4`` name).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not an image (or video), or carries no lindiff parameters.
        MissingVideoWriter: an MP4 without imageio-ffmpeg installed.
    """
    if Path(path).suffix.lower() == VIDEO_SUFFIX:
        return read_video_params(path)
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(METADATA_KEY)
    except UnidentifiedImageError as error:
        raise ValueError(f"{path} is not an image") from error
    if text is None:
        raise ValueError(f"{path} has no lindiff metadata (no {METADATA_KEY!r} PNG text chunk)")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the {METADATA_KEY!r} PNG text chunk is not valid JSON: {error}") from error
    if not isinstance(params, dict):
        raise ValueError(f"{path}: the {METADATA_KEY!r} PNG text chunk is not a JSON object")
    return params
