"""What `linearize` records on a converted denoiser, so `restore` and weight I/O can undo or save it."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters.base import ModelAdapter
from .attention.base import AttentionMethod, AttentionModule
from .grid import TokenGrid

STATE_ATTRIBUTE = "_lindiff_state"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def base_linear(attn: AttentionModule, projection: str) -> nn.Linear:
    """The ``nn.Linear`` behind ``attn.<projection>``, looking through a PEFT LoRA wrapper."""
    module = attn.get_submodule(projection)
    return getattr(module, "base_layer", module)


def projections_of(attn: AttentionModule) -> tuple[str, ...]:
    """The :data:`PROJECTIONS` a layer has (FLUX single-stream layers have no ``to_out``)."""
    return tuple(p for p in PROJECTIONS if p != "to_out.0" or getattr(attn, "to_out", None) is not None)


FINGERPRINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes a projection may be cast to after `linearize` and still be recognised as the teacher's."""

_BLOCK = 1 << 16
_CHUNK = 16 * _BLOCK
"""Elements hashed per step: bounds the int64 temporaries, and keeps them in cache on CPU."""
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SPLITMIX = tuple(c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
"""SplitMix64's increment and multipliers, as signed int64 (each is above ``2**63``)."""


def _odd_hashes(start: int, stop: int, device: torch.device) -> torch.Tensor:
    """SplitMix64 of the integers ``start .. stop - 1``, lowest bit set: ``(stop - start,)`` int64.

    Integer ops only (int64 products wrap around), so every device gives the same numbers.
    """
    x = torch.arange(start, stop, dtype=torch.int64, device=device) * _SPLITMIX[0]
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _SPLITMIX[1]
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _SPLITMIX[2]
    return x ^ ((x >> 31) & ((1 << 33) - 1)) | 1


@functools.lru_cache(maxsize=8)
def _block_weights(device: torch.device) -> torch.Tensor:
    return _odd_hashes(0, _BLOCK, device)


def fingerprint(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A 64-bit hash of the raw bits of ``tensor`` (cast to ``dtype``, if given), computed on its
    device; a 0-d int64 tensor.

    The bits ``x`` (flattened, read as integers of the element's width, sign-extended to int64,
    zero-padded to whole blocks) are cut into ``m`` blocks of ``B = 2**16`` elements and hashed
    with the element count ``n`` as
    ``h = w_m * n + sum_b w_b * sum_j r_j * x[b * B + j]  (mod 2**64)``, with fixed odd
    pseudo-random ``r`` and ``w`` (:func:`_odd_hashes`). Integer sums are exact in any order, so
    ``h`` is the same on every device. Changing one element always changes ``h`` (an odd factor
    times a nonzero difference below ``2**64`` is never 0 mod ``2**64``); other changes go
    unnoticed with probability about ``2**-64``.

    Cost: one pass over the tensor, in chunks of :data:`_CHUNK` elements (an 8 MiB int64
    temporary at most; about the time of a copy of the tensor on CPU); no copy is kept.
    """
    flat = tensor.detach().reshape(-1)
    r = _block_weights(flat.device)
    sums = []
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK].to(dtype or flat.dtype)
        bits = part.view(_INT_OF_WIDTH[part.element_size()]).to(torch.int64)
        if bits.numel() % _BLOCK:
            bits = torch.nn.functional.pad(bits, (0, -bits.numel() % _BLOCK))
        sums.append(bits.view(-1, _BLOCK).mul_(r).sum(1))
    sums.append(torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device))
    block_sums = torch.cat(sums)
    return (block_sums * _odd_hashes(_BLOCK, _BLOCK + block_sums.numel(), flat.device)).sum()


def teacher_fingerprints(param: torch.Tensor) -> dict[torch.dtype, int] | None:
    """:func:`fingerprint` of ``param`` in its dtype and, if floating, cast to each of
    :data:`FINGERPRINT_DTYPES`; ``None`` on the meta device (no values to hash)."""
    if param.is_meta:
        return None
    dtypes = {param.dtype, *FINGERPRINT_DTYPES} if param.is_floating_point() else {param.dtype}
    hashes = {dtype: fingerprint(param, dtype) for dtype in dtypes}
    return {dtype: int(h) for dtype, h in hashes.items()}


@dataclass
class LinearizedState:
    """Everything `linearize` changed on one denoiser.

    Attributes:
        method: the attention method instance (its options included).
        adapter: the model-family adapter.
        grid: the TokenGrid shared by all converted layers.
        layers: converted attention layers by module path.
        original_processors: the processor each converted layer had before conversion.
        hook_id: id of the grid-recording pre-forward hook on the denoiser.
        processors: the method's processor installed on each converted layer.
        projection_backup: CPU copies of the teacher's q/k/v/out parameters by
            :meth:`projection_parameters` key, kept once something in lindiff is about to overwrite
            them (loaded checkpoints with projections, distillation that trains them,
            ``linearize(..., keep_teacher=True)``), so `restore` can give back the original model
            exactly. Parameters already changed when the copy is taken are left out of it.
        fingerprints: :func:`teacher_fingerprints` of each projection parameter at `linearize`:
            how save and restore tell which projections changed since, however they were changed,
            without a copy of them.
    """

    method: AttentionMethod
    adapter: ModelAdapter
    grid: TokenGrid
    layers: dict[str, AttentionModule]
    original_processors: dict[str, Any]
    hook_id: int
    processors: dict[str, Any] = field(default_factory=dict)
    projection_backup: dict[str, torch.Tensor] | None = field(default=None)
    fingerprints: dict[str, dict[torch.dtype, int] | None] = field(default_factory=dict)

    def projection_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``("{layer}.{projection}.{name}", parameter)`` for the q/k/v/out parameters of every
        converted layer, looking through PEFT LoRA wrappers (``name`` is ``weight`` or ``bias``)."""
        for name, attn in self.layers.items():
            for projection in projections_of(attn):
                for param_name, param in base_linear(attn, projection).named_parameters():
                    yield f"{name}.{projection}.{param_name}", param

    def record_teacher(self) -> None:
        """Fingerprint the projections as they are now, as the teacher's (`linearize` calls this)."""
        self.fingerprints = {key: teacher_fingerprints(p) for key, p in self.projection_parameters()}

    def changed_projections(self) -> list[str]:
        """Keys of the projection parameters whose bits differ from the teacher's at `linearize`.

        A parameter since cast to one of :data:`FINGERPRINT_DTYPES` is unchanged if its bits equal
        the teacher's cast to that dtype; in another dtype, it counts as changed. Parameters on
        the meta device count as unchanged (nothing to save or give back). Costs one
        :func:`fingerprint` pass over the projections, on their device.
        """
        checks = []
        for key, param in self.projection_parameters():
            if not param.is_meta:
                expected = (self.fingerprints.get(key) or {}).get(param.dtype)
                checks.append((key, expected, None if expected is None else fingerprint(param)))
        return [key for key, expected, found in checks if expected is None or int(found) != expected]

    def unrestorable_projections(self) -> list[str]:
        """The :meth:`changed_projections` that :attr:`projection_backup` holds no teacher copy of."""
        backup = self.projection_backup or {}
        return [key for key in self.changed_projections() if key not in backup]

    def backup_projections(self) -> None:
        """Keep CPU copies of the projections that are still the teacher's, before lindiff changes them.

        Does nothing if a backup exists (so a second checkpoint load keeps the teacher's).
        Parameters already changed are left out: their teacher values are gone, and `restore`
        says so instead of bringing back the changed ones.
        """
        if self.projection_backup is not None:
            return
        changed = set(self.changed_projections())
        self.projection_backup = {
            key: param.detach().to("cpu", copy=True)
            for key, param in self.projection_parameters()
            if key not in changed
        }

    def reinstall_processors(self) -> dict[str, type]:
        """Put the method's processor back on converted layers where something replaced it.

        diffusers swaps processors wholesale (``enable_attention_slicing``,
        ``set_default_attn_processor``, ``set_attn_processor``), which would silently bring back
        softmax attention on converted layers; only `restore` should do that. Layers whose
        processor is of the installed class (IP-Adapter loading re-creates them with ``cls()``)
        are left alone.

        Returns:
            The replaced layers' names and the processor class found on each.
        """
        replaced = {
            name: type(self.layers[name].processor)
            for name, processor in self.processors.items()
            if type(self.layers[name].processor) is not type(processor)
        }
        for name in replaced:
            self.layers[name].set_processor(self.processors[name])
        return replaced


def get_state(model: nn.Module) -> LinearizedState | None:
    return getattr(model, STATE_ATTRIBUTE, None)
