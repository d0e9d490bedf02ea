"""Rebuild every shipped asset from a seed: ``python -m recipes.tiny_shapes.build --out DIR``.

Run from the repository root; ``--out lindiff/assets`` rebuilds the assets in place.

Stages run in order; each one's result is kept under ``DIR/.build`` (or ``--work``), so an
interrupted build (Ctrl-C, a crash) continues where it stopped when run again with the same
arguments. The long stages also checkpoint inside themselves. The per-stage wall times are
written to ``DIR/tiny-shapes/build.json``.

    vae            AutoencoderKL on rendered scenes (plain and striped), half size first
    latents        encode the training corpus once
    decoder        fine-tune the VAE decoder on those latents (the encoder stays as it is)
    text-to-image  CLIP text encoder and UNet, trained together (Muon)  -> DIR/tiny-shapes
    classifier     the benchmark's per-pixel classifier                 -> DIR/tiny-shapes-classifier
    student        LinFusion student with `lindiff.distill`             -> DIR/tiny-shapes-linfusion
    controlnet     ControlNet on object masks                           -> DIR/tiny-shapes-controlnet
    lora           stripes LoRA                                         -> DIR/tiny-shapes-lora-stripes
    motion         AnimateDiff motion adapter on the frozen model       -> DIR/tiny-shapes-motion
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from lindiff import linearize, save_weights
from lindiff.assets import WORLD_FILE
from lindiff.distill import DistillConfig
from lindiff.version import __version__

from . import architectures
from .autoencoder import encode, finetune_decoder, round_trip, train_vae
from .corpus import Corpus, render_corpus
from .dataset import write_folder
from .denoiser import token_ids, train_controlnet, train_lora, train_text_to_image
from .tokenizer import extend_tokenizer, write_tokenizer

logger = logging.getLogger("recipes.tiny_shapes.build")

MOTION_CLIP_SEEDS = 3_000_000
"""Seed of the motion stage's first training clip (images train below 1,000,000; benchmarks
draw their clips from 40,000,000)."""

STAGES = (
    "vae",
    "latents",
    "decoder",
    "text-to-image",
    "classifier",
    "student",
    "controlnet",
    "lora",
    "motion",
)


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Sizes of the build. :meth:`full` is what ships; :meth:`smoke` only exercises the code."""

    corpus: int
    striped: int
    vae_steps: int
    decoder_steps: int
    unet_steps: int
    unet_cooldown: int
    classifier_steps: int
    student_steps: int
    student_images: int
    controlnet_steps: int
    lora_steps: int
    motion_clips: int
    motion_steps: int
    motion_cooldown: int
    motion_batch: int = 4
    unet_lr: float = 1e-3
    unet_snr_gamma: float | None = None
    unet_object_weights: tuple[float, ...] = (1.0, 2.0)
    unet_batch: int = 24
    unet_optimizer: str = "adamw"
    batch: int = 8
    student_scales: tuple[int, ...] = (1, 2)

    @classmethod
    def full(cls) -> BuildPlan:
        return cls(
            12_000,
            2_000,
            1_500,
            900,
            9_000,
            1_800,
            500,
            1_000,
            1_200,
            600,
            400,
            1_200,
            2_200,
            400,
            unet_optimizer="muon",
        )

    @classmethod
    def smoke(cls) -> BuildPlan:
        return cls(
            64,
            32,
            2,
            2,
            2,
            1,
            2,
            2,
            16,
            2,
            2,
            4,
            2,
            1,
            motion_batch=2,
            unet_snr_gamma=5.0,
            unet_batch=4,
            unet_optimizer="muon",
            batch=2,
        )


def student_images(work: Path, plan: BuildPlan, seed: int) -> Path:
    """The student stage's training images: ``plan.student_images`` scenes in ``work/student-data``."""
    return write_folder(
        work / "student-data", plan.student_images, seed=seed + 2_000_000, config=architectures.TRAINING_WORLD
    )


