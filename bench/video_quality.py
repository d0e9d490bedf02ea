"""Video quality of the embedded motion model and of its LinFusion student, scored by the shapes classifier.

The teacher (``lindiff.assets.motion_pipeline()``: the tiny-shapes UNet with softmax spatial
attention and its motion adapter) and the student (the same pipeline after ``lindiff.linearize``
with the image model's LinFusion weights, unchanged) render the same held-out motion captions
with the same seeds, at 8 and 16 frames, and at 2x the native size through ``HighResPipeline``
(``--highres-prompts``). Each clip is scored by :func:`lindiff.evaluation.score_clip`:

- per-frame prompt accuracy: the frames showing exactly the caption's objects;
- direction accuracy: each named object tracked through the frames by its colour, its fitted
  velocity's direction ("still" below 0.01 image sides per frame) against the caption's; also
  per clip (every object right);
- temporal consistency: every named object found in every frame with one shape throughout;
- paired counts and a two-sided sign test, teacher against student, per clip.

The temporal attention (motion modules) stays softmax in both: it runs over 8-16 frames per pixel.

    python bench/video_quality.py                     # 200 prompts; resumes from its .jsonl
    python bench/video_quality.py --quick             # 6 prompts, to check the path

Captions are ``sample_clip(40_000_000 + i)`` from the motion model's world (its training clips
come from seeds 3,000,000 on). Results: ``bench/results/video_quality-<device>[-quick].json``,
per-clip records in the ``.jsonl`` beside it (an interrupted run continues from them), and a
``.png`` strip of frames.
"""

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import RESULTS, device_label, save_results  # bench/ is on sys.path when run as a script
from PIL import Image, ImageDraw
from quality import paired_counts
from tqdm.auto import tqdm

import lindiff
import lindiff.assets
from lindiff.cli import environment
from lindiff.data import parse_motion_caption, sample_clip
from lindiff.evaluation import ShapeClassifier, detect_objects, score_clip

