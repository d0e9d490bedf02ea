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


class ExponentialAverage:
    """EMA of a module's parameters (decay warms up as ``min(decay, (1 + n) / (10 + n))``)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    def state_dict(self) -> dict:
        return {"steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.shadow = state["shadow"]


def train(
    name: str,
    work_dir: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[int], torch.Tensor],
    steps: int,
    *,
    ema: ExponentialAverage | None = None,
    checkpoint_every: int = 200,
    warmup: int = 0,
    clip: float | None = 1.0,
) -> list[float]:
    """Run ``steps`` optimizer steps of ``step(i) -> loss``, resuming from ``work_dir/checkpoint.pt``.

    A checkpoint (module, optimizer, EMA, step, losses) is written atomically every
    ``checkpoint_every`` steps and when SIGINT/SIGTERM arrives (then the run stops with
    KeyboardInterrupt). Losses go to ``work_dir/log.jsonl``. Returns the loss of every step.
    The learning rate ramps up linearly over ``warmup`` steps, then stays.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "checkpoint.pt"
    start, losses = 0, []
    base_lr = [group["lr"] for group in optimizer.param_groups]  # before a checkpoint overwrites them
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start, losses = state["step"], state["losses"]
        logger.info("%s: resuming at step %d of %d", name, start, steps)
    parameters = [p for p in module.parameters() if p.requires_grad]

    def save(at: int) -> None:
        state = {"module": module.state_dict(), "optimizer": optimizer.state_dict(), "step": at}
        state.update(losses=losses, ema=ema.state_dict() if ema is not None else None)
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
                for group, lr in zip(optimizer.param_groups, base_lr, strict=True):
                    group["lr"] = lr * min(1.0, (i + 1) / warmup) if warmup else lr
                loss = step(i)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(module)
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
