"""Training of the benchmark's :class:`~lindiff.evaluation.ShapeClassifier` on freshly rendered
shape scenes, and its accuracy on real renders.

Every step renders ``batch_size`` new scenes (``make_example(TRAIN_SEEDS + i)``, disjoint from
the generator's training seeds below 1_000_000 and the benchmark's from ``EVAL_SEEDS``), then
corrupts them the way generated images differ from renders (see :class:`Augmentations`), so
the classifier scores generated images by what they show rather than by how clean they are.

    python -m recipes.tiny_shapes.classifier_training --out DIR   # train, save (fp16), report accuracy
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from lindiff.data import SHAPES, Example, ShapesConfig, make_example, rasterize, to_tensor
from lindiff.evaluation import EVAL_SEEDS, ShapeClassifier, detect_objects, prompt_scores
from lindiff.evaluation.classifier import crop_silhouettes

from .stripes import colour_classes, stripes

TRAIN_SEEDS = 30_000_000
"""Seed of the classifier's first training example."""

TRAIN_SIZE = 128
"""Side, in pixels, of the training renders (the native size of the shipped generator)."""

Reconstruct = Callable[[torch.Tensor], torch.Tensor]


PROBABILITIES: tuple[str, ...] = (
    "stripes",
    "flip",
    "reconstruct",
    "jitter",
    "drift",
    "resample",
    "blur",
    "noise",
    "jpeg",
    "mask_morph",
    "mask_blur",
    "mask_holes",
    "max_holes",
    "rotate",
)
"""Fields of :class:`Augmentations` that must lie in ``[0, 1]``."""


