"""Training checkpoints: atomic folders of accelerate state plus the trainable parameters.

``OUTPUT_DIR/checkpoints/step-00000300/`` holds what ``accelerator.save_state`` writes (optimizer,
LR scheduler, gradient scaler, every process's RNG states) with the full model replaced by
``trainable.safetensors`` (only the trainable parameters), and ``progress.json`` (step counters
and the run's configuration). It is written as ``.step-00000300.tmp`` and renamed when complete,
so a run killed while saving leaves the previous checkpoint intact; the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from .student import load_trainable, trainable_state

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
PROGRESS_NAME = "progress.json"
TRAINABLE_NAME = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Options that shape the trainable parameters: a checkpoint resumes only under the same ones.
STATE_OPTIONS = ("method", "method_options", "component", "trainable", "lora_rank", "lora_alpha")
# Options that set data order and noise: resuming under others works but does not reproduce.
ORDER_OPTIONS = ("seed", "batch_size", "gradient_accumulation_steps", "num_processes")


def check_resumable(folder: Path, progress: dict[str, Any], current: dict[str, Any]) -> None:
    """Compare the run options saved in ``progress`` with ``current`` (both with ``num_processes``).

    Raises:
        ValueError: if an option in :data:`STATE_OPTIONS` differs; differences in
            :data:`ORDER_OPTIONS` only log a warning.
    """
    saved = {**progress["config"], "num_processes": progress["num_processes"]}
    changed = [k for k in STATE_OPTIONS if saved.get(k) != current[k]]
    if changed:
        details = ", ".join(f"{k}={current[k]!r} (checkpoint: {saved.get(k)!r})" for k in changed)
        raise ValueError(f"cannot resume from {folder}: {details}")
    changed = [k for k in ORDER_OPTIONS if saved.get(k) != current[k]]
    if changed:
        logger.warning("resuming with changed %s: the run will not reproduce an uninterrupted one", changed)


class CheckpointManager:
    """Saves and restores checkpoints of one run through ``accelerator``.

    Registers save/load hooks on the accelerator so that ``save_state`` stores only the trainable
    parameters of the prepared model (FSDP and DeepSpeed models are saved by accelerate itself).

    Args:
        accelerator: the run's accelerator (the student must be its only prepared model).
        output_dir: the run folder; checkpoints go to ``output_dir/checkpoints``.
        keep: how many checkpoints to keep.
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path, keep: int) -> None:
        self.accelerator = accelerator
        self.folder = Path(output_dir) / CHECKPOINTS_DIR
        self.keep = keep
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _save_hook(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if not weights:  # sharded models: accelerate saved them
            return
        weights.clear()
        if self.accelerator.is_main_process:
            tensors = trainable_state(self.accelerator.unwrap_model(models[0]))
            save_file(
                {k: v.contiguous().cpu() for k, v in tensors.items()},
                os.path.join(output_dir, TRAINABLE_NAME),
            )

    def _load_hook(self, models: list[nn.Module], input_dir: str) -> None:
        if not models:
            return
        model = self.accelerator.unwrap_model(models.pop())
        load_trainable(model, load_file(os.path.join(input_dir, TRAINABLE_NAME)))

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, folder)``, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / PROGRESS_NAME).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def save(self, step: int, progress: dict[str, Any]) -> Path:
        """Write the checkpoint of ``step`` atomically (call on every process); returns its folder."""
        accelerator = self.accelerator
        final = self.folder / f"step-{step:08d}"
        tmp = self.folder / f".step-{step:08d}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / PROGRESS_NAME).write_text(
                json.dumps({"step": step, **progress}, indent=2, default=str) + "\n"
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def load(self, folder: Path, current: dict[str, Any]) -> int:
        """Restore the state saved in ``folder`` after :func:`check_resumable`; returns its step."""
        progress = json.loads((folder / PROGRESS_NAME).read_text())
        check_resumable(folder, progress, current)
        self.accelerator.load_state(str(folder))
        return int(progress["step"])
