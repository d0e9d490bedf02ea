"""The demo's model: one pipeline loaded once, switched between softmax and linear attention.

A video pipeline renders videos: each run writes an MP4 and a poster PNG of its first frame (see
:mod:`lindiff.pipelines.video`).

The same pipeline serves the softmax teacher and every linear student: switching runs
:func:`lindiff.restore` / :func:`lindiff.linearize` on it, with the student's weights read once
and kept in memory. One run at a time (a lock); a run stops at the next denoising step once
:meth:`DemoModel.cancel` is called by the session that started it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import lindiff
from lindiff.attention import METHODS
from lindiff.denoisers import main_denoiser, pipeline_adapter
from lindiff.pipelines.highres import HighResProgress
from lindiff.pipelines.loading import SOFTMAX, check_size, load_pipeline, resolve_weights
from lindiff.pipelines.metadata import save_png
from lindiff.pipelines.request import ImageRenderer, ImageRequest, Rendered
from lindiff.pipelines.video import ffmpeg, save_video
from lindiff.weights import read_checkpoint

from .timing import Estimate, RunMeter, RunRecord, estimate, memory_budget

MAX_PROMPT_CHARS = 500
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_FRAMES = 257
"""Most frames of a video run."""
MAX_SIZE = {"cuda": 16384, "cpu": 4096}
"""Default largest image side per device type, in pixels."""
PRESET_FACTORS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
"""Size presets, as multiples of the model's native size."""
CALIBRATION_STEPS = 2
DEFAULT_METHOD = "linfusion"
"""The method preselected when the student's weights name none (the default of `lindiff.linearize`)."""


@dataclass(frozen=True, kw_only=True)
class Request(ImageRequest):
    """One image to render (an :class:`~lindiff.pipelines.request.ImageRequest`) with the attention
    to render it with and the LoRA to apply.

    Attributes:
        method: ``"softmax"`` (the teacher) or a linear method name.
        lora, lora_scale: a loaded LoRA's name (``None``: none) and its scale.
    """

    method: str
    lora: str | None = None
    lora_scale: float = 1.0


@dataclass(frozen=True)
class Progress:
    """Where a run is: ``step`` of ``steps`` in ``stage`` of ``stages`` (high-res chains have several)."""

    step: int
    steps: int
    stage: int = 1
    stages: int = 1


class Cancelled(Exception):
    """A run stopped by :meth:`DemoModel.cancel`; ``steps`` denoising steps ran, the last at ``at``."""

    def __init__(self, steps: int, at: Progress) -> None:
        where = f" of stage {at.stage}/{at.stages}" if at.stages > 1 else ""
        super().__init__(f"cancelled after step {at.step} of {at.steps}{where}")
        self.steps = steps
        self.at = at


@dataclass(frozen=True)
class Generation:
    """A finished run: the image (a video's first frame), the PNG written with its parameters (a
    video's poster), its measurements, and a video's MP4 (``None`` for an image)."""

    request: Request
    image: Image.Image
    path: Path
    record: RunRecord
    video: Path | None = None


