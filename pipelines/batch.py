"""Batch rendering: items in, PNGs (or MP4s with a poster PNG) carrying their parameters out;
resumable and multi-process.

    renderer = Renderer(load_pipeline(), RenderOptions(steps=20))
    items = [RenderItem(0, "a red star above a blue circle", "", seed=42, width=128, height=128)]
    result = render_batch(renderer, items, "renders", PartialState())

Every image goes through :class:`~lindiff.pipelines.request.ImageRenderer`, the path the demo
renders with too.

A video item (one with ``frames``, for a video pipeline) is written as an H.264 MP4 and a poster
PNG of its first frame (see :mod:`~lindiff.pipelines.video`). Each finished image is written atomically and then recorded in the folder's manifest (see
:mod:`~lindiff.pipelines.manifest`), so a re-run skips it and a crash loses at most the image
in progress. Under ``accelerate launch`` (or ``torchrun``) the pending items are split between the
processes; when the pipeline's denoiser is itself split over them by tokens (context parallelism,
:func:`lindiff.parallel.enable_context_parallel`), every process renders every item instead, and
the main process alone writes the images and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..denoisers import pipeline_adapter
from ..parallel import context_parallel_degree
from .highres import HighResProgress
from .manifest import Manifest
from .metadata import VIDEO_SUFFIX, save_png
from .peak_memory import PeakMemory
from .request import ImageRenderer, ImageRequest, ProgressCallback, Rendered
from .video import save_video

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
SLUG_LENGTH = 48


def slugify(text: str, max_length: int = SLUG_LENGTH) -> str:
    """``text`` as a file-name part: ASCII lower case, words joined by ``-``, at most ``max_length``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "image"


@dataclass(frozen=True)
class RenderItem:
    """One image (or video) to render.

    Attributes:
        index: position in the batch (numbers the file).
        prompt, negative_prompt, seed, width, height: the generation call.
        name: the file name; ``None`` derives one from index, prompt and seed (a video takes its
            stem, with ``.mp4``).
        frames: a video's frame count; ``None`` for an image.
    """

    index: int
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    name: str | None = None
    frames: int | None = None

    @property
    def key(self) -> str:
        """Identity in the manifest, stable across runs of the same batch."""
        identity = [self.index, self.prompt, self.negative_prompt, self.seed, self.width, self.height]
        if self.frames is not None:  # images keep the keys they had before videos
            identity.append(self.frames)
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        """``00003-a-red-star-above-a-blue-circle-s42.png`` (a video: ``.mp4``) unless :attr:`name` is set."""
        name = self.name or f"{self.index:05d}-{slugify(self.prompt)}-s{self.seed}.png"
        return name if self.frames is None else str(Path(name).with_suffix(VIDEO_SUFFIX))

    @property
    def poster(self) -> str | None:
        """A video's poster PNG (its first frame) beside :attr:`filename`; ``None`` for an image."""
        return None if self.frames is None else str(Path(self.filename).with_suffix(".png"))


@dataclass(frozen=True)
class RenderOptions:
    """What every item of a batch shares.

    Attributes:
        model, method, weights: as given to :func:`~lindiff.pipelines.loading.load_pipeline`
            (recorded in each PNG).
        steps, guidance: denoising steps and classifier-free guidance scale.
        highres: render with :class:`~lindiff.pipelines.highres.HighResPipeline`; ``None``
            does so exactly when a side exceeds the model's native size.
        stages, strengths: the high-resolution pipeline's ``stages`` and ``strength_schedule``
            (``None``: the default schedule).
        fps: frame rate of the videos; ``None``: the model family's
            (:attr:`~lindiff.adapters.ModelAdapter.frame_rate`).
        tile: code with a tiled VAE (less memory at large sizes), in the plain and the
            high-resolution pipeline; ``None`` tiles the high-resolution pipeline's VAE only when
            memory is short (its ``tile_vae="auto"``) and never the plain pipeline's.
    """

    model: str | None = None
    method: str | None = "linfusion"
    weights: str | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    highres: bool | None = None
    stages: int | str = "auto"
    strengths: tuple[float, ...] | None = None
    tile: bool | None = None
    fps: float | None = None


