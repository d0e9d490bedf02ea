"""lindiff's attention under diffusers' context parallelism: exact, not shard-local.

``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` (or ``ring_degree``)
splits a model's token sequence over ``N`` processes and sets ``_parallel_config`` on each attention
processor. lindiff's processors declare that attribute, turn it into a :class:`SequenceShard`
(:func:`shard_of`) and pass it to the method's mixer in ``Tokens.shard``. The mixers then compute
what one process would:

- linear methods (linfusion, lit, sana) all-reduce their float32 state ``[S | z]``
  (:func:`linear_attention_sharded`): bytes per layer independent of the resolution;
- LiT's depthwise convolution fetches the neighbouring grid rows it needs (:func:`rows_around`);
- methods that cannot yet run sharded raise (:func:`not_supported`) instead of attending over
  their shard alone.

Files: ``shards.py`` (where a rank's tokens sit), ``exchange.py`` (the collectives),
``rows.py`` (grid-row halos), ``linear.py`` (linear attention over shards).
"""

from __future__ import annotations

from .exchange import all_gather, all_reduce_sum, neighbour_tokens
from .linear import linear_attention_sharded
from .rows import RowBlock, rows_around
from .shards import SequenceShard, not_supported, shard_of

__all__ = [
    "RowBlock",
    "SequenceShard",
    "all_gather",
    "all_reduce_sum",
    "linear_attention_sharded",
    "neighbour_tokens",
    "not_supported",
    "rows_around",
    "shard_of",
]
