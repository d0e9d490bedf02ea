"""SDEdit: the strength of every refining stage, and a scheduler that runs only the tail of its schedule.

An SDEdit stage of strength ``s`` noises its input to ``s`` of the schedule and runs the last
``int(num_inference_steps * s)`` steps. Pipelines without an image-to-image variant in diffusers do
it through their text-to-image pipeline with a scheduler built by :func:`sdedit_scheduler`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch

from .stages import stage_scales

LINFUSION_STRENGTHS = (0.4, 0.3, 0.2, 0.1)
"""SDEdit strengths of the stages at 2x, 4x, 8x and 16x the native side in LinFusion's published chain."""


def default_strengths(sizes: Sequence[tuple[int, int]]) -> list[float]:
    """The default SDEdit strengths of stages 2, 3, ... of a chain of ``sizes`` (from
    :func:`~lindiff.pipelines.stages.plan_stages`, stage 1 first), by each stage's scale.

    A stage gets the strength that LinFusion's chain (:data:`LINFUSION_STRENGTHS`) gives the stage
    at its scale (its side over stage 1's, rounded up to a power of two): 0.4 up to 2x, 0.3 up to
    4x, 0.2 up to 8x and 0.1 above, where a stage only adds detail at the new scale. The larger a
    stage's objects are against the size the model knows, the less noise it gets to redraw them
    with. The ``"auto"`` chain to 8x (stages at 4x and 8x) runs 0.3 then 0.2, to 32x 0.3, 0.2, 0.1,
    0.1; a chain of 2x stages (an int ``stages``) runs LinFusion's 0.4, 0.3, 0.2, 0.1, 0.1, ...
    """
    strengths = []
    for scale in stage_scales(list(sizes)):
        # 7% slack: sizes rounded to the model's multiple may land just above a power of two
        doublings = math.ceil(math.log2(scale) - 0.1)
        strengths.append(LINFUSION_STRENGTHS[min(max(doublings - 1, 0), len(LINFUSION_STRENGTHS) - 1)])
    return strengths


def stage_strengths(
    strength_schedule: Sequence[float] | None, sizes: Sequence[tuple[int, int]]
) -> list[float]:
    """The SDEdit strengths of stages 2, 3, ... of a chain of ``sizes`` (stage 1 first):
    :func:`default_strengths` for ``strength_schedule=None``, else the schedule's first
    ``len(sizes) - 1`` entries.

    Raises:
        ValueError: an entry is not in (0, 1], or a given schedule is too short for the chain.
    """
    num_stages = len(sizes)
    if strength_schedule is None:
        return default_strengths(sizes)
    if isinstance(strength_schedule, (str, bytes)) or not isinstance(strength_schedule, Sequence):
        raise ValueError(
            f"strength_schedule must be None or a sequence of floats in (0, 1], got {strength_schedule!r}"
        )
    bad = [
        s
        for s in strength_schedule
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 < s <= 1
    ]
    if bad:
        raise ValueError(f"strength_schedule entries must be in (0, 1], got {list(strength_schedule)}")
    if len(strength_schedule) < num_stages - 1:
        raise ValueError(
            f"strength_schedule (--strengths of lindiff render) has {len(strength_schedule)} strengths but "
            f"the {num_stages}-stage chain needs {num_stages - 1}; give more strengths, fewer stages, or "
            "none for the default schedule, which fits any chain"
        )
    return [float(s) for s in strength_schedule[: num_stages - 1]]


class SDEditSchedule:
    """Scheduler mixin: ``set_timesteps`` keeps only the last ``strength`` of the schedule.

    Same cut as diffusers' image-to-image pipelines: ``int(num_inference_steps * strength)`` steps.
    ``sigmas`` (DPM-Solver, Euler, flow matching) are cut alongside ``timesteps``. Built per
    scheduler class by :func:`sdedit_scheduler`.
    """

    strength: float = 1.0

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        order = getattr(self, "order", 1)
        steps = len(self.timesteps) // order
        start = (steps - min(int(steps * self.strength), steps)) * order
        self.timesteps = self.timesteps[start:]
        sigmas = getattr(self, "sigmas", None)
        if isinstance(sigmas, torch.Tensor) and len(sigmas) > start:
            self.sigmas = sigmas[start:]


@functools.cache
def _sdedit_class(scheduler_class: type) -> type:
    def set_timesteps(self: Any, *args: Any, **kwargs: Any) -> None:
        SDEditSchedule.set_timesteps(self, *args, **kwargs)

    # diffusers' retrieve_timesteps reads the signature to see which schedules a scheduler takes;
    # each class gets its own function so that signatures of different schedulers never mix.
    set_timesteps.__signature__ = inspect.signature(scheduler_class.set_timesteps)
    name = f"SDEdit{scheduler_class.__name__}"
    return type(name, (SDEditSchedule, scheduler_class), {"set_timesteps": set_timesteps})


def sdedit_scheduler(scheduler: Any) -> Any:
    """A new scheduler of ``scheduler``'s class and config that runs only the SDEdit tail (see :class:`SDEditSchedule`)."""
    return _sdedit_class(type(scheduler)).from_config(scheduler.config)
