"""One denoising step of FLUX- and PixArt-architecture transformers: softmax vs CLEAR vs LiT.

The transformers are built from the released configs' widths with random weights (speed does
not depend on the weights) and fewer blocks, so they fit in CPU memory:

- ``flux``: FLUX.1-dev (24 heads x 128, joint width 4096, pooled 768, guidance embedding, RoPE
  axes 16/56/56) with 2 double-stream + 4 single-stream blocks (of 19 + 38), 512 T5 tokens;
- ``pixart``: PixArt-Sigma XL/2 (16 heads x 72, patch 2, caption width 4096) with 4 blocks (of
  28), 300 T5 tokens.

Both see ``(size / 16)^2`` image tokens (8x VAE, then 2x2 patches). For every model and image
size the variants run in the same process on the same model: softmax (diffusers' SDPA), CLEAR
(``radius=16`` tokens, text global) and LiT (2 heads, 5x5 depthwise conv), converted with
``lindiff.linearize`` and put back with ``lindiff.restore``. Each variant first runs one warm-up
step (whose peak memory is recorded), then the timed steps go round-robin over the variants, so
that other load on a shared machine hits all of them alike. The ratios variant / softmax of the
median step time and of the peak memory are reported:

    python bench/dit_step.py                   # 256, 512, 768, 1024 px, both models
    python bench/dit_step.py --quick           # 256 and 512 px, 2 timed steps
    python bench/dit_step.py --models pixart --sizes 1024 2048 --flux-blocks 2 4 --pixart-blocks 4

Peak memory is the high-water mark above the memory in use before the step
(``lindiff.pipelines.peak_memory.PeakMemory``: CUDA allocator statistics, or the CPU resident
set). Results go to ``bench/results/dit_step-<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (  # bench/ is on sys.path when run as a script
    device_label,
    sage_attention,
    save_results,
    sdpa_replaced,
    time_call,
)
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel
from torch import nn

import lindiff
from lindiff.cli import environment
from lindiff.pipelines.peak_memory import PeakMemory

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
PIXART_SIGMA = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    caption_channels=4096,
    sample_size=128,
    patch_size=2,
    interpolation_scale=2,
    use_additional_conditions=False,
)
PIXELS_PER_TOKEN = 16  # 8x VAE, 2x2 patches (FLUX packs 2x2 latent pixels per token)
# Converted variants, each timed against softmax in the same run.
VARIANTS = {
    "clear": {"method": "clear", "radius": 16},
    "lit": {"method": "lit", "heads": 2, "kernel_size": 5},
}


@dataclass(frozen=True)
class DiT:
    """A benchmarked transformer: its config (depth set by the command line) and step inputs."""

    config: dict[str, Any]
    text_tokens: int
    build: Callable[[dict[str, Any]], nn.Module]
    inputs: Callable[[DiT, int, int, torch.Generator], dict[str, torch.Tensor]]


def flux_inputs(spec: DiT, size: int, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    side = size // PIXELS_PER_TOKEN
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, side * side, spec.config["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(
            batch, spec.text_tokens, spec.config["joint_attention_dim"], generator=generator
        ),
        "pooled_projections": torch.randn(batch, spec.config["pooled_projection_dim"], generator=generator),
        "timestep": torch.full((batch,), 0.5),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(spec.text_tokens, 3),
    }


def pixart_inputs(spec: DiT, size: int, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    latent = size // 8
    return {
        "hidden_states": torch.randn(batch, spec.config["in_channels"], latent, latent, generator=generator),
        "encoder_hidden_states": torch.randn(
            batch, spec.text_tokens, spec.config["caption_channels"], generator=generator
        ),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


MODELS = {
    "flux": DiT(FLUX_DEV, 512, lambda config: FluxTransformer2DModel(**config), flux_inputs),
    "pixart": DiT(PIXART_SIGMA, 300, lambda config: PixArtTransformer2DModel(**config), pixart_inputs),
}


def to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return value


# Softmax baselines, run on the model as built: name -> context the step runs in (main adds
# ``softmax_sage`` where SageAttention imports).
BASELINES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {"softmax": contextlib.nullcontext}


@contextlib.contextmanager
def variant(model: nn.Module, name: str) -> Iterator[None]:
    """Run the body with ``model`` converted to variant ``name`` (a baseline: as built)."""
    if name in BASELINES:
        with BASELINES[name]():
            yield
        return
    lindiff.linearize(model, **VARIANTS[name])
    try:
        yield
    finally:
        lindiff.restore(model)


def measure_size(model: nn.Module, inputs: dict[str, Any], repeats: int, memory: PeakMemory) -> dict:
    """Every variant at one size: a warm-up step each (its peak memory), then ``repeats`` rounds of
    one timed step per variant, interleaved so that load on a shared machine hits all alike."""

    def step() -> None:
        model(**inputs, return_dict=False)

    names = [*BASELINES, *VARIANTS]
    results = {name: {"times_s": []} for name in names}
    with torch.inference_mode():
        for name in names:
            with variant(model, name):
                memory.start()
                results[name]["warmup_s"] = time_call(step, memory.device)
                results[name]["peak_mib"] = memory.added_bytes() / 2**20
        for _ in range(repeats):
            for name in names:
                with variant(model, name):
                    results[name]["times_s"].append(time_call(step, memory.device))
    for result in results.values():
        result["median_s"] = statistics.median(result["times_s"])
    return results


def run_model(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    record: dict,
    save: Callable[[], object],
) -> None:
    """Time the baselines and every variant at every size on one model; prints a table and fills
    ``record`` (``config``, ``parameters``, ``text_tokens``, ``rows``), calling ``save`` after each size."""
    spec = MODELS[name]
    config = model_config(name, args)
    torch.manual_seed(0)
    model = spec.build(config).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    memory = PeakMemory(device)
    print(f"\n{name}: {params / 1e6:.0f}M parameters, {spec.text_tokens} text tokens")
    header = f"{'size':>6} {'tokens':>7} {'softmax s':>10}"
    header += "".join(f" {v + ' s':>9} {'x':>6}" for v in VARIANTS)
    header += f" {'softmax MiB':>12}" + "".join(f" {v + ' MiB':>10} {'x':>6}" for v in VARIANTS)
    print(header)
    record.update(config=config, parameters=params, text_tokens=spec.text_tokens, rows=[])
    for size in args.sizes:
        inputs = spec.inputs(spec, size, args.batch, torch.Generator().manual_seed(0))
        row = {"size": size, "image_tokens": (size // PIXELS_PER_TOKEN) ** 2}
        row.update(measure_size(model, to_device(inputs, device, dtype), args.repeats, memory))
        base = row["softmax"]
        for v in VARIANTS:
            row[f"{v}_time_ratio"] = row[v]["median_s"] / base["median_s"]
            row[f"{v}_memory_ratio"] = row[v]["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else None
            if "softmax_sage" in row:
                row[f"{v}_time_ratio_vs_softmax_sage"] = row[v]["median_s"] / row["softmax_sage"]["median_s"]
        record["rows"].append(row)
        save()
        line = f"{size:>6} {row['image_tokens']:>7} {base['median_s']:>10.3f}"
        line += "".join(f" {row[v]['median_s']:>9.3f} {row[f'{v}_time_ratio']:>6.3f}" for v in VARIANTS)
        line += f" {base['peak_mib']:>12.0f}"
        for v in VARIANTS:
            ratio = row[f"{v}_memory_ratio"]
            line += f" {row[v]['peak_mib']:>10.0f} {'-' if ratio is None else f'{ratio:.3f}':>6}"
        print(line, flush=True)


def model_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The released config with the depth given on the command line."""
    if name == "flux":
        return {**FLUX_DEV, "num_layers": args.flux_blocks[0], "num_single_layers": args.flux_blocks[1]}
    return {**PIXART_SIGMA, "num_layers": args.pixart_blocks}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512, 768, 1024], help="image sizes (px)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant and size")
    parser.add_argument("--batch", type=int, default=1, help="latent batch")
    parser.add_argument(
        "--flux-blocks",
        type=int,
        nargs=2,
        default=[2, 4],
        metavar=("DOUBLE", "SINGLE"),
        help="FLUX double- and single-stream blocks (FLUX.1 has 19 and 38)",
    )
    parser.add_argument("--pixart-blocks", type=int, default=4, help="PixArt blocks (PixArt-Sigma has 28)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--quick", action="store_true", help="256 and 512 px, 2 timed steps")
    parser.add_argument("--sage", action="store_true", help="also softmax with SageAttention, if it imports")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/dit_step-<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [256, 512], 2
    bad = [s for s in args.sizes if s <= 0 or s % PIXELS_PER_TOKEN]
    if bad:
        parser.error(
            f"--sizes must be positive multiples of {PIXELS_PER_TOKEN} (8x VAE, 2x2 patches), got {bad}"
        )
    if args.repeats < 1 or args.batch < 1:
        parser.error("--repeats and --batch must be at least 1")
    if min(args.flux_blocks) < 0 or sum(args.flux_blocks) < 1 or args.pixart_blocks < 1:
        parser.error("--flux-blocks must be two counts >= 0 (not both 0) and --pixart-blocks at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    sage, sage_note = sage_attention() if args.sage else (None, None)
    if sage is not None:
        BASELINES["softmax_sage"] = lambda: sdpa_replaced(sage)
    result = {
        "benchmark": "dit_step",
        "description": f"one transformer step with random weights, FLUX.1-dev widths with {args.flux_blocks[0]} "
        f"double + {args.flux_blocks[1]} single blocks and PixArt-Sigma widths with {args.pixart_blocks} blocks: "
        "SDPA (softmax) vs CLEAR (radius 16, text global) vs LiT (2 heads, 5x5 depthwise conv); timed steps "
        "interleaved across variants; ratios are variant / softmax",
        "environment": environment(),
        "device": device_label(device),
        "config": {
            "dtype": str(dtype),
            "batch": args.batch,
            "repeats": args.repeats,
            "sizes": args.sizes,
            "variants": VARIANTS,
            "baselines": list(BASELINES),
        },
        "sage": sage_note,
        "models": {},
        "complete": False,
    }
    path = args.out or f"dit_step-{device_label(device, short=True)}.json"
    print(f"DiT step on {device_label(device)}, {dtype}, batch {args.batch}, median of {args.repeats}")
    if sage_note:
        print(sage_note)
    for name in args.models:
        result["models"][name] = {}
        run_model(name, args, device, dtype, result["models"][name], lambda: save_results(result, path))
    result["complete"] = True
    path = save_results(result, path)
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
