"""The high-resolution SDEdit chain on an SD 1.5-architecture pipeline: softmax vs LinFusion.

The UNet has the SD 1.5 config with random weights (speed and memory do not depend on the
weights); the VAE has the SD 1.5 VAE config (``--vae sd``) or a narrow 8x one (``--vae small``),
the text encoder is a one-layer CLIP of SD 1.5's width, both random. For every target size the
chain (``HighResPipeline``: native 512 px, then 2x stages with LinFusion's strengths, tiled VAE)
runs with softmax attention and with ``lindiff.linearize`` (LinFusion, fresh weights) on the same
pipeline, in the same process; the ratios LinFusion / softmax of the wall time and of the peak
memory are reported, and the growth of the peak memory per added megapixel from one size to the
next shows how memory grows with pixel count (constant when linear):

    python bench/highres.py                    # chains to 1024, 2048, 4096 px, 10 steps
    python bench/highres.py --quick            # 256 and 512 px from native 256 px, 3 steps, small VAE

Per stage, the time runs from the end of the previous stage's last step to the end of this
stage's last step (so it holds the VAE round trip between stages); the final decode is reported
apart. Peak memory is the high-water mark above the memory in use before the chain
(``lindiff.pipelines.peak_memory.PeakMemory``: CUDA allocator statistics, or the CPU resident
set). Results go to ``bench/results/highres-<device>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from common import device_label, save_results  # bench/ is on sys.path when run as a script
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from unet_step import SD15_UNET

import lindiff
from lindiff.cli import environment
from lindiff.pipelines import HighResPipeline, HighResProgress
from lindiff.pipelines.peak_memory import PeakMemory

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
PROMPT = "a red circle above a blue square"
VAES = {
    "sd": dict(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    "small": dict(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
}
TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1)


def build_pipeline(vae: str, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """SD 1.5-architecture pipeline with random weights (UNet as released, ``vae``, a 1-layer text encoder)."""
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77)
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAES[vae]),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe


def run_chain(hr: HighResPipeline, size: int, args: argparse.Namespace, memory: PeakMemory) -> dict:
    """One chain to ``size`` px: total and per-stage seconds, the final decode's seconds, peak MiB."""
    last_step: dict[int, float] = {}

    def on_progress(event: HighResProgress) -> None:
        if event.step == event.num_steps:
            if memory.device.type == "cuda":
                torch.cuda.synchronize(memory.device)
            last_step[event.stage] = time.perf_counter()

    memory.start()
    start = time.perf_counter()
    hr(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        native_size=args.native_size,
        generator=torch.Generator().manual_seed(0),
        tile_vae=True,
        sequential_cfg_above=args.sequential_cfg_above,
        feed_forward_chunk_size=args.feed_forward_chunk_size,
        output_type="pt",
        on_progress=on_progress,
    )
    if memory.device.type == "cuda":
        torch.cuda.synchronize(memory.device)
    end = time.perf_counter()
    marks = [start] + [last_step[stage] for stage in sorted(last_step)]
    return {
        "total_s": end - start,
        "stage_s": [b - a for a, b in itertools.pairwise(marks)],
        "final_decode_s": end - marks[-1],
        "peak_mib": memory.added_bytes() / 2**20,
    }