class Renderer:
    """Renders :class:`RenderItem` s with ``pipe``: the plain pipeline call at or below the model's
    native size, the high-resolution pipeline above it (or as ``options.highres`` says)."""

    def __init__(self, pipe: Any, options: RenderOptions) -> None:
        self.pipe = pipe
        self.options = options
        adapter = pipeline_adapter(pipe)
        self.native_size = adapter.native_size(pipe)
        self.fps = options.fps or adapter.frame_rate
        self._render = ImageRenderer(pipe)

    def uses_highres(self, item: RenderItem) -> bool:
        """Whether ``item`` goes through the high-resolution pipeline."""
        if self.options.highres is None:
            return max(item.width, item.height) > self.native_size
        return self.options.highres

    def request(self, item: RenderItem) -> ImageRequest:
        """``item`` with the batch's options, as the renderer takes it."""
        options = self.options
        return ImageRequest(
            prompt=item.prompt,
            negative_prompt=item.negative_prompt,
            seed=item.seed,
            width=item.width,
            height=item.height,
            steps=options.steps,
            guidance=options.guidance,
            highres=self.uses_highres(item),
            stages=options.stages,
            strengths=options.strengths,
            tile=options.tile,
            frames=item.frames,
            fps=None if item.frames is None else self.fps,
        )

    def params(self, item: RenderItem) -> dict[str, Any]:
        """The generation parameters recorded in ``item``'s PNG (or MP4 and poster)."""
        return self.request(item).params(self.options.model, self.options.method, self.options.weights)

    def __call__(self, item: RenderItem, progress: ProgressCallback | None = None) -> Rendered:
        """Render ``item`` (an image, or a video's frames); ``progress`` is called after every denoising step."""
        return self._render(self.request(item), progress)

    def save(self, rendered: Rendered, item: RenderItem, out: Path) -> Path:
        """Write ``item``'s image, or its MP4 after its poster PNG, into ``out``; returns the image or MP4."""
        params = self.params(item)
        if item.frames is None:
            return save_png(rendered, out / item.filename, params)
        save_png(rendered[0], out / item.poster, params)
        return save_video(rendered, out / item.filename, params, fps=self.fps)


@dataclass
class ItemRecord:
    """A rendered image: its item, file, time and peak memory (bytes)."""

    item: RenderItem
    path: Path
    seconds: float
    peak_memory: int
    highres: bool


@dataclass
class BatchResult:
    """What :func:`render_batch` did in this process.

    Attributes:
        rendered: the images this process rendered, in order.
        skipped: items already done before this run (by any process).
        total: items in the batch.
        interrupted: stopped by Ctrl-C; a re-run resumes.
        removed: temporary files of killed runs that were deleted.
        manifest: the merged manifest file.
        process_index, num_processes: this process and how many rendered the batch.
        split_over: processes each image was split over by tokens (context parallelism); when
            above 1, only the main process writes, so ``rendered`` is empty on the others.
    """

    rendered: list[ItemRecord] = field(default_factory=list)
    skipped: int = 0
    total: int = 0
    interrupted: bool = False
    removed: list[Path] = field(default_factory=list)
    manifest: Path | None = None
    process_index: int = 0
    num_processes: int = 1
    split_over: int = 1


def _execution_device(pipe: Any) -> torch.device:
    # diffusers' own answer, which also accounts for model CPU offload.
    return torch.device(getattr(pipe, "_execution_device", "cpu"))


class _ImageBar:
    """The per-image bar: one stage at a time, its steps as the count."""

    def __init__(self, enabled: bool) -> None:
        self.bar = tqdm(total=0, position=1, leave=False, unit="step", disable=not enabled)
        self.stage: int | None = None
        self.name = ""

    def start(self, item: RenderItem) -> None:
        self.stage = None
        self.name = item.filename[:32]
        self.bar.reset(total=0)
        self.bar.set_description(self.name)

    def __call__(self, progress: HighResProgress) -> None:
        if progress.stage != self.stage:
            self.stage = progress.stage
            self.bar.reset(total=progress.num_steps)
            self.bar.set_description(
                f"{self.name} stage {progress.stage}/{progress.num_stages} {progress.width}x{progress.height}"
            )
        self.bar.update(progress.step - self.bar.n)


