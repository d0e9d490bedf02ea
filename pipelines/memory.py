"""Memory savers for the duration of one pipeline call, undone when the call ends.

:func:`vae_tiling` switches the VAE to tiled encode/decode (:func:`vae_tile_size` says when it
must, and in which tiles); :func:`sequential_halves` runs models on the two halves of their batch (the
classifier-free-guidance halves) in turn; :func:`chunked_feed_forward` runs every ``FeedForward``
over chunks of tokens. The last two are diffusers hooks
(:class:`~diffusers.hooks.HookRegistry`), removed when the block ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import FeedForward
from diffusers.utils import BaseOutput
from torch import nn

logger = logging.getLogger(__name__)

VAE_ACTIVATIONS = 4
"""Full-resolution activations of the VAE's widest full- or half-resolution block that
:func:`untiled_vae_bytes` counts as alive at once (input, normalised, convolved, residual)."""

VAE_MEMORY_SHARE = 0.5
"""Share of the free memory an untiled VAE pass may take before :func:`vae_tile_size` tiles."""

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


def untiled_vae_bytes(vae: nn.Module, batch: int, height: int, width: int) -> int | None:
    """Rough peak bytes of an untiled encode or decode of ``batch`` images of ``height x width`` px.

    Counts :data:`VAE_ACTIVATIONS` tensors of the widest of the VAE's first two blocks at full
    resolution (the decoder up-samples the second block's channels to full size before its last
    convolution); ``None`` for a VAE whose config names no block widths.
    """
    config = getattr(vae, "config", {})
    widths = config.get("block_out_channels") or config.get("decoder_block_out_channels")
    if not widths:
        return None
    element = next(vae.parameters()).element_size()
    return VAE_ACTIVATIONS * max(widths[:2]) * batch * height * width * element


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device``: CUDA's free memory, or the host's available memory (from psutil
    where it is installed, else ``/proc/meminfo``); ``None`` if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        pass
    else:
        return psutil.virtual_memory().available
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def vae_tile_size(
    vae: nn.Module, batch: int, height: int, width: int, device: torch.device | str
) -> int | None:
    """The side (px) of the tiles a VAE pass over ``batch`` images of ``height x width`` px should
    use, or ``None`` to run it untiled (always ``None`` for a VAE that cannot tile).

    It tiles when an untiled pass would take more than :data:`VAE_MEMORY_SHARE` of ``device``'s
    free memory (or when the free memory or the VAE's widths are unknown), in tiles as large as
    the share allows: every tile is normalised on its own, so small tiles shift colours and
    latents (the 128 px tiles of a small VAE). A VAE whose tile size cannot be set (not
    ``AutoencoderKL``-like) tiles at its own size.
    """
    if getattr(vae, "use_tiling", None) is None:
        return None
    needed = untiled_vae_bytes(vae, batch, height, width)
    free = free_memory(device)
    if needed is not None and free is not None and needed <= VAE_MEMORY_SHARE * free:
        return None
    config = getattr(vae, "config", {})
    if not hasattr(vae, "tile_sample_min_size"):
        return int(config.get("sample_size") or max(height, width))
    widths = config.get("block_out_channels") or (0,) * 4
    # diffusers' tiles overlap by a quarter and put their rows together assuming the quarter is
    # a whole number of latent pixels: a side of 4 * factor * k gives an image of the right size.
    step = 4 * 2 ** (len(widths) - 1)
    smallest = max(step, int(config.get("sample_size") or step) // step * step)
    if needed is None or free is None:
        return smallest
    # Activations grow with the area: the largest square tile that fits the share.
    fits = int(max(height, width) * (VAE_MEMORY_SHARE * free / needed) ** 0.5)
    return max(smallest, fits // step * step)


def vae_needs_tiling(vae: nn.Module, batch: int, height: int, width: int, device: torch.device | str) -> bool:
    """Whether :func:`vae_tile_size` tiles a VAE pass over ``batch`` images of ``height x width`` px."""
    return vae_tile_size(vae, batch, height, width, device) is not None


@contextlib.contextmanager
def vae_tiling(vae: nn.Module, enabled: bool, tile_size: int | None = None) -> Iterator[None]:
    """Tiled (or untiled) VAE encode/decode for the duration of the block, in tiles of ``tile_size``
    px where given (an ``AutoencoderKL``-like VAE; ``None``: its own size); the previous settings
    afterwards."""
    previous = getattr(vae, "use_tiling", None)
    if previous is None:
        if enabled:
            raise ValueError(
                f"tile_vae=True needs a VAE with tiling (enable_tiling); {type(vae).__name__} has none"
            )
        yield
        return
    sizes = {
        name: getattr(vae, name)
        for name in ("tile_sample_min_size", "tile_latent_min_size")
        if hasattr(vae, name)
    }
    vae.enable_tiling() if enabled else vae.disable_tiling()
    if enabled and tile_size is not None and len(sizes) == 2:
        factor = sizes["tile_sample_min_size"] // max(1, sizes["tile_latent_min_size"])
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile_size, tile_size // factor
    try:
        yield
    finally:
        vae.use_tiling = previous
        for name, value in sizes.items():
            setattr(vae, name, value)
