"""lindiff's attention under diffusers' context parallelism: exact, not shard-local.

``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` (or ``ring_degree``)
splits a model's token sequence over ``N`` processes and sets ``_parallel_config`` on each attention
processor. lindiff's processors declare that attribute, turn it into a :class:`SequenceShard`
(:func:`shard_of`) and pass it to the method's mixer in ``Tokens.shard``. The mixers then compute
what one process would:

- linear methods (linfusion, lit, sana) all-reduce their float32 state ``[S | z]``
  (:func:`linear_attention_sharded`): bytes per layer independent of the resolution;
- LiT's depthwise convolution fetches the neighbouring grid rows it needs (:func:`rows_around`);
- CLEAR's window attention fetches the keys within its window's reach in rows and frames
  (:func:`local_attention_sharded`, :func:`box_around`), gathers the text tokens
  (:func:`gather_sequence`) and merges the text queries' attention over every process's keys
  (:func:`attention_over_shards`);
- methods that cannot yet run sharded raise (:func:`not_supported`) instead of attending over
  their shard alone.

Files: ``shards.py`` (where a rank's tokens sit), ``exchange.py`` (the collectives),
``rows.py`` (grid-row halos), ``linear.py`` (linear attention over shards), ``softmax.py``
(local and replicated-query softmax attention over shards), ``pipeline.py``
(:func:`enable_context_parallel`: a whole pipeline split over the processes of a launch).
"""

from __future__ import annotations

from .exchange import all_gather, all_reduce_max, all_reduce_sum, gather_sequence, neighbour_tokens
from .linear import linear_attention_sharded
from .pipeline import context_parallel_degree, enable_context_parallel
from .rows import GridBox, RowBlock, box_around, rows_around
from .shards import SequenceShard, not_supported, shard_of
from .softmax import attention_over_shards, local_attention_sharded

__all__ = [
    "GridBox",
    "RowBlock",
    "SequenceShard",
    "all_gather",
    "all_reduce_max",
    "all_reduce_sum",
    "attention_over_shards",
    "box_around",
    "context_parallel_degree",
    "enable_context_parallel",
    "gather_sequence",
    "linear_attention_sharded",
    "local_attention_sharded",
    "neighbour_tokens",
    "not_supported",
    "rows_around",
    "shard_of",
]