def student_config(
    teacher: StableDiffusionPipeline,
    images: Path,
    output_dir: Path,
    plan: BuildPlan,
    seed: int,
    device: torch.device,
    mid_dim: int | None = None,
) -> DistillConfig:
    """The student stage's distillation of ``teacher`` into LinFusion.

    The self-attention projections train with the new layers, and every other step sees the
    latents up-sampled 2x (``plan.student_scales``), the token grids of the high-resolution chain
    (see README.md). ``mid_dim`` is the width of LinFusion's q/k MLPs (``None``: each layer's own
    width, what ships; ``bench/linfusion_width.py`` compares others).
    """
    return DistillConfig(
        model=teacher,
        output_dir=output_dir,
        image_folder=str(images),
        trainable="attention",
        method_options={} if mid_dim is None else {"mid_dim": mid_dim},
        resolution=architectures.NATIVE_SIZE,
        latent_scales=list(plan.student_scales),
        max_steps=plan.student_steps,
        batch_size=plan.batch,
        learning_rate=1e-3,
        lr_warmup_steps=min(30, plan.student_steps),
        lr_scheduler="cosine",
        checkpoint_every=100,
        validation_every=0,
        log_with="none",
        seed=seed,
        resume=True,
        cpu=device.type == "cpu",
    )


