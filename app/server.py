"""Start the demo: the model with its defaults, the queued app, the web server.

demo = launch(DemoModel("path/to/pipeline", output_dir="out"), port=7860)
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import gradio as gr

from lindiff import assets

from .models import DemoModel
from .ui import build_app

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
EMBEDDED_CONTROLNET = "tiny-shapes-controlnet"
EMBEDDED_LORAS = {"stripes": "tiny-shapes-lora-stripes"}


def embedded_extras() -> tuple[str | None, dict[str, str]]:
    """The embedded model's ControlNet and LoRAs that are installed (missing ones are left out)."""
    found: dict[str, str] = {}
    for name in (EMBEDDED_CONTROLNET, *EMBEDDED_LORAS.values()):
        try:
            found[name] = assets.path(name)
        except FileNotFoundError as error:
            logger.warning("%s; the demo runs without it", error)
    loras = {label: found[name] for label, name in EMBEDDED_LORAS.items() if name in found}
    return found.get(EMBEDDED_CONTROLNET), loras


def create_model(
    model: str | None = None,
    *,
    weights: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    controlnet: str | None = None,
    loras: dict[str, str] | None = None,
    output_dir: str | None = None,
    max_size: int | None = None,
    calibrate: bool = True,
    video: bool = False,
) -> DemoModel:
    """A :class:`DemoModel`; ``model=None`` is the embedded model with its ControlNet and LoRAs
    (``video``: its video model, tiny-shapes with the motion adapter).

    PNGs go to ``output_dir``, or to a new temporary folder. ``calibrate`` runs two short
    renders at native size so the size presets and estimates start from measurements.

    Raises:
        FileNotFoundError: ``model=None`` and the embedded model is not installed.
    """
    if model is None and video:
        assets.path(assets.MOTION_MODEL)  # a clear FileNotFoundError before anything else
    elif model is None and controlnet is None and loras is None:
        assets.path()  # the embedded model itself: a clear FileNotFoundError before anything else
        controlnet, loras = embedded_extras()
    demo_model = DemoModel(
        model,
        weights=weights,
        device=device,
        dtype=dtype,
        controlnet=controlnet,
        loras=loras,
        output_dir=output_dir or tempfile.mkdtemp(prefix="lindiff-demo-"),
        max_size=max_size,
        video=video,
    )
    if calibrate:
        demo_model.calibrate()
    return demo_model


def launch(
    model: DemoModel,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Serve the demo of ``model`` on ``host:port`` (and a public link with ``share``).

    Blocks until the server stops, unless ``prevent_thread_lock``; returns the running app.
    """
    demo = build_app(model)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        allowed_paths=[str(Path(model.output_dir).resolve())],
        show_error=True,
        ssr_mode=False,
        quiet=prevent_thread_lock,
    )
    return demo
