"""A tiny distillation run, one per process under ``accelerate launch`` (see test_distill.py).

    accelerate launch --cpu --num_processes 2 tests/distill_worker.py FOLDER

Trains on the tiny SD pipeline into ``FOLDER/run`` and saves each rank's trainable parameters
to ``FOLDER/rank{index}.safetensors`` so the test can compare them across ranks.
"""

import sys
from pathlib import Path

import tiny_models
from safetensors.torch import save_file

from lindiff.distill import DistillConfig, Distiller
from lindiff.distill.student import trainable_state


def main(folder: Path) -> None:
    config = DistillConfig(
        model=tiny_models.sd_pipeline(),
        output_dir=folder / "run",
        prompts=["a red circle", "a blue square", "a green tree", "a yellow cat"],
        resolution=32,
        generation_steps=2,
        batch_size=2,
        max_steps=4,
        learning_rate=5e-3,
        diffusion_weight=0.0,
        checkpoint_every=2,
        validation_every=0,
        log_with="none",
    )
    distiller = Distiller(config)
    distiller.train()
    state = {k: v.contiguous() for k, v in trainable_state(distiller.unwrapped_student()).items()}
    save_file(state, str(folder / f"rank{distiller.accelerator.process_index}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
