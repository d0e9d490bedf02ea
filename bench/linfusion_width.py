"""The width of LinFusion's q/k MLPs: UNet step time at high resolution against prompt accuracy.

LinFusion passes queries and keys through a residual MLP whose hidden layer is ``mid_dim`` wide
(``None``: the layer's own width, what the shipped student has; ``0``: no MLP, linear attention
alone). On an SD 1.5-architecture UNet at 2048 px those MLPs cost half of the linear step, so a
narrower one may buy speed; this script measures the trade on the embedded model. For every
width in ``--widths`` a student is distilled with the recipe's student stage
(``recipes.tiny_shapes.build.student_config``, only ``mid_dim`` changed; ``layer`` reuses the
shipped ``tiny-shapes-linfusion`` unless ``--redistil``), then, in one process:

- step time: one UNet call with classifier-free guidance (batch 2) on a ``--time-size`` px
  latent, the widths and the softmax teacher round-robin, median of ``--repeats``;
- prompt accuracy: the benchmark's classifier on ``--prompts`` held-out prompts at native size
  (bench/quality.py's prompts, seeds, sampler and scoring), each width against ``layer`` with a
  paired sign test on the prompts only one of them gets right.

    python bench/linfusion_width.py --widths layer 16 4 0 --work /tmp/width
    python bench/linfusion_width.py --quick --work /tmp/width-quick    # smoke run

Students are distilled into ``--work`` and resume there; the results go to
``bench/results/linfusion_width-<device>.json`` and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import device_label, save_results  # bench/ is on sys.path when run as a script
from diffusers import StableDiffusionPipeline
from quality import RunPlan, generate, load_models, paired_counts, score, score_real
from quality import parse_args as quality_args
from tqdm.auto import tqdm

import lindiff
from lindiff.cli import environment
from lindiff.evaluation import prompt_correct
from lindiff.state import get_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.tiny_shapes.build import BuildPlan, student_config, student_images  # noqa: E402

LAYER = "layer"
"""``--widths`` name of ``mid_dim=None``: each layer's own width."""


def parse_width(value: str) -> str | int:
    if value == LAYER:
        return value
    try:
        width = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a width is {LAYER!r} or an integer >= 0, got {value!r}") from None
    if width < 0:
        raise argparse.ArgumentTypeError(f"a width is {LAYER!r} or an integer >= 0, got {value!r}")
    return width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=parse_width, nargs="+", default=[LAYER, 16, 4, 0])
    parser.add_argument("--work", type=Path, required=True, help="folder of the distilled students")
    parser.add_argument(
        "--redistil", action="store_true", help=f"distil '{LAYER}' too (default: the shipped one)"
    )
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts at native size")
    parser.add_argument("--time-size", type=int, default=2048, help="image size (px) of the timed UNet step")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--no-softmax", action="store_true", help="do not time the softmax teacher")
    parser.add_argument("--quick", action="store_true", help="2-step students, 8 prompts, 256 px steps")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    if LAYER not in args.widths:
        parser.error(f"--widths must include {LAYER!r} (the paired tests compare against it)")
    if args.quick:
        args.prompts, args.time_size, args.repeats = min(args.prompts, 8), 256, 1
    return args


