"""A small resumable training loop shared by the asset build stages."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def train(
    name: str,
    work_dir: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[int], torch.Tensor],
    steps: int,
    *,
    checkpoint_every: int = 200,
    warmup: int = 0,
    cooldown: int = 0,
    clip: float | None = 1.0,
) -> list[float]:
    """Run ``steps`` optimizer steps of ``step(i) -> loss``, resuming from ``work_dir/checkpoint.pt``.

    A checkpoint (module, optimizer, step, losses) is written atomically every
    ``checkpoint_every`` steps and when SIGINT/SIGTERM arrives (then the run stops with
    KeyboardInterrupt). Losses go to ``work_dir/log.jsonl``. Returns the loss of every step.
    The learning rate ramps up linearly over ``warmup`` steps, stays, and over the last
    ``cooldown`` steps falls linearly towards zero (a warmup-stable-decay schedule).
    """
    if warmup < 0 or not 0 <= cooldown <= steps:
        raise ValueError(f"need warmup >= 0 and 0 <= cooldown <= steps={steps}; got {warmup}, {cooldown}")
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "checkpoint.pt"
    start, losses = 0, []
    base_lr = [group["lr"] for group in optimizer.param_groups]  # before a checkpoint overwrites them
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], state["losses"]
        logger.info("%s: resuming at step %d of %d", name, start, steps)
    parameters = [p for p in module.parameters() if p.requires_grad]

    def save(at: int) -> None:
        state = {"module": module.state_dict(), "optimizer": optimizer.state_dict(), "step": at}
        state.update(losses=losses)
        torch.save(state, work_dir / "checkpoint.tmp")
        os.replace(work_dir / "checkpoint.tmp", checkpoint)

    stop = {"signal": None}

    def on_signal(signum: int, frame: object) -> None:
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.perf_counter()
    try:
        with open(work_dir / "log.jsonl", "a", encoding="utf-8") as log:
            bar = tqdm(range(start, steps), desc=name, initial=start, total=steps, mininterval=5.0)
            for i in bar:
                factor = _schedule(i, steps, warmup, cooldown)
                for group, lr in zip(optimizer.param_groups, base_lr, strict=True):
                    group["lr"] = lr * factor
                loss = step(i)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if (i + 1) % 25 == 0:
                    recent = sum(losses[-25:]) / 25
                    bar.set_postfix(loss=f"{recent:.4f}")
                    log.write(
                        json.dumps({"step": i + 1, "loss": recent, "seconds": time.perf_counter() - started})
                        + "\n"
                    )
                    log.flush()
                if (i + 1) % checkpoint_every == 0 or i + 1 == steps or stop["signal"] is not None:
                    save(i + 1)
                if stop["signal"] is not None:
                    raise KeyboardInterrupt(
                        f"{name}: stopped by signal {stop['signal']} at step {i + 1}; run again to resume"
                    )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return losses


def _schedule(i: int, steps: int, warmup: int, cooldown: int) -> float:
    """Learning-rate factor of step ``i``: linear warm-up, constant, linear decay over the last ``cooldown``."""
    warming = (i + 1) / warmup if i < warmup else 1.0
    cooling = (steps - i) / (cooldown + 1) if i >= steps - cooldown else 1.0
    return min(warming, cooling)