def _manifest_entry(record: ItemRecord, fps: float) -> dict[str, Any]:
    item = record.item
    entry = {
        "key": item.key,
        "file": item.filename,
        "index": item.index,
        "prompt": item.prompt,
        "seed": item.seed,
        "width": item.width,
        "height": item.height,
        "seconds": round(record.seconds, 3),
        "peak_memory": record.peak_memory,
    }
    if item.frames is not None:
        entry.update(frames=item.frames, fps=fps, poster=item.poster)
    return entry


def render_batch(
    renderer: Renderer,
    items: Sequence[RenderItem],
    out_dir: str | os.PathLike,
    state: Any,
    show_progress: bool = True,
) -> BatchResult:
    """Render the items not yet in ``out_dir``'s manifest into ``out_dir``; resumable.

    Args:
        renderer: renders one item.
        items: the whole batch (every process passes the same list).
        out_dir: where the PNGs and ``manifest.jsonl`` go.
        state: an ``accelerate.PartialState``; the pending items are split between its processes,
            unless ``renderer``'s denoiser is split over all of them by tokens (context
            parallelism): then every process renders every item and the main process writes.
        show_progress: show the overall and per-image bars (main process only).

    Ctrl-C stops after cleaning up the image in progress and returns with ``interrupted`` set.

    Raises:
        ValueError: the denoiser is split over a number of processes other than ``state``'s.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split_over = context_parallel_degree(renderer.pipe)
    if split_over > 1 and split_over != state.num_processes:
        raise ValueError(
            f"the denoiser is split over {split_over} processes, but {state.num_processes} render the batch"
        )
    shares_batch = split_over == 1
    writes = shares_batch or state.is_main_process
    manifest = Manifest(out, state.process_index, state.num_processes) if shares_batch else Manifest(out)
    result = BatchResult(
        total=len(items),
        manifest=manifest.path,
        process_index=state.process_index,
        num_processes=state.num_processes,
        split_over=split_over,
    )
    if state.is_main_process:
        result.removed = manifest.remove_temporary_files()
        manifest.merge()
    state.wait_for_everyone()
    done = manifest.done()
    pending = [item for item in items if item.key not in done]
    result.skipped = len(items) - len(pending)
    mine: list[RenderItem] = pending
    if shares_batch:
        with state.split_between_processes(pending) as share:
            mine = list(share)

    memory = PeakMemory(_execution_device(renderer.pipe))
    enabled = show_progress and state.is_main_process
    overall = tqdm(total=len(mine), position=0, unit="image", desc="images", disable=not enabled)
    image_bar = _ImageBar(enabled)
    try:
        for item in mine:
            image_bar.start(item)
            memory.start()
            start = time.perf_counter()
            rendered = renderer(item, image_bar)
            if writes:
                path = renderer.save(rendered, item, out)
                seconds = time.perf_counter() - start
                record = ItemRecord(item, path, seconds, memory.peak_bytes(), renderer.uses_highres(item))
                manifest.record(_manifest_entry(record, renderer.fps))
                result.rendered.append(record)
            overall.update(1)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        image_bar.bar.close()
        overall.close()
    if not result.interrupted:
        state.wait_for_everyone()
        if state.is_main_process:
            manifest.merge()
    return result


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def summary_table(result: BatchResult) -> str:
    """A plain-text table of ``result``: one row per rendered image, then the totals.

    Peak memory is the most memory in use while rendering the image: CUDA memory allocated, or on
    the CPU the process's resident set (see :class:`~lindiff.pipelines.peak_memory.PeakMemory`).
    """
    rows = [
        (
            str(r.item.index),
            r.path.name,
            f"{r.item.width}x{r.item.height}"
            + ("" if r.item.frames is None else f", {r.item.frames} frames"),
            "yes" if r.highres else "no",
            f"{r.seconds:.2f} s",
            _mib(r.peak_memory),
        )
        for r in result.rendered
    ]
    header = ("#", "file", "size", "high-res", "time", "peak memory")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    if result.split_over > 1:
        lines = [f"each image split over {result.split_over} processes:"]
    elif result.num_processes > 1:
        lines = [f"process {result.process_index + 1} of {result.num_processes}:"]
    else:
        lines = []
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    seconds = sum(r.seconds for r in result.rendered)
    per_image = f", {seconds / len(result.rendered):.2f} s per image" if result.rendered else ""
    lines.append(
        f"{len(result.rendered)} rendered, {result.skipped} already done, {result.total} in the batch; "
        f"{seconds:.1f} s{per_image}"
    )
    return "\n".join(lines)
