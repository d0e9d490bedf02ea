"""The Gradio interface: ``build_app(model) -> gr.Blocks``; a thin layer over :class:`DemoModel`.

:func:`input_panel` and :func:`output_panel` lay out the two columns and return their components
(:class:`InputPanel`, :class:`OutputPanel`); :class:`Handlers` answers the events; :func:`wire`
connects the two. A video pipeline adds a frames input and a video tab (:class:`VideoOutputs`:
teacher and student side by side); an image pipeline's app has neither.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from .models import (
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    SOFTMAX,
    Cancelled,
    DemoModel,
    Generation,
    Progress,
    Request,
)

NO_LORA = "none"
CANVAS = 512
"""Side of the ControlNet drawing canvas in pixels (the condition is resized to the image)."""
DIFF_GAIN = 4
"""The teacher/student difference image is amplified this much."""
DIFF_MIN_SIDE = 256
PLOT_COLORS = {
    "red": "#dc2626",
    "blue": "#2563eb",
    "green": "#16a34a",
    "purple": "#9333ea",
    "orange": "#ea580c",
}
"""Colours of the methods in the timing plot: the teacher first, then the linear methods."""
STATS_HEADERS = ["method", "size", "steps", "wall time (s)", "attention share", "peak memory (MB)"]
PROGRESS = gr.Progress()
"""The default that marks a handler's progress parameter; Gradio passes each call a tracker of its own."""
Updates = dict[Any, Any]
"""What a handler returns or yields: new values of output components, keyed by component."""


def _as_int(value: float | None, name: str) -> int:
    if value is None or not float(value).is_integer():
        raise ValueError(f"{name} must be a whole number; got {value!r}")
    return int(value)


def _memory_text(size: int) -> str:
    if size >= 2**30:
        return f"~{size / 2**30:.1f} GiB"
    return f"~{size / 2**20:.0f} MiB" if size >= 2**20 else "<1 MiB"


def condition_image(value: dict[str, Any] | None) -> Image.Image:
    """The ControlNet condition from the editor: its composite, over black, as RGB."""
    composite = (value or {}).get("composite")
    if composite is None:
        raise ValueError("ControlNet is on, but no condition image was drawn or uploaded")
    image = Image.new("RGB", composite.size)
    image.paste(composite, mask=composite.getchannel("A") if composite.mode == "RGBA" else None)
    if image.getbbox() is None:
        raise ValueError("ControlNet is on, but the condition image is all black; draw the shapes in white")
    return image


