"""Helpers shared by the benchmark scripts: device names, timing, peak memory, where results are written."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def device_label(device: torch.device, short: bool = False) -> str:
    """The device's name (``"NVIDIA H100 80GB HBM3"``, ``"cpu (2 cores, x86_64)"``); ``short`` for file names."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    if short:
        name = re.sub(r"[^a-z0-9]+", "-", name.lower().split("(")[0]).strip("-")
    return name


def save_results(result: dict, path: str | Path) -> Path:
    """Write ``result`` as JSON; a bare file name goes to ``bench/results/``."""
    path = Path(path)
    if path.parent == Path("."):
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _malloc_trim() -> None:
    """Return free heap pages to the system (glibc only; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakMemory:
    """Peak memory (MiB) above the level at ``start()``: CUDA allocator stats or the CPU resident set.

    On CPU the process's peak resident set is reset through ``/proc/self/clear_refs``, after glibc's
    ``malloc_trim`` hands freed heap memory back to the system: otherwise memory kept from an
    earlier step would serve the next one without showing in its peak.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0.0

    @staticmethod
    def _proc_status(field: str) -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._proc_status("VmRSS")

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return self._proc_status("VmHWM") - self.base


def time_call(step: Callable[[], object], device: torch.device) -> float:
    """Wall time of one ``step()`` in seconds (synchronising CUDA before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_step(step: Callable[[], object], repeats: int, memory: PeakMemory) -> dict:
    """Median wall time of ``repeats`` calls of ``step()`` after one warm-up, and the warm-up's peak memory.

    Runs under ``torch.inference_mode()``; returns ``median_s``, ``times_s``, ``warmup_s`` and ``peak_mib``.
    """
    with torch.inference_mode():
        memory.start()
        warmup = time_call(step, memory.device)
        peak = memory.peak()
        times = [time_call(step, memory.device) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "times_s": times, "warmup_s": warmup, "peak_mib": peak}
