"""Image quality of a text-to-image pipeline and of its linear-attention student, scored by a shapes classifier.

The teacher (softmax attention) and the student (``lindiff.linearize`` with trained weights, on
the same pipeline object) render the same prompts with the same seeds at 1x, 2x and 4x the
native size (direct generation at that size). With ``--highres`` they also render every size
above native through ``HighResPipeline`` with its defaults (generation at native size, then
SDEdit stages up to the target: what ``lindiff render`` does there), reported under keys such as
``2x-highres``; a chain that is the first stages of a longer one is read from that one's stages
(the 4x and 8x chains from the 32x chain). ``--highres only`` renders the sizes above native
through the chain alone (no direct generation there: 32x is 4096 px), and ``--variants student``
skips the softmax teacher.
The shipped classifier (``lindiff.evaluation``) finds the objects of every image and scores:

- prompt accuracy: the objects are exactly those the caption names (colour, shape, count);
- position accuracy: on prompts with a relation, the relation holds (min separation 0.1);
- paired counts: per size, the prompts only the teacher or only the student gets right, with a
  two-sided sign test on them (whether "the student is no worse" is more than chance);
- Fréchet distance between classifier features of generated images and of real renders of the
  same scenes (biased upwards for few images: compare teacher and student at one scale);
- ControlNet adherence: IoU of the detected object pixels with the condition mask;
- chain fidelity (high-resolution runs): each final image, area-averaged to the native size,
  against the chain's own native stage (``lindiff.evaluation.chain_fidelity``): pixel agreement
  of the colour maps and objects added or lost on the way up;
- LoRA: stripe score (luminance std inside the objects) with and without the stripes LoRA.

The classifier's scores on real renders of the same prompts (prompt and position accuracy, mask
IoU with the condition; at every scale) validate the metrics: they should be close to 1.

    python bench/quality.py                  # shipped tiny-shapes assets; prints a time estimate
    python bench/quality.py --quick          # a few prompts per scale
    python bench/quality.py --highres        # also 2x and 4x through the high-resolution chain
    python bench/quality.py --scales 1 4 8 32 --num-prompts 100 100 100 100 --highres only \
        --variants student --controlnet none --lora none --tile-vae auto \
        --out quality-cpu-chain.json                                         # the chain to 4096 px
    python bench/quality.py --model DIR --weights DIR --classifier DIR --controlnet none --lora none

Prompts are ``make_example(10_000_000 + i, size, world)`` (the generator trains on seeds below
1_000_000), from the shipped model's training world (``--world training``: one or two objects,
six colours) unless ``--world full``.
Results: ``bench/results/quality-<device>[-quick].json`` and a ``.png`` grid beside it. Every
rendered batch is kept in ``<out>.partial/`` until the results are saved: an interrupted run
(Ctrl-C, a crash) goes on from there when the same command runs again (``--fresh``: start over).
"""

import argparse
import collections
import dataclasses
import json
import math
import shutil
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import device_label, results_path, save_results  # bench/ is on sys.path when run as a script
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

import lindiff
import lindiff.assets
from lindiff.cli import environment
from lindiff.data import Example, ShapesConfig, condition_image, make_example, render, to_tensor
from lindiff.denoisers import pipeline_adapter
from lindiff.evaluation import (
    DETECTION_SIZE,
    EVAL_SEEDS,
    POSITION_SEPARATION,
    ShapeClassifier,
    chain_fidelity,
    detect_objects,
    frechet_distance,
    mask_iou,
    prompt_correct,
    prompt_scores,
    stripe_score,
)
from lindiff.evaluation.fidelity import downsample
from lindiff.pipelines import HighResPipeline, plan_stages
from lindiff.pipelines.sdedit import stage_strengths

