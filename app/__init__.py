"""The Gradio demo (installed as ``lindiff.app``; needs the ``demo`` extra)."""
