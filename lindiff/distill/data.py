"""Latent caches on disk and the deterministic order in which training reads them.

A cache folder holds one ``{index:06d}.safetensors`` per source item (``latents`` ``(C, H, W)``
plus the conditioning tensors of its prompt) and an ``index.json`` written last, which lists the
sample files (items that could not be read have none). It is built in
``<name>.partial`` (samples written atomically, so an interrupted build continues where it
stopped) and renamed to ``<name>`` when complete; a complete folder is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

INDEX_NAME = "index.json"


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of everything that determines a cache's content."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(module: nn.Module, values: int = 64) -> str:
    """Hash of ``module``'s tensor names, shapes, dtypes and first ``values`` elements of each.

    Cheap even for billions of parameters, and tells apart any two differently trained or
    initialised models; used as the model identity of an object given in Python.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().flatten()[:values].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def pipeline_identity(pipe: Any) -> dict[str, Any]:
    """Class, source and weight fingerprints of a pipeline's model components."""
    components = {
        name: {"class": type(part).__name__, "weights": fingerprint(part)}
        for name, part in sorted(pipe.components.items())
        if isinstance(part, nn.Module)
    }
    return {
        "pipeline": type(pipe).__name__,
        "name_or_path": str(getattr(pipe, "name_or_path", "") or ""),
        "components": components,
    }


class CacheWriter:
    """Builds a cache folder: samples written atomically into ``<folder>.partial``, then renamed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.partial = folder.with_name(folder.name + ".partial")

    def start(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)

    def _sample_path(self, index: int) -> Path:
        return self.partial / f"{index:06d}.safetensors"

    def has(self, index: int) -> bool:
        return self._sample_path(index).is_file()

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self._sample_path(index)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def written(self, count: int) -> list[int]:
        """Which of the items ``0 .. count-1`` have a sample file."""
        return [index for index in range(count) if self.has(index)]

    def finish(self, index: dict[str, Any], samples: list[int]) -> None:
        """Write ``index.json`` (``index`` plus the list of ``samples``) and publish the folder."""
        index = {**index, "samples": [self._sample_path(i).name for i in samples]}
        (self.partial / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.partial, self.folder)


class LatentCache(Dataset):
    """A complete cache folder as a dataset of ``{"latents": (C, H, W), <conditioning>: ...}``.

    Attributes:
        folder: the cache folder.
        index: the content of its ``index.json`` (``samples``, ``source``, ``skipped``, ...).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.is_complete(self.folder):
            raise ValueError(f"{self.folder} is not a complete latent cache (no {INDEX_NAME})")
        self.index: dict[str, Any] = json.loads((self.folder / INDEX_NAME).read_text())
        if not self.index["samples"]:
            raise ValueError(f"latent cache {self.folder} holds no samples")

    @staticmethod
    def is_complete(folder: Path) -> bool:
        return (folder / INDEX_NAME).is_file()

    def __len__(self) -> int:
        return len(self.index["samples"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.folder / self.index["samples"][index]))


class DataOrder:
    """Which cache samples each process reads at each micro-step, as a pure function of the step.

    The sample stream is the concatenation of per-epoch permutations (epoch ``e`` shuffled by a
    generator seeded with ``(seed, e)``); micro-step ``m`` takes the next
    ``batch_size * num_processes`` positions of it and process ``r`` its ``r``-th slice. The
    position of a resumed run is therefore just its micro-step count.
    """

    def __init__(self, size: int, batch_size: int, num_processes: int, process_index: int, seed: int) -> None:
        self.size = size
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            kept = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            self._permutations = {**kept, epoch: torch.randperm(self.size, generator=generator)}
        return self._permutations[epoch]

    def indices(self, micro_step: int) -> list[int]:
        """Sample indices of this process at ``micro_step``."""
        start = (micro_step * self.num_processes + self.process_index) * self.batch_size
        return [
            int(self._permutation(position // self.size)[position % self.size])
            for position in range(start, start + self.batch_size)
        ]

    def batches(self, start_micro_step: int) -> Iterator[list[int]]:
        """Endless batches from ``start_micro_step`` on (a ``DataLoader`` ``batch_sampler``)."""
        micro_step = start_micro_step
        while True:
            yield self.indices(micro_step)
            micro_step += 1
