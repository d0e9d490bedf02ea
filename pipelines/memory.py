"""Memory savers for the duration of one pipeline call, undone when the call ends.

:func:`vae_tiling` switches the VAE to tiled encode/decode; :func:`sequential_halves` runs models on
the two halves of their batch (the classifier-free-guidance halves) in turn; :func:`chunked_feed_forward`
runs every ``FeedForward`` over chunks of tokens. The last two are diffusers hooks
(:class:`~diffusers.hooks.HookRegistry`), removed when the block ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import FeedForward
from diffusers.utils import BaseOutput
from torch import nn

logger = logging.getLogger(__name__)

_SEQUENTIAL_HOOK = "lindiff_sequential_batch"
_FEED_FORWARD_HOOK = "lindiff_chunked_feed_forward"


class _SequentialHalvesHook(ModelHook):
    """Runs a model on the two halves of its batch in turn (the CFG halves) and concatenates the outputs.

    Every tensor argument whose first dimension is the batch of the main input is split; the rest
    (timesteps of shape ``()``, position ids) is passed to both calls.
    """

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        main = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        batch = main.shape[0] if isinstance(main, torch.Tensor) else 0
        if batch < 2 or batch % 2:
            return forward(*args, **kwargs)
        outputs = [
            forward(*_take(args, part, batch), **_take(kwargs, part, batch))
            for part in (slice(0, batch // 2), slice(batch // 2, batch))
        ]
        return _concat(outputs)


def _take(value: Any, part: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[part] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(_take(item, part, batch) for item in value)
    if isinstance(value, dict):
        return {key: _take(item, part, batch) for key, item in value.items()}
    return value


def _concat(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, BaseOutput):
        return type(first)(**{key: _concat([out[key] for out in outputs]) for key in first})
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(list(items)) for items in zip(*outputs, strict=True))
    if isinstance(first, dict):
        return {key: _concat([out[key] for out in outputs]) for key in first}
    return first


class _ChunkedFeedForwardHook(ModelHook):
    """Runs a token-wise ``FeedForward`` on ``(B, N, C)`` hidden states ``chunk_size`` tokens at a time."""

    def __init__(self, chunk_size: int) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    def new_forward(
        self, module: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        forward = self.fn_ref.original_forward
        if hidden_states.ndim != 3 or hidden_states.shape[1] <= self.chunk_size:
            return forward(hidden_states, *args, **kwargs)
        chunks = hidden_states.split(self.chunk_size, dim=1)
        return torch.cat([forward(chunk, *args, **kwargs) for chunk in chunks], dim=1)


@contextlib.contextmanager
def _hooked(modules: Sequence[nn.Module], make_hook: Callable[[], ModelHook], name: str) -> Iterator[None]:
    """Registers ``make_hook()`` on every module for the duration of the block."""
    registries = []
    try:
        for module in modules:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(make_hook(), name)
            registries.append(registry)
        yield
    finally:
        for registry in registries:
            registry.remove_hook(name, recurse=False)


def sequential_halves(models: Sequence[nn.Module]) -> contextlib.AbstractContextManager[None]:
    """Every model of ``models`` runs the two halves of its batch in turn while the block runs."""
    return _hooked(models, _SequentialHalvesHook, _SEQUENTIAL_HOOK)


def chunked_feed_forward(
    models: Sequence[nn.Module], chunk_size: int
) -> contextlib.AbstractContextManager[None]:
    """Every ``FeedForward`` inside ``models`` runs ``chunk_size`` tokens at a time while the block runs.

    Logs (INFO) when ``models`` have no ``FeedForward``: the chunking then changes nothing.
    """
    modules = [module for model in models for module in model.modules() if isinstance(module, FeedForward)]
    if not modules:
        logger.info(
            "%s has no FeedForward modules; feed_forward_chunk_size changes nothing",
            " + ".join(type(model).__name__ for model in models),
        )
    return _hooked(modules, lambda: _ChunkedFeedForwardHook(chunk_size), _FEED_FORWARD_HOOK)


@contextlib.contextmanager
def vae_tiling(vae: nn.Module, enabled: bool) -> Iterator[None]:
    """Tiled (or untiled) VAE encode/decode for the duration of the block; the previous setting afterwards."""
    previous = getattr(vae, "use_tiling", None)
    if previous is None:
        if enabled:
            raise ValueError(
                f"tile_vae=True needs a VAE with tiling (enable_tiling); {type(vae).__name__} has none"
            )
        yield
        return
    vae.enable_tiling() if enabled else vae.disable_tiling()
    try:
        yield
    finally:
        vae.use_tiling = previous