class Build:
    """One build into ``out``; intermediate results and stage records live in ``work``."""

    def __init__(self, out: Path, work: Path, plan: BuildPlan, seed: int, device: torch.device) -> None:
        self.out, self.work, self.plan, self.seed, self.device = out, work, plan, seed, device
        self.record_path = work / "stages.json"
        self.records: dict[str, float] = (
            json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        )
        self._corpus: Corpus | None = None
        self._striped: Corpus | None = None

    # Shared inputs, made lazily: a resumed build only renders what its remaining stages need.
    @property
    def tokenizer(self) -> CLIPTokenizer:
        folder = self.work / "tokenizer"
        if not (folder / "vocab.json").exists():
            write_tokenizer(folder)
        return CLIPTokenizer.from_pretrained(folder)

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = render_corpus(
                self.plan.corpus, self.seed, architectures.NATIVE_SIZE, architectures.TRAINING_WORLD
            )
        return self._corpus

    @property
    def striped(self) -> Corpus:
        if self._striped is None:
            subset = Corpus(
                self.corpus.images[: self.plan.striped],
                self.corpus.labels[: self.plan.striped],
                self.corpus.captions[: self.plan.striped],
                self.corpus.label_colours[: self.plan.striped],
            )
            self._striped = subset.striped()
        return self._striped

    def vae(self) -> AutoencoderKL:
        return AutoencoderKL.from_pretrained(self.work / "vae")

    def latents(self) -> dict[str, torch.Tensor]:
        return torch.load(self.work / "latents.pt", weights_only=True)

    def text_to_image(self) -> tuple[CLIPTextModel, UNet2DConditionModel]:
        return CLIPTextModel.from_pretrained(
            self.work / "text_encoder"
        ), UNet2DConditionModel.from_pretrained(self.work / "unet")

    def pipeline(self) -> StableDiffusionPipeline:
        text_encoder, unet = self.text_to_image()
        return StableDiffusionPipeline(
            vae=self.vae(),
            text_encoder=text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=architectures.scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def object_weights(self) -> np.ndarray:
        """``(N,)`` weight of drawing each corpus scene in text-to-image training, by its object count."""
        counts = self.corpus.object_counts()
        by_count = self.plan.unet_object_weights
        if counts.max() > len(by_count):
            raise ValueError(
                f"unet_object_weights has {len(by_count)} entries; the corpus has scenes of {counts.max()} objects"
            )
        return np.asarray(by_count, dtype=np.float64)[counts - 1]

    # Stages.
    def stage_vae(self) -> None:
        both = Corpus(
            np.concatenate([self.corpus.images, self.striped.images]),
            np.concatenate([self.corpus.labels, self.striped.labels]),
            self.corpus.captions + self.striped.captions,
            np.concatenate([self.corpus.label_colours, self.striped.label_colours]),
        )
        vae = train_vae(
            both,
            self.work / "runs" / "vae",
            steps=self.plan.vae_steps,
            batch_size=self.plan.batch // 2,
            seed=self.seed,
            device=self.device,
        )
        vae.save_pretrained(self.work / "vae")

    def stage_latents(self) -> None:
        vae = self.vae()
        tokenizer = self.tokenizer
        latents = {
            "latents": encode(vae, self.corpus, self.device),
            "ids": token_ids(tokenizer, self.corpus.captions),
            "striped": encode(vae, self.striped, self.device),
        }
        torch.save(latents, self.work / "latents.pt")

    def stage_decoder(self) -> None:
        vae = finetune_decoder(
            self.vae(),
            self.corpus,
            self.latents()["latents"],
            self.work / "runs" / "decoder",
            steps=self.plan.decoder_steps,
            batch_size=2 * self.plan.batch,
            seed=self.seed,
            device=self.device,
        )
        vae.save_pretrained(self.work / "vae")

    def stage_text_to_image(self) -> None:
        data = self.latents()
        text_encoder, unet = train_text_to_image(
            data["latents"],
            data["ids"],
            self.tokenizer,
            self.work / "runs" / "text-to-image",
            steps=self.plan.unet_steps,
            cooldown=self.plan.unet_cooldown,
            batch_size=self.plan.unet_batch,
            lr=self.plan.unet_lr,
            snr_gamma=self.plan.unet_snr_gamma,
            draw_weights=self.object_weights(),
            optimizer=self.plan.unet_optimizer,
            seed=self.seed,
            device=self.device,
        )
        text_encoder.save_pretrained(self.work / "text_encoder")
        unet.save_pretrained(self.work / "unet")
        pipe = self.pipeline()
        _replace(self.out / "tiny-shapes", lambda tmp: _save_pipeline(pipe, tmp))

    def stage_classifier(self) -> None:
        from .classifier_training import train_classifier

        vae = self.vae().to(self.device).eval()
        _replace(
            self.out / "tiny-shapes-classifier",
            lambda tmp: train_classifier(
                tmp,
                steps=self.plan.classifier_steps,
                seed=self.seed,
                reconstruct=lambda x: round_trip(vae, x),
                device=str(self.device),
            ),
        )

    def stage_student(self) -> None:
        """Distil the LinFusion student (:func:`student_config`)."""
        from lindiff.distill import distill

        images = student_images(self.work, self.plan, self.seed)
        config = student_config(
            self.pipeline(), images, self.work / "runs" / "student", self.plan, self.seed, self.device
        )
        result = distill(config)
        if result.weights is None:
            raise KeyboardInterrupt("student: interrupted; run again to resume")
        pipe = linearize(self.pipeline(), method="linfusion", weights=str(result.weights))
        pipe.unet.half()
        _replace(self.out / "tiny-shapes-linfusion", lambda tmp: save_weights(pipe, tmp))

    def stage_controlnet(self) -> None:
        data = self.latents()
        text_encoder, unet = self.text_to_image()
        controlnet = train_controlnet(
            unet,
            text_encoder,
            data["latents"],
            data["ids"],
            self.corpus.masks,
            self.tokenizer,
            self.work / "runs" / "controlnet",
            steps=self.plan.controlnet_steps,
            batch_size=self.plan.batch,
            seed=self.seed,
            device=self.device,
        )
        _replace(self.out / "tiny-shapes-controlnet", lambda tmp: controlnet.half().save_pretrained(tmp))

    def stage_lora(self) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        data = self.latents()
        text_encoder, unet = self.text_to_image()
        state = train_lora(
            unet,
            text_encoder,
            data["striped"],
            data["ids"][: self.plan.striped],
            self.tokenizer,
            self.work / "runs" / "lora",
            steps=self.plan.lora_steps,
            batch_size=self.plan.batch,
            seed=self.seed,
            device=self.device,
        )
        layers = {k: v.half() for k, v in convert_state_dict_to_diffusers(state).items()}
        _replace(
            self.out / "tiny-shapes-lora-stripes",
            lambda tmp: StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=layers, safe_serialization=True
            ),
        )

    def stage_motion(self) -> None:
        """Train the motion adapter on the shipped image model in ``out`` (see ``motion.py``)."""
        from lindiff.data.motion import MOTION_WORDS

        from .motion import encode_clips, extend_text_encoder, train_motion

        base = self.out / "tiny-shapes"
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32)
        tokenizer = extend_tokenizer(base / "tokenizer", self.work / "motion-tokenizer", MOTION_WORDS)
        text_encoder = extend_text_encoder(pipe.text_encoder, pipe.tokenizer, tokenizer)
        clips = self.work / "motion-latents.pt"
        if not clips.exists():
            data = encode_clips(
                pipe.vae,
                self.plan.motion_clips,
                MOTION_CLIP_SEEDS + self.seed,
                architectures.TRAINING_FRAMES,
                architectures.MOTION_WORLD,
                self.device,
            )
            torch.save(data, clips)
        adapter, text_encoder = train_motion(
            pipe.unet,
            text_encoder,
            torch.load(clips, weights_only=True),
            tokenizer,
            len(pipe.tokenizer),
            self.work / "runs" / "motion",
            steps=self.plan.motion_steps,
            cooldown=self.plan.motion_cooldown,
            batch_size=self.plan.motion_batch,
            seed=self.seed,
            device=self.device,
        )

        def save(folder: Path) -> None:
            adapter.half().save_pretrained(folder / "motion_adapter")
            text_encoder.save_pretrained(folder / "text_encoder")
            extend_tokenizer(base / "tokenizer", folder / "tokenizer", MOTION_WORDS)
            world = dataclasses.asdict(architectures.MOTION_WORLD)
            (folder / WORLD_FILE).write_text(json.dumps(world, indent=2) + "\n")

        _replace(self.out / "tiny-shapes-motion", save)

    def run(self, stages: Sequence[str]) -> dict[str, float]:
        """Run ``stages`` in build order, skipping those already recorded as done."""
        self.work.mkdir(parents=True, exist_ok=True)
        for name in STAGES:
            if name not in stages or name in self.records:
                continue
            logger.info("stage %s", name)
            started = time.perf_counter()
            getattr(self, "stage_" + name.replace("-", "_"))()
            self.records[name] = round(time.perf_counter() - started, 1)
            self.record_path.write_text(json.dumps(self.records, indent=2) + "\n")
            logger.info("stage %s done in %.0f s", name, self.records[name])
        self.write_summary()
        return self.records

    def write_summary(self) -> None:
        folder = self.out / "tiny-shapes"
        if not folder.is_dir():
            return
        summary = {
            "lindiff": __version__,
            "seed": self.seed,
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "plan": dataclasses.asdict(self.plan),
            "world": dataclasses.asdict(architectures.TRAINING_WORLD),
        }
        # A build of some stages keeps the recorded times of the others.
        old = json.loads((folder / "build.json").read_text()) if (folder / "build.json").exists() else {}
        seconds = {**old.get("stage_seconds", {}), **self.records}
        summary.update(stage_seconds=seconds, total_seconds=round(sum(seconds.values()), 1))
        (folder / "build.json").write_text(json.dumps(summary, indent=2) + "\n")


