"""The Gradio demo (installed as ``lindiff.app``; needs the ``demo`` extra).

    lindiff demo                                  # embedded tiny model, http://127.0.0.1:7860
    lindiff demo --model path/to/pipeline --weights path/to/student

    from lindiff.app import create_model, launch
    launch(create_model("path/to/pipeline"), port=7860)

The modules import gradio, so ``import lindiff.app`` alone stays cheap and works without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DemoModel", "build_app", "create_model", "launch"]


def __getattr__(name: str) -> Any:
    if name == "DemoModel":
        from .models import DemoModel

        return DemoModel
    if name == "build_app":
        from .ui import build_app

        return build_app
    if name in ("create_model", "launch"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'lindiff.app' has no attribute {name!r}")
