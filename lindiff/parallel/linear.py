"""Non-causal linear attention over a sequence that may be split over processes.

Linear attention reduces all keys and values to one state ``[S | z]`` ``(B, H, D, D_v + 1)``.
The state of a whole sequence is the sum of its shards' states, so each process computes the
state of its own tokens (float32, unscaled), the processes all-reduce it (sum) together with
their token counts (for the mean-normalised variants), and each applies the summed state to its
own queries. The result is the single-process one up to float32 summation order; the bytes sent
per layer, ``4 * (B * H * D * (D_v + 1) + 1)``, do not depend on the number of tokens.
"""

from __future__ import annotations

import torch

from lindiff.kernels import linear_attention
from lindiff.kernels.linear_attention import linear_attention_from_state, linear_attention_state

from . import exchange
from .shards import SequenceShard


def linear_attention_sharded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: SequenceShard | None,
    *,
    feature_map: str,
    eps: float,
    kv_scale: float | str,
) -> torch.Tensor:
    """:func:`lindiff.kernels.linear_attention` of ``q, k, v`` ``(B, N, H, D)`` (``v``: ``D_v``)
    over the whole sequence, of which this process holds ``shard`` (``None``: all of it).

    Returns:
        ``(B, N, H, D_v)`` for this process's queries, in the dtype of ``q``.
    """
    if shard is None:
        return linear_attention(q, k, v, feature_map=feature_map, eps=eps, kv_scale=kv_scale)
    state = linear_attention_state(k, v, feature_map=feature_map, kv_scale=1.0)
    count = state.new_full((1,), k.shape[1])
    summed = exchange.all_reduce_sum(torch.cat([state.flatten(), count]), shard)
    scale = 1.0 / summed[-1] if kv_scale == "mean" else float(kv_scale)
    state = summed[:-1].view(state.shape) * scale
    return linear_attention_from_state(q, state, feature_map=feature_map, eps=eps)
