"""Does a LoRA recovery phase help the shipped tiny-shapes student? One measured row.

Trains phase 2 of the two-phase distillation alone (``trainable="lora_only"``: LoRA adapters on
the converted layers' q/k/v/out projections, diffusion and output losses, no attention loss),
starting from the shipped ``tiny-shapes-linfusion`` weights, on the data recipe that built them
(``stage_student`` of ``recipes/tiny_shapes/build.py``: its image folder, latent scales, batch,
seed, cosine schedule). Then the teacher, the shipped student and the recovered student (its
export, LoRA merged) render the same native-size prompts with the same seeds as
``bench/quality.py``, and the classifier scores them; a two-sided sign test on the prompts only
one of the two students gets right says whether the difference is more than chance.

    python bench/lora_recovery.py                     # 500 steps, 400 prompts (about 10 min on 2 cores)
    python bench/lora_recovery.py --steps 2 --num-prompts 4 --out /tmp/smoke.json   # the code path

Training resumes from its checkpoints in ``--work`` when run again with the same options.
Results: ``bench/results/quality-cpu-lora-recovery.json`` (per-prompt correctness included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import quality  # bench/ is on sys.path when run as a script
import torch
from common import device_label, save_results
from torch.utils.data import default_collate

import lindiff
import lindiff.assets
from lindiff.cli import environment
from lindiff.distill import DistillConfig, Distiller, distill

VARIANTS = ("teacher", "student", "recovered")
"""Scored models: the softmax teacher, the shipped student, the student after the recovery phase."""
PAIRS = (("student", "recovered"), ("teacher", "student"), ("teacher", "recovered"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="recovery (phase 2) optimizer steps")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (cosine)")
    parser.add_argument("--num-prompts", type=int, default=400, help="prompts at native size")
    parser.add_argument("--seed", type=int, default=0, help="the build's seed (data and training)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lindiff-lora-recovery"), help="run folder")
    parser.add_argument("--out", type=Path, default=Path("quality-cpu-lora-recovery.json"), help="JSON path")
    args = parser.parse_args(argv)
    if min(args.steps, args.lora_rank) < 1 or args.num_prompts < 2 or args.learning_rate <= 0:
        parser.error("--steps and --lora-rank must be >= 1, --num-prompts >= 2, --learning-rate > 0")
    return args


def recovery_config(args: argparse.Namespace) -> DistillConfig:
    """Phase 2 alone from the shipped student, on ``stage_student``'s data and schedule."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/ is not installed
    from diffusers import StableDiffusionPipeline

    from recipes.tiny_shapes import architectures
    from recipes.tiny_shapes.build import BuildPlan
    from recipes.tiny_shapes.dataset import write_folder

    plan = BuildPlan.full()
    images = write_folder(
        args.work / "student-data",
        plan.student_images,
        seed=args.seed + 2_000_000,
        config=architectures.TRAINING_WORLD,
    )
    pipe = StableDiffusionPipeline.from_pretrained(lindiff.assets.path("tiny-shapes"), dtype=torch.float32)
    return DistillConfig(
        model=pipe,
        output_dir=args.work / "run",
        image_folder=str(images),
        weights=lindiff.assets.path("tiny-shapes-linfusion"),
        trainable="lora_only",
        lora_rank=args.lora_rank,
        attention_weight=0.0,
        resolution=architectures.NATIVE_SIZE,
        latent_scales=list(plan.student_scales),
        max_steps=args.steps,
        batch_size=plan.batch,
        learning_rate=args.learning_rate,
        lr_warmup_steps=min(30, args.steps),
        lr_scheduler="cosine",
        checkpoint_every=100,
        validation_every=0,
        log_with="none",
        seed=args.seed,
        resume=True,
        cpu=True,
    )


def fixed_batch_losses(config: DistillConfig, weights: dict[str, str], batches: int = 16) -> dict:
    """Diffusion and output (student vs teacher) MSE of each student in ``weights`` on the same
    ``batches`` training batches, noise and timesteps (the trainer's, micro-steps ``0 .. batches - 1``),
    averaged per latent scale."""
    losses: dict[str, dict[str, dict[str, float]]] = {}
    for name, path in weights.items():
        distiller = Distiller(
            dataclasses.replace(
                config, weights=path, output_dir=Path(config.output_dir).parent / "losses", resume=False
            )
        )
        order = distiller.order
        terms: dict[str, dict[str, list[float]]] = {}
        for micro_step in range(batches):
            batch = default_collate([distiller.dataset[i] for i in order.indices(micro_step)])
            with torch.no_grad():
                values = distiller.losses(batch, micro_step)
            scale = f"{config.latent_scales[micro_step % len(config.latent_scales)]}x"
            for term in ("diffusion", "output"):
                terms.setdefault(scale, {}).setdefault(term, []).append(float(values[term]))
        losses[name] = {
            scale: {term: statistics.fmean(v) for term, v in by_term.items()}
            for scale, by_term in terms.items()
        }
    return losses


