"""Two-phase (LoLCATs-style) distillation: attention transfer, then low-rank recovery.

Chosen by ``DistillConfig.recovery_steps > 0``; :func:`~lindiff.distill.distill` dispatches here.

- Phase 1 (``OUTPUT_DIR/phase1``): only the parameters ``linearize`` added train
  (``trainable="new"``), for ``max_steps``, on the per-layer attention-output loss alone.
- Phase 2 (``OUTPUT_DIR/phase2``): from phase 1's exported weights, only LoRA adapters on the
  converted layers' q/k/v/out projections train (``trainable="lora_only"``), for
  ``recovery_steps`` at ``recovery_learning_rate``, on the diffusion, output and variance losses.
- Its export (LoRA merged into the projections) is copied to ``OUTPUT_DIR/final``.

Each phase is an ordinary :class:`~lindiff.distill.Distiller` run with its own checkpoints and
validation grids; both read the same latent cache. A rerun with ``resume=True`` continues the
phase that was stopped; a finished phase 1 (its ``final/`` written) is not trained again.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from accelerate import PartialState

from ..weights import WEIGHTS_NAME
from .checkpoint import STATE_OPTIONS
from .components import SetupError
from .config import DistillConfig
from .trainer import FINAL_DIR, Callback, Distiller, DistillResult

logger = logging.getLogger(__name__)

PHASE_DIRS = ("phase1", "phase2")


def phase_configs(config: DistillConfig) -> tuple[DistillConfig, DistillConfig]:
    """The single-phase configurations of ``config``'s attention-transfer and recovery phases."""
    if not config.recovery_steps:
        raise ValueError(f"recovery_steps must be > 0 for a two-phase run, got {config.recovery_steps!r}")
    output_dir, cache_dir = Path(config.output_dir), str(config.cache_path)
    common = {"recovery_steps": 0, "recovery_learning_rate": None, "cache_dir": cache_dir}
    transfer = dataclasses.replace(
        config,
        output_dir=output_dir / PHASE_DIRS[0],
        diffusion_weight=0.0,
        output_weight=0.0,
        variance_weight=0.0,
        **common,
    )
    recovery = dataclasses.replace(
        config,
        output_dir=output_dir / PHASE_DIRS[1],
        weights=str(transfer.output_dir / FINAL_DIR / WEIGHTS_NAME),
        trainable="lora_only",
        max_steps=config.recovery_steps,
        learning_rate=config.recovery_learning_rate or config.learning_rate,
        attention_weight=0.0,
        **common,
    )
    return transfer, recovery


def _check_finished(transfer: DistillConfig) -> None:
    """Raise if the finished phase 1 in ``transfer.output_dir`` ran under other options."""
    folder = Path(transfer.output_dir)
    saved = json.loads((folder / "config.json").read_text())
    current = transfer.to_dict()
    changed = [key for key in (*STATE_OPTIONS, "max_steps") if saved.get(key) != current[key]]
    if changed:
        details = ", ".join(f"{key}={current[key]!r} (finished phase: {saved.get(key)!r})" for key in changed)
        raise SetupError(f"cannot resume {folder}: its phase 1 finished under other options: {details}")


def _publish(source: Path, target: Path) -> Path:
    """Copy the folder ``source`` to ``target`` atomically (main process); returns its weights file."""
    state = PartialState()
    if state.is_main_process:
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    state.wait_for_everyone()
    return target / WEIGHTS_NAME


def distill_in_phases(config: DistillConfig, callbacks: Sequence[Callback] = ()) -> DistillResult:
    """Run both phases of ``config`` (see the module docstring).

    Args:
        config: the run's options, with ``recovery_steps > 0``.
        callbacks: passed to each phase's :class:`~lindiff.distill.Distiller` (``step`` counts
            that phase's steps; ``distiller.config.output_dir`` names the phase).

    Returns:
        The result of the whole run: ``step`` counts both phases, ``weights`` is
        ``OUTPUT_DIR/final/lindiff.safetensors`` (``None`` when a signal stopped either phase,
        whose checkpoint a rerun with ``resume=True`` continues from).
    """
    output_dir = Path(config.output_dir)
    transfer, recovery = phase_configs(config)
    if config.resume and Path(recovery.weights).is_file():
        _check_finished(transfer)
        logger.info("phase 1 already finished in %s; going on with phase 2", transfer.output_dir)
        done = transfer.max_steps
    else:
        first = Distiller(transfer, callbacks).train()
        if first.interrupted:
            return dataclasses.replace(first, output_dir=output_dir)
        done = first.step
        gc.collect()  # phase 1's student and optimizer state (reference cycles through accelerate)
    second = Distiller(recovery, callbacks).train()
    if second.interrupted:
        return DistillResult(done + second.step, True, None, output_dir)
    weights = _publish(Path(recovery.output_dir) / FINAL_DIR, output_dir / FINAL_DIR)
    return DistillResult(done + second.step, False, weights, output_dir)
