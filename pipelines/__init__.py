"""Diffusers pipelines built on converted models (installed as ``lindiff.pipelines``).

The high-resolution pipeline (``HighResPipeline.from_pipe(pipe)``: a progressive SDEdit chain,
see :mod:`lindiff.pipelines.highres`) and the batch renderer live here.
"""

from .highres import HighResPipeline, HighResPipelineOutput, HighResProgress, plan_stages

__all__ = ["HighResPipeline", "HighResPipelineOutput", "HighResProgress", "plan_stages"]
