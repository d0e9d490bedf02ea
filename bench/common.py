"""Helpers shared by the benchmark scripts: device names, timing, where results are written.

Peak memory is measured by lindiff's own meter (:class:`lindiff.pipelines.peak_memory.PeakMemory`),
the one the renderer and the demo use.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lindiff.pipelines.peak_memory import PeakMemory

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


def results_path(path: str | Path) -> Path:
    """``path``, or ``bench/results/<path>`` for a bare file name."""
    path = Path(path)
    return RESULTS / path if path.parent == Path(".") else path


def save_results(result: dict, path: str | Path) -> Path:
    """Write ``result`` as JSON; a bare file name goes to ``bench/results/``."""
    path = results_path(path)
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
        peak = memory.added_bytes() / 2**20
        times = [time_call(step, memory.device) for _ in range(repeats)]
    return {"median_s": statistics.median(times), "times_s": times, "warmup_s": warmup, "peak_mib": peak}


def sage_attention() -> tuple[Callable | None, str]:
    """SageAttention as a drop-in for ``F.scaled_dot_product_attention``, or ``None``, and a note.

    The function takes SDPA's ``(B, H, N, D)`` arguments; calls with a mask, dropout or another
    option set (``enable_gqa=True``) go to SDPA.
    """
    try:
        import sageattention
        from sageattention import sageattn
    except Exception as error:  # ImportError, or a CUDA extension that does not load
        return (
            None,
            f"SageAttention baseline skipped: sageattention does not import ({type(error).__name__}: {error})",
        )
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or dropout_p or any(kwargs.values()):
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return sageattn(query, key, value, tensor_layout="HND", is_causal=is_causal, sm_scale=scale)

    return attention, f"sageattention {getattr(sageattention, '__version__', '(version unknown)')}"


@contextlib.contextmanager
def sdpa_replaced(attention: Callable) -> Iterator[None]:
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` is ``attention``.

    For a baseline only (diffusers' processors call SDPA through that name): not thread-safe.
    """
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