def difference(first: Image.Image, second: Image.Image) -> Image.Image:
    """Per-pixel absolute difference, amplified by :data:`DIFF_GAIN`; small images are enlarged
    (nearest neighbour) to at least :data:`DIFF_MIN_SIDE` pixels so the pixels can be seen."""
    a = np.asarray(first.convert("RGB"), dtype=np.int16)
    b = np.asarray(second.convert("RGB"), dtype=np.int16)
    diff = Image.fromarray(np.clip(np.abs(a - b) * DIFF_GAIN, 0, 255).astype(np.uint8))
    zoom = max(1, DIFF_MIN_SIDE // max(diff.size))
    return diff.resize((diff.width * zoom, diff.height * zoom), Image.Resampling.NEAREST)


def stats_rows(generations: list[Generation]) -> list[list[Any]]:
    """One row of :data:`STATS_HEADERS` per generation."""
    return [
        [
            g.request.method,
            f"{g.request.width}x{g.request.height}" + (f"x{g.request.frames}" if g.request.frames else ""),
            g.record.steps,
            round(g.record.stats.wall_s, 2),
            f"{g.record.stats.attention_share:.0%}",
            round(g.record.stats.peak_bytes / 2**20, 1),
        ]
        for g in generations
    ]


def timing_frame(model: DemoModel) -> pd.DataFrame:
    """Median seconds per step by method and megapixels, over every run so far."""
    rows = [
        {"method": r.method, "megapixels": r.pixels / 1e6, "seconds per step": r.stats.step_s}
        for r in model.records
    ]
    frame = pd.DataFrame(rows, columns=["method", "megapixels", "seconds per step"])
    return frame.groupby(["method", "megapixels"], as_index=False).median().sort_values("megapixels")


def estimate_text(
    model: DemoModel, method: str, width: float | None, height: float | None, steps: float
) -> str:
    """Markdown with the estimated time and memory of a run of ``method`` and of the teacher."""
    try:
        w, h, n = _as_int(width, "width"), _as_int(height, "height"), _as_int(steps, "steps")
    except ValueError as error:
        return str(error)
    lines = []
    for name in dict.fromkeys([method, SOFTMAX]):
        guess = model.estimate(name, w, h, n)
        text = "no run yet" if guess is None else f"~{guess.seconds:.1f} s, {_memory_text(guess.bytes)} peak"
        lines.append(f"{model.method_label(name)}: {text}")
    return f"**Estimate for {w}x{h}, {n} steps** — " + "; ".join(lines)


def request_from(values: Sequence[Any]) -> Request:
    """The request for the values of :meth:`InputPanel.run_inputs`, in that order (a video app's
    end with the frames)."""
    (text, neg, w, h, n, cfg, s, m, hr, use_cn, cond, cn_scale, lo, lo_scale, *video) = values
    return Request(
        prompt=text,
        negative_prompt=neg or "",
        width=_as_int(w, "width"),
        height=_as_int(h, "height"),
        steps=_as_int(n, "steps"),
        guidance=float(cfg),
        seed=_as_int(s, "seed"),
        method=m,
        highres=bool(hr),
        condition=condition_image(cond) if use_cn else None,
        controlnet_scale=float(cn_scale),
        lora=None if lo == NO_LORA else lo,
        lora_scale=float(lo_scale),
        frames=_as_int(video[0], "frames") if video else None,
    )


def report_progress(progress: gr.Progress, label: str, p: Progress) -> None:
    """Show one denoising step of the run ``label`` on Gradio's progress bar."""
    stage = f", stage {p.stage}/{p.stages}" if p.stages > 1 else ""
    progress((p.step, p.steps), desc=f"{label}{stage}", unit="steps")


def random_seed() -> int:
    """A seed for the *Random* button."""
    return random.randint(0, MAX_SEED)


def square(size: int) -> tuple[int, int]:
    """Width and height of a size preset."""
    return size, size


@dataclass(frozen=True)
class ControlNetInputs:
    """The ControlNet accordion's inputs."""

    use: gr.Checkbox
    condition: gr.ImageEditor
    scale: gr.Slider


@dataclass(frozen=True)
class LoraInputs:
    """The LoRA accordion's inputs."""

    name: gr.Dropdown
    scale: gr.Slider


@dataclass(frozen=True)
class InputPanel:
    """The left column: what to render, the estimate of its cost, and the buttons."""

    prompt: gr.Textbox
    negative: gr.Textbox
    preset: gr.Dropdown
    width: gr.Number
    height: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    randomize: gr.Button
    method: gr.Dropdown
    estimate: gr.Markdown
    highres: gr.Checkbox
    control: ControlNetInputs
    lora: LoraInputs
    generate: gr.Button
    compare: gr.Button
    cancel: gr.Button
    frames: gr.Number | None = None

    def run_inputs(self) -> list[gr.components.Component]:
        """The inputs of Generate and Compare, in the order that :func:`request_from` reads."""
        return [
            *(self.prompt, self.negative, self.width, self.height, self.steps, self.guidance, self.seed),
            *(self.method, self.highres, self.control.use, self.control.condition, self.control.scale),
            *(self.lora.name, self.lora.scale),
            *([] if self.frames is None else [self.frames]),
        ]


@dataclass(frozen=True)
class VideoOutputs:
    """A video app's tab: the teacher's and the student's videos side by side, each labelled with
    its method and time."""

    teacher: gr.Video
    student: gr.Video


@dataclass(frozen=True)
class OutputPanel:
    """The right column: status, the image or the teacher/student comparison, stats, files, plot
    (and, for a video pipeline, the videos)."""

    status: gr.Markdown
    tabs: gr.Tabs
    image: gr.Image
    slider: gr.ImageSlider
    diff: gr.Image
    stats: gr.Dataframe
    files: gr.File
    plot: gr.ScatterPlot
    videos: VideoOutputs | None = None


def controlnet_inputs(model: DemoModel) -> ControlNetInputs:
    """The ControlNet accordion (hidden without a ControlNet): switch, drawing canvas, scale."""
    blank = Image.new("RGB", (CANVAS, CANVAS))
    with gr.Accordion("ControlNet", open=False, visible=model.control_pipe is not None):
        use = gr.Checkbox(False, label="Use the condition (shapes in white on black)")
        condition = gr.ImageEditor(
            {"background": blank, "layers": [], "composite": None},
            type="pil",
            image_mode="RGB",
            sources=["upload", "clipboard"],
            brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed"),
            canvas_size=(CANVAS, CANVAS),
            label="Condition",
        )
        scale = gr.Slider(0, 2, value=1.0, step=0.05, label="ControlNet scale")
    return ControlNetInputs(use, condition, scale)


def lora_inputs(model: DemoModel) -> LoraInputs:
    """The LoRA accordion (hidden without LoRAs): which one, and its scale."""
    with gr.Accordion("LoRA", open=False, visible=bool(model.loras)):
        name = gr.Dropdown([NO_LORA, *model.loras], value=NO_LORA, label="LoRA")
        scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
    return LoraInputs(name, scale)


def input_panel(model: DemoModel) -> InputPanel:
    """Lay out the :class:`InputPanel` in the current column."""
    methods = [(model.method_label(m), m) for m in (SOFTMAX, *model.linear_methods)]
    presets = [(f"{s} x {s} ({s / model.native:g}x native)", s) for s in model.presets()]
    prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="prompt")
    negative = gr.Textbox(label="Negative prompt", max_length=MAX_PROMPT_CHARS)
    preset = gr.Dropdown(presets, value=model.default_size, label="Size preset")
    with gr.Row():
        width = gr.Number(model.default_size, label="Width", precision=0, step=model.multiple)
        height = gr.Number(model.default_size, label="Height", precision=0, step=model.multiple)
    with gr.Row():
        steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
        guidance = gr.Slider(0, MAX_GUIDANCE, value=7.5, step=0.5, label="Guidance")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=4)
        randomize = gr.Button("Random", size="sm", scale=1, min_width=80)
    method = gr.Dropdown(methods, value=model.default_method, label="Attention")
    estimate = gr.Markdown()
    highres = gr.Checkbox(False, label="High-resolution chain (render native, then upscale in stages)")
    frames = None
    if model.frames is not None:
        step = model.frame_multiple
        label = f"Frames ({step}k + 1)" if step > 1 else "Frames"  # step 1: any count (AnimateDiff)
        frames = gr.Number(model.frames, label=label, precision=0, minimum=1, maximum=MAX_FRAMES, step=step)
    control = controlnet_inputs(model)
    lora = lora_inputs(model)
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        compare = gr.Button("Compare", elem_id="compare")
        cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
    return InputPanel(
        *(prompt, negative, preset, width, height, steps, guidance, seed, randomize, method, estimate),
        *(highres, control, lora, generate, compare, cancel),
        frames=frames,
    )