def paired(correct: dict[str, list[bool]], first: str, second: str) -> dict:
    """``quality.paired_counts`` of two variants, its counts named after them."""
    counts = quality.paired_counts(correct[first], correct[second])
    names = {"teacher_only": f"{first}_only", "student_only": f"{second}_only"}
    return {names.get(key, key): value for key, value in counts.items()}


def score_variants(weights: dict[str, str | None], num_prompts: int) -> tuple[dict, dict]:
    """Render and score every variant at native size (``weights[variant]`` linearizes the pipeline);
    returns the score summary and ``quality``'s run configuration."""
    argv = ["--scales", "1", "--num-prompts", str(num_prompts), "--num-control", "0", "--num-lora", "0"]
    args = quality.parse_args([*argv, "--controlnet", "none", "--lora", "none"])
    device = torch.device("cpu")
    models = quality.load_models(args, device)
    plan = quality.RunPlan.from_args(args, quality.native_size(models.pipe), False, False)
    real, real_features = quality.score_real(models.classifier, plan)
    results = quality.Results()
    for variant in VARIANTS:
        results.generation.setdefault(variant, {})
        results.correct.setdefault(variant, {})
        if weights[variant] is not None:
            lindiff.linearize(models.pipe, method="linfusion", weights=weights[variant])
        quality.generation_runs(variant, models, plan, real_features, args, results)
        if weights[variant] is not None:
            lindiff.restore(models.pipe)
    correct = {variant: results.correct[variant]["1x"] for variant in VARIANTS}
    summary = {
        "classifier_on_real": real["1x"],
        "generation": {variant: results.generation[variant]["1x"] for variant in VARIANTS},
        "paired": {f"{a}_vs_{b}": paired(correct, a, b) for a, b in PAIRS},
        "correct": correct,
    }
    return summary, {**quality.run_config(args, models, plan), "weights": weights}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    config = recovery_config(args)
    result = distill(config)
    if result.weights is None:
        raise SystemExit(f"interrupted at step {result.step}; run again to resume from {config.output_dir}")
    trained = time.perf_counter() - started
    metrics = Path(config.output_dir) / "metrics.jsonl"
    weights = {"teacher": None, "student": lindiff.assets.path("tiny-shapes-linfusion")}
    weights["recovered"] = str(result.weights)
    losses = fixed_batch_losses(config, {name: weights[name] for name in VARIANTS[1:]})
    print(f"losses on fixed training batches: {json.dumps(losses)}")
    summary, scoring = score_variants(weights, args.num_prompts)
    accuracy = {variant: summary["generation"][variant]["prompt_accuracy"] for variant in VARIANTS}
    versus = summary["paired"]["student_vs_recovered"]
    row = {
        "teacher": accuracy["teacher"],
        "shipped_student": accuracy["student"],
        "recovered_student": accuracy["recovered"],
        "right_only_for_shipped": versus["student_only"],
        "right_only_for_recovered": versus["recovered_only"],
        "sign_test_p": versus["sign_test_p"],
    }
    output = {
        "benchmark": "quality-lora-recovery",
        "description": __doc__.split("\n\n")[0],
        "environment": environment(),
        "device": device_label(torch.device("cpu")),
        "training": {
            "config": config.to_dict(),
            "fixed_batch_losses": losses,
            "seconds": trained,  # of this invocation (data, setup and the steps it trained)
            "step_seconds": sum(json.loads(line)["seconds"] for line in metrics.read_text().splitlines()),
        },
        "scoring": scoring,
        "row": row,
        **summary,
        "seconds": time.perf_counter() - started,
    }
    path = save_results(output, args.out)
    print("prompt accuracy at 1x over", args.num_prompts, "prompts:", json.dumps(row))
    print(f"saved {path} in {output['seconds'] / 60:.1f} min")
    return output


if __name__ == "__main__":
    main()
