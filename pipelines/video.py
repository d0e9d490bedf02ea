"""Videos lindiff writes: an H.264 MP4 carrying the generation parameters, beside a poster PNG.

    save_video(frames, "out/00000-a-red-star-s42.mp4", params, fps=16)
    read_video_params("out/00000-a-red-star-s42.mp4")["seed"]  # 42

The writer is imageio-ffmpeg (the ffmpeg it bundles, libx264, yuv420p, which every player shows),
installed with the optional extra ``lindiff[video]`` together with imageio, which reads the frames
back. The parameters travel in the MP4's ``comment`` tag as the same JSON as a PNG's ``lindiff``
chunk, and as text in its ``description`` tag (see :mod:`~lindiff.pipelines.metadata`); ffmpeg's
``ffmetadata`` output reads them back. H.264 is lossy: a poster PNG of the first frame keeps it exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic import TEMP_SUFFIX

INSTALL_HINT = "pip install 'lindiff[video]'"
"""How to install the video writer."""
COMMENT_TAG = "comment"
"""MP4 tag holding the parameters as JSON."""
DESCRIPTION_TAG = "description"
"""MP4 tag holding the parameters as human-readable text."""
CRF = 17
"""libx264's constant rate factor: visually lossless for generated video, files stay small."""


class MissingVideoWriter(ImportError):
    """The optional video writer (imageio-ffmpeg) is not installed."""


def _writer() -> Any:
    """The ``imageio_ffmpeg`` module.

    Raises:
        MissingVideoWriter: imageio-ffmpeg is not installed (the message says how to install it).
    """
    try:
        import imageio_ffmpeg
    except ImportError as error:
        raise MissingVideoWriter(
            f"writing and reading MP4 videos needs imageio-ffmpeg, which is not installed; install "
            f"lindiff's video extra: {INSTALL_HINT}"
        ) from error
    return imageio_ffmpeg


def ffmpeg() -> str:
    """The path of imageio-ffmpeg's ffmpeg executable (a :class:`MissingVideoWriter` without it)."""
    return _writer().get_ffmpeg_exe()


def _as_array(frame: Image.Image | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame))


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block ends without error (named
    as :func:`~lindiff.pipelines.atomic.atomic_write` names its files, so a killed run's leftover is
    found and removed the same way)."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def save_video(
    frames: Sequence[Image.Image | np.ndarray],
    path: str | os.PathLike,
    params: dict[str, Any],
    fps: float,
) -> Path:
    """Write ``frames`` (PIL images or ``(H, W, 3)`` uint8 arrays, all one size) as an H.264 MP4
    carrying ``params``, atomically; returns the path.

    Raises:
        ValueError: no frames, frames of different sizes, a side that is odd, or ``fps <= 0``.
        MissingVideoWriter: imageio-ffmpeg is not installed.
    """
    from .metadata import format_params

    arrays = [_as_array(frame) for frame in frames]
    if not arrays:
        raise ValueError("frames is empty; a video needs at least one frame")
    shapes = sorted({a.shape for a in arrays})
    height, width = arrays[0].shape[:2]
    if len(shapes) > 1 or arrays[0].shape != (height, width, 3):
        raise ValueError(f"frames must be RGB and all one size; got shapes {shapes}")
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs even sides; got {width}x{height}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    writer_module = _writer()
    path = Path(path)
    metadata = {COMMENT_TAG: json.dumps(params, ensure_ascii=True), DESCRIPTION_TAG: format_params(params)}
    options = ["-crf", str(CRF), "-f", "mp4"]  # the temporary name has no .mp4 to pick the muxer by
    for key, value in metadata.items():
        options += ["-metadata", f"{key}={value}"]
    with _temporary(path) as temp:
        writer = writer_module.write_frames(
            str(temp),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=2,
            output_params=options,
            ffmpeg_log_level="error",
        )
        writer.send(None)
        try:
            for array in arrays:
                writer.send(array.tobytes())
        finally:
            writer.close()
    return path


def _ffmetadata(text: str) -> dict[str, str]:
    """The ``key=value`` tags of ffmpeg's ``ffmetadata`` output (``=``, ``;``, ``#``, ``\\`` and
    newlines in values are escaped with a backslash; ``;``/``#`` lines are comments)."""
    tags: dict[str, str] = {}
    fields: list[list[str]] = [[]]  # the key, then the value once a "=" is seen
    chars = iter(text + "\n")
    for char in chars:
        if char == "\\":
            fields[-1].append(next(chars, ""))
        elif char == "=" and len(fields) == 1:
            fields.append([])
        elif char == "\n":
            key = "".join(fields[0])
            if len(fields) == 2 and not key.startswith((";", "#")):
                tags[key] = "".join(fields[1])
            fields = [[]]
        else:
            fields[-1].append(char)
    return tags


def read_video_params(path: str | os.PathLike) -> dict[str, Any]:
    """The parameters :func:`save_video` stored in the MP4 at ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a video ffmpeg reads, or carries no lindiff parameters.
        MissingVideoWriter: imageio-ffmpeg is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video: {path}")
    command = [ffmpeg(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"]
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", check=False)
    if result.returncode != 0:
        raise ValueError(f"{path} is not a video ffmpeg can read: {result.stderr.strip()}")
    text = _ffmetadata(result.stdout).get(COMMENT_TAG)
    if text is None:
        raise ValueError(f"{path} has no lindiff metadata (no {COMMENT_TAG!r} tag)")
    try:
        params = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the {COMMENT_TAG!r} tag is not lindiff's JSON: {error}") from error
    if not isinstance(params, dict):
        raise ValueError(f"{path}: the {COMMENT_TAG!r} tag is not a JSON object")
    return params