def distil(width: str | int, args: argparse.Namespace, teacher: str, device: torch.device) -> str:
    """The weights of the student of ``width``: shipped, or distilled (resumably) into ``args.work``."""
    if width == LAYER and not args.redistil:
        return lindiff.assets.path("tiny-shapes-linfusion")
    from lindiff.distill import distill

    plan = BuildPlan.smoke() if args.quick else BuildPlan.full()
    images = student_images(args.work, plan, seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
    mid_dim = None if width == LAYER else width
    config = student_config(pipe, images, args.work / f"student-{width}", plan, 0, device, mid_dim=mid_dim)
    result = distill(config)
    if result.weights is None:
        raise KeyboardInterrupt(f"width {width}: interrupted; run again to resume")
    return str(result.weights)


@torch.no_grad()
def step_times(pipe: StableDiffusionPipeline, weights: dict, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one guided UNet step at ``args.time_size`` px per variant, round-robin."""
    latent = args.time_size // pipe.vae_scale_factor
    sample = torch.randn(
        2, pipe.unet.config.in_channels, latent, latent, generator=torch.Generator().manual_seed(0)
    )
    text, _ = pipe.encode_prompt("a red star above a blue circle", "cpu", 1, False)
    text = text.repeat(2, 1, 1)
    variants = ([] if args.no_softmax else ["softmax"]) + list(weights)
    times: dict[str, list[float]] = {name: [] for name in variants}

    def use(name: str) -> None:
        if get_state(pipe.unet) is not None:
            lindiff.restore(pipe)
        if name != "softmax":
            lindiff.linearize(pipe, method="linfusion", weights=weights[name])

    for repeat in tqdm(range(args.repeats + 1), desc=f"steps at {args.time_size} px"):
        for name in variants:
            use(name)
            start = time.perf_counter()
            pipe.unet(sample, 500, text)
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def accuracy(args: argparse.Namespace, weights: dict) -> dict[str, dict]:
    """Prompt accuracy of every width at native size, and paired sign tests against ``layer``."""
    qargs = quality_args(
        [
            *("--scales", "1", "--num-prompts", str(args.prompts), "--variants", "student"),
            *("--num-control", "0", "--num-lora", "0", "--controlnet", "none", "--lora", "none"),
        ]
    )
    models = load_models(qargs, torch.device("cpu"))
    native = models.pipe.unet.config.sample_size * models.pipe.vae_scale_factor
    plan = RunPlan.from_args(qargs, native, control=False, lora=False)
    _, real = score_real(models.classifier, plan)
    examples = plan.examples[: args.prompts]
    keep = models.classifier.config.input_size
    scores, correct = {}, {}
    for name, path in tqdm(weights.items(), desc="accuracy"):
        if get_state(models.pipe.unet) is not None:
            lindiff.restore(models.pipe)
        lindiff.linearize(models.pipe, method="linfusion", weights=path)
        images = generate(models.pipe, examples, native, qargs, keep_size=keep)[-1].images
        scores[name], detections = score(models.classifier, images, examples, real)
        correct[name] = [
            prompt_correct(e.spec, objects) for e, objects in zip(examples, detections, strict=True)
        ]
    paired = {name: paired_counts(correct[LAYER], correct[name]) for name in weights if name != LAYER}
    return {"scores": scores, "paired_with_layer": paired}


def markdown(result: dict) -> str:
    """The trade as a Markdown table."""
    times, scores = result["step_seconds"], result["accuracy"]["scores"]
    paired = result["accuracy"]["paired_with_layer"]
    lines = [
        f"| mid_dim | UNet step at {result['config']['time_size']} px (s) | vs `{LAYER}` "
        f"| prompt accuracy ({result['config']['prompts']} prompts) | sign test vs `{LAYER}` |",
        "|---|---|---|---|---|",
    ]
    if "softmax" in times:
        lines.append(
            f"| softmax teacher | {times['softmax']:.2f} | {times['softmax'] / times[LAYER]:.2f}x | - | - |"
        )
    for name in result["config"]["widths"]:
        key = str(name)
        p = paired.get(key, {}).get("sign_test_p")
        lines.append(
            f"| {key} | {times[key]:.2f} | {times[key] / times[LAYER]:.2f}x | "
            f"{scores[key]['prompt_accuracy']:.1%} | {'-' if p is None else f'p = {p:.2f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cpu")
    teacher = lindiff.assets.path("tiny-shapes")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    weights = {str(width): distil(width, args, teacher, device) for width in args.widths}
    pipe = StableDiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
    result = {
        "benchmark": "linfusion_width",
        "description": __doc__.split("\n\n")[0],
        "environment": environment(),
        "device": device_label(device),
        "config": {
            "widths": [str(width) for width in args.widths],
            "weights": weights,
            "time_size": args.time_size,
            "repeats": args.repeats,
            "prompts": args.prompts,
            "quick": args.quick,
        },
        "step_seconds": step_times(pipe, weights, args),
        "accuracy": accuracy(args, weights),
    }
    result["seconds"] = time.perf_counter() - started
    label = device_label(device, short=True) + ("-quick" if args.quick else "")
    path = save_results(result, args.out or Path(f"linfusion_width-{label}.json"))
    print(markdown(result))
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
