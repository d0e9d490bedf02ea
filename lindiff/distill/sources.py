"""The two data sources, each turned once into a latent cache (see :mod:`lindiff.distill.data`).

- Prompts: the teacher pipeline samples latents for each prompt with fixed seeds.
- An image folder: images with a ``.txt`` caption beside each or a ``metadata.jsonl``
  (``{"file_name": ..., "text": ...}`` per line), resized and center-cropped to the training
  size and encoded by the VAE. Images that cannot be decoded are skipped and counted.

Several processes split the work by item index and write into the same cache folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..adapters import ModelAdapter
from .data import CacheWriter, LatentCache, cache_key

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_NAME = "metadata.jsonl"
CACHE_FORMAT = 1


def read_prompts(prompts: str | os.PathLike | list[str] | tuple[str, ...]) -> list[str]:
    """Prompts from a text file (one per line, blank lines ignored) or a list of strings."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"prompts={str(prompts)!r} is not a file (expected one prompt per line)")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
    found = [p.strip() for p in prompts if p.strip()]
    if not found:
        raise ValueError("prompts is empty: give at least one non-empty prompt")
    return found


def find_captioned_images(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """Every image under ``folder`` (sorted) with its caption.

    Raises:
        ValueError: no images, an unreadable ``metadata.jsonl`` line, or images without a caption
            (the first few are listed).
    """
    root = Path(folder)
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"image_folder={str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    captions: dict[Path, str] = {}
    metadata = root / METADATA_NAME
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions[(root / entry["file_name"]).resolve()] = str(entry["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{metadata} line {number}: expected a JSON object with 'file_name' and 'text' ({error})"
                ) from None
    found, missing = [], []
    for image in images:
        caption_file = image.with_suffix(".txt")
        if image.resolve() in captions:
            found.append((image, captions[image.resolve()]))
        elif caption_file.is_file():
            found.append((image, caption_file.read_text(encoding="utf-8").strip()))
        else:
            missing.append(image.relative_to(root).as_posix())
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} of {len(images)} images in image_folder={str(folder)!r} have no caption "
            f"(a .txt file beside the image or an entry in {METADATA_NAME}): {shown}"
        )
    return found


def load_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Resize the short side to ``size`` and center-crop: ``(3, size, size)`` in [-1, 1] and its
    micro-conditions ``(orig_h, orig_w, crop_top, crop_left, size, size)``."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, (height, width, top, left, size, size)


def encode_images(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> diffusion-space latents (mode of the posterior, scaled)."""
    dtype = vae.dtype
    if dtype != torch.float32:
        vae.to(torch.float32)  # fp16 VAEs overflow when encoding; this runs once per image
    try:
        latents = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.mode()
    finally:
        if dtype != torch.float32:
            vae.to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _build(
    folder: Path,
    accelerator: Any,
    count: int,
    work: Callable[[CacheWriter, list[int]], None],
    index: dict[str, Any],
) -> LatentCache:
    """Build ``folder`` unless complete: each process does ``work`` on its share of the items."""
    if LatentCache.is_complete(folder):
        return LatentCache(folder)
    writer = CacheWriter(folder)
    if accelerator.is_main_process:
        writer.start()
    accelerator.wait_for_everyone()
    mine = [
        i for i in range(accelerator.process_index, count, accelerator.num_processes) if not writer.has(i)
    ]
    work(writer, mine)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        writer.finish(index, writer.written(count))
    accelerator.wait_for_everyone()
    return LatentCache(folder)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def generated_cache(
    pipe: Any, denoiser: nn.Module, adapter: ModelAdapter, config: Any, accelerator: Any, identity: dict
) -> LatentCache:
    """Latents the teacher samples for ``config.prompts`` (seed ``config.seed + item``), cached."""
    prompts = read_prompts(config.prompts)
    items = [
        (p, config.seed + i)
        for i, p in enumerate(p for p in prompts for _ in range(config.samples_per_prompt))
    ]
    size = config.resolution
    settings = {"size": size, "steps": config.generation_steps, "guidance_scale": config.guidance_scale}
    key = cache_key({"format": CACHE_FORMAT, "model": identity, "items": items, **settings})
    micro = (size, size, 0, 0, size, size)

    def work(writer: CacheWriter, mine: list[int]) -> None:
        bar = tqdm(total=len(mine), desc="teacher samples", disable=not accelerator.is_local_main_process)
        for chunk in _chunks(mine, config.generation_batch_size):
            texts = [items[i][0] for i in chunk]
            with torch.no_grad():
                latents = pipe(
                    prompt=texts,
                    height=size,
                    width=size,
                    num_inference_steps=config.generation_steps,
                    guidance_scale=config.guidance_scale,
                    generator=[torch.Generator().manual_seed(items[i][1]) for i in chunk],
                    output_type="latent",
                ).images
                cond = adapter.encode_prompts(pipe, denoiser, texts, accelerator.device, [micro] * len(chunk))
            for j, i in enumerate(chunk):
                writer.write(i, {"latents": latents[j], **{k: v[j] for k, v in cond.items()}})
            bar.update(len(chunk))
        bar.close()

    index = {"source": "prompts", "key": key, "prompts": len(prompts), **settings}
    return _build(config.cache_path / f"generated-{key}", accelerator, len(items), work, index)


def image_folder_cache(
    pipe: Any, denoiser: nn.Module, adapter: ModelAdapter, config: Any, accelerator: Any, identity: dict
) -> LatentCache:
    """VAE latents of the captioned images in ``config.image_folder``, cached; broken images skipped."""
    root = Path(config.image_folder)
    images = find_captioned_images(root)
    files = [
        (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns, text) for p, text in images
    ]
    key = cache_key({"format": CACHE_FORMAT, "model": identity, "files": files, "size": config.resolution})

    def work(writer: CacheWriter, mine: list[int]) -> None:
        bar = tqdm(total=len(mine), desc="encoding images", disable=not accelerator.is_local_main_process)
        for chunk in _chunks(mine, config.generation_batch_size):
            loaded = []
            for i in chunk:
                try:
                    loaded.append((i, *load_image(images[i][0], config.resolution)))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                    logger.warning("skipping %s: cannot decode it as an image (%s)", images[i][0], error)
            if loaded:
                with torch.no_grad():
                    latents = encode_images(pipe.vae, torch.stack([pixels for _, pixels, _ in loaded]))
                    texts = [images[i][1] for i, _, _ in loaded]
                    micro = [m for _, _, m in loaded]
                    cond = adapter.encode_prompts(pipe, denoiser, texts, accelerator.device, micro)
                for j, (i, _, _) in enumerate(loaded):
                    writer.write(i, {"latents": latents[j], **{k: v[j] for k, v in cond.items()}})
            bar.update(len(chunk))
        bar.close()

    index = {"source": "image_folder", "key": key, "folder": str(root.resolve()), "size": config.resolution}
    cache = _build(config.cache_path / f"images-{key}", accelerator, len(images), work, index)
    present = {int(name.split(".")[0]) for name in cache.index["samples"]}
    skipped = [files[i][0] for i in range(len(files)) if i not in present]
    cache.index["skipped"] = skipped
    if skipped and accelerator.is_main_process:
        logger.warning(
            "skipped %d of %d images that could not be decoded: %s",
            len(skipped),
            len(images),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    return cache
