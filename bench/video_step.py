"""One denoising step of a Wan2.1-T2V-1.3B-architecture transformer: softmax vs CLEAR, LiT and LinFusion.

The transformer has Wan2.1-T2V-1.3B's widths (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: 12 heads x
128, FFN 8960, T5 width 4096, time frequencies 256, 1x2x2 patches, 16 latent channels, RMS q/k
norms across heads, cross-attention norm, eps 1e-6, RoPE table 1024) with random weights (speed
does not depend on them) and 2 of its 30 blocks. A 480p video (832 x 480 px, Wan's default) is a
latent of 60 x 104 per latent frame (8x VAE), 30 x 52 tokens after the patch, and ``4k + 1``
frames make ``k + 1`` latent frames (4x temporal VAE): 17, 33 and 81 frames are 7,800, 14,040 and
32,760 video tokens per self-attention call. The text is 512 T5 tokens (Wan pads to 512).

For every frame count the variants run in the same process on the same model, converted with
``lindiff.linearize`` and put back with ``lindiff.restore``: softmax (diffusers' SDPA), CLEAR
(a disc of ``--clear-radius`` tokens, default 8, in each of the frames within
``--clear-frames-radius`` latent frames, default every frame), LiT
(2 heads, 5x5 depthwise convolution per frame) and LinFusion (as released: q/k MLPs as wide as the
layer). Each variant runs one warm-up step (its peak memory), then the timed steps go round-robin
over the variants so that other load on a shared machine hits all alike. A variant whose step
would exceed ``--max-step-s`` is recorded as not run (``null`` times, the reason beside them),
never filled in: the prediction extrapolates its own step times at the smaller frame counts
(the power of the token count measured between the last two, between 1 and 2; 2 after one).

    python bench/video_step.py                  # 17, 33, 81 frames
    python bench/video_step.py --quick          # 17 frames, 1 timed step
    python bench/video_step.py --frames 17 33 --max-step-s 120

Peak memory is the high-water mark above the memory in use before the step
(``lindiff.pipelines.peak_memory.PeakMemory``). Results go to
``bench/results/video_step-<device>.json``, rewritten after every frame count.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import device_label, save_results, time_call  # bench/ is on sys.path when run as a script
from diffusers import WanTransformer3DModel
from local_attention import clear_window, window_pairs
from torch import nn

import lindiff
from lindiff.cli import environment
from lindiff.pipelines.peak_memory import PeakMemory

WAN21_T2V_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
HEIGHT, WIDTH = 480, 832  # Wan's 480p default
VAE_SPATIAL, VAE_TEMPORAL = 8, 4
TEXT_TOKENS = 512


def variants(radius: float, frames_radius: float | None) -> dict[str, dict[str, Any]]:
    """Converted variants, each timed against softmax in the same run."""
    return {
        "clear": {"method": "clear", "radius": radius, "frames_radius": frames_radius},
        "lit": {"method": "lit", "heads": 2, "kernel_size": 5},
        "linfusion": {"method": "linfusion"},
    }


def latent_shape(frames: int) -> tuple[int, int, int]:
    """``(latent frames, latent height, latent width)`` of a 480p clip of ``frames`` frames."""
    return (frames - 1) // VAE_TEMPORAL + 1, HEIGHT // VAE_SPATIAL, WIDTH // VAE_SPATIAL


def token_grid(frames: int) -> tuple[int, int, int]:
    latent_frames, height, width = latent_shape(frames)
    return latent_frames, height // 2, width // 2


def window_fraction(grid: tuple[int, int, int], radius: float, frames_radius: float | None) -> float:
    """Mean share of the video keys a query sees in CLEAR's window (the grid's border clips it):
    the query-key pairs inside it over ``N^2``."""
    return window_pairs(grid, clear_window(grid, radius, frames_radius)) / math.prod(grid) ** 2


def step_inputs(frames: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, *latent_shape(frames), generator=generator),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, WAN21_T2V_1_3B["text_dim"], generator=generator),
        "timestep": torch.full((1,), 500.0),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}


@contextlib.contextmanager
def converted(model: nn.Module, options: dict[str, Any] | None) -> Iterator[None]:
    """Run the body with ``model`` linearized with ``options`` (``None``: softmax, as built)."""
    if options is None:
        yield
        return
    lindiff.linearize(model, **options)
    try:
        yield
    finally:
        lindiff.restore(model)


def predicted_step_s(history: list[tuple[int, float]], tokens: int) -> float | None:
    """A variant's step time at ``tokens`` extrapolated from ``history`` ``[(tokens, seconds)]``
    (``None`` without one): the power measured between the last two points, within [1, 2]; 2
    after one point."""
    if not history:
        return None
    power = 2.0
    if len(history) > 1:
        (n0, t0), (n1, t1) = history[-2:]
        power = min(2.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    n, t = history[-1]
    return t * (tokens / n) ** power


def measure_frames(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    options: dict[str, dict[str, Any] | None],
    skip: dict[str, str],
    args: argparse.Namespace,
    memory: PeakMemory,
) -> dict[str, dict[str, Any]]:
    """Every variant not in ``skip`` at one frame count: a warm-up step each (its peak memory; a
    warm-up past ``args.max_step_s`` ends that variant), then ``args.repeats`` interleaved rounds."""

    def step() -> None:
        model(**inputs, return_dict=False)

    results: dict[str, dict[str, Any]] = {}
    for name in options:
        results[name] = {"median_s": None, "times_s": [], "warmup_s": None, "peak_mib": None}
        if name in skip:
            results[name]["not_run"] = skip[name]
    running = [name for name in options if name not in skip]
    with torch.inference_mode():
        for name in list(running):
            with converted(model, options[name]):
                memory.start()
                warmup = time_call(step, memory.device)
                results[name].update(warmup_s=warmup, peak_mib=memory.added_bytes() / 2**20)
            print(f"    {name}: warm-up {warmup:.1f} s", flush=True)
            if warmup > args.max_step_s:
                results[name]["not_run"] = (
                    f"timed steps: the warm-up took {warmup:.0f} s > {args.max_step_s:.0f} s"
                )
                running.remove(name)
        for _ in range(args.repeats):
            for name in running:
                with converted(model, options[name]):
                    results[name]["times_s"].append(time_call(step, memory.device))
    for name in running:
        results[name]["median_s"] = statistics.median(results[name]["times_s"])
    return results


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 81], help="video frames (4k + 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per variant and frame count")
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (Wan2.1-1.3B has 30)")
    parser.add_argument(
        "--clear-radius",
        type=float,
        default=8.0,
        help="CLEAR's window radius in tokens, within a frame (default 8)",
    )
    parser.add_argument(
        "--clear-frames-radius",
        type=float,
        default=None,
        help="latent frames CLEAR's window reaches each way (default: every frame)",
    )
    parser.add_argument(
        "--max-step-s",
        type=float,
        default=300.0,
        help="a variant whose step is predicted (or whose warm-up is measured) above this is not run",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="17 frames, 1 timed step")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/video_step-<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.repeats = [17], 1
    bad = [f for f in args.frames if f < 1 or (f - 1) % VAE_TEMPORAL]
    if bad:
        parser.error(
            f"--frames must be 4k + 1 (Wan's VAE keeps the first frame, then 4 per latent frame), got {bad}"
        )
    if args.repeats < 1 or args.blocks < 1:
        parser.error("--repeats and --blocks must be at least 1")
    if args.clear_radius <= 0 or args.max_step_s <= 0:
        parser.error("--clear-radius and --max-step-s must be positive")
    if args.clear_frames_radius is not None and args.clear_frames_radius < 0:
        parser.error("--clear-frames-radius must be at least 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    config = {**WAN21_T2V_1_3B, "num_layers": args.blocks}
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(device).eval()
    keep = set(model._keep_in_fp32_modules)  # what from_pretrained(torch_dtype=...) keeps in float32
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not keep & set(name.split(".")):
            tensor.data = tensor.data.to(dtype)
    params = sum(p.numel() for p in model.parameters())
    memory = PeakMemory(device)
    converted_variants = variants(args.clear_radius, args.clear_frames_radius)
    options: dict[str, dict[str, Any] | None] = {"softmax": None, **converted_variants}
    frames_text = "all" if args.clear_frames_radius is None else f"{args.clear_frames_radius:g}"
    result = {
        "benchmark": "video_step",
        "description": f"one Wan2.1-T2V-1.3B-architecture transformer step with random weights and {args.blocks} "
        f"blocks at 480p ({WIDTH} x {HEIGHT} px), batch 1, {TEXT_TOKENS} text tokens: SDPA (softmax) vs CLEAR "
        f"(a disc of radius {args.clear_radius:g} tokens in each frame within {frames_text} latent frames) vs LiT "
        "(2 heads, 5x5 depthwise conv per frame) vs LinFusion (as released); timed steps interleaved; ratios "
        "are variant / softmax; a variant predicted or measured above max_step_s is not run (null)",
        "environment": environment(),
        "device": device_label(device),
        "config": {
            "dtype": str(dtype),
            "batch": 1,
            "repeats": args.repeats,
            "frames": args.frames,
            "max_step_s": args.max_step_s,
            "transformer": {**config, "patch_size": list(config["patch_size"])},
            "parameters": params,
            "variants": converted_variants,
        },
        "rows": [],
        "complete": False,
    }
    path = args.out or f"video_step-{device_label(device, short=True)}.json"
    print(
        f"Wan2.1-1.3B widths, {args.blocks} blocks ({params / 1e6:.0f}M parameters), 480p, on "
        f"{device_label(device)}, {dtype}, median of {args.repeats}"
    )
    names = [name for name in options if name != "softmax"]
    print(
        f"{'frames':>6} {'tokens':>7} {'softmax s':>10}"
        + "".join(f" {v + ' s':>11} {'x':>6}" for v in names)
        + f" {'softmax MiB':>12}"
        + "".join(f" {v + ' MiB':>13} {'x':>6}" for v in names)
    )
    history: dict[str, list[tuple[int, float]]] = {name: [] for name in options}
    for frames in args.frames:
        grid = token_grid(frames)
        tokens = math.prod(grid)
        skip = {}
        for name in options:
            predicted = predicted_step_s(history[name], tokens)
            if predicted is not None and predicted > args.max_step_s:
                skip[name] = f"predicted step {predicted:.0f} s > max_step_s {args.max_step_s:.0f} s"
        print(f"  {frames} frames: grid {grid}, {tokens} tokens", flush=True)
        measured = measure_frames(model, step_inputs(frames, device, dtype), options, skip, args, memory)
        row = {
            "frames": frames,
            "latent": list(latent_shape(frames)),
            "token_grid": list(grid),
            "video_tokens": tokens,
            "clear_window_fraction": window_fraction(grid, args.clear_radius, args.clear_frames_radius),
            **measured,
        }
        base = measured["softmax"]
        for name in names:
            row[f"{name}_time_ratio"] = ratio(measured[name]["median_s"], base["median_s"])
            row[f"{name}_memory_ratio"] = ratio(measured[name]["peak_mib"], base["peak_mib"])
        for name in options:
            if measured[name]["median_s"] is not None:
                history[name].append((tokens, measured[name]["median_s"]))
        result["rows"].append(row)
        save_results(result, path)
        line = f"{frames:>6} {tokens:>7} {cell(base['median_s'], '>10.1f')}"
        line += "".join(
            f" {cell(measured[v]['median_s'], '>11.1f')} {cell(row[f'{v}_time_ratio'], '>6.2f')}"
            for v in names
        )
        line += f" {cell(base['peak_mib'], '>12.0f')}"
        line += "".join(
            f" {cell(measured[v]['peak_mib'], '>13.0f')} {cell(row[f'{v}_memory_ratio'], '>6.2f')}"
            for v in names
        )
        print(line, flush=True)
    result["complete"] = True
    path = save_results(result, path)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