def _save_pipeline(pipe: StableDiffusionPipeline, folder: Path) -> None:
    """Save in fp16, except the text encoder (small, and fp32 keeps CPU loading dtype-consistent), with vocab files."""
    pipe.vae.half()
    pipe.unet.half()
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("vae", "unet"):  # from_pretrained recorded the build's work folder there
        config = folder / name / "config.json"
        values = json.loads(config.read_text())
        values.pop("_name_or_path", None)
        config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    # Recent transformers save only tokenizer.json; older ones load CLIPTokenizer from these files.
    write_tokenizer(folder / "tokenizer")
    (folder / WORLD_FILE).write_text(
        json.dumps(dataclasses.asdict(architectures.TRAINING_WORLD), indent=2) + "\n"
    )


def _replace(folder: Path, write: Callable[[Path], object]) -> None:
    """Write a folder through ``write(tmp)`` and move it into place, replacing any old one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.tiny_shapes.build", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the assets into")
    parser.add_argument("--work", type=Path, default=None, help="intermediate results (default: OUT/.build)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGES),
        choices=STAGES,
        metavar="STAGE",
        help=f"stages to run (default: all): {', '.join(STAGES)}",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path in a minute")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.seed < 0:
        raise SystemExit(f"--seed must be non-negative; got {args.seed}")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    plan = BuildPlan.smoke() if args.smoke else BuildPlan.full()
    build = Build(args.out, args.work or args.out / ".build", plan, args.seed, device)
    try:
        records = build.run(args.stages)
    except KeyboardInterrupt as error:
        print(f"build interrupted: {error}. Run the same command again to continue.", file=sys.stderr)
        return 130
    print(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