TEACHER_TARGET = 0.80
"""Least teacher prompt accuracy at native size."""
STUDENT_GAP = 0.03
"""Most the student may trail the teacher at native size."""
CHAIN_SCALES = (4, 8, 32)
"""Scales whose high-resolution chain the chain-fidelity targets name (reported as not run when absent)."""
CHAIN_PIXEL_AGREEMENT = 0.95
"""Least mean pixel agreement of the student's final images with their native stage."""
CHAIN_NO_EXTRA = 0.90
"""Least share of the student's final images with no object that their native stage lacks."""
CHAIN_ACCURACY_GAP = 0.05
"""Most the student's prompt accuracy through the chain may trail its native (1x) accuracy."""
TIMED_MAX_SCALE = 4
"""The time estimate runs the pipeline at sizes up to this multiple of native; larger sizes are
extrapolated from it by pixel count (right for linear attention and the VAE, low for softmax)."""
VARIANTS = ("teacher", "student")
LORA_ADAPTER = "stripes"
WORLDS: dict[str, Callable[[], ShapesConfig]] = {"training": lindiff.assets.world, "full": ShapesConfig}
"""Scene distributions to draw prompts from (``make_example(seed, size, world)``): the shipped model's
training world (its ``world.json``) or the whole shapes world."""
TILE = 128


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="pipeline folder (default: the tiny-shapes asset)")
    parser.add_argument("--weights", help="student weights (default: tiny-shapes-linfusion; 'none': fresh)")
    parser.add_argument("--method", default="linfusion", help="lindiff method of the student")
    parser.add_argument("--controlnet", help="ControlNetModel folder (default: the asset; 'none': skip)")
    parser.add_argument("--lora", help="LoRA folder (default: tiny-shapes-lora-stripes; 'none': skip)")
    parser.add_argument("--classifier", help="ShapeClassifier folder (default: tiny-shapes-classifier)")
    parser.add_argument(
        "--scales", type=int, nargs="+", default=[1, 2, 4], help="multiples of the native size"
    )
    parser.add_argument(
        "--num-prompts",
        type=int,
        nargs="+",
        help="prompts per scale (default 200 50 25; --quick 16 4 2; further scales repeat the last)",
    )
    parser.add_argument(
        "--num-control",
        type=int,
        nargs="+",
        help="ControlNet prompts per scale (default 50 10 0; --quick 4 2 0; further scales repeat the last)",
    )
    parser.add_argument("--num-lora", type=int, help="LoRA prompts at native size (default 50; --quick 4)")
    parser.add_argument(
        "--highres",
        nargs="?",
        const="also",
        choices=["also", "only"],
        help="also render the sizes above native through the high-resolution chain (same prompts and "
        "seeds); 'only': render them through the chain alone (no direct generation or ControlNet above native)",
    )
    parser.add_argument(
        "--tile-vae",
        choices=["off", "auto"],
        default="off",
        help="VAE tiling in the chain: off (untiled: tiles of a small VAE shift colours) or auto "
        "(HighResPipeline's choice by free memory, as lindiff render; needed for 4096 px on a CPU)",
    )
    parser.add_argument(
        "--stages", type=int, help="stages of every chain (default: HighResPipeline's plan, stages='auto')"
    )
    parser.add_argument(
        "--strengths", type=float, nargs="+", help="SDEdit strengths of stages 2, 3, ... (default: by scale)"
    )
    parser.add_argument(
        "--sdedit-guidance", type=float, help="guidance scale of the SDEdit stages (default: 1.0, no CFG)"
    )
    parser.add_argument(
        "--skip-residual", type=float, help="DemoFusion's skip residual with this exponent (default: none)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="which models render: the teacher (softmax), the student, or both (paired comparisons need both)",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="prompts per pipeline call at native size (divided by the scale)",
    )
    parser.add_argument("--columns", type=int, default=6, help="prompts shown in the PNG grid")
    parser.add_argument(
        "--world",
        choices=list(WORLDS),
        default="training",
        help="scenes the prompts describe: the shipped model's training world (1-2 objects, 6 colours) "
        "or the full shapes world",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--quick", action="store_true", help="fewer prompts (see the counts above)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/quality-<device>.json)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="render everything again, discarding the batches an interrupted run left in <out>.partial/",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the per-scale counts defaulted (``--quick`` or not) and checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = {"num_prompts": [16, 4, 2], "num_control": [4, 2, 0], "num_lora": 4}
    if not args.quick:
        defaults = {"num_prompts": [200, 50, 25], "num_control": [50, 10, 0], "num_lora": 50}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            if isinstance(value, list):  # defaults cover any number of scales
                value += [value[-1]] * (len(args.scales) - len(value))
            setattr(args, name, value)
    for name in ("num_prompts", "num_control"):
        counts = getattr(args, name)
        if len(counts) < len(args.scales) or any(n < 0 for n in counts):
            parser.error(f"--{name.replace('_', '-')} needs a count >= 0 for each of --scales {args.scales}")
        setattr(args, name, counts[: len(args.scales)])
    if any(s < 1 for s in args.scales) or len(set(args.scales)) != len(args.scales):
        parser.error(f"--scales must be distinct positive ints; got {args.scales}")
    if min(args.num_prompts) < 2:
        parser.error(f"--num-prompts must be at least 2 per scale (Fréchet distance); got {args.num_prompts}")
    if args.num_lora > args.num_prompts[0] or (args.scales[0] != 1 and args.num_lora):
        parser.error("--num-lora must not exceed the prompts of the first scale, which must be 1")
    if min(args.steps, args.batch_size, args.columns) < 1:
        parser.error("--steps, --batch-size and --columns must be at least 1")
    args.variants = [variant for variant in VARIANTS if variant in args.variants]  # teacher first, once
    return args


def native_size(pipe: StableDiffusionPipeline) -> int:
    """Side (px) of the square the pipeline's model was trained at, as its family's adapter reads it."""
    return pipeline_adapter(pipe).native_size(pipe)


def asset(value: str | None, name: str) -> str | None:
    """``value`` as given, ``None`` for ``"none"``, or the shipped asset ``name`` when not given."""
    if value is None:
        return lindiff.assets.path(name)
    return None if value.lower() == "none" else value


