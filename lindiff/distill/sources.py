"""The two data sources, each turned once into a latent cache (see :mod:`lindiff.distill.data`).

- Prompts: the teacher pipeline samples latents for each prompt with fixed seeds (video
  pipelines: clips of ``num_frames`` frames, latents ``(C, F, h, w)``).
- An image folder: images with a ``.txt`` caption beside each or a ``metadata.jsonl``
  (``{"file_name": ..., "text": ...}`` per line), resized and center-cropped to the training
  size and encoded by the VAE. Images that cannot be decoded are skipped and counted.

Teacher samples come out at exactly the training size (resolution binning off). A pipeline with
a ControlNet samples with the ControlNet switched off (a blank control image at conditioning
scale 0), i.e. as its base model. When the ControlNet itself trains, every item also gets a
control image ``(3, H, W)`` in [0, 1]: the control preprocessor applied to the decoded sample or
to the training image, or for image folders the file of the same relative path in
``control_folder``; that is the data a ControlNet of that kind is trained on.

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
from ..adapters.base import CONTROL, accepts, call_default
from .components import SetupError
from .config import preprocessor_name
from .data import CacheWriter, LatentCache, cache_key

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_NAME = "metadata.jsonl"
CACHE_FORMAT = 2


def read_prompts(prompts: str | os.PathLike | list[str] | tuple[str, ...]) -> list[str]:
    """Prompts from a text file (one per line, blank lines ignored) or a list of strings."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise SetupError(f"prompts={str(prompts)!r} is not a file (expected one prompt per line)")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if not all(isinstance(p, str) for p in prompts):
        raise SetupError(f"prompts must be strings, got {sorted({type(p).__name__ for p in prompts})}")
    found = [p.strip() for p in prompts if p.strip()]
    if not found:
        raise SetupError("prompts is empty: give at least one non-empty prompt")
    return found


