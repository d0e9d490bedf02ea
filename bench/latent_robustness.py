"""How much latent error an autoencoder's decoder tolerates before shapes stop being shapes.

A denoiser never produces a training latent exactly; what matters is whether the decoder still
draws the right shapes from a latent that is slightly off. Held-out scenes of the shipped
model's training world (``lindiff.assets.world()``), rendered at the VAE's ``sample_size``, are
encoded (scaled latent means, as the UNet sees them), disturbed, and decoded; the benchmark
classifier scores prompt accuracy (exactly the captioned objects) of:

- ``real``: the renders themselves (checks the classifier);
- ``round_trip``: encode and decode;
- ``noise_<s>``: Gaussian noise of std ``s`` added to the scaled latents (their std is about 1);
- ``blur_3x3``: a 3x3 box blur of the latents (whether shape identity survives losing the
  finest latent detail, the detail a small UNet learns last).

    python bench/latent_robustness.py                        # the shipped tiny-shapes VAE
    python bench/latent_robustness.py --vae DIR --count 500

Results: ``bench/results/latent_robustness-<device>.json``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import device_label, save_results  # bench/ is on sys.path when run as a script
from diffusers import AutoencoderKL

import lindiff.assets
from lindiff.data import make_example, render, to_tensor
from lindiff.evaluation import EVAL_SEEDS, ShapeClassifier, detect_objects, prompt_scores

NOISE_LEVELS = (0.1, 0.2, 0.4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default=None, help="AutoencoderKL folder (default: the tiny-shapes VAE)")
    parser.add_argument("--classifier", default=None, help="ShapeClassifier folder (default: the asset)")
    parser.add_argument("--count", type=int, default=200, help="held-out scenes (default 200)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/latent_robustness-<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.batch_size < 1:
        parser.error(f"--count and --batch-size must be positive; got {args.count} and {args.batch_size}")
    return args


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae_path = args.vae or lindiff.assets.path("tiny-shapes")
    vae = (
        AutoencoderKL.from_pretrained(
            vae_path, subfolder=None if args.vae else "vae", torch_dtype=torch.float32
        )
        .to(device)
        .eval()
    )
    classifier_path = args.classifier or lindiff.assets.path("tiny-shapes-classifier")
    classifier = ShapeClassifier.from_pretrained(classifier_path).to(device).eval()
    scale, size = vae.config.scaling_factor, vae.config.sample_size

    world = lindiff.assets.world()
    examples = [make_example(EVAL_SEEDS + i, size, world) for i in range(args.count)]
    specs = [example.spec for example in examples]
    images = torch.stack([to_tensor(render(example.scene, size)) for example in examples]).to(device)
    latents = torch.cat(
        [vae.encode(chunk).latent_dist.mean * scale for chunk in images.split(args.batch_size)]
    )

    def accuracy(pixels: torch.Tensor) -> float:
        return prompt_scores(specs, detect_objects(classifier, pixels))["prompt_accuracy"]

    def decoded_accuracy(disturbed: torch.Tensor) -> float:
        pixels = [vae.decode(chunk / scale).sample.clamp(-1, 1) for chunk in disturbed.split(args.batch_size)]
        return accuracy(torch.cat(pixels))

    generator = torch.Generator().manual_seed(0)
    scores = {"real": accuracy(images), "round_trip": decoded_accuracy(latents)}
    for level in NOISE_LEVELS:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        scores[f"noise_{level}"] = decoded_accuracy(latents + level * noise)
    scores["blur_3x3"] = decoded_accuracy(
        F.avg_pool2d(F.pad(latents, (1,) * 4, mode="replicate"), 3, stride=1)
    )

    result = {
        "device": device_label(device),
        "vae": args.vae or "tiny-shapes/vae (shipped)",
        "latent_shape": list(latents.shape[1:]),
        "latent_std": round(float(latents.std()), 3),
        "num_scenes": args.count,
        "prompt_accuracy": {key: round(value, 3) for key, value in scores.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    for key, value in result["prompt_accuracy"].items():
        print(f"{key:>12}: {value:.1%}")
    path = save_results(result, args.out or f"latent_robustness-{device_label(device, short=True)}.json")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