def timing_plot(model: DemoModel) -> gr.ScatterPlot:
    """Seconds per step against megapixels, one colour per method (see :func:`timing_frame`)."""
    colors = dict(zip((SOFTMAX, *model.linear_methods), PLOT_COLORS.items(), strict=False))
    return gr.ScatterPlot(
        timing_frame(model),
        x="megapixels",
        y="seconds per step",
        color="method",
        color_map={method: code for method, (_, code) in colors.items()},
        tooltip="all",
        # Gradio leaves the colour legend empty, so the label says which colour is which.
        label="Time vs resolution, all runs so far: "
        + ", ".join(f"{method} {name}" for method, (name, _) in colors.items()),
        height=300,
    )


def output_panel(model: DemoModel) -> OutputPanel:
    """Lay out the :class:`OutputPanel` in the current column."""
    status = gr.Markdown(elem_id="status")
    with gr.Tabs() as tabs:
        with gr.Tab("Image", id="image"):
            image = gr.Image(label="Result", type="filepath", format="png", elem_id="result")
        with gr.Tab("Compare", id="compare"), gr.Row():
            slider = gr.ImageSlider(
                label="Teacher | student", type="filepath", format="png", height=400, scale=2
            )
            diff = gr.Image(label=f"|teacher - student| x {DIFF_GAIN}", type="pil", format="png", height=400)
        videos = None
        if model.frames is not None:
            with gr.Tab("Video", id="video"), gr.Row():
                videos = VideoOutputs(
                    teacher=gr.Video(label="teacher (softmax)", format="mp4", elem_id="video-teacher"),
                    student=gr.Video(label="student (linear)", format="mp4", elem_id="video-student"),
                )
    stats = gr.Dataframe(headers=STATS_HEADERS, label="This run", interactive=False)
    files = gr.File(label="PNGs with their parameters", file_count="multiple", interactive=False)
    return OutputPanel(status, tabs, image, slider, diff, stats, files, timing_plot(model), videos)


