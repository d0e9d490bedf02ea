"""What one run costs: wall time, time inside self-attention, peak memory; estimates for other sizes.

meter = RunMeter(pipe, device)
with meter.measure():
    pipe(prompt, callback_on_step_end=on_step_end)  # on_step_end calls meter.step()
meter.stats.wall_s, meter.stats.attention_share, meter.stats.peak_bytes
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lindiff.adapters import adapter_for
from lindiff.denoisers import denoisers
from lindiff.grid import TokenGrid
from lindiff.pipelines.memory import free_memory
from lindiff.pipelines.peak_memory import PeakMemory


@dataclass(frozen=True)
class RunStats:
    """Measurements of one finished (or cancelled) run.

    Attributes:
        wall_s: seconds from the call to the decoded image.
        attention_s: seconds spent inside the denoisers' self-attention layers.
        step_s: median seconds per denoising step (``wall_s / steps`` with fewer than two steps).
        peak_bytes: the most memory the run held above what was in use when it started (the CUDA
            allocator on GPU, the process's resident set on CPU; see
            :class:`~lindiff.pipelines.peak_memory.PeakMemory`).
        steps: denoising steps executed.
    """

    wall_s: float
    attention_s: float
    step_s: float
    peak_bytes: int
    steps: int

    @property
    def attention_share(self) -> float:
        """Fraction of the denoising time spent in self-attention."""
        denoising = self.step_s * self.steps
        return min(1.0, self.attention_s / denoising) if denoising > 0 else 0.0


def self_attention_modules(pipe: Any) -> list[nn.Module]:
    """The self-attention layers of every denoiser of ``pipe`` (UNet/transformer and ControlNets)."""
    modules: list[nn.Module] = []
    for _, model in denoisers(pipe):
        modules.extend(layer.module for layer in adapter_for(model).layers(model, TokenGrid()))
    return modules


class _AttentionClock:
    """Forward hooks that add up the time spent inside some modules (CUDA events on GPU)."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._started: list[Any] = []
        self._handles = [m.register_forward_pre_hook(self._enter) for m in modules]
        self._handles += [m.register_forward_hook(self._exit) for m in modules]

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._started.append(event)
        else:
            self._started.append(time.perf_counter())

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        start = self._started.pop()
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((start, end))
        else:
            self.seconds += time.perf_counter() - start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._events:
            torch.cuda.synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000


class RunMeter:
    """Measures one run of ``pipe``; call :meth:`step` from the pipeline's step callback."""

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe = pipe
        self.device = device
        self._stats: RunStats | None = None
        self._step_times: list[float] = []

    @property
    def stats(self) -> RunStats:
        """The measurements, once :meth:`measure` has exited."""
        if self._stats is None:
            raise RuntimeError("stats are known only after the measure() block")
        return self._stats

    def step(self) -> None:
        """Mark the end of a denoising step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._step_times.append(time.perf_counter())

    @contextmanager
    def measure(self) -> Iterator[RunMeter]:
        """Measure the block; :attr:`stats` is set when it exits, also when it raises."""
        clock = _AttentionClock(self_attention_modules(self.pipe), self.device)
        memory = PeakMemory(self.device)
        memory.start()
        start = time.perf_counter()
        try:
            yield self
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - start
            clock.close()
            steps = len(self._step_times)
            intervals = [b - a for a, b in itertools.pairwise(self._step_times)]
            step_s = statistics.median(intervals) if intervals else wall / max(steps, 1)
            self._stats = RunStats(
                wall_s=wall,
                attention_s=clock.seconds,
                step_s=step_s,
                peak_bytes=memory.added_bytes(),
                steps=steps,
            )


@dataclass(frozen=True)
class RunRecord:
    """A finished run, as the estimator and the time-vs-resolution plot see it."""

    method: str
    width: int
    height: int
    steps: int
    stats: RunStats
    quadratic: bool
    """Whether the run's self-attention was softmax (cost grows with the square of the pixels)."""

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class Estimate:
    seconds: float
    bytes: int


def estimate(records: list[RunRecord], method: str, width: int, height: int, steps: int) -> Estimate | None:
    """Time and peak memory of a run, scaled from the nearest-sized run of ``method`` so far.

    Per-step time is split by the measured attention share: the rest grows with the pixel count,
    the attention part with its square for softmax and linearly otherwise. Memory grows with the
    pixel count to the power fitted between the two nearest runs (1 with a single run).
    ``None`` before any run of ``method``.
    """
    same = sorted(
        (r for r in records if r.method == method and r.stats.steps > 0),
        key=lambda r: abs(math.log(r.pixels / (width * height))),
    )
    if not same:
        return None
    base = same[0]
    ratio = width * height / base.pixels
    share = base.stats.attention_share
    step_s = base.stats.step_s * ((1 - share) * ratio + share * ratio ** (2 if base.quadratic else 1))
    overhead_s = max(0.0, base.stats.wall_s - base.stats.step_s * base.stats.steps) * ratio
    exponent = 1.0
    other = next((r for r in same[1:] if r.pixels != base.pixels and r.stats.peak_bytes > 0), None)
    if other is not None and base.stats.peak_bytes > 0:
        fitted = math.log(other.stats.peak_bytes / base.stats.peak_bytes) / math.log(
            other.pixels / base.pixels
        )
        exponent = min(2.0, max(1.0, fitted))
    return Estimate(seconds=overhead_s + steps * step_s, bytes=int(base.stats.peak_bytes * ratio**exponent))


def memory_budget(device: torch.device) -> int:
    """Bytes a run may use on ``device``: free CUDA memory, or 80% of the available RAM on CPU."""
    if device.type == "cuda":
        return int(free_memory(device) * 0.9)
    return int(free_memory("cpu") * 0.8)
