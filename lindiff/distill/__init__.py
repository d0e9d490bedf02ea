"""Distillation of a pretrained pipeline's denoiser into its linear-attention student.

    from lindiff.distill import DistillConfig, distill
    result = distill(DistillConfig(model="path/or/hub-id", output_dir="runs/x", prompts="prompts.txt"))
    lindiff.linearize(pipe, weights=result.weights)

or ``lindiff distill MODEL --output-dir runs/x --prompts prompts.txt`` (``accelerate launch -m
lindiff.cli distill ...`` for several GPUs). See :class:`DistillConfig` for every option.
"""

from .config import DistillConfig
from .trainer import Distiller, DistillResult, distill

__all__ = ["DistillConfig", "DistillResult", "Distiller", "distill"]
