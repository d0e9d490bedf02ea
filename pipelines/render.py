"""``lindiff render`` as a function: prompts (or a PNG or MP4 to reproduce) in, a rendered folder out.

result = render(RenderConfig(prompts="prompts.jsonl", out="renders", size=(1024, 1024)))
print(summary_table(result))
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..denoisers import pipeline_adapter
from ..parallel import enable_context_parallel
from .batch import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    BatchResult,
    Renderer,
    RenderItem,
    RenderOptions,
    render_batch,
)
from .loading import check_size, load_pipeline, resolve_device
from .metadata import read_params
from .prompts import ON_ERROR, OnError, Problem, PromptFileError, PromptRow, read_prompts
from .video import ffmpeg

logger = logging.getLogger(__name__)

REPRODUCED_KEYS = ("prompt", "seed", "steps", "guidance", "width", "height", "method")
"""Parameters a PNG (or MP4) must carry for ``reproduce``."""


@dataclass
class RenderConfig:
    """Everything ``lindiff render`` takes; exactly one of ``prompt``, ``prompts``, ``reproduce``.

    Attributes:
        out: output folder (PNGs, or MP4s with poster PNGs, and ``manifest.jsonl``).
        prompt: prompts given directly (item ``i`` gets index ``i``).
        prompts: a prompt file (see :mod:`~lindiff.pipelines.prompts`).
        reproduce: a PNG written by lindiff (an image, or a video's poster) or an MP4, rendered
            again from its parameters into ``out`` (``model`` and ``weights`` override the
            recorded ones, for moved files; ``fps`` a video's frame rate).
        negative_prompt: default negative prompt.
        model, method, weights, device, dtype, offload: see
            :func:`~lindiff.pipelines.loading.load_pipeline`.
        size: default ``(width, height)``; ``width``/``height`` override it; the model's native
            size when all are ``None``.
        steps, guidance: denoising steps and guidance scale.
        seed: base seed; a row without its own seed gets ``seed + index``.
        highres, stages, strengths, tile: see :class:`~lindiff.pipelines.batch.RenderOptions`.
        frames: frames of each video, for a video pipeline (``None``: the pipeline's default);
            its model family says which counts are valid
            (:meth:`~lindiff.adapters.ModelAdapter.resolve_frames`). Image pipelines take none;
            without ``model``, frames select the embedded video model.
        fps: frame rate the videos are written at (``None``: the family's).
        on_error: ``"abort"`` or ``"skip"`` malformed prompt-file lines (and rows whose size
            the model cannot render).
        parallel_degree: processes each image is split over by tokens (context parallelism, see
            :func:`~lindiff.parallel.enable_context_parallel`); it must equal the number of
            processes launched. 1: each process renders its own share of the batch.
    """

    out: str | os.PathLike = "renders"
    prompt: list[str] | None = None
    prompts: str | os.PathLike | None = None
    reproduce: str | os.PathLike | None = None
    negative_prompt: str = ""
    model: str | None = None
    method: str | None = "linfusion"
    weights: str | None = None
    device: str = "auto"
    dtype: str | None = None
    offload: bool = False
    size: tuple[int, int] | None = None
    width: int | None = None
    height: int | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    highres: bool | None = None
    stages: int | str = "auto"
    strengths: tuple[float, ...] | None = None
    tile: bool | None = None
    on_error: OnError = "abort"
    parallel_degree: int = 1
    frames: int | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("prompt", "prompts", "reproduce") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, prompts or reproduce; got {given or 'none'}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be non-negative, got {self.guidance}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if not isinstance(self.parallel_degree, int) or self.parallel_degree < 1:
            raise ValueError(f"parallel_degree must be a positive integer, got {self.parallel_degree!r}")
        if self.parallel_degree > 1 and self.offload:
            raise ValueError(
                "offload cannot be combined with parallel_degree > 1 (context parallelism keeps each "
                "process's denoiser on its own device)"
            )
        if self.fps is not None and (not isinstance(self.fps, (int, float)) or not self.fps > 0):
            raise ValueError(f"fps must be a positive number, got {self.fps!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}; got {self.on_error!r}")
        if self.stages != "auto" and (not isinstance(self.stages, int) or self.stages < 1):
            raise ValueError(f"stages must be 'auto' or a positive integer, got {self.stages!r}")
        if self.strengths is not None:
            bad = [s for s in self.strengths if not isinstance(s, (int, float)) or not 0 < s <= 1]
            if bad or not self.strengths:
                raise ValueError(f"strengths must be numbers in (0, 1], got {list(self.strengths)}")
            self.strengths = tuple(float(s) for s in self.strengths)


def _process_state(device: str, parallel_degree: int) -> Any:
    """The accelerate process state (``torchrun`` or ``accelerate launch``); CPU processes talk over gloo.

    Raises:
        ValueError: accelerate set up fewer processes than were launched, or ``parallel_degree``
            is not the number of processes.
    """
    from accelerate import PartialState

    state = PartialState(cpu=resolve_device(device).type == "cpu")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise ValueError(
            f"launched as {launched} processes, but accelerate set up only one; without GPUs, launch "
            "with --cpu or ACCELERATE_USE_CPU=1 (each process would render every image otherwise)"
        )
    if parallel_degree > 1 and state.num_processes != parallel_degree:
        raise ValueError(
            f"--parallel-degree {parallel_degree} splits every image over {parallel_degree} processes, but "
            f"{state.num_processes} {'was' if state.num_processes == 1 else 'were'} launched; run "
            f"`torchrun --nproc-per-node {parallel_degree} -m lindiff.cli render ...`"
        )
    return state


def _reproduction(config: RenderConfig) -> tuple[RenderOptions, RenderItem, str | None]:
    """Options and the one item that re-render ``config.reproduce``, and its recorded weights hash."""
    source = Path(config.reproduce)
    params = read_params(source)
    missing = [key for key in REPRODUCED_KEYS if key not in params]
    if missing:
        raise ValueError(f"{source} cannot be reproduced: its parameters lack {', '.join(missing)}")
    item = RenderItem(
        0,
        params["prompt"],
        params.get("negative_prompt", ""),
        params["seed"],
        params["width"],
        params["height"],
        name=source.name,
        frames=params.get("frames"),
    )
    for name in filter(None, (item.filename, item.poster)):
        if (Path(config.out) / name).resolve() == source.resolve():
            raise ValueError(
                f"reproducing {source} into --out {config.out} would overwrite it; pick another --out"
            )
    options = RenderOptions(
        model=config.model or params.get("model"),
        method=params["method"],
        weights=config.weights or params.get("weights"),
        steps=params["steps"],
        guidance=params["guidance"],
        highres=params.get("highres", False),
        stages=params.get("stages") or "auto",
        strengths=tuple(params["strengths"]) if params.get("strengths") else None,
        tile=config.tile,
        fps=config.fps or params.get("fps"),
    )
    return options, item, params.get("weights_sha256")


def plan_items(
    rows: list[PromptRow], pipe: Any, config: RenderConfig, source: str
) -> tuple[list[RenderItem], list[Problem]]:
    """The items for ``rows`` with the config's defaults filled in, and rows of sizes ``pipe`` cannot render.

    Raises:
        ValueError: the default size is invalid, or ``config.frames`` is not a count ``pipe``
            renders (any count, for an image pipeline).
    """
    default_width, default_height = config.size or (None, None)
    adapter = pipeline_adapter(pipe)
    frames = adapter.resolve_frames(pipe, config.frames)
    native = adapter.native_size(pipe)
    width = config.width or default_width or native
    height = config.height or default_height or native
    check_size(pipe, height, width)
    items, problems = [], []
    for row in rows:
        item = RenderItem(
            row.index,
            row.prompt,
            config.negative_prompt if row.negative_prompt is None else row.negative_prompt,
            config.seed + row.index if row.seed is None else row.seed,
            row.width or width,
            row.height or height,
            frames=frames,
        )
        try:
            check_size(pipe, item.height, item.width)
        except ValueError as error:
            problems.append(Problem(source, row.line, str(error)))
            continue
        items.append(item)
    return items, problems


def _report(problems: list[Problem], on_error: OnError) -> None:
    if problems and on_error == "abort":
        raise PromptFileError(problems)
    for problem in problems:
        logger.warning("skipped %s", problem)


def render(config: RenderConfig, show_progress: bool = True) -> BatchResult:
    """Load the pipeline and render ``config``'s batch (or reproduction) into ``config.out``.

    Raises:
        ValueError: invalid arguments, prompt file, model or size (with what is allowed).
        FileNotFoundError: a missing prompt file, PNG or MP4, or the embedded model is not installed.
        MissingVideoWriter: a video pipeline (or an MP4 to reproduce) without imageio-ffmpeg installed.
        NotImplementedError: ``parallel_degree > 1`` with a method that cannot run on a shard of
            the tokens.
        torch.OutOfMemoryError: the device ran out of memory.
    """
    recorded_hash = None
    if config.reproduce:
        options, item, recorded_hash = _reproduction(config)
        rows, source = [], str(config.reproduce)
    else:
        options = RenderOptions(
            model=config.model,
            method=config.method,
            weights=config.weights,
            steps=config.steps,
            guidance=config.guidance,
            highres=config.highres,
            stages=config.stages,
            strengths=config.strengths,
            tile=config.tile,
            fps=config.fps,
        )
        if config.prompts:
            rows, problems = read_prompts(config.prompts, config.on_error)
            _report(problems, config.on_error)
            source = str(config.prompts)
        else:
            rows = [PromptRow(i, i + 1, text) for i, text in enumerate(config.prompt or [])]
            source = "--prompt"

    state = _process_state(config.device, config.parallel_degree)
    # Under a launcher each process takes its own GPU.
    device = str(state.device) if state.num_processes > 1 else config.device
    video = (item.frames if config.reproduce else config.frames) is not None
    pipe = load_pipeline(
        options.model,
        method=options.method,
        weights=options.weights,
        device=device,
        dtype=config.dtype,
        offload=config.offload,
        video=video,
    )
    if config.parallel_degree > 1:
        enable_context_parallel(pipe, config.parallel_degree)
    renderer = Renderer(pipe, options)
    if config.reproduce:
        check_size(pipe, item.height, item.width)
        if pipeline_adapter(pipe).resolve_frames(pipe, item.frames) != item.frames:
            raise ValueError(f"{config.reproduce} is an image, but {type(pipe).__name__} renders videos")
        current = renderer.params(item)["weights_sha256"]
        if current != recorded_hash:
            logger.warning(
                "the weights differ from those %s was rendered with (hash %s, now %s); the image will differ",
                config.reproduce,
                recorded_hash,
                current,
            )
        items = [item]
    else:
        items, problems = plan_items(rows, pipe, config, source)
        _report(problems, config.on_error)
    if any(item.frames is not None for item in items):
        ffmpeg()  # a missing video writer stops the run before the first video, not after it
    return render_batch(renderer, items, config.out, state, show_progress=show_progress)
