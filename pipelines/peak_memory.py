"""How much memory a run takes: one meter for the renderer, the demo and the benchmarks.

    meter = PeakMemory(device)
    meter.start()
    pipe(prompt)
    meter.peak_bytes(), meter.added_bytes()   # absolute peak, and peak above the start

On CUDA it reads the caching allocator's statistics. On the CPU it reads the process's resident
set: Linux keeps its high-water mark (``VmHWM``), which :meth:`PeakMemory.start` resets through
``/proc/self/clear_refs`` after glibc's ``malloc_trim`` hands freed heap back to the system (so
memory kept from an earlier run cannot serve this one unseen). Where that is not possible the
meter reports the process's peak since it started (``getrusage``), and says so once at INFO.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK_RSS = "5"
"""What ``clear_refs`` takes to reset the peak resident set size (Linux 4.0 and later)."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_free_heap() -> None:
    """Return freed heap pages to the system (glibc's ``malloc_trim``; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{_STATUS} has no {field} field")
    return int(match.group(1)) * 1024


@functools.cache
def _warn_lifetime_peak() -> None:
    logger.info(
        "the peak resident set cannot be reset here (no writable %s); CPU peak memory is the "
        "process's peak since it started",
        _CLEAR_REFS,
    )


def _reset_cpu_peak() -> int:
    """Reset the resident-set high-water mark; returns the resident set now (bytes)."""
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK_RSS)
        return _status_bytes("VmRSS")
    except OSError:
        _warn_lifetime_peak()
        return _lifetime_peak()


def _cpu_peak() -> int:
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return _lifetime_peak()


def _lifetime_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of ``device`` between :meth:`start` and the readings (bytes).

    :meth:`peak_bytes` is the highest amount in use (CUDA memory allocated, or the process's
    resident set), :meth:`added_bytes` that peak minus what was in use at :meth:`start`.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.base_bytes = 0

    def start(self) -> None:
        """Reset the peak to what is in use now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
        else:
            release_free_heap()
            self.base_bytes = _reset_cpu_peak()

    def peak_bytes(self) -> int:
        """The most memory in use since :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _cpu_peak()

    def added_bytes(self) -> int:
        """The peak above what was in use at :meth:`start` (never negative)."""
        return max(0, self.peak_bytes() - self.base_bytes)
