"""The Gradio interface: ``build_app(model) -> gr.Blocks``; a thin layer over :class:`DemoModel`."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from .models import (
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
            f"{g.request.width}x{g.request.height}",
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


def build_app(model: DemoModel) -> gr.Blocks:
    """The demo's Blocks, queued so that one run at a time uses the model."""
    methods = [(model.method_label(m), m) for m in (SOFTMAX, *model.linear_methods)]
    presets = [(f"{s} x {s} ({s / model.native:g}x native)", s) for s in model.presets()]
    blank = Image.new("RGB", (CANVAS, CANVAS))

    with gr.Blocks(title="lindiff demo", analytics_enabled=False) as demo:
        gr.Markdown(
            "# lindiff — linear attention for diffusion models\n"
            f"Model: `{model.model or 'embedded tiny-shapes'}` on **{model.device}**, native size "
            f"{model.native} px. *Compare* renders the softmax teacher and the linear student "
            "with the same seed."
        )
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", max_length=MAX_PROMPT_CHARS)
                preset = gr.Dropdown(presets, value=model.native, label="Size preset")
                with gr.Row():
                    width = gr.Number(model.native, label="Width", precision=0, step=model.multiple)
                    height = gr.Number(model.native, label="Height", precision=0, step=model.multiple)
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=7.5, step=0.5, label="Guidance")
                with gr.Row():
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=4)
                    randomize = gr.Button("Random", size="sm", scale=1, min_width=80)
                method = gr.Dropdown(methods, value=model.default_method, label="Attention")
                estimate = gr.Markdown()
                highres = gr.Checkbox(
                    False, label="High-resolution chain (render native, then upscale in stages)"
                )
                with gr.Accordion("ControlNet", open=False, visible=model.control_pipe is not None):
                    use_control = gr.Checkbox(False, label="Use the condition (shapes in white on black)")
                    condition = gr.ImageEditor(
                        {"background": blank, "layers": [], "composite": None},
                        type="pil",
                        image_mode="RGB",
                        sources=["upload", "clipboard"],
                        brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed"),
                        canvas_size=(CANVAS, CANVAS),
                        label="Condition",
                    )
                    control_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="ControlNet scale")
                with gr.Accordion("LoRA", open=False, visible=bool(model.loras)):
                    lora = gr.Dropdown([NO_LORA, *model.loras], value=NO_LORA, label="LoRA")
                    lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    compare = gr.Button("Compare", elem_id="compare")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id="status")
                with gr.Tabs() as tabs:
                    with gr.Tab("Image", id="image"):
                        image = gr.Image(label="Result", type="filepath", format="png", elem_id="result")
                    with gr.Tab("Compare", id="compare"), gr.Row():
                        slider = gr.ImageSlider(
                            label="Teacher | student", type="filepath", format="png", height=400, scale=2
                        )
                        diff = gr.Image(
                            label=f"|teacher - student| x {DIFF_GAIN}",
                            type="pil",
                            format="png",
                            height=400,
                        )
                stats = gr.Dataframe(headers=STATS_HEADERS, label="This run", interactive=False)
                files = gr.File(label="PNGs with their parameters", file_count="multiple", interactive=False)
                colors = dict(zip((SOFTMAX, *model.linear_methods), PLOT_COLORS.items(), strict=False))
                plot = gr.ScatterPlot(
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

        inputs = [prompt, negative, width, height, steps, guidance, seed, method, highres]
        inputs += [use_control, condition, control_scale, lora, lora_scale]
        outputs = [status, tabs, image, slider, diff, stats, files, plot, estimate]

        def request_from(values: tuple[Any, ...]) -> Request:
            (text, neg, w, h, n, cfg, s, m, hr, use_cn, cond, cn_scale, lo, lo_scale) = values
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
            )

        def reporter(progress: gr.Progress, label: str) -> Callable[[Progress], None]:
            def report(p: Progress) -> None:
                stage = f", stage {p.stage}/{p.stages}" if p.stages > 1 else ""
                progress((p.step, p.steps), desc=f"{label}{stage}", unit="steps")

            return report

        def finished(done: list[Generation], note: str) -> dict[Any, Any]:
            last = done[-1].request
            return {
                status: note,
                stats: stats_rows(done),
                files: [str(g.path) for g in done],
                plot: timing_frame(model),
                estimate: estimate_text(model, last.method, last.width, last.height, last.steps),
            }

        # Gradio passes the session (gr.Request) and the progress tracker to the two handlers below
        # through their leading positional parameters, then the values of ``inputs``.
        def run_generate(
            req: gr.Request,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio tracks progress through this default)
            *values: Any,
        ) -> Iterator[dict[Any, Any]]:
            try:
                request = request_from(values)
                model.check(request)
            except ValueError as error:
                raise gr.Error(str(error)) from error
            yield {
                status: f"Rendering with {model.method_label(request.method)}…",
                tabs: gr.Tabs(selected="image"),
            }
            try:
                result = model.run(request, req.session_hash, reporter(progress, request.method))
            except Cancelled as stop:
                yield {status: f"**Cancelled** {stop}."}
                return
            except ValueError as error:
                raise gr.Error(str(error)) from error
            yield {
                image: str(result.path),
                **finished([result], f"Done in {result.record.stats.wall_s:.2f} s."),
            }

        def run_compare(
            req: gr.Request,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio tracks progress through this default)
            *values: Any,
        ) -> Iterator[dict[Any, Any]]:
            try:
                student_request = request_from(values)
                if student_request.method == SOFTMAX:
                    raise ValueError("Compare needs a linear attention method; choose one under Attention")
                teacher_request = replace(student_request, method=SOFTMAX)
                model.check(teacher_request)
                model.check(student_request)
            except ValueError as error:
                raise gr.Error(str(error)) from error
            done: list[Generation] = []
            try:
                for label, request in (("teacher", teacher_request), ("student", student_request)):
                    yield {
                        status: f"Rendering the {label} ({model.method_label(request.method)})…",
                        tabs: gr.Tabs(selected="compare"),
                    }
                    done.append(model.run(request, req.session_hash, reporter(progress, label)))
            except Cancelled as stop:
                yield {status: f"**Cancelled** {stop}.", **({} if not done else {stats: stats_rows(done)})}
                return
            except ValueError as error:
                raise gr.Error(str(error)) from error
            teacher, student = done
            speedup = teacher.record.stats.wall_s / max(student.record.stats.wall_s, 1e-9)
            yield {
                slider: (str(teacher.path), str(student.path)),
                diff: difference(teacher.image, student.image),
                **finished(
                    done,
                    f"Teacher {teacher.record.stats.wall_s:.2f} s, student {student.record.stats.wall_s:.2f} s: "
                    f"{speedup:.2f}x speed-up.",
                ),
            }

        def run_cancel(req: gr.Request) -> str:
            if model.cancel(req.session_hash):
                return "Cancelling at the next step…"
            return "Nothing of yours is running."

        run_options = {
            "inputs": inputs,
            "outputs": outputs,
            "concurrency_limit": 1,
            "concurrency_id": "model",
        }
        generate.click(run_generate, api_name="generate", **run_options)
        compare.click(run_compare, api_name="compare", **run_options)
        prompt.submit(run_generate, api_visibility="private", **run_options)
        cancel.click(run_cancel, outputs=status, api_name="cancel", concurrency_limit=None, queue=False)
        randomize.click(
            lambda: random.randint(0, MAX_SEED), outputs=seed, api_visibility="private", queue=False
        )
        preset.input(
            lambda size: (size, size),
            inputs=preset,
            outputs=[width, height],
            api_visibility="private",
            queue=False,
        )
        for trigger in (width, height, steps, method):
            trigger.change(
                lambda m, w, h, n: estimate_text(model, m, w, h, n),
                inputs=[method, width, height, steps],
                outputs=estimate,
                api_visibility="private",
                queue=False,
            )
        demo.load(
            lambda m, w, h, n: estimate_text(model, m, w, h, n),
            inputs=[method, width, height, steps],
            outputs=estimate,
            api_visibility="private",
            queue=False,
        )
    demo.queue(default_concurrency_limit=1)
    return demo
