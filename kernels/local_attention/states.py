"""Merging partial attention results through their log-sum-exp.

Softmax attention over a union of disjoint key sets is the log-sum-exp-weighted mean of the
attentions over each set. With ``return_lse=True`` every part of a sharded computation (key
ranges on different GPUs, window keys and global keys computed apart) can be reduced exactly.
"""

from __future__ import annotations

import torch


def merge_attention_states(
    outputs: list[torch.Tensor] | tuple[torch.Tensor, ...],
    lses: list[torch.Tensor] | tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attentions of the same queries over disjoint key sets.

    Args:
        outputs: tensors of one shape ``(..., D_v)``, e.g. ``(B, N, H, D_v)``.
        lses: their natural-log log-sum-exps, shape ``outputs[i].shape[:-1]``; ``-inf`` marks a
            query that saw no key in that part (its output is ignored).

    Returns:
        ``(output, lse)`` of the attention over all the key sets; the output in the dtype of
        ``outputs[0]``, the log-sum-exp in float32. A query with ``-inf`` in every part gets a
        zero output and ``-inf``.
    """
    if len(outputs) != len(lses) or not outputs:
        raise ValueError(f"need as many outputs as lses (at least one), got {len(outputs)} and {len(lses)}")
    for i, (o, lse) in enumerate(zip(outputs, lses, strict=True)):
        if o.shape[:-1] != lse.shape or o.shape != outputs[0].shape:
            raise ValueError(
                f"part {i}: output {tuple(o.shape)} and lse {tuple(lse.shape)} must match "
                f"output 0 {tuple(outputs[0].shape)} without its last dim"
            )
    stacked = torch.stack([lse.float() for lse in lses])
    total = torch.logsumexp(stacked, dim=0)
    # A query that saw no key anywhere keeps lse -inf and gets a zero output.
    weights = torch.exp(stacked - total.masked_fill(torch.isneginf(total), 0.0))
    merged = sum(
        w.unsqueeze(-1) * o.float().masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
        for w, o, lse in zip(weights, outputs, stacked, strict=True)
    )
    return merged.to(outputs[0].dtype), total