@dataclass(frozen=True)
class Augmentations:
    """Per-image probabilities and strengths of the training corruptions (sizes in pixels at 128 px).

    Attributes:
        stripes: fill the objects with diagonal stripes of the object colour and that colour
            mixed half with black (with white for black objects), as the stripes LoRA draws them.
        flip: mirror left-right.
        reconstruct: fraction of each batch sent through the ``reconstruct`` callable (a VAE
            round trip) when one is given.
        jitter, jitter_strength: per-channel gain and offset, each up to ``jitter_strength``.
        drift, drift_strength: a smooth colour field (4x4 noise, upsampled) of that std.
        resample: downscale by 0.25-0.75 and back up.
        blur, max_blur: Gaussian blur of sigma up to ``max_blur``.
        noise, max_noise: Gaussian noise of std up to ``max_noise`` (in ``[-1, 1]`` units).
        jpeg, jpeg_quality: JPEG round trip at a quality in ``jpeg_quality``.
        mask_morph, max_morph: grow or shrink an object mask by up to ``max_morph`` pixels.
        mask_blur, max_mask_blur: blur a mask (sigma up to ``max_mask_blur``) and threshold it
            at 0.35-0.65, which rounds corners and moves edges.
        mask_holes, max_holes: switch off up to that fraction of a mask's pixels at random.
        rotate, max_stretch: rotate a silhouette by a random angle (no rotation changes a
            shape's name) and stretch it by up to ``max_stretch`` along one axis.
    """

    stripes: float = 0.2
    flip: float = 0.5
    reconstruct: float = 0.25
    jitter: float = 0.8
    jitter_strength: float = 0.08
    drift: float = 0.3
    drift_strength: float = 0.06
    resample: float = 0.3
    blur: float = 0.4
    max_blur: float = 1.5
    noise: float = 0.4
    max_noise: float = 0.08
    jpeg: float = 0.2
    jpeg_quality: tuple[int, int] = (20, 90)
    mask_morph: float = 0.5
    max_morph: int = 2
    mask_blur: float = 0.5
    max_mask_blur: float = 2.0
    mask_holes: float = 0.2
    max_holes: float = 0.1
    rotate: float = 0.5
    max_stretch: float = 0.15

    def __post_init__(self) -> None:
        for name in PROBABILITIES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]; got {getattr(self, name)!r}")
        for name in ("jitter_strength", "drift_strength", "max_blur", "max_noise", "max_mask_blur"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if not isinstance(self.max_morph, int) or self.max_morph < 0:
            raise ValueError(f"max_morph must be an int >= 0; got {self.max_morph!r}")
        if not 0.0 <= self.max_stretch < 1.0:
            raise ValueError(f"max_stretch must be in [0, 1); got {self.max_stretch!r}")
        if len(self.jpeg_quality) != 2 or not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 95:
            raise ValueError(
                f"jpeg_quality must be (low, high) with 1 <= low <= high <= 95; got {self.jpeg_quality!r}"
            )


def ground_truth(
    examples: Sequence[Example], size: int = TRAIN_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render ``examples`` with their targets.

    Returns:
        ``images`` ``float32 (B, 3, size, size)`` in ``[-1, 1]``; per-pixel ``colours``
        ``int64 (B, size, size)`` (0 background, ``1 + SHAPE_COLOURS.index(colour)``); the mask of
        every object of every example ``bool (N, size, size)``; and their ``shapes`` ``int64 (N,)``
        (``SHAPES.index(shape)``).
    """
    images, colours, masks, shapes = [], [], [], []
    for example in examples:
        image, labels = rasterize(example.scene, size)
        objects = example.scene.objects
        images.append(to_tensor(image))
        colours.append(torch.from_numpy(colour_classes(example.scene)[labels]))
        masks.extend(torch.from_numpy(labels == index) for index in range(1, len(objects) + 1))
        shapes.extend(SHAPES.index(obj.shape) for obj in objects)
    return torch.stack(images), torch.stack(colours), torch.stack(masks), torch.tensor(shapes)


def _uniform(generator: torch.Generator, count: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def _chosen(generator: torch.Generator, count: int, probability: float) -> torch.Tensor:
    return torch.rand(count, generator=generator) < probability


def add_stripes(
    images: torch.Tensor, colours: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Fill the objects of the ``chosen`` images ``(B,)`` with :func:`~.stripes.stripes` of a random
    period (4-32 px at 128 px), phase and direction.

    ``images`` ``(B, 3, H, W)`` in ``[-1, 1]``; ``colours`` ``(B, H, W)`` as from :func:`ground_truth`.
    """
    batch, _, height, _ = images.shape
    period = _uniform(generator, batch, 4.0, 32.0).mul(height / TRAIN_SIZE)
    phase = torch.rand(batch, generator=generator) * period
    direction = torch.where(_chosen(generator, batch, 0.5), 1.0, -1.0)
    striped = stripes(images, colours, period, phase, direction)
    return torch.where(chosen.view(-1, 1, 1, 1), striped, images)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``(B, C, H, W)`` with its own ``sigma`` ``(B,)`` in pixels."""
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    x = F.pad(images.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    x = F.conv2d(x, kernel.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    return x.view_as(images)


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    array = (image.permute(1, 2, 0) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return to_tensor(Image.open(buffer).convert("RGB"))


def augment(
    images: torch.Tensor,
    colours: torch.Tensor,
    generator: torch.Generator,
    config: Augmentations | None = None,
    reconstruct: Reconstruct | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt images ``(B, 3, H, W)`` like generated ones; the colour targets ``(B, H, W)`` follow any flip.

    All randomness comes from ``generator`` (and ``reconstruct``, if it draws any).
    """
    config = config or Augmentations()
    batch, _, height, _ = images.shape
    scale = height / TRAIN_SIZE
    images = add_stripes(images, colours, _chosen(generator, batch, config.stripes), generator)
    flip = _chosen(generator, batch, config.flip)
    images[flip], colours[flip] = images[flip].flip(-1), colours[flip].flip(-1)
    if reconstruct is not None and config.reconstruct > 0:
        picked = torch.randperm(batch, generator=generator)[: round(config.reconstruct * batch)]
        with torch.no_grad():
            rebuilt = reconstruct(images[picked])
        if rebuilt.shape != images[picked].shape:
            raise ValueError(
                f"reconstruct must return images of the shape it is given, {tuple(images[picked].shape)}; "
                f"got {tuple(rebuilt.shape)}"
            )
        images[picked] = rebuilt.to(images)
    jitter = _chosen(generator, batch, config.jitter).view(-1, 1, 1, 1) * config.jitter_strength
    gain = 1.0 + jitter * (2.0 * torch.rand(batch, 3, 1, 1, generator=generator) - 1.0)
    offset = 2.0 * jitter * (2.0 * torch.rand(batch, 3, 1, 1, generator=generator) - 1.0)
    images = images * gain + offset
    drift = _chosen(generator, batch, config.drift).view(-1, 1, 1, 1) * config.drift_strength
    field = torch.randn(batch, 3, 4, 4, generator=generator) * drift
    images = images + F.interpolate(field, size=images.shape[-2:], mode="bicubic", align_corners=False)
    for index in _chosen(generator, batch, config.resample).nonzero()[:, 0].tolist():
        side = max(4, round(height * float(_uniform(generator, 1, 0.25, 0.75))))
        small = F.interpolate(images[index : index + 1], size=(side, side), mode="bilinear", antialias=True)
        images[index] = F.interpolate(small, size=images.shape[-2:], mode="bilinear")[0]
    blurred = _chosen(generator, batch, config.blur).nonzero()[:, 0]
    sigma = _uniform(generator, len(blurred), 0.3, max(0.3, config.max_blur)) * scale
    if len(blurred):
        images[blurred] = gaussian_blur(images[blurred], sigma)
    noise = _chosen(generator, batch, config.noise) * _uniform(generator, batch, 0.0, config.max_noise)
    images = (images + noise.view(-1, 1, 1, 1) * torch.randn(images.shape, generator=generator)).clamp(
        -1.0, 1.0
    )
    low, high = config.jpeg_quality
    for index in _chosen(generator, batch, config.jpeg).nonzero()[:, 0].tolist():
        quality = int(torch.randint(low, high + 1, (1,), generator=generator))
        images[index] = _jpeg(images[index], quality)
    return images, colours


def _rotate(masks: torch.Tensor, generator: torch.Generator, max_stretch: float) -> torch.Tensor:
    """Rotate masks ``(N, 1, H, W)`` by random angles and stretch them, about their centroids; binary out."""
    count, _, height, width = masks.shape
    angle = _uniform(generator, count, 0.0, 2.0 * math.pi)
    stretch = _uniform(generator, count, -max_stretch, max_stretch)
    total = masks.sum(dim=(1, 2, 3)).clamp(min=1.0)
    center_x = (masks.sum(dim=(1, 2)) @ torch.arange(width, dtype=torch.float32)) / total
    center_y = (masks.sum(dim=(1, 3)) @ torch.arange(height, dtype=torch.float32)) / total
    center = torch.stack([(2.0 * center_x + 1.0) / width - 1.0, (2.0 * center_y + 1.0) / height - 1.0], dim=1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    wide, narrow = 1.0 + stretch, 1.0 - stretch  # rotation @ diag(wide, narrow)
    linear = torch.stack(
        [torch.stack([cos * wide, -sin * narrow], dim=1), torch.stack([sin * wide, cos * narrow], dim=1)],
        dim=1,
    )
    theta = torch.cat([linear, (center - (linear @ center[:, :, None])[:, :, 0])[:, :, None]], dim=2)
    grid = F.affine_grid(theta, [count, 1, height, width], align_corners=False)
    return (
        F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5
    ).float()


def silhouettes(
    masks: torch.Tensor, size: int, generator: torch.Generator, config: Augmentations | None = None
) -> torch.Tensor:
    """Silhouette crops ``(N, 1, size, size)`` of object masks ``bool (N, H, W)``, corrupted like predicted masks.

    Each mask may be grown or shrunk, blurred and re-thresholded, holed, and rotated and
    stretched about its centroid; then it is cropped (:func:`crop_silhouettes`).
    """
    config = config or Augmentations()
    count, height, _ = masks.shape
    scale = height / TRAIN_SIZE
    x = masks.float()[:, None]
    morph = torch.randint(-config.max_morph, config.max_morph + 1, (count,), generator=generator)
    morph = torch.where(_chosen(generator, count, config.mask_morph), morph, 0).view(-1, 1, 1, 1)
    for pixels in range(1, config.max_morph + 1):
        grown = F.max_pool2d(x, 3, stride=1, padding=1)
        shrunk = -F.max_pool2d(-x, 3, stride=1, padding=1)
        x = torch.where(morph >= pixels, grown, torch.where(-morph >= pixels, shrunk, x))
    blurred = _chosen(generator, count, config.mask_blur).nonzero()[:, 0]
    if len(blurred):
        sigma = _uniform(generator, len(blurred), 0.5, max(0.5, config.max_mask_blur)) * scale
        threshold = _uniform(generator, len(blurred), 0.35, 0.65).view(-1, 1, 1, 1)
        x[blurred] = (gaussian_blur(x[blurred], sigma) > threshold).float()
    holes = _chosen(generator, count, config.mask_holes) * _uniform(generator, count, 0.0, config.max_holes)
    x = x * (torch.rand(x.shape, generator=generator) >= holes.view(-1, 1, 1, 1))
    turned = _chosen(generator, count, config.rotate).nonzero()[:, 0]
    if len(turned):
        x[turned] = _rotate(x[turned], generator, config.max_stretch)
    return crop_silhouettes(x[:, 0] > 0.5, size)


def train_classifier(
    out_dir: str | Path | None,
    *,
    steps: int = 500,
    batch_size: int = 32,
    seed: int = 0,
    lr: float = 1e-2,
    reconstruct: Reconstruct | None = None,
    augmentations: Augmentations | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ShapeClassifier:
    """Train a :class:`ShapeClassifier` and save it (fp16 safetensors, ``save_pretrained``) to ``out_dir``.

    Loss: cross-entropy of the colour logits (against the 128 px targets), averaged over
    background and object pixels separately and summed (objects cover ~10% of an image), plus
    the cross-entropy of the shapes of the silhouettes of every object. AdamW with a 5% linear
    warm-up and a cosine decay.

    Args:
        out_dir: folder to save to (plus ``training.json`` with the settings and timing);
            ``None`` saves nothing.
        steps, batch_size: optimisation steps and fresh scenes per step.
        seed: initialisation and augmentation seed (the scenes are the same for every seed).
        lr: peak learning rate.
        reconstruct: ``(k, 3, 128, 128) -> (k, 3, 128, 128)`` in ``[-1, 1]`` on CPU tensors, e.g.
            a VAE encode/decode round trip, applied to a fraction of each batch (see
            :attr:`Augmentations.reconstruct`).
        augmentations: corruption settings; :class:`Augmentations` defaults when ``None``.
        device: where the classifier trains (scenes are rendered on the CPU).
        progress: show a tqdm bar.

    Returns:
        The trained classifier, float32, in eval mode, on ``device``; when saved, its weights are
        the saved ones (rounded to fp16).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive; got {lr!r}")
    augmentations = augmentations or Augmentations()
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier()
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for step in bar:
        examples = [make_example(TRAIN_SEEDS + step * batch_size + i, TRAIN_SIZE) for i in range(batch_size)]
        images, colours, masks, shapes = ground_truth(examples)
        images, colours = augment(images, colours, generator, augmentations, reconstruct)
        crops = silhouettes(masks, model.config.silhouette_size, generator, augmentations)
        logits = model(images.to(device)).colour_logits
        if logits.shape[-2:] != colours.shape[-2:]:
            logits = F.interpolate(logits, size=colours.shape[-2:], mode="bilinear")
        per_pixel = F.cross_entropy(logits, colours.to(device), reduction="none")
        on_object = colours.to(device) > 0
        colour_loss = per_pixel[on_object].mean() + per_pixel[~on_object].mean()
        shape_loss = F.cross_entropy(model.shape_logits(crops, crops=True), shapes.to(device))
        loss = colour_loss + shape_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(colour=f"{colour_loss.item():.3f}", shape=f"{shape_loss.item():.3f}", refresh=False)
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        model.half().save_pretrained(out)
        model.float()
        record = {
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "lr": lr,
            "reconstruct": reconstruct is not None,
            "augmentations": asdict(augmentations),
            "final_colour_loss": colour_loss.item(),
            "final_shape_loss": shape_loss.item(),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return model


@torch.no_grad()
def real_accuracy(
    classifier: ShapeClassifier,
    count: int = 500,
    seed: int = EVAL_SEEDS,
    size: int = TRAIN_SIZE,
    blur: float = 0.0,
    noise: float = 0.0,
    config: ShapesConfig | None = None,
) -> dict[str, float | int | None]:
    """Prompt and position accuracy of ``classifier``'s detections on ``count`` real renders.

    Scenes are ``make_example(seed + i, size, config)`` rendered at ``size`` px, optionally
    blurred (Gaussian ``blur`` px at 128 px) and noised (std ``noise`` in ``[-1, 1]`` units,
    fixed seed).

    Returns:
        ``prompt_accuracy``, ``position_accuracy``, ``num_prompts``, ``num_with_relation``.
    """
    examples = [make_example(seed + i, size, config) for i in range(count)]
    images = torch.stack([to_tensor(rasterize(example.scene)[0]) for example in examples])
    if blur > 0:
        images = gaussian_blur(images, torch.full((count,), blur * size / TRAIN_SIZE))
    if noise > 0:
        images = images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    detections = detect_objects(classifier, images.clamp(-1, 1))
    scores = prompt_scores([example.spec for example in examples], detections)
    return {key: value for key, value in scores.items() if not isinstance(value, list)}


def main(argv: list[str] | None = None) -> ShapeClassifier:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the classifier")
    parser.add_argument("--steps", type=int, help="default: train_classifier's")
    parser.add_argument("--batch-size", type=int, help="default: train_classifier's")
    parser.add_argument("--seed", type=int, help="default: train_classifier's")
    parser.add_argument("--lr", type=float, help="default: train_classifier's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--eval", type=int, default=500, help="held-out renders to score afterwards (0: none)"
    )
    args = parser.parse_args(argv)
    options = {
        key: getattr(args, key)
        for key in ("steps", "batch_size", "seed", "lr")
        if getattr(args, key) is not None
    }
    start = time.perf_counter()
    classifier = train_classifier(args.out, device=args.device, **options)
    print(f"trained in {time.perf_counter() - start:.0f} s; saved to {args.out}")
    if args.eval:
        for name, perturbation in {
            "clean": {},
            "blur 1 px + noise 0.05": {"blur": 1.0, "noise": 0.05},
        }.items():
            scores = real_accuracy(classifier, args.eval, **perturbation)
            print(f"{name}: {json.dumps(scores)}")
    return classifier


if __name__ == "__main__":
    main()