@dataclass(frozen=True)
class Stage:
    """One render of a run: the status shown while it runs, its progress label, the request."""

    status: str
    label: str
    request: Request


class Handlers:
    """The event handlers of one app: they read the panels' inputs and update their components."""

    def __init__(self, model: DemoModel, inputs: InputPanel, outputs: OutputPanel) -> None:
        self.model = model
        self.inputs = inputs
        self.out = outputs

    def run_outputs(self) -> list[gr.components.Component]:
        """What Generate and Compare update, in the order the API returns them."""
        out = self.out
        videos = [] if out.videos is None else [out.videos.teacher, out.videos.student]
        return [
            *(out.status, out.tabs, out.image, out.slider, out.diff, out.stats, out.files, out.plot),
            self.inputs.estimate,
            *videos,
        ]

    # Gradio passes the session (gr.Request) and a progress tracker to the two handlers below
    # through their leading positional parameters, then the values of ``InputPanel.run_inputs``.
    def generate(self, req: gr.Request, progress: gr.Progress = PROGRESS, *values: Any) -> Iterator[Updates]:
        yield from self._run(req.session_hash, progress, values, compare=False)

    def compare(self, req: gr.Request, progress: gr.Progress = PROGRESS, *values: Any) -> Iterator[Updates]:
        yield from self._run(req.session_hash, progress, values, compare=True)

    def cancel(self, req: gr.Request) -> str:
        if self.model.cancel(req.session_hash):
            return "Cancelling at the next step…"
        return "Nothing of yours is running."

    def estimate(self, method: str, width: float | None, height: float | None, steps: float) -> str:
        return estimate_text(self.model, method, width, height, steps)

    def _stages(self, request: Request, compare: bool) -> list[Stage]:
        """Generate renders ``request``; Compare renders the teacher, then ``request`` (the student)."""
        name = self.model.method_label
        if not compare:
            return [Stage(f"Rendering with {name(request.method)}…", request.method, request)]
        if request.method == SOFTMAX:
            raise ValueError("Compare needs a linear attention method; choose one under Attention")
        pair = (("teacher", replace(request, method=SOFTMAX)), ("student", request))
        return [Stage(f"Rendering the {label} ({name(r.method)})…", label, r) for label, r in pair]

    def _run(
        self, session: str, progress: gr.Progress, values: Sequence[Any], compare: bool
    ) -> Iterator[Updates]:
        """Render the stages of Generate (one) or Compare (teacher, then student) in turn."""
        out = self.out
        try:
            stages = self._stages(request_from(values), compare)
            for stage in stages:
                self.model.check(stage.request)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        done: list[Generation] = []
        try:
            for stage in stages:
                tab = "video" if out.videos is not None else "compare" if compare else "image"
                yield {out.status: stage.status, out.tabs: gr.Tabs(selected=tab)}
                report = functools.partial(report_progress, progress, stage.label)
                done.append(self.model.run(stage.request, session, report))
        except Cancelled as stop:
            yield {
                out.status: f"**Cancelled** {stop}.",
                **({} if not done else {out.stats: stats_rows(done)}),
            }
            return
        except ValueError as error:
            raise gr.Error(str(error)) from error
        yield self._compared(*done) if compare else self._generated(*done)

    def _generated(self, result: Generation) -> Updates:
        return {
            self.out.image: str(result.path),
            **self._videos([result]),
            **self._finished([result], f"Done in {result.record.stats.wall_s:.2f} s."),
        }

    def _videos(self, done: list[Generation]) -> Updates:
        """Each video of ``done`` on its side of the video tab (the teacher's left), labelled with
        its method and time; nothing for images."""
        videos = self.out.videos
        if videos is None:
            return {}
        updates: Updates = {}
        for g in done:
            side = videos.teacher if g.request.method == SOFTMAX else videos.student
            label = f"{self.model.method_label(g.request.method)}: {g.record.stats.wall_s:.2f} s"
            updates[side] = gr.Video(str(g.video), label=label)
        return updates

    def _compared(self, teacher: Generation, student: Generation) -> Updates:
        t, s = teacher.record.stats.wall_s, student.record.stats.wall_s
        note = f"Teacher {t:.2f} s, student {s:.2f} s: {t / max(s, 1e-9):.2f}x speed-up."
        return {
            self.out.slider: (str(teacher.path), str(student.path)),
            self.out.diff: difference(teacher.image, student.image),
            **self._videos([teacher, student]),
            **self._finished([teacher, student], note),
        }

    def _finished(self, done: list[Generation], note: str) -> Updates:
        last = done[-1].request
        return {
            self.out.status: note,
            self.out.stats: stats_rows(done),
            self.out.files: [str(path) for g in done for path in (g.path, g.video) if path is not None],
            self.out.plot: timing_frame(self.model),
            self.inputs.estimate: self.estimate(last.method, last.width, last.height, last.steps),
        }