CLIP_SEEDS = 40_000_000
MODELS = ("teacher", "student")
TARGETS = {"teacher_direction": 0.75, "teacher_frame_accuracy": 0.70, "student_gap_points": 5.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="held-out captions per frame count")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16], help="frame counts at native size")
    parser.add_argument(
        "--highres-prompts",
        type=int,
        default=50,
        help="captions rendered at 2x through HighResPipeline (0: none)",
    )
    parser.add_argument("--highres-frames", type=int, default=8, help="frames of the 2x clips")
    parser.add_argument("--weights", help="student weights (default: the tiny-shapes-linfusion asset)")
    parser.add_argument("--method", default="linfusion", help="lindiff method of the student")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--strip", type=int, default=4, help="captions shown in the PNG strip")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="6 prompts per frame count, 2 at 2x")
    parser.add_argument(
        "--report", action="store_true", help="render nothing: write the JSON from the clips recorded so far"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON path (default bench/results/video_quality-<device>.json)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("prompts", "highres_frames", "steps", "strip"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive int; got {getattr(args, name)}")
    if args.highres_prompts < 0 or any(f < 2 for f in args.frames):
        raise SystemExit("--highres-prompts must be >= 0 and every --frames value >= 2")
    if args.quick:
        args.prompts, args.highres_prompts = 6, min(args.highres_prompts, 2)
    return args


def load_models(args: argparse.Namespace, device: torch.device) -> dict:
    teacher = lindiff.assets.motion_pipeline().to(device)
    student = lindiff.assets.motion_pipeline()
    weights = args.weights or lindiff.assets.path("tiny-shapes-linfusion")
    lindiff.linearize(student, method=args.method, weights=weights)
    student.to(device)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    return {"teacher": teacher, "student": student, "weights": weights}


def render_clip(
    pipe, caption: str, seed: int, frames: int, args: argparse.Namespace, scale: int
) -> list[Image.Image]:
    """The frames of one clip: direct at native size, through ``HighResPipeline`` above it."""
    generator = torch.Generator().manual_seed(seed)
    options = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator)
    if scale == 1:
        return pipe(caption, num_frames=frames, **options).frames[0]
    from lindiff.pipelines import HighResPipeline

    size = 128 * scale
    return HighResPipeline(pipe)(caption, height=size, width=size, num_frames=frames, **options).images[0]


def run_key(model: str, frames: int, scale: int, index: int) -> str:
    return f"{model}/{frames}f/{scale}x/{index}"


def load_records(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {record["key"]: record for record in records}


def summarize(records: Sequence[dict]) -> dict:
    """Mean scores of one model at one setting."""
    motions = [ok for record in records for ok in record["motions_correct"]]
    return {
        "clips": len(records),
        "frame_accuracy": statistics.fmean(r["frame_accuracy"] for r in records),
        "direction_accuracy": statistics.fmean(motions),
        "clip_direction_accuracy": statistics.fmean(all(r["motions_correct"]) for r in records),
        "consistency": statistics.fmean(r["consistent"] for r in records),
        "seconds_per_clip": statistics.fmean(r["seconds"] for r in records),
    }


def compare(teacher: Sequence[dict], student: Sequence[dict]) -> dict:
    """Teacher against student on the same clips: score gaps in points and paired counts."""
    t, s = summarize(teacher), summarize(student)
    return {
        "teacher": t,
        "student": s,
        "student_minus_teacher_points": {
            key: round(100 * (s[key] - t[key]), 2)
            for key in ("frame_accuracy", "direction_accuracy", "clip_direction_accuracy", "consistency")
        },
        "paired_clip_direction": paired_counts(
            [all(r["motions_correct"]) for r in teacher], [all(r["motions_correct"]) for r in student]
        ),
        "paired_all_frames_right": paired_counts(
            [r["frame_accuracy"] == 1.0 for r in teacher], [r["frame_accuracy"] == 1.0 for r in student]
        ),
    }


def targets(settings: dict) -> dict:
    """The issue's targets next to the measured figures."""
    out = {}
    eight = settings.get("8f/1x")
    if eight:
        t, gap = eight["teacher"], eight["student_minus_teacher_points"]
        out["teacher_direction_8f"] = {"target": ">= 0.75", "measured": t["direction_accuracy"]}
        out["teacher_frame_accuracy_8f"] = {"target": ">= 0.70", "measured": t["frame_accuracy"]}
        out["student_gap_direction_8f"] = {"target": ">= -5 points", "measured": gap["direction_accuracy"]}
        out["student_gap_frames_8f"] = {"target": ">= -5 points", "measured": gap["frame_accuracy"]}
        for entry in out.values():
            value, bound = entry["measured"], float(entry["target"].split()[1])
            entry["met"] = value >= bound
    sixteen = settings.get("16f/1x")
    if sixteen:
        gap = sixteen["student_minus_teacher_points"]
        out["student_no_worse_16f"] = {
            "target": "student >= teacher (direction and per-frame accuracy)",
            "measured": {"direction": gap["direction_accuracy"], "frames": gap["frame_accuracy"]},
            "met": gap["direction_accuracy"] >= 0 and gap["frame_accuracy"] >= 0,
            "sign_test_p_clip_direction": sixteen["paired_clip_direction"]["sign_test_p"],
        }
    return out


def save_strip(rows: Sequence[tuple[str, Sequence[Image.Image]]], path: Path, size: int = 96) -> Path:
    """One row of frames per (label, frames), the label above it."""
    width = max(len(frames) for _, frames in rows) * size
    sheet = Image.new("RGB", (width, len(rows) * (size + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, frames) in enumerate(rows):
        top = row * (size + 14)
        draw.text((2, top + 1), label[:160], fill="black")
        for column, frame in enumerate(frames):
            sheet.paste(frame.resize((size, size)), (column * size, top + 14))
    sheet.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = (
        args.out
        or RESULTS / f"video_quality-{device_label(device, short=True)}{'-quick' if args.quick else ''}.json"
    )
    log = out.with_suffix(".jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    records = load_records(log)
    models = load_models(args, device)
    classifier = (
        ShapeClassifier.from_pretrained(lindiff.assets.path("tiny-shapes-classifier")).to(device).eval()
    )
    world = lindiff.assets.world(lindiff.assets.MOTION_MODEL)
    captions = [
        sample_clip(CLIP_SEEDS + i, config=world).caption
        for i in range(max(args.prompts, args.highres_prompts))
    ]
    runs = [(frames, 1, args.prompts) for frames in args.frames]
    if args.highres_prompts:
        runs.append((args.highres_frames, 2, args.highres_prompts))
    jobs = [(m, f, s, i) for f, s, n in runs for i in range(n) for m in MODELS]
    strip: list[tuple[str, Sequence[Image.Image]]] = []
    started = time.perf_counter()
    with open(log, "a", encoding="utf-8") as sink:
        for model, frames, scale, index in tqdm([] if args.report else jobs, desc="clips", mininterval=5.0):
            key = run_key(model, frames, scale, index)
            keep = index < args.strip and frames == args.frames[0] and scale == 1
            if key in records and not keep:
                continue
            tic = time.perf_counter()
            clip = render_clip(models[model], captions[index], index, frames, args, scale)
            seconds = time.perf_counter() - tic
            if keep:
                strip.append((f"{model}: {captions[index]}", clip))
            if key in records:
                continue
            score = score_clip(parse_motion_caption(captions[index]), detect_objects(classifier, clip))
            record = {
                "key": key,
                "caption": captions[index],
                "frame_accuracy": score.frame_accuracy,
                "motions": list(score.motions),
                "motions_correct": list(score.motions_correct),
                "consistent": score.consistent,
                "seconds": round(seconds, 3),
            }
            records[key] = record
            sink.write(json.dumps(record) + "\n")
            sink.flush()
    settings = {}
    for frames, scale, count in runs:
        done = [i for i in range(count) if all(run_key(m, frames, scale, i) in records for m in MODELS)]
        if done:
            pick = {m: [records[run_key(m, frames, scale, i)] for i in done] for m in MODELS}
            settings[f"{frames}f/{scale}x"] = compare(pick["teacher"], pick["student"]) | {
                "complete": len(done) == count
            }
    result = {
        "benchmark": "video_quality",
        "device": device_label(device),
        "environment": environment(),
        "settings_run": vars(args) | {"out": str(out)},
        "student": {"method": args.method, "weights": str(models["weights"])},
        "caption_seeds": f"sample_clip({CLIP_SEEDS} + i)",
        "wall_seconds_this_run": round(time.perf_counter() - started, 1),
        "results": settings,
        "targets": targets(settings),
    }
    save_results(result, out)
    print(json.dumps({"results": settings, "targets": result["targets"]}, indent=1))
    print(f"saved {out}")
    if strip:
        print(f"saved {save_strip(strip, out.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
