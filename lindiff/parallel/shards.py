"""Where this process's tokens sit when diffusers' context parallelism splits a sequence.

``model.enable_parallelism(config=ContextParallelConfig(...))`` splits the sequence inputs named
in the model's ``_cp_plan`` over the flattened ring x Ulysses mesh: into equal chunks (diffusers
asserts that the length divides), or with ``ulysses_anything`` / ``ring_anything`` by
``torch.tensor_split`` (the first ``N % P`` ranks hold one token more). A :class:`SequenceShard`
records that split for the attention processors, which hand it to the methods' mixers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class SequenceShard:
    """This process's part of sequences split over a process group.

    Attributes:
        group: the process group of the split (diffusers' flattened context-parallel mesh).
        rank: this process's index in ``group``.
        world_size: number of processes in ``group``.
        uneven: ``True`` when lengths are split by ``torch.tensor_split`` (any length; diffusers'
            ``ulysses_anything`` / ``ring_anything``), ``False`` for equal chunks.
    """

    group: Any
    rank: int
    world_size: int
    uneven: bool = False

    def sizes(self, total: int) -> list[int]:
        """Tokens each rank holds of a sequence of ``total`` tokens, in rank order.

        Raises:
            ValueError: if the split is even and ``world_size`` does not divide ``total``.
        """
        if not self.uneven and total % self.world_size:
            raise ValueError(
                f"context parallelism over {self.world_size} processes splits sequences into equal parts, "
                f"but this one has {total} tokens; choose a size whose token count divides, or set "
                "ulysses_anything=True / ring_anything=True in diffusers' ContextParallelConfig"
            )
        base, extra = divmod(total, self.world_size)
        return [base + (rank < extra) for rank in range(self.world_size)]

    def parts(self, total: int) -> list[slice]:
        """Positions ``[start, stop)`` of each rank's tokens in a sequence of ``total`` tokens."""
        bounds = itertools.accumulate(self.sizes(total), initial=0)
        return [slice(start, stop) for start, stop in itertools.pairwise(bounds)]

    def part(self, total: int) -> slice:
        """Positions ``[start, stop)`` of this rank's tokens in a sequence of ``total`` tokens."""
        return self.parts(total)[self.rank]


def shard_of(parallel_config: Any) -> SequenceShard | None:
    """The sequence shard of diffusers' ``ParallelConfig`` (what ``enable_parallelism`` sets on
    each processor's ``_parallel_config``), or ``None`` without context parallelism."""
    context = getattr(parallel_config, "context_parallel_config", None)
    if context is None:
        return None
    group = context._flattened_mesh.get_group()
    return SequenceShard(
        group=group,
        rank=dist.get_rank(group),
        world_size=dist.get_world_size(group),
        uneven=bool(context.ulysses_anything or context.ring_anything),
    )


def not_supported(method: str) -> NotImplementedError:
    """The error of a method that cannot yet compute exactly on a sharded sequence."""
    return NotImplementedError(
        f"method {method!r} cannot run under context parallelism yet (lindiff issue 32): its attention "
        "would see only this process's shard of the tokens and give a different result. Call the model "
        "without enable_parallelism(), or linearize with a method that supports it (linfusion, lit, sana)"
    )