def wire(demo: gr.Blocks, handlers: Handlers) -> None:
    """Connect the buttons and fields to ``handlers``; runs queue for the model one at a time."""
    ins = handlers.inputs
    run_options = {
        "inputs": ins.run_inputs(),
        "outputs": handlers.run_outputs(),
        "concurrency_limit": 1,
        "concurrency_id": "model",
    }
    ins.generate.click(handlers.generate, api_name="generate", **run_options)
    ins.compare.click(handlers.compare, api_name="compare", **run_options)
    ins.prompt.submit(handlers.generate, api_visibility="private", **run_options)
    ins.cancel.click(
        handlers.cancel, outputs=handlers.out.status, api_name="cancel", concurrency_limit=None, queue=False
    )
    ins.randomize.click(random_seed, outputs=ins.seed, api_visibility="private", queue=False)
    ins.preset.input(
        square, inputs=ins.preset, outputs=[ins.width, ins.height], api_visibility="private", queue=False
    )
    estimate_options = {
        "inputs": [ins.method, ins.width, ins.height, ins.steps],
        "outputs": ins.estimate,
        "api_visibility": "private",
        "queue": False,
    }
    for trigger in (ins.width, ins.height, ins.steps, ins.method):
        trigger.change(handlers.estimate, **estimate_options)
    demo.load(handlers.estimate, **estimate_options)


def build_app(model: DemoModel) -> gr.Blocks:
    """The demo's Blocks, queued so that one run at a time uses the model."""
    with gr.Blocks(title="lindiff demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "# lindiff — linear attention for diffusion models\n"
            f"Model: `{model.model or 'embedded tiny-shapes'}` on **{model.device}**, native size "
            f"{model.native} px. *Compare* renders the softmax teacher and the linear student "
            "with the same seed."
        )
        with gr.Row():
            with gr.Column(scale=2):
                inputs = input_panel(model)
            with gr.Column(scale=3):
                outputs = output_panel(model)
        wire(demo, Handlers(model, inputs, outputs))
    demo.queue(default_concurrency_limit=1)
    return demo