def measure(hr: HighResPipeline, size: int, args: argparse.Namespace, memory: PeakMemory) -> dict:
    """``args.repeats`` chains: medians of the times, the first chain's peak memory."""
    runs = [run_chain(hr, size, args, memory) for _ in range(args.repeats)]
    return {
        "total_s": statistics.median(run["total_s"] for run in runs),
        "stage_s": [
            statistics.median(times) for times in zip(*(run["stage_s"] for run in runs), strict=True)
        ],
        "final_decode_s": statistics.median(run["final_decode_s"] for run in runs),
        "peak_mib": runs[0]["peak_mib"],
        "runs_total_s": [run["total_s"] for run in runs],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="target sizes (px)")
    parser.add_argument("--steps", type=int, default=10, help="num_inference_steps of the chain")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="guidance_scale (CFG batch of 2 when > 1)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="chains per variant and size")
    parser.add_argument(
        "--native-size", type=int, default=None, help="first-stage size (default: 512, the model's)"
    )
    parser.add_argument("--vae", choices=sorted(VAES), default="sd", help="VAE architecture (random weights)")
    parser.add_argument(
        "--sequential-cfg-above",
        type=int,
        default=None,
        help="HighResPipeline's sequential_cfg_above (pixels)",
    )
    parser.add_argument(
        "--feed-forward-chunk-size", type=int, default=None, help="HighResPipeline's feed_forward_chunk_size"
    )
    parser.add_argument("--offload", action="store_true", help="enable_model_cpu_offload (CUDA only)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="default: float16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--contended", action="store_true", help="record that other jobs shared the machine")
    parser.add_argument(
        "--quick", action="store_true", help="256 and 512 px from a 256 px first stage, 3 steps, small VAE"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/highres-<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.quick:  # sized for a shared 2-core CPU: one step at 512 px is already tens of seconds
        args.sizes, args.native_size, args.steps, args.vae = [256, 512], 256, 3, "small"
    bad = [s for s in args.sizes if s <= 0 or s % 64]
    if bad:
        parser.error(f"--sizes must be positive multiples of 64 px, got {bad}")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.offload and device.type != "cuda":
        raise SystemExit("--offload needs a CUDA device")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    pipe = build_pipeline(args.vae, torch.device("cpu") if args.offload else device, dtype)
    hr = HighResPipeline.from_pipe(pipe)
    if args.offload:
        hr.enable_model_cpu_offload(device=device)
    memory = PeakMemory(device)
    if device.type == "cuda":  # kernels, cuDNN plans and allocator pools, once per variant
        for convert in (False, True):
            if convert:
                lindiff.linearize(pipe)
            run_chain(hr, 1024, argparse.Namespace(**{**vars(args), "steps": 3}), memory)
        lindiff.restore(pipe)

    print(
        f"HighResPipeline chain, SD 1.5 architecture, on {device_label(device)}, {dtype}, {args.steps} steps"
    )
    print(
        f"{'size':>6} {'stages':>7} {'softmax s':>10} {'linfusion s':>12} {'x':>6} {'softmax MiB':>12} {'linfusion MiB':>14} {'mem':>6}"
    )
    rows = []
    for size in args.sizes:
        row = {"size": size, "megapixels": size * size / 1e6, "softmax": measure(hr, size, args, memory)}
        lindiff.linearize(pipe)
        row["linfusion"] = measure(hr, size, args, memory)
        lindiff.restore(pipe)
        row["stages"] = len(row["softmax"]["stage_s"])
        row["time_ratio"] = row["linfusion"]["total_s"] / row["softmax"]["total_s"]
        row["last_stage_time_ratio"] = row["linfusion"]["stage_s"][-1] / row["softmax"]["stage_s"][-1]
        row["memory_ratio"] = row["linfusion"]["peak_mib"] / row["softmax"]["peak_mib"]
        if rows:  # memory growth: constant for linear growth with pixel count, rising for quadratic
            added = row["megapixels"] - rows[-1]["megapixels"]
            for variant in ("softmax", "linfusion"):
                growth = row[variant]["peak_mib"] - rows[-1][variant]["peak_mib"]
                row[variant]["peak_mib_per_added_megapixel"] = growth / added
        rows.append(row)
        print(
            f"{size:>6} {row['stages']:>7} {row['softmax']['total_s']:>10.1f} {row['linfusion']['total_s']:>12.1f}"
            f" {row['time_ratio']:>6.3f} {row['softmax']['peak_mib']:>12.0f} {row['linfusion']['peak_mib']:>14.0f}"
            f" {row['memory_ratio']:>6.3f}"
        )

    result = {
        "benchmark": "highres",
        "description": "HighResPipeline chain (native 512 px, 2x SDEdit stages, tiled VAE) on an SD 1.5-architecture "
        "pipeline with random weights: softmax (SDPA) vs LinFusion (lindiff.linearize, fresh weights); ratios are "
        "LinFusion / softmax; stage_s[i] runs from the end of stage i-1's last step to the end of stage i's",
        "environment": environment(),
        "device": device_label(device),
        "contended": args.contended,
        "argv": sys.argv[1:] if argv is None else argv,
        "config": {
            "dtype": str(dtype),
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "repeats": args.repeats,
            "strength_schedule": "HighResPipeline default (pipelines.sdedit.default_strengths)",
            "native_size": args.native_size or hr.native_size,
            "sequential_cfg_above": args.sequential_cfg_above,
            "feed_forward_chunk_size": args.feed_forward_chunk_size,
            "model_cpu_offload": args.offload,
            "unet": SD15_UNET,
            "vae": {"name": args.vae, **VAES[args.vae]},
            "text_encoder": TEXT_ENCODER,
        },
        "results": rows,
    }
    path = save_results(result, args.out or f"highres-{device_label(device, short=True)}.json")
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
