"""Helpers shared by the benchmark scripts: device names and where results are written."""

from __future__ import annotations

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
