"""Atomic file writes: a temporary file in the same folder, then ``os.replace``.

A reader (or a re-run after a crash) sees either the old file or the complete new one, never
a partial one. A killed process can leave its temporary file behind; :func:`leftovers` finds
them so the next run can delete them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a new temporary file beside ``path``, sync it, then move it onto ``path``.

    On any error or interrupt the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        with temp.open("xb") as f:  # "x": never clobber; created with the usual umask permissions
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def leftovers(folder: str | os.PathLike) -> list[Path]:
    """Temporary files of :func:`atomic_write` calls in ``folder`` that never finished."""
    return sorted(Path(folder).glob(f".*{TEMP_SUFFIX}"))
