"""The embedded VAE at high resolution: full softmax attention against local attention and tiles.

The VAE's middle block runs softmax attention over every latent pixel; ``HighResPipeline`` turns
it local above ``VAE_ATTENTION_TOKENS`` latent pixels (``lindiff.pipelines.vae_attention``). This
script renders one scene of the shapes world at ``--size`` px, encodes and decodes it with the
shipped tiny-shapes VAE (untiled, full attention: the reference), then with local attention of
several radii, with tiles of several sizes (full attention in each tile) and with the shipped
radius in bfloat16 (``lindiff.pipelines.vae_precision``: fast on a CPU with bfloat16 arithmetic,
emulated and slow on others), and reports each variant's time and how far its latents and decoded
image move from the reference:

    python bench/vae_attention.py                 # 2048 px, radii 8 16 32, tiles 512 1024
    python bench/vae_attention.py --size 512 --radii 16 --tiles 256   # a quick look

Results go to ``bench/results/vae_attention-<device>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Callable, Iterator

import torch
from common import device_label, save_results  # bench/ is on sys.path when run as a script
from diffusers import AutoencoderKL

import lindiff.assets
from lindiff.cli import environment
from lindiff.data import ShapesConfig, make_example, render, to_tensor
from lindiff.pipelines.memory import vae_tiling
from lindiff.pipelines.vae_attention import LocalVAEAttnProcessor, vae_attention_radius
from lindiff.pipelines.vae_precision import bf16_vae, cpu_computes_bf16


@contextlib.contextmanager
def processors(vae: AutoencoderKL, processor: object | None) -> Iterator[None]:
    previous = vae.attn_processors
    if processor is not None:
        vae.set_attn_processor(processor)
    try:
        yield
    finally:
        vae.set_attn_processor(previous)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@contextlib.contextmanager
def stacked(*contexts: contextlib.AbstractContextManager) -> Iterator[None]:
    """All of ``contexts`` at once."""
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="image side (px)")
    parser.add_argument("--radii", type=int, nargs="*", default=[8, 16, 32], help="local radii (latent px)")
    parser.add_argument("--tiles", type=int, nargs="*", default=[512, 1024], help="tile sides (px)")
    parser.add_argument("--seed", type=int, default=12345, help="the scene's seed")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(lindiff.assets.path("tiny-shapes"), subfolder="vae").eval()
    image = to_tensor(render(make_example(args.seed, 128, ShapesConfig()).scene, args.size))[None]
    shipped = vae_attention_radius(vae)
    variants: dict[str, tuple[contextlib.AbstractContextManager, dict]] = {
        "full": (contextlib.nullcontext(), {}),
        **{
            f"local r={r}": (processors(vae, LocalVAEAttnProcessor(r, full_below=0)), {"radius": r})
            for r in args.radii
        },
        **{f"tiles {t} px": (vae_tiling(vae, True, t), {"tile": t}) for t in args.tiles},
        f"local r={shipped}, bfloat16": (
            stacked(processors(vae, LocalVAEAttnProcessor(shipped, full_below=0)), bf16_vae(vae, True)),
            {"radius": shipped, "bf16": True},
        ),
    }
    rows, reference = {}, None
    with torch.no_grad():
        for name, (context, settings) in variants.items():
            with context:
                latents, encode_s = timed(lambda: vae.encode(image).latent_dist.mean)
                # Every variant decodes the reference's latents: the decoder's own shift.
                source = latents if reference is None else reference[0]
                decoded, decode_s = timed(functools.partial(lambda z: vae.decode(z).sample, source))
            row = {**settings, "encode_s": round(encode_s, 2), "decode_s": round(decode_s, 2)}
            if reference is None:
                reference = (latents, decoded)
                row["latent_mean_abs"] = round(latents.abs().mean().item(), 4)
            else:
                row["latent_shift"] = round((latents - reference[0]).abs().mean().item(), 5)
                row["decoded_shift_mean"] = round((decoded - reference[1]).abs().mean().item(), 5)
                row["decoded_shift_max"] = round((decoded - reference[1]).abs().max().item(), 4)
            rows[name] = row
            print(name, row, flush=True)
    result = {
        "benchmark": "vae_attention",
        "description": __doc__.split("\n\n")[0],
        "environment": environment(),
        "device": device_label(torch.device("cpu")),
        "config": {
            "size": args.size,
            "seed": args.seed,
            "shipped_radius": shipped,
            "cpu_computes_bf16": cpu_computes_bf16(),
        },
        "variants": rows,
    }
    path = save_results(
        result, args.out or f"vae_attention-{device_label(torch.device('cpu'), short=True)}.json"
    )
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