@dataclasses.dataclass(frozen=True)
class Rendered:
    """What :func:`generate` rendered, all in ``[-1, 1]``.

    Attributes:
        images: ``(N, 3, S, S)``: the images at their size, or shrunk to ``S = keep_size``.
        native: the chain's native stage ``(N, 3, n, n)`` (``None`` without ``highres``).
        final_native: the final images area-averaged to the native stage's size (``None``
            without ``highres``): what :func:`lindiff.evaluation.chain_fidelity` compares.
    """

    images: torch.Tensor
    native: torch.Tensor | None = None
    final_native: torch.Tensor | None = None

    @classmethod
    def concatenate(cls, parts: Sequence["Rendered"]) -> "Rendered":
        """The batches ``parts`` as one, in order."""

        def cat(name: str) -> torch.Tensor | None:
            tensors = [getattr(part, name) for part in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        return cls(cat("images"), cat("native"), cat("final_native"))


def shrink(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``images`` ``(B, 3, H, W)`` resized to ``size`` px as ``ShapeClassifier.prepare`` does
    (bilinear, antialiased), so the classifier's scores do not change; unchanged when not larger."""
    if size is None or max(images.shape[-2:]) <= size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


class BatchJournal:
    """The rendered batches of a run, one ``torch.save`` file each in ``folder``, so that an
    interrupted run goes on where it stopped: the same command renders only what is missing.

    ``settings`` (JSON) are what the images depend on; a folder written with other settings is
    refused (rerun with ``--fresh``). :meth:`remove` deletes the folder once the results are saved.
    """

    def __init__(self, folder: Path, settings: dict, fresh: bool) -> None:
        self.folder = folder
        if fresh and folder.exists():
            shutil.rmtree(folder)
        stamp = folder / "settings.json"
        text = json.dumps(settings, sort_keys=True, default=str)
        if stamp.exists() and stamp.read_text() != text:
            raise SystemExit(
                f"{folder} holds batches rendered with other settings ({stamp.read_text()}, now {text}); "
                "rerun with --fresh to start over, or give another --out"
            )
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(text)
        self.found = len(list(folder.glob("*.pt")))

    def _file(self, name: str) -> Path:
        return self.folder / f"{name.replace('/', '-')}.pt"

    def get(self, name: str) -> list[Rendered] | None:
        """The batch ``name`` if it was rendered before."""
        path = self._file(name)
        return [Rendered(**stage) for stage in torch.load(path)] if path.exists() else None

    def put(self, name: str, stages: list[Rendered]) -> None:
        """Keep the batch ``name`` (written whole or not at all)."""
        partial = self._file(name).with_suffix(".tmp")
        torch.save([dataclasses.asdict(stage) for stage in stages], partial)
        partial.replace(self._file(name))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def generate(
    pipe: StableDiffusionPipeline,
    examples: Sequence[Example],
    size: int,
    args: argparse.Namespace,
    conditions: Sequence[Image.Image] | None = None,
    highres: bool = False,
    keep_size: int | None = None,
    journal: BatchJournal | None = None,
    name: str = "",
) -> list[Rendered]:
    """Images at ``size`` px for the examples' captions; example ``i``'s seed seeds its noise.

    Direct generation gives one :class:`Rendered`; ``highres`` renders through
    ``HighResPipeline.from_pipe(pipe)`` (it shares ``pipe``'s modules) and gives one per stage of
    the chain, the last being the final images. Prompts go in batches of ``args.batch_size``
    divided by the scale (memory grows with the size). Images larger than ``keep_size`` are kept
    shrunk to it (see :func:`shrink`; a 4096 px image is 200 MB). With a ``journal``, every batch
    is kept under ``name`` and taken from it when it is there.
    """
    native = native_size(pipe)
    batch_size = max(1, args.batch_size * native // size)
    runner, extra = pipe, {}
    if highres:
        # "off": untiled VAE, as tile_vae="auto" chooses up to a few megapixels: tiles of a small
        # VAE shift colours; "auto" tiles where an untiled pass would not fit (4096 px on a CPU).
        runner = HighResPipeline.from_pipe(pipe)
        extra = {
            "tile_vae": "auto" if args.tile_vae == "auto" else False,
            "return_stages": True,
            **chain_options(args),
        }
    batches = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"{name} ({size} px)", leave=False):
        batch = examples[start : start + batch_size]
        batch_name = f"{name}/{start}-{len(batch)}"
        done = journal.get(batch_name) if journal is not None else None
        if done is not None:
            batches.append(done)
            continue
        if conditions is not None:
            extra["image"] = list(conditions[start : start + batch_size])
        output = runner(
            prompt=[example.text for example in batch],
            height=size,
            width=size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=[torch.Generator().manual_seed(example.scene.seed) for example in batch],
            output_type="pt",
            **extra,
        )
        if highres:
            stages = [stage.float().cpu() * 2.0 - 1.0 for stage in output.stages]
            rendered = [
                Rendered(shrink(stage, keep_size), stages[0], downsample(stage, stages[0].shape[-2:]))
                for stage in stages
            ]
        else:
            rendered = [Rendered(shrink(output.images.float().cpu() * 2.0 - 1.0, keep_size))]
        if journal is not None:
            journal.put(batch_name, rendered)
        batches.append(rendered)
    return [Rendered.concatenate(stage) for stage in zip(*batches, strict=True)]


def chain_options(args: argparse.Namespace) -> dict:
    """The ``HighResPipeline`` arguments the options set (none: its defaults)."""
    options = {
        "stages": args.stages,
        "strength_schedule": args.strengths,
        "sdedit_guidance_scale": args.sdedit_guidance,
        "skip_residual": args.skip_residual,
    }
    return {name: value for name, value in options.items() if value is not None}


def chain_layout(
    pipe: StableDiffusionPipeline, size: int, args: argparse.Namespace
) -> tuple[tuple[int, int, float], ...]:
    """``(height, width, strength)`` of every stage of the chain to ``size`` px (stage 1: 1.0)."""
    runner = HighResPipeline.from_pipe(pipe)
    stages = args.stages or "auto"
    sizes = plan_stages(size, size, native_size(pipe), stages, multiple=runner.size_multiple)
    return tuple(
        (h, w, s) for (h, w), s in zip(sizes, [1.0, *stage_strengths(args.strengths, sizes)], strict=True)
    )


def shared_chains(
    pipe: StableDiffusionPipeline, plan: "RunPlan", args: argparse.Namespace
) -> dict[str, tuple[str, int]]:
    """The chain runs read from a longer chain's stages instead of rendered: key -> (the longer run,
    stage index). A chain whose stages, strengths and prompts begin another's renders exactly that
    one's first stages (same seeds, the same noise drawn in the same order), so the 4x and 8x chains
    are stages of the 32x chain: one render gives all three."""
    chains = {key: chain_layout(pipe, size, args) for key, (size, highres) in plan.runs.items() if highres}
    shared = {}
    for key, layout in chains.items():
        longer = [
            other
            for other, other_layout in chains.items()
            if len(other_layout) > len(layout)
            and other_layout[: len(layout)] == layout
            and plan.counts[other] >= plan.counts[key]
        ]
        if longer:
            source = max(longer, key=lambda other: len(chains[other]))
            shared[key] = (source, len(layout) - 1)
    return shared


def direct_seconds_per_image(
    pipe: StableDiffusionPipeline, size: int, args: argparse.Namespace, timed: dict[int, float]
) -> float:
    """Rough seconds per image of direct generation at ``size``: :func:`seconds_per_image` (cached in
    ``timed`` by size) up to ``TIMED_MAX_SCALE`` x native, scaled from there by pixel count above it."""
    measured = min(size, TIMED_MAX_SCALE * native_size(pipe))
    if measured not in timed:
        timed[measured] = seconds_per_image(pipe, measured, args)
    return timed[measured] * (size / measured) ** 2


def highres_seconds_per_image(
    pipe: StableDiffusionPipeline, size: int, args: argparse.Namespace, timed: dict[int, float]
) -> float:
    """Rough seconds per image of the high-resolution chain to ``size``: its stages' direct costs
    (:func:`direct_seconds_per_image`, ``timed`` its cache) times their SDEdit strengths."""
    return sum(
        strength * direct_seconds_per_image(pipe, height, args, timed)
        for height, _, strength in chain_layout(pipe, size, args)
    )


def seconds_per_image(pipe: StableDiffusionPipeline, size: int, args: argparse.Namespace) -> float:
    """Rough seconds per image at ``size`` and ``args.steps`` (from 1- and 3-step calls on 2 prompts)."""

    def call(steps: int) -> float:
        start = time.perf_counter()
        pipe(
            ["a red circle"] * 2,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=args.guidance,
            output_type="pt",
        )
        return time.perf_counter() - start

    call(1)
    one, three = call(1), call(3)
    per_step = max(three - one, 0.0) / 4
    return max(one / 2 - per_step, 0.0) + args.steps * per_step


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` in ``[-1, 1]`` as an RGB image."""
    return Image.fromarray(image.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())


def score(
    classifier: ShapeClassifier, images: torch.Tensor, examples: Sequence[Example], real: torch.Tensor
) -> tuple[dict, list]:
    """Prompt/position accuracy and Fréchet distance to the ``real`` features; also the detections."""
    detections = detect_objects(classifier, images)
    scores = prompt_scores([example.spec for example in examples], detections)
    with torch.no_grad():
        features = torch.cat([classifier.features(chunk).cpu() for chunk in images.split(32)])
    result = {key: value for key, value in scores.items() if not isinstance(value, list)}
    result["frechet_distance"] = frechet_distance(features, real[: len(images)])
    return result, detections


def paired_counts(teacher: Sequence[bool], student: Sequence[bool]) -> dict:
    """Prompts right for both, only one or neither model, and the two-sided sign-test p-value of
    the prompts only one of them gets right (1.0 when there are none)."""
    pairs = collections.Counter(zip(map(bool, teacher), map(bool, student), strict=True))
    teacher_only, student_only = pairs[True, False], pairs[False, True]
    discordant = teacher_only + student_only
    tail = sum(math.comb(discordant, k) for k in range(min(teacher_only, student_only) + 1))
    return {
        "both": pairs[True, True],
        "teacher_only": teacher_only,
        "student_only": student_only,
        "neither": pairs[False, False],
        "sign_test_p": min(1.0, 2 * tail / 2**discordant) if discordant else 1.0,
    }


def control_scores(detections: list, conditions: Sequence[Image.Image], examples: Sequence[Example]) -> dict:
    """Mean and median IoU of each image's detected object pixels with its condition mask."""
    ious = []
    for objects, condition in zip(detections, conditions, strict=True):
        foreground = np.zeros((DETECTION_SIZE, DETECTION_SIZE), dtype=bool)
        for obj in objects:
            foreground |= obj.mask
        ious.append(mask_iou(foreground, condition))
    accuracy = prompt_scores([example.spec for example in examples], detections)["prompt_accuracy"]
    return {
        "mask_iou": statistics.fmean(ious),
        "mask_iou_median": statistics.median(ious),
        "prompt_accuracy": accuracy,
        "num_prompts": len(ious),
    }


def mean_stripes(images: torch.Tensor, detections: list) -> float | None:
    """Mean :func:`stripe_score` over the images with objects (their masks stacked); ``None`` if none."""
    values = [
        stripe_score(image, np.stack([obj.mask for obj in objects]))
        for image, objects in zip(images, detections, strict=True)
        if objects
    ]
    values = [value for value in values if not math.isnan(value)]
    return statistics.fmean(values) if values else None


def save_grid(titles: Sequence[str], rows: Sequence[tuple[str, Sequence[Image.Image]]], path: Path) -> Path:
    """A PNG with one labelled row per entry of ``rows`` and a caption above each column."""
    font = ImageFont.load_default()
    label_width, line = 170, 12
    wrapped = [textwrap.wrap(title, 22) for title in titles]
    header = line * max((len(lines) for lines in wrapped), default=1) + 6
    sheet = Image.new(
        "RGB", (label_width + TILE * len(titles), header + (TILE + 4) * len(rows)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    for column, lines in enumerate(wrapped):
        for index, text in enumerate(lines):
            draw.text((label_width + column * TILE + 3, 3 + index * line), text, fill=(0, 0, 0), font=font)
    for row, (label, images) in enumerate(rows):
        top = header + row * (TILE + 4)
        for index, text in enumerate(textwrap.wrap(label, 26)):
            draw.text((4, top + 4 + index * line), text, fill=(0, 0, 0), font=font)
        for column, image in enumerate(images[: len(titles)]):
            sheet.paste(
                image.resize((TILE, TILE), Image.Resampling.LANCZOS), (label_width + column * TILE, top)
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def accuracy_gap(teacher: dict, student: dict) -> float:
    """Teacher minus student prompt accuracy, rounded to 9 places: 0.73 - 0.70 is 3 points, and
    must not fail "within 3 points" as the float 0.030000000000000027 would."""
    return round(teacher["prompt_accuracy"] - student["prompt_accuracy"], 9)


def chain_targets(student: dict) -> dict:
    """The student's chain-fidelity targets at every ``CHAIN_SCALES`` chain and every other chain
    run: pixel agreement, images without extra objects, prompt accuracy against native (1x).

    A target whose runs are missing has ``"run": False`` and ``"met": None``.
    """
    keys = {f"{scale}x-highres" for scale in CHAIN_SCALES} | {
        key for key in student if key.endswith("-highres")
    }
    found = {}
    for key in sorted(keys, key=lambda key: int(key.split("x")[0])):
        run = student.get(key)
        for name, field, least in (
            ("pixel_agreement", "chain_pixel_agreement", CHAIN_PIXEL_AGREEMENT),
            ("no_extra_objects", "chain_no_extra_objects", CHAIN_NO_EXTRA),
        ):
            value = run[field] if run else None
            found[f"student_chain_{name}_{key}_at_least_{least:.2f}"] = {
                "value": value,
                "met": None if value is None else value >= least,
                "run": run is not None,
            }
        both = run is not None and "1x" in student
        gap = accuracy_gap(student["1x"], run) if both else None
        found[f"student_chain_within_{round(CHAIN_ACCURACY_GAP * 100)}_points_of_1x_{key}"] = {
            "native_minus_chain": gap,
            "met": None if gap is None else gap <= CHAIN_ACCURACY_GAP,
            "run": both,
        }
    return found


def targets(generation: dict) -> dict:
    """The issues' targets, each with its value and whether it is met. The teacher-student ones are
    left out where a scale or variant was not run; the student's chain targets are always listed,
    ``"met": None`` (``"run": False``) where not run."""
    teacher, student = generation.get("teacher", {}), generation.get("student")
    found = {}
    if "1x" in teacher:
        value = teacher["1x"]["prompt_accuracy"]
        found["teacher_prompt_accuracy_1x_at_least_0.80"] = {"value": value, "met": value >= TEACHER_TARGET}
    if student is not None and "1x" in teacher and "1x" in student:
        gap = accuracy_gap(teacher["1x"], student["1x"])
        found["student_within_3_points_of_teacher_1x"] = {
            "teacher_minus_student": gap,
            "met": gap <= STUDENT_GAP,
        }
    for key in teacher:
        if key != "1x" and student is not None and key in student:
            gap = accuracy_gap(teacher[key], student[key])
            found[f"student_not_worse_than_teacher_{key}"] = {"teacher_minus_student": gap, "met": gap <= 0.0}
    found.update(chain_targets(student or {}))
    return found


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a benchmark run renders.

    Attributes:
        native: the model's native size (px).
        sizes: size (px) of every scale, keyed ``"1x"``, ``"2x"``, ...
        runs: ``(size, highres)`` of every generation run, keyed as ``sizes`` (direct generation;
            with ``--highres only`` native size alone) plus ``"2x-highres"``, ...
        counts: prompts of every scale and run (the first ``counts[key]`` of ``examples``).
        control_counts: ControlNet prompts of every scale rendered directly (empty without a ControlNet).
        num_lora: LoRA prompts at native size (0 without a LoRA).
        world: the scenes the prompts describe.
        examples: the prompts, ``make_example(EVAL_SEEDS + i, native, world)``.
    """

    native: int
    sizes: dict[str, int]
    runs: dict[str, tuple[int, bool]]
    counts: dict[str, int]
    control_counts: dict[str, int]
    num_lora: int
    world: ShapesConfig
    examples: list[Example]

    @classmethod
    def from_args(cls, args: argparse.Namespace, native: int, control: bool, lora: bool) -> "RunPlan":
        """The plan of ``args`` for a model of ``native`` px, with or without a ControlNet and a LoRA."""
        sizes = {f"{scale}x": native * scale for scale in args.scales}
        counts = dict(zip(sizes, args.num_prompts, strict=True))
        direct = {key for key, size in sizes.items() if args.highres != "only" or size <= native}
        runs = {key: (size, False) for key, size in sizes.items() if key in direct}
        for key, size in sizes.items():
            if args.highres and size > native:
                runs[f"{key}-highres"] = (size, True)
                counts[f"{key}-highres"] = counts[key]
        control_counts = {}
        if control:
            control_counts = {
                key: count for key, count in zip(sizes, args.num_control, strict=True) if key in direct
            }
        world = WORLDS[args.world]()
        examples = [make_example(EVAL_SEEDS + i, native, world) for i in range(max(args.num_prompts))]
        return cls(native, sizes, runs, counts, control_counts, args.num_lora if lora else 0, world, examples)

    def conditions(self) -> dict[str, list[Image.Image]]:
        """The ControlNet's mask conditions of every scale that has ControlNet prompts."""
        return {
            key: [condition_image(example.scene, "mask", size) for example in self.examples[:count]]
            for key, size in self.sizes.items()
            if (count := self.control_counts.get(key))
        }


@dataclasses.dataclass
class Models:
    """The asset folders of a run (``None``: skipped) and what was loaded from them."""

    paths: dict[str, str | None]
    pipe: StableDiffusionPipeline
    classifier: ShapeClassifier
    control_pipe: StableDiffusionControlNetPipeline | None

    @property
    def student_target(self) -> StableDiffusionPipeline:
        """What ``linearize`` converts: the ControlNet pipeline (its UNet and ControlNet) if there is one."""
        return self.control_pipe if self.control_pipe is not None else self.pipe


def by_variant(variants: Sequence[str] = VARIANTS) -> dict[str, dict]:
    """An empty dict for each variant."""
    return {variant: {} for variant in variants}


@dataclasses.dataclass
class Results:
    """Scores of the variants by run key, and the images of the PNG grid by row label.

    ``chain`` holds, per variant and high-resolution run, the per-image chain fidelity
    (``pixel_agreement``, ``extra_objects``, ``missing_objects``): enough for paired tests.
    """

    generation: dict[str, dict] = dataclasses.field(default_factory=by_variant)
    correct: dict[str, dict[str, list[bool]]] = dataclasses.field(default_factory=by_variant)
    control: dict[str, dict] = dataclasses.field(default_factory=by_variant)
    lora: dict[str, dict] = dataclasses.field(default_factory=dict)
    chain: dict[str, dict] = dataclasses.field(default_factory=by_variant)
    shown: dict[str, list[Image.Image]] = dataclasses.field(default_factory=dict)


def load_models(args: argparse.Namespace, device: torch.device) -> Models:
    """The pipeline, classifier and ControlNet pipeline of ``args`` (the shipped assets by default)."""
    dtype = getattr(torch, args.dtype)
    paths = {
        "model": asset(args.model, "tiny-shapes"),
        "weights": asset(args.weights, "tiny-shapes-linfusion"),
        "controlnet": asset(args.controlnet, "tiny-shapes-controlnet"),
        "lora": asset(args.lora, "tiny-shapes-lora-stripes"),
        "classifier": asset(args.classifier, "tiny-shapes-classifier"),
    }
    if paths["model"] is None or paths["classifier"] is None:
        raise SystemExit("quality.py: --model and --classifier cannot be 'none'")
    pipe = StableDiffusionPipeline.from_pretrained(paths["model"], torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    classifier = ShapeClassifier.from_pretrained(paths["classifier"]).to(device).eval()
    control_pipe = None
    if paths["controlnet"] is not None:
        controlnet = ControlNetModel.from_pretrained(paths["controlnet"], torch_dtype=dtype).to(device)
        control_pipe = StableDiffusionControlNetPipeline(
            **pipe.components, controlnet=controlnet, requires_safety_checker=False
        )
        control_pipe.set_progress_bar_config(disable=True)
    return Models(paths, pipe, classifier, control_pipe)


def estimate_seconds(pipe: StableDiffusionPipeline, plan: RunPlan, args: argparse.Namespace) -> float:
    """Rough seconds of the whole run (teacher speed for every variant), printed with the per-image costs."""
    timed: dict[int, float] = {}
    shared = shared_chains(pipe, plan, args)
    per_image = {
        key: 0.0
        if key in shared
        else (highres_seconds_per_image if highres else direct_seconds_per_image)(pipe, size, args, timed)
        for key, (size, highres) in plan.runs.items()
    }
    work = {key: plan.counts[key] + 1.5 * plan.control_counts.get(key, 0) for key in plan.runs}
    work["1x"] = work.get("1x", 0) + plan.num_lora
    estimate = len(args.variants) * sum(per_image[key] * work[key] for key in plan.runs)
    print(
        f"estimated time: {estimate / 60:.1f} min (teacher speed for {', '.join(args.variants)}; "
        f"seconds per image {per_image})"
    )
    return estimate


def score_real(classifier: ShapeClassifier, plan: RunPlan) -> tuple[dict[str, dict], torch.Tensor]:
    """The classifier's scores on real renders of every scale's prompts, and its features ``(N, F)``
    of native renders of all of them."""
    real = {}
    keep_size = classifier.config.input_size
    for key, size in plan.sizes.items():
        chosen = plan.examples[: plan.counts[key]]
        renders = torch.cat(
            [shrink(to_tensor(render(example.scene, size))[None], keep_size) for example in chosen]
        )
        detections = detect_objects(classifier, renders)
        scores = prompt_scores([example.spec for example in chosen], detections)
        real[key] = {name: value for name, value in scores.items() if not isinstance(value, list)}
        masks = [condition_image(example.scene, "mask", size) for example in chosen]
        real[key]["mask_iou"] = control_scores(detections, masks, chosen)["mask_iou"]
    native_renders = torch.stack([to_tensor(render(example.scene)) for example in plan.examples])
    with torch.no_grad():
        features = torch.cat([classifier.features(chunk).cpu() for chunk in native_renders.split(32)])
    print(f"classifier on real renders: {real}")
    return real, features


def generation_runs(
    variant: str,
    models: Models,
    plan: RunPlan,
    real_features: torch.Tensor,
    args: argparse.Namespace,
    results: Results,
    journal: BatchJournal | None = None,
) -> float | None:
    """Render and score every run of ``variant``; returns the mean stripe score of the first
    ``plan.num_lora`` prompts at 1x (``None`` without a LoRA run). Chain runs that are stages of a
    longer chain (:func:`shared_chains`) are read from it."""
    plain_stripes = None
    keep_size = models.classifier.config.input_size
    shared = shared_chains(models.pipe, plan, args)
    rendered, seconds = {}, {}
    for key, (size, highres) in plan.runs.items():
        if key in shared:
            continue
        start = time.perf_counter()
        chosen = plan.examples[: plan.counts[key]]
        rendered[key] = generate(
            models.pipe,
            chosen,
            size,
            args,
            highres=highres,
            keep_size=keep_size,
            journal=journal,
            name=f"{variant}/{key}",
        )
        seconds[key] = time.perf_counter() - start
    for key, (size, highres) in plan.runs.items():
        source, stage = shared.get(key, (key, -1))
        count = plan.counts[key]
        chosen = plan.examples[:count]
        found = rendered[source][stage]
        images = found.images[:count]
        results.generation[variant][key], detections = score(models.classifier, images, chosen, real_features)
        if highres:
            fidelity = chain_fidelity(models.classifier, found.native[:count], found.final_native[:count])
            results.generation[variant][key].update(
                {f"chain_{name}": value for name, value in fidelity.summary().items() if name != "num_images"}
            )
            results.chain.setdefault(variant, {})[key] = {
                "pixel_agreement": [round(value, 5) for value in fidelity.pixel_agreement],
                "extra_objects": list(fidelity.extra_objects),
                "missing_objects": list(fidelity.missing_objects),
            }
        results.generation[variant][key].update(size=size, seconds=seconds[source])
        if source != key:
            results.generation[variant][key]["stage_of"] = source
        results.correct[variant][key] = [
            prompt_correct(example.spec, objects) for example, objects in zip(chosen, detections, strict=True)
        ]
        results.shown[f"{variant} {key} ({size} px)"] = [to_pil(image) for image in images[: args.columns]]
        print(f"{variant} {key}: {results.generation[variant][key]}")
        if key == "1x" and plan.num_lora:
            plain_stripes = mean_stripes(images[: plan.num_lora], detections[: plan.num_lora])
    return plain_stripes


def control_runs(
    variant: str,
    models: Models,
    conditions: dict[str, list[Image.Image]],
    plan: RunPlan,
    args: argparse.Namespace,
    results: Results,
    journal: BatchJournal | None = None,
) -> None:
    """Render ``variant`` with the ControlNet on every scale's ``conditions`` and score its adherence."""
    keep_size = models.classifier.config.input_size
    for key, key_conditions in conditions.items():
        chosen = plan.examples[: len(key_conditions)]
        size = plan.sizes[key]
        images = generate(
            models.control_pipe,
            chosen,
            size,
            args,
            key_conditions,
            keep_size=keep_size,
            journal=journal,
            name=f"{variant}/control-{key}",
        )[-1].images
        found = detect_objects(models.classifier, images)
        results.control[variant][key] = control_scores(found, key_conditions, chosen)
        results.shown[f"{variant} + ControlNet {key}"] = [to_pil(image) for image in images[: args.columns]]
        print(f"{variant} + ControlNet {key}: {results.control[variant][key]}")


def lora_run(
    variant: str,
    models: Models,
    plain_stripes: float | None,
    plan: RunPlan,
    args: argparse.Namespace,
    results: Results,
    journal: BatchJournal | None = None,
) -> None:
    """Render ``variant`` with the LoRA at native size; its stripe score against ``plain_stripes``."""
    models.pipe.load_lora_weights(models.paths["lora"], adapter_name=LORA_ADAPTER)
    chosen = plan.examples[: plan.num_lora]
    keep_size = models.classifier.config.input_size
    images = generate(
        models.pipe, chosen, plan.native, args, keep_size=keep_size, journal=journal, name=f"{variant}/lora"
    )[-1].images
    models.pipe.unload_lora_weights()
    detections = detect_objects(models.classifier, images)
    results.lora[variant] = {
        "stripe_score_without_lora": plain_stripes,
        "stripe_score_with_lora": mean_stripes(images, detections),
        "prompt_accuracy_with_lora": prompt_scores([e.spec for e in chosen], detections)["prompt_accuracy"],
        "num_prompts": plan.num_lora,
    }
    results.shown[f"{variant} + LoRA 1x"] = [to_pil(image) for image in images[: args.columns]]
    print(f"{variant} + LoRA: {results.lora[variant]}")


def run_variants(
    models: Models,
    plan: RunPlan,
    real_features: torch.Tensor,
    args: argparse.Namespace,
    journal: BatchJournal | None = None,
) -> tuple[Results, list[str]]:
    """Render and score the teacher, then the student (``linearize``, undone at the end), as far as
    ``args.variants`` asks; also the row labels of the PNG grid, in order. Batches go through
    ``journal`` (see :class:`BatchJournal`)."""
    conditions = plan.conditions()
    results = Results(
        generation=by_variant(args.variants),
        correct=by_variant(args.variants),
        control=by_variant(args.variants),
        chain=by_variant(args.variants),
        shown={"real": [render(example.scene) for example in plan.examples[: args.columns]]},
    )
    for variant in args.variants:
        if variant == "student":
            lindiff.linearize(models.student_target, method=args.method, weights=models.paths["weights"])
        plain_stripes = generation_runs(variant, models, plan, real_features, args, results, journal)
        control_runs(variant, models, conditions, plan, args, results, journal)
        if plan.num_lora:
            lora_run(variant, models, plain_stripes, plan, args, results, journal)
    if "student" in args.variants:
        lindiff.restore(models.student_target)
    rows = ["real"] + [
        f"{variant} {key} ({size} px)"
        for key, (size, _) in plan.runs.items()
        for variant in results.generation
    ]
    for key, key_conditions in conditions.items():
        results.shown[f"condition {key}"] = key_conditions[: args.columns]
        rows += [f"condition {key}"] + [f"{variant} + ControlNet {key}" for variant in results.control]
    rows += [f"{variant} + LoRA 1x" for variant in results.lora]
    return results, rows


def run_config(args: argparse.Namespace, models: Models, plan: RunPlan) -> dict:
    """The ``config`` section of the JSON: what was rendered, and how."""
    return {
        **models.paths,
        "method": args.method,
        "native_size": plan.native,
        "sizes": plan.sizes,
        "num_prompts": plan.counts,
        "highres": {
            "mode": args.highres,
            "stages": "auto",
            "strength_schedule": "default (pipelines.sdedit.default_strengths)",
            "sdedit_guidance_scale": "auto",
            **chain_options(args),
            "tile_vae": args.tile_vae,
        }
        if args.highres
        else None,
        "variants": args.variants,
        "num_control": plan.control_counts,
        "num_lora": plan.num_lora,
        "steps": args.steps,
        "guidance": args.guidance,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "prompt_seeds": f"{EVAL_SEEDS} + i",
        "world": {"name": args.world, **dataclasses.asdict(plan.world)},
        "position_min_separation": POSITION_SEPARATION,
    }


def journal_settings(args: argparse.Namespace, models: Models, plan: RunPlan) -> dict:
    """What a run's images depend on (:class:`BatchJournal`): its config without the prompt counts
    (a batch is named by its first prompt and size), and every chain's stages and strengths."""
    config = run_config(args, models, plan)
    for name in ("num_prompts", "num_control", "num_lora"):
        config.pop(name)
    config["chains"] = {
        key: chain_layout(models.pipe, size, args) for key, (size, highres) in plan.runs.items() if highres
    }
    return config


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = load_models(args, device)
    plan = RunPlan.from_args(
        args, native_size(models.pipe), models.control_pipe is not None, models.paths["lora"] is not None
    )
    print(
        f"quality of {models.paths['model']} on {device_label(device)}: sizes {plan.sizes}, prompts {plan.counts}"
    )
    estimate = estimate_seconds(models.pipe, plan, args)
    label = device_label(device, short=True) + ("-quick" if args.quick else "")
    out = results_path(args.out or Path(f"quality-{label}.json"))
    journal = BatchJournal(out.with_suffix(".partial"), journal_settings(args, models, plan), args.fresh)
    if journal.found:
        print(f"resuming: {journal.found} rendered batch(es) in {journal.folder}")
    real, real_features = score_real(models.classifier, plan)
    try:
        results, rows = run_variants(models, plan, real_features, args, journal)
    except KeyboardInterrupt:
        print(f"interrupted; the rendered batches are in {journal.folder}: run the same command to go on")
        raise SystemExit(130) from None
    generation, correct = results.generation, results.correct
    result = {
        "benchmark": "quality",
        "description": __doc__.split("\n\n")[0],
        "environment": environment(),
        "device": device_label(device),
        "config": run_config(args, models, plan),
        "classifier_on_real": real,
        "generation": generation,
        "paired": {key: paired_counts(correct["teacher"][key], correct["student"][key]) for key in plan.runs}
        if len(args.variants) == 2
        else None,
        "controlnet": results.control if plan.control_counts else None,
        "lora": results.lora or None,
        "chain_fidelity": results.chain if args.highres else None,
        "targets": targets(generation),
        "estimated_seconds": estimate,
        "seconds": time.perf_counter() - started,
        "resumed_batches": journal.found,
    }
    path = save_results(result, out)
    titles = [example.text for example in plan.examples[: args.columns]]
    grid = save_grid(titles, [(row, results.shown[row]) for row in rows], path.with_suffix(".png"))
    journal.remove()
    print(f"targets: {result['targets']}")
    print(f"saved {path} and {grid} in {result['seconds'] / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
