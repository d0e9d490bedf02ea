"""What a run reports: a tqdm bar with the loss terms and ETA, ``metrics.jsonl``, and trackers.

The bar and the JSONL file belong to the main process; accelerate trackers (TensorBoard, W&B)
get the same metrics when installed and asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, is_wandb_available
from tqdm.auto import tqdm

METRICS_NAME = "metrics.jsonl"
PROJECT_NAME = "lindiff-distill"


def trackers(log_with: str) -> list[str] | None:
    """The accelerate trackers for ``log_with`` (``"auto"``: TensorBoard when installed)."""
    if log_with == "none":
        return None
    if log_with == "auto":
        return ["tensorboard"] if is_tensorboard_available() else None
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[log_with]()
    if not available:
        raise ValueError(f"log_with={log_with!r} but {log_with} is not installed; use 'auto' or 'none'")
    return [log_with]


class RunLog:
    """Per-step metrics of one run in ``output_dir/metrics.jsonl``, the trackers and a progress bar.

    Args:
        accelerator: the run's accelerator (created with ``log_with=trackers(...)``).
        output_dir: the run folder.
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_NAME
        self.bar: tqdm | None = None

    def start(self, step: int, total: int, config: dict[str, Any]) -> None:
        """Open the bar at ``step`` of ``total`` and drop metrics logged after ``step`` (a killed run
        may have logged steps that the resumed run redoes)."""
        main = self.accelerator.is_main_process
        if main and self.path.is_file():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))
        flat = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        self.accelerator.init_trackers(PROJECT_NAME, config=flat)
        self.bar = tqdm(
            total=total, initial=step, desc="distill", disable=not self.accelerator.is_local_main_process
        )

    def write(self, step: int, metrics: dict[str, float], shown: tuple[str, ...]) -> None:
        """Record ``metrics`` of ``step``; the bar shows the ``shown`` ones."""
        if self.accelerator.is_main_process:
            with open(self.path, "a") as log:
                log.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in shown if k in metrics})
            self.bar.update(1)

    def close(self) -> None:
        """Close the bar and finish the trackers (the process group stays up for the caller)."""
        if self.bar is not None:
            self.bar.close()
        for tracker in self.accelerator.trackers:
            tracker.finish()
