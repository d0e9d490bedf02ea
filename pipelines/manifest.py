"""The manifest of a batch render: one JSON line per finished image, so re-runs skip them.

One process appends to ``manifest.jsonl``; under ``accelerate launch`` each process appends to
its own shard ``manifest.rank{N}.jsonl`` and the main process merges the shards into
``manifest.jsonl`` (one entry per key, ordered by index) at the start and end of every run.
An entry counts as done only while its image file exists. A line cut short by a crash is
ignored (its image is simply rendered again).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write, leftovers

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
SHARD_PATTERN = "manifest.rank*.jsonl"


def _read_entries(path: Path) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: ignoring an incomplete manifest line", path, number)
            continue
        if isinstance(entry, dict) and "key" in entry and "file" in entry:
            entries.append(entry)
    return entries


class Manifest:
    """The finished images of the batch in ``folder``, as seen by process ``process_index``.

    Args:
        folder: the output folder.
        process_index, num_processes: this process and how many render the batch.
    """

    def __init__(self, folder: str | os.PathLike, process_index: int = 0, num_processes: int = 1) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.own = self.path if num_processes == 1 else self.folder / f"manifest.rank{process_index}.jsonl"

    def entries(self) -> dict[str, dict[str, Any]]:
        """Key -> entry of every recorded image (the merged manifest and any shards)."""
        found: dict[str, dict[str, Any]] = {}
        for path in [self.path, *sorted(self.folder.glob(SHARD_PATTERN))]:
            if path.is_file():
                found.update((entry["key"], entry) for entry in _read_entries(path))
        return found

    def done(self) -> set[str]:
        """Keys of the recorded images whose file still exists."""
        return {key for key, entry in self.entries().items() if (self.folder / entry["file"]).is_file()}

    def record(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` (with ``key`` and ``file``) and flush it to disk."""
        with self.own.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def merge(self) -> None:
        """Rewrite ``manifest.jsonl`` atomically with every entry once, by index; drop the shards.

        Only the main process may call this, while no other process writes.
        """
        shards = sorted(self.folder.glob(SHARD_PATTERN))
        entries = sorted(self.entries().values(), key=lambda entry: (entry.get("index", 0), entry["key"]))
        if not entries and not shards:
            return
        lines = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
        atomic_write(self.path, lambda f: f.write(lines.encode("utf-8")))
        for shard in shards:
            shard.unlink()

    def remove_temporary_files(self) -> list[Path]:
        """Delete what atomic writes left behind when a process was killed; returns them.

        Only the main process may call this, before any process renders.
        """
        removed = leftovers(self.folder)
        for path in removed:
            path.unlink()
        return removed
