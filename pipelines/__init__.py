"""Diffusers pipelines built on converted models (installed as ``lindiff.pipelines``).

- :mod:`~lindiff.pipelines.highres`: ``HighResPipeline.from_pipe(pipe)``, a progressive SDEdit
  chain to high resolution (its stages: :mod:`~lindiff.pipelines.stages`).
- :mod:`~lindiff.pipelines.request`: one image request and the one path that renders it, for
  ``lindiff render`` (:mod:`~lindiff.pipelines.batch`, :mod:`~lindiff.pipelines.render`) and the demo.
- :mod:`~lindiff.pipelines.video`: H.264 MP4s carrying their parameters (the ``video`` extra).
- :mod:`~lindiff.pipelines.loading`: a pipeline loaded and converted for rendering, valid sizes.
- :mod:`~lindiff.pipelines.memory`, :mod:`~lindiff.pipelines.peak_memory`: memory savers for a
  call, free memory, and the one peak-memory meter.
"""

from .highres import HighResPipeline, HighResPipelineOutput, HighResProgress
from .stages import plan_stages

__all__ = ["HighResPipeline", "HighResPipelineOutput", "HighResProgress", "plan_stages"]