class DemoModel:
    """A pipeline and its linear students, for the demo.

    Args:
        model: a diffusers pipeline folder or hub id; ``None`` for the embedded tiny model.
        weights: weights of the linear student (see :func:`lindiff.linearize`); ``None`` for the
            embedded model's own (with ``model=None``) or none.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``None`` (as saved).
        controlnet: a ControlNet folder or hub id, offered as an optional condition.
        loras: LoRA name -> folder or hub id, offered with a scale.
        output_dir: where PNGs are written.
        max_size: largest image side in pixels (default by device, see :data:`MAX_SIZE`).
        video: with ``model=None``, the embedded video model (tiny-shapes with its motion
            adapter) instead of the image one.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        weights: str | None = None,
        device: str = "auto",
        dtype: str | None = None,
        controlnet: str | None = None,
        loras: dict[str, str] | None = None,
        output_dir: str | Path,
        max_size: int | None = None,
        video: bool = False,
    ) -> None:
        self.pipe = load_pipeline(model, method=SOFTMAX, device=device, dtype=dtype, video=video)
        self.model = model
        self.device: torch.device = main_denoiser(self.pipe).device
        self.control_pipe = None if controlnet is None else self._with_controlnet(controlnet)
        self.renderer = ImageRenderer(self.pipe)
        self.control_renderer = None if self.control_pipe is None else ImageRenderer(self.control_pipe)
        self.weights = weights
        student_weights = resolve_weights(model, DEFAULT_METHOD, weights)
        self.checkpoint = None if student_weights is None else read_checkpoint(student_weights)
        adapter = pipeline_adapter(self.pipe)
        family = adapter.name
        self.linear_methods = [
            name
            for name in lindiff.methods()
            if METHODS.get(name).families is None or family in METHODS.get(name).families
        ]
        self.loras = dict(loras or {})
        for name, source in self.loras.items():
            self.pipe.load_lora_weights(source, adapter_name=name)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.native = adapter.native_size(self.pipe)
        self.multiple = adapter.size_multiple(self.pipe)
        # The valid size nearest the native one (Wan's native 632 px is not a multiple of its 16).
        self.default_size = max(self.multiple, round(self.native / self.multiple) * self.multiple)
        self.frames = adapter.resolve_frames(self.pipe, None)  # a video's default; None: renders images
        self.frame_multiple = adapter.frame_multiple(self.pipe)
        self.fps = adapter.frame_rate
        if self.frames is not None:
            ffmpeg()  # a missing video writer is reported now, not after the first run
        self.max_size = max_size or MAX_SIZE.get(self.device.type, MAX_SIZE["cpu"])
        self.records: list[RunRecord] = []
        self._method = SOFTMAX
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._owner: str | None = None
        self._numbers = itertools.count(1)

    def _with_controlnet(self, source: str) -> Any:
        """The family's ControlNet pipeline around the ControlNet at ``source``, sharing ``pipe``'s components."""
        from diffusers import AutoModel, AutoPipelineForText2Image

        try:
            net = AutoModel.from_pretrained(source, torch_dtype=main_denoiser(self.pipe).dtype)
            control = AutoPipelineForText2Image.from_pipe(self.pipe, controlnet=net.to(self.device))
        except (OSError, ValueError) as error:
            raise ValueError(f"controlnet={source!r} could not be loaded: {error}") from error
        control.set_progress_bar_config(disable=True)
        return control

    @property
    def default_method(self) -> str:
        """The method of the student's weights, else lindiff's default method, else the first one."""
        for method in (self.checkpoint.method if self.checkpoint else None, DEFAULT_METHOD):
            if method in self.linear_methods:
                return method
        return self.linear_methods[0]

    def method_label(self, method: str) -> str:
        """How the UI names ``method``."""
        if method == SOFTMAX:
            return "softmax (teacher)"
        trained = self.checkpoint is not None and self.checkpoint.method == method
        return f"{method} ({'distilled weights' if trained else 'no trained weights'})"

    def presets(self) -> list[int]:
        """Square sizes from native up to the largest that fits ``max_size`` and the device's memory."""
        budget = memory_budget(self.device)
        sizes: list[int] = []
        for factor in PRESET_FACTORS:
            size = max(self.multiple, round(self.native * factor / self.multiple) * self.multiple)
            if size > self.max_size or size in sizes:
                continue
            guess = self.estimate(self.default_method, size, size, CALIBRATION_STEPS)
            if guess is not None and guess.bytes > budget:
                break
            sizes.append(size)
        return sizes

    def estimate(self, method: str, width: int, height: int, steps: int) -> Estimate | None:
        """Time and memory of a run, from the runs so far (``None`` before any run of ``method``)."""
        return estimate(list(self.records), method, width, height, steps)

    def check(self, request: Request) -> None:
        """Raise ``ValueError`` naming the input, the value and what is allowed, for a bad request."""
        if not request.prompt.strip():
            raise ValueError("prompt is empty; describe the image to render")
        for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"{name} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are allowed")
        for name, size in (("width", request.width), ("height", request.height)):
            if not self.multiple <= size <= self.max_size:
                raise ValueError(
                    f"{name}={size} px is outside the allowed {self.multiple}-{self.max_size} px"
                )
        check_size(self.pipe, request.height, request.width)
        if request.frames is not None and request.frames > MAX_FRAMES:
            raise ValueError(f"frames={request.frames} is more than the {MAX_FRAMES} allowed")
        if self.frames is not None and request.frames is None:
            raise ValueError("this model renders videos; give the number of frames")
        pipeline_adapter(self.pipe).resolve_frames(self.pipe, request.frames)
        if not 1 <= request.steps <= MAX_STEPS:
            raise ValueError(f"steps={request.steps} is outside 1-{MAX_STEPS}")
        if not 0 <= request.guidance <= MAX_GUIDANCE:
            raise ValueError(f"guidance={request.guidance} is outside 0-{MAX_GUIDANCE}")
        if not 0 <= request.seed <= MAX_SEED:
            raise ValueError(f"seed={request.seed} is outside 0-{MAX_SEED}")
        if request.method not in (SOFTMAX, *self.linear_methods):
            raise ValueError(
                f"method={request.method!r} is not available; choose one of {[SOFTMAX, *self.linear_methods]}"
            )
        if request.lora is not None and request.lora not in self.loras:
            raise ValueError(f"lora={request.lora!r} is not loaded; choose one of {list(self.loras)} or none")
        if request.condition is not None and self.control_pipe is None:
            raise ValueError("a ControlNet condition was given, but no ControlNet is loaded")
        guess = self.estimate(request.method, request.width, request.height, request.steps)
        budget = memory_budget(self.device)
        if guess is not None and guess.bytes > budget:
            raise ValueError(
                f"{request.width}x{request.height} with {request.method} needs about {guess.bytes / 2**30:.1f} GiB, "
                f"more than the {budget / 2**30:.1f} GiB this {self.device.type} device has free; choose a smaller size"
            )

    def cancel(self, owner: str) -> bool:
        """Stop the run of ``owner`` at its next step; ``False`` if ``owner`` has no run going."""
        if self._owner is None or self._owner != owner:
            return False
        self._stop.set()
        return True

    def calibrate(self) -> None:
        """Short runs at native size with the teacher and the default student, to seed the estimates.

        A first one-step run, not recorded, takes the one-time costs (lazy initialisation, allocator
        growth) out of the measurements.
        """
        frames = None if self.frames is None else self.frame_multiple + 1  # the shortest video with motion
        warmup = Request(
            "warm-up",
            self.default_size,
            self.default_size,
            steps=1,
            guidance=7.5,
            seed=0,
            method=SOFTMAX,
            frames=frames,
        )
        self._render(warmup, owner="calibration", on_progress=None)
        self.records.clear()
        for method in (SOFTMAX, self.default_method):
            request = Request(
                prompt="calibration",
                width=self.default_size,
                height=self.default_size,
                steps=CALIBRATION_STEPS,
                guidance=7.5,
                seed=0,
                method=method,
                frames=frames,
            )
            self._render(request, owner="calibration", on_progress=None)

    def run(
        self, request: Request, owner: str, on_progress: Callable[[Progress], None] | None = None
    ) -> Generation:
        """Render ``request`` (after :meth:`check`) and write its PNG with the generation parameters (a
        video: its MP4 and a poster PNG, at the family's frame rate unless ``request.fps`` says).

        Raises:
            ValueError: the request is invalid.
            Cancelled: :meth:`cancel` was called for ``owner`` during the run.
        """
        self.check(request)
        if request.frames is not None and request.fps is None:
            request = replace(request, fps=self.fps)
        rendered, record = self._render(request, owner, on_progress)
        weights = self.weights if self._uses_checkpoint(request.method) else None
        params = request.params(self.model, request.method, weights)
        frames = "" if request.frames is None else f"x{request.frames}"
        name = f"{next(self._numbers):05d}-{request.method}-s{request.seed}-{request.width}x{request.height}{frames}"
        if request.frames is None:
            path = save_png(rendered, self.output_dir / f"{name}.png", params)
            return Generation(request=request, image=rendered, path=path, record=record)
        poster = save_png(rendered[0], self.output_dir / f"{name}.png", params)
        video = save_video(rendered, self.output_dir / f"{name}.mp4", params, fps=request.fps)
        return Generation(request=request, image=rendered[0], path=poster, record=record, video=video)

    def _uses_checkpoint(self, method: str) -> bool:
        return self.checkpoint is not None and self.checkpoint.method == method

    def _use(self, method: str) -> None:
        """Put ``method``'s attention on the pipeline (the teacher's for ``"softmax"``)."""
        if method == self._method:
            return
        target = self.control_pipe or self.pipe  # shares the UNet/transformer with ``pipe``
        if self._method != SOFTMAX:
            lindiff.restore(target)
            self._method = SOFTMAX
        if method != SOFTMAX:
            weights = self.checkpoint if self._uses_checkpoint(method) else None
            lindiff.linearize(target, method=method, weights=weights)
            self._method = method

    def _render(
        self, request: Request, owner: str, on_progress: Callable[[Progress], None] | None
    ) -> tuple[Rendered, RunRecord]:
        with self._lock:
            self._owner = owner
            self._stop.clear()
            try:
                self._use(request.method)
                self._set_lora(request)
                renderer = self.renderer if request.condition is None else self.control_renderer
                meter = RunMeter(renderer.pipe, self.device)
                done = 0

                def step(at: HighResProgress) -> None:
                    nonlocal done
                    meter.step()
                    done += 1
                    progress = Progress(at.step, at.num_steps, at.stage, at.num_stages)
                    if on_progress is not None:
                        on_progress(progress)
                    if self._stop.is_set():
                        raise Cancelled(done, progress)

                with meter.measure():
                    image = renderer(request, step)
            finally:
                self._owner = None
        record = RunRecord(
            method=request.method,
            width=request.width,
            height=request.height,
            steps=request.steps,
            stats=meter.stats,
            quadratic=request.method == SOFTMAX,
        )
        self.records.append(record)
        return image, record

    def _set_lora(self, request: Request) -> None:
        if not self.loras:
            return
        if request.lora is None:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([request.lora], adapter_weights=[request.lora_scale])