def find_captioned_images(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """Every image under ``folder`` (sorted) with its caption.

    Raises:
        SetupError: no images, an unreadable ``metadata.jsonl`` line, or images without a caption
            (the first few are listed).
    """
    root = Path(folder)
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise SetupError(f"image_folder={str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
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
                raise SetupError(
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
        raise SetupError(
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
    """``(B, 3, H, W)`` in [-1, 1] -> diffusion-space latents (mode of the posterior of KL VAEs, the
    latent of deterministic ones such as SANA's DC-AE; scaled)."""
    dtype = vae.dtype
    if dtype != torch.float32:
        vae.to(torch.float32)  # fp16 VAEs overflow when encoding; this runs once per image
    try:
        encoded = vae.encode(pixels.to(vae.device, torch.float32))
        posterior = getattr(encoded, "latent_dist", None)
        latents = posterior.mode() if posterior is not None else encoded.latent
    finally:
        if dtype != torch.float32:
            vae.to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion-space latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1] (the inverse of
    :func:`encode_images`)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaled = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    return (vae.decode(scaled).sample.float().clamp(-1, 1) + 1) / 2


def edge_map(images: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """White edges on black ``(B, 3, H, W)`` of images ``(B, 3, H, W)`` in [0, 1]: Sobel gradient
    magnitude of the luminance, over ``threshold`` times each image's largest (a Canny-like map)."""
    gray = (images * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(1, True)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    kernels = torch.stack([sobel, sobel.T])[:, None]
    gradients = torch.nn.functional.conv2d(
        torch.nn.functional.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels
    )
    magnitude = gradients.square().sum(1, keepdim=True).sqrt()
    peak = magnitude.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return (magnitude > threshold * peak).float().expand(-1, 3, -1, -1)


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def control_images(images: torch.Tensor, preprocessor: Any) -> torch.Tensor:
    """Control images ``(B, 3, H, W)`` in [0, 1] derived from images ``(B, 3, H, W)`` in [0, 1] by
    ``preprocessor``: ``"edges"`` (:func:`edge_map`), ``"image"`` (the images), or a callable
    PIL image -> PIL image (its output resized to ``H x W``)."""
    if preprocessor == "edges":
        return edge_map(images.float())
    if preprocessor == "image":
        return images.float()
    height, width = images.shape[-2:]
    found = []
    for image in images:
        result = preprocessor(_to_pil(image)).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        found.append(torch.from_numpy(np.asarray(result, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(found).to(images.device)


def control_arguments(pipe: Any, image: Any) -> dict[str, Any]:
    """``{name: image}`` for the control-image argument of ``pipe.__call__`` (``control_image`` or ``image``)."""
    return {"control_image" if accepts(pipe, "control_image") else "image": image}


def has_controlnet(pipe: Any) -> bool:
    return isinstance(getattr(pipe, "controlnet", None), nn.Module)


def guidance_scale(pipe: Any, config: Any) -> float:
    """``config.guidance_scale``, else the pipeline's default."""
    return (
        config.guidance_scale if config.guidance_scale is not None else call_default(pipe, "guidance_scale")
    )


def _sampling_arguments(
    pipe: Any, adapter: ModelAdapter, size: int, num_frames: int | None
) -> dict[str, Any]:
    """What the teacher's sampling call needs beyond the prompts: the family's options and frame
    count, and for a ControlNet pipeline a blank control image at conditioning scale 0 (the base
    model samples)."""
    arguments = {**adapter.generation_options(pipe), **adapter.frame_options(num_frames)}
    if has_controlnet(pipe):
        blank = Image.new("RGB", (size, size))
        arguments.update(control_arguments(pipe, blank), controlnet_conditioning_scale=0.0)
    return arguments


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
    pipe: Any,
    denoiser: nn.Module,
    adapter: ModelAdapter,
    config: Any,
    accelerator: Any,
    identity: dict,
    control: bool = False,
) -> LatentCache:
    """Latents the teacher samples for ``config.prompts`` (seed ``config.seed + item``), cached;
    with ``control``, each with the control image of its decoded sample."""
    prompts = read_prompts(config.prompts)
    items = [
        (p, config.seed + i)
        for i, p in enumerate(p for p in prompts for _ in range(config.samples_per_prompt))
    ]
    size = config.resolution
    latent_shape = adapter.latent_shape(pipe, size, config.num_frames)
    scale = guidance_scale(pipe, config)
    settings = {"size": size, "steps": config.generation_steps, "guidance_scale": scale}
    if config.num_frames is not None:  # image caches keep their keys
        settings["frames"] = config.num_frames
    control_name = preprocessor_name(config.control_preprocessor) if control else None
    key = cache_key(
        {"format": CACHE_FORMAT, "model": identity, "items": items, "control": control_name, **settings}
    )
    micro = (size, size, 0, 0, size, size)
    sampling = _sampling_arguments(pipe, adapter, size, config.num_frames)

    def work(writer: CacheWriter, mine: list[int]) -> None:
        bar = tqdm(total=len(mine), desc="teacher samples", disable=not accelerator.is_local_main_process)
        for chunk in _chunks(mine, config.generation_batch_size):
            texts = [items[i][0] for i in chunk]
            with torch.no_grad():
                output = pipe(
                    prompt=texts,
                    height=size,
                    width=size,
                    num_inference_steps=config.generation_steps,
                    guidance_scale=scale,
                    generator=[torch.Generator().manual_seed(items[i][1]) for i in chunk],
                    output_type="latent",
                    **sampling,
                )
                latents = adapter.sampled_latents(output, latent_shape)
                cond = _conditions(
                    pipe, denoiser, adapter, texts, accelerator.device, [micro] * len(chunk), scale
                )
                if control:
                    images = decode_latents(pipe.vae, latents)
                    cond[CONTROL] = control_images(images, config.control_preprocessor).half()
            for j, i in enumerate(chunk):
                writer.write(i, {"latents": latents[j], **{k: v[j] for k, v in cond.items()}})
            bar.update(len(chunk))
        bar.close()

    index = {"source": "prompts", "key": key, "prompts": len(prompts), "control": control_name, **settings}
    return _build(config.cache_path / f"generated-{key}", accelerator, len(items), work, index)


def image_folder_cache(
    pipe: Any,
    denoiser: nn.Module,
    adapter: ModelAdapter,
    config: Any,
    accelerator: Any,
    identity: dict,
    control: bool = False,
) -> LatentCache:
    """VAE latents of the captioned images in ``config.image_folder``, cached; broken images skipped.
    With ``control``, each also gets its control image (``config.control_folder``'s file, else the
    control preprocessor of the image)."""
    root = Path(config.image_folder)
    images = find_captioned_images(root)
    files = [
        (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns, text) for p, text in images
    ]
    controls = _control_files(root, images, config.control_folder) if control else None
    control_key = None
    if control:
        control_key = preprocessor_name(config.control_preprocessor)
        if controls is not None:
            control_key = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in controls]
    key = cache_key(
        {
            "format": CACHE_FORMAT,
            "model": identity,
            "files": files,
            "size": config.resolution,
            "control": control_key,
        }
    )
    scale = guidance_scale(pipe, config)

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
                    cond = _conditions(pipe, denoiser, adapter, texts, accelerator.device, micro, scale)
                    if control:
                        pixels = torch.stack([pixels for _, pixels, _ in loaded])
                        cond[CONTROL] = _folder_controls(pixels, [i for i, _, _ in loaded], controls, config)
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


def _conditions(
    pipe: Any,
    denoiser: nn.Module,
    adapter: ModelAdapter,
    texts: list[str],
    device: torch.device,
    micro: list[tuple[int, int, int, int, int, int]],
    scale: float,
) -> dict[str, torch.Tensor]:
    """The text conditioning of ``texts`` plus what carries the guidance scale (FLUX)."""
    cond = adapter.encode_prompts(pipe, denoiser, texts, device, micro)
    return {**cond, **adapter.guidance_conditions(denoiser, scale, len(texts))}


def _control_files(root: Path, images: list[tuple[Path, str]], folder: str | None) -> list[Path] | None:
    """The control image of each image: same relative path and stem under ``folder``, any image
    extension (``None`` without a folder).

    Raises:
        ValueError: listing the images without one.
    """
    if folder is None:
        return None
    found, missing = [], []
    for image, _ in images:
        relative = image.relative_to(root).with_suffix("")
        candidates = [Path(folder) / relative.with_suffix(ext) for ext in IMAGE_EXTENSIONS]
        match = next((c for c in candidates if c.is_file()), None)
        if match is None:
            missing.append(relative.as_posix())
        found.append(match)
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        raise SetupError(
            f"{len(missing)} of {len(images)} images have no control image in control_folder={str(folder)!r} "
            f"(same relative path, any of {', '.join(IMAGE_EXTENSIONS)}): {shown}"
        )
    return found


def _folder_controls(
    pixels: torch.Tensor, indices: list[int], controls: list[Path] | None, config: Any
) -> torch.Tensor:
    """Control images ``(B, 3, H, W)`` in [0, 1] (float16) of training images ``pixels`` in [-1, 1]."""
    if controls is None:
        return control_images((pixels + 1) / 2, config.control_preprocessor).half()
    loaded = [(load_image(controls[i], config.resolution)[0] + 1) / 2 for i in indices]
    return torch.stack(loaded).half()
