"""A fresh accelerate state for every distillation run of a test (shared by the distill tests).

accelerate keeps process-wide singletons; each run builds its own Accelerator. Tiny models run
fastest, and steadily on a busy machine, on one thread (no OpenMP wake-ups).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextmanager
def fresh_accelerate_on_one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    try:
        yield
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    """Import into a test module to give each of its tests a fresh accelerate state."""
    with fresh_accelerate_on_one_thread():
        yield
