"""Prompt files of ``lindiff render --prompts``: plain text or JSON Lines, with line-numbered errors.

Text (any suffix but ``.jsonl``/``.ndjson``): one prompt per line; blank lines and lines starting
with ``#`` are skipped.

JSON Lines (``.jsonl``/``.ndjson``): one object per line with ``prompt`` and optionally
``negative`` (or ``negative_prompt``), ``seed``, ``size`` (``512``, ``"768x512"`` as WxH, or
``[768, 512]``), ``width`` and ``height`` (these two override ``size``)::

    {"prompt": "a red star above a blue circle", "seed": 7, "size": "96x64"}

Each row's ``index`` counts the rows, malformed ones included, so fixing or skipping a line
never renumbers the rows after it (file names and resume keys stay stable).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

OnError = Literal["abort", "skip"]
ON_ERROR = ("abort", "skip")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ROW_KEYS = ("prompt", "negative", "negative_prompt", "seed", "size", "width", "height")


@dataclass(frozen=True)
class PromptRow:
    """One prompt of a prompt file; ``None`` fields take the command's defaults."""

    index: int
    line: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Problem:
    """A malformed line: where it is and what is wrong."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class PromptFileError(ValueError):
    """A prompt file has malformed lines (all of them listed in :attr:`problems`)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        listed = "; ".join(map(str, problems[:5])) + ("; ..." if len(problems) > 5 else "")
        super().__init__(
            f"{len(problems)} malformed line(s): {listed} (fix them, or pass --on-error skip to skip them)"
        )


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def parse_size(value: Any) -> tuple[int, int]:
    """``512``, ``"512"``, ``"768x512"`` (width x height) or ``[768, 512]`` as ``(width, height)``."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must be N or WxH (like 512 or 768x512), got {value!r}")
        value = int(parts[0]) if len(parts) == 1 else [int(p) for p in parts]
    if isinstance(value, list):
        if len(value) != 2:
            raise ValueError(f"size as a list must be [width, height], got {value!r}")
        return _positive_int(value[0], "width"), _positive_int(value[1], "height")
    size = _positive_int(value, "size")
    return size, size


def _row_from_json(text: str, index: int, line: int) -> PromptRow:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(ROW_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ROW_KEYS)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    negative = data.get("negative", data.get("negative_prompt"))
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"negative must be a string, got {negative!r}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    width, height = parse_size(data["size"]) if "size" in data else (None, None)
    if "width" in data:
        width = _positive_int(data["width"], "width")
    if "height" in data:
        height = _positive_int(data["height"], "height")
    return PromptRow(index, line, prompt.strip(), negative, seed, width, height)


def read_prompts(
    path: str | os.PathLike, on_error: OnError = "abort"
) -> tuple[list[PromptRow], list[Problem]]:
    """The rows of prompt file ``path`` and the malformed lines that were skipped.

    Args:
        path: a text or JSON Lines prompt file (see the module docstring).
        on_error: ``"abort"`` raises on any malformed line; ``"skip"`` leaves them out and
            returns them as problems.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PromptFileError: malformed lines and ``on_error="abort"``.
        ValueError: ``on_error`` is invalid, or the file holds no prompts at all.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text: {error}") from error
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    rows: list[PromptRow] = []
    problems: list[Problem] = []
    index = 0
    for number, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or (not jsonl and text.startswith("#")):
            continue
        try:
            rows.append(_row_from_json(text, index, number) if jsonl else PromptRow(index, number, text))
        except ValueError as error:
            problems.append(Problem(str(path), number, str(error)))
        index += 1
    if problems and on_error == "abort":
        raise PromptFileError(problems)
    if not rows:
        raise ValueError(f"prompt file {str(path)!r} holds no usable prompts")
    return rows, problems
