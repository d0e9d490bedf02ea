"""One denoising step of an SD 1.5-architecture UNet: softmax (SDPA) vs LinFusion linear attention.

The UNet is built from the SD 1.5 config with random weights (speed does not depend on the
weights). For every image size the variants run in the same process, interleaved: softmax,
LinFusion (q/k MLPs + linear attention) and linear attention alone (``mid_dim=0``); the ratios
variant / softmax of the median step time and of the peak memory are reported:

    python bench/unet_step.py                  # 512, 768, 1024, 1536 px
    python bench/unet_step.py --quick          # 512 and 1024 px, fewer runs
    python bench/unet_step.py --sizes 512 1024 2048 4096 --variants linfusion --sage   # the GPU check

``--sage`` adds the softmax UNet with SageAttention in place of SDPA as a second baseline, where
``import sageattention`` works (a note in the JSON otherwise). ``--channels`` shrinks the UNet's
widths (a smoke test on a CPU); the default is SD 1.5's.

Peak memory is the high-water mark above the memory in use before the step: CUDA's peak
allocator statistics on GPU, the process's peak resident set (reset through
``/proc/self/clear_refs``) on CPU. Results go to ``bench/results/unet_step-<device>.json``,
rewritten after every size (``"complete": false`` until the last).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
from common import (  # bench/ is on sys.path when run as a script
    device_label,
    measure_step,
    sage_attention,
    save_results,
    sdpa_replaced,
)
from diffusers import UNet2DConditionModel

import lindiff
from lindiff.cli import environment
from lindiff.pipelines.peak_memory import PeakMemory

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TEXT_TOKENS = 77
# Converted variants, each timed against softmax in the same run: LinFusion as released (q/k MLPs
# as wide as the layer) and its attention alone (no MLPs), the cost floor of the method.
VARIANTS = {"linfusion": {}, "linear_only": {"mid_dim": 0}}


def step_inputs(size: int, batch: int, device: torch.device, dtype: torch.dtype) -> tuple:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, size // 8, size // 8, generator=generator)
    text = torch.randn(batch, TEXT_TOKENS, SD15_UNET["cross_attention_dim"], generator=generator)
    timestep = torch.tensor([500] * batch)
    return tuple(
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in (latents, timestep, text)
    )


def measure(unet: UNet2DConditionModel, inputs: tuple, repeats: int, memory: PeakMemory) -> dict:
    """Median wall time of ``repeats`` steps after one warm-up, and the peak memory of one step."""
    return measure_step(lambda: unet(*inputs, return_dict=False), repeats, memory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 768, 1024, 1536], help="image sizes (px)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant and size")
    parser.add_argument("--batch", type=int, default=1, help="latent batch (2 for classifier-free guidance)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: float16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="512 and 1024 px, 2 timed steps")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="converted variants"
    )
    parser.add_argument("--sage", action="store_true", help="also softmax with SageAttention, if it imports")
    parser.add_argument(
        "--channels",
        type=int,
        nargs=4,
        default=list(SD15_UNET["block_out_channels"]),
        help="block widths (multiples of 32; default SD 1.5's 320 640 1280 1280)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/unet_step-<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [512, 1024], 2
    bad = [s for s in args.sizes if s <= 0 or s % 64]
    if bad:
        parser.error(f"--sizes must be positive multiples of 64 (the UNet downsamples latents 8x), got {bad}")
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1")
    if any(c <= 0 or c % 32 for c in args.channels):
        parser.error(f"--channels must be positive multiples of 32 (group norm), got {args.channels}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    config = {**SD15_UNET, "block_out_channels": tuple(args.channels)}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
    memory = PeakMemory(device)
    sage, sage_note = sage_attention() if args.sage else (None, None)
    if sage_note:
        print(sage_note)
    baselines = {
        "softmax": contextlib.nullcontext,
        **({"softmax_sage": lambda: sdpa_replaced(sage)} if sage else {}),
    }

    result = {
        "benchmark": "unet_step",
        "description": "one SD 1.5-architecture UNet step: SDPA (softmax) vs LinFusion (q/k MLPs of the layer's width + "
        "linear attention) and linear attention alone (mid_dim=0); ratios are variant / softmax",
        "environment": environment(),
        "device": device_label(device),
        "config": {"dtype": str(dtype), "batch": args.batch, "repeats": args.repeats, "unet": config},
        "sage": sage_note,
        "results": [],
        "complete": False,
    }
    path = args.out or f"unet_step-{device_label(device, short=True)}.json"
    print(
        f"SD 1.5 UNet step on {device_label(device)}, {dtype}, batch {args.batch}, median of {args.repeats}"
    )
    header = f"{'size':>6} {'tokens':>7}" + "".join(f" {name + ' s':>18}" for name in baselines)
    for name in args.variants:
        header += f" {name + ' s':>18} {'x':>6}"
    print(header + f" {'softmax MiB':>12} {'variant MiB':>12} {'mem':>6}")
    for size in args.sizes:
        inputs = step_inputs(size, args.batch, device, dtype)
        row = {"size": size, "tokens": (size // 8) ** 2}
        for name, context in baselines.items():
            with context():
                row[name] = measure(unet, inputs, args.repeats, memory)
        line = f"{size:>6} {row['tokens']:>7}" + "".join(
            f" {row[name]['median_s']:>18.3f}" for name in baselines
        )
        for name in args.variants:
            lindiff.linearize(unet, **VARIANTS[name])
            row[name] = measure(unet, inputs, args.repeats, memory)
            lindiff.restore(unet)
            for base in baselines:
                suffix = "" if base == "softmax" else f"_vs_{base}"
                row[f"{name}_time_ratio{suffix}"] = row[name]["median_s"] / row[base]["median_s"]
            row[f"{name}_memory_ratio"] = row[name]["peak_mib"] / row["softmax"]["peak_mib"]
            line += f" {row[name]['median_s']:>18.3f} {row[f'{name}_time_ratio']:>6.3f}"
        result["results"].append(row)
        save_results(result, path)
        last = args.variants[-1]
        print(
            line + f" {row['softmax']['peak_mib']:>12.0f} {row[last]['peak_mib']:>12.0f}"
            f" {row[f'{last}_memory_ratio']:>6.3f}",
            flush=True,
        )

    result["complete"] = True
    path = save_results(result, path)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
