"""`DistillConfig`: every option of a distillation run, validated in one place.

The CLI builds its ``lindiff distill`` flags from these fields (their ``help`` metadata), so a
new option added here appears on the command line too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attention import create_method

TRAINABLE = ("new", "attention", "lora", "lora_only")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LOG_WITH = ("auto", "none", "tensorboard", "wandb")
CONTROL_PREPROCESSORS = ("edges", "image")
EXPORT_FORMATS = ("lindiff", "clear")
DEFAULT_VALIDATION_PROMPTS = ("a photo of a red fox in the snow", "a watercolor painting of a lighthouse")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class DistillConfig:
    """Options of a teacher -> linear-attention student distillation run.

    Exactly one data source is used: ``image_folder`` (captioned images, encoded once by the
    VAE) or ``prompts`` (the teacher samples latents for them with fixed seeds). Both are cached
    under ``cache_dir`` keyed by a hash of everything that determines their content.
    """

    model: Any = field(metadata=_help("pipeline folder or hub id (or, in Python, a pipeline object)"))
    output_dir: str | os.PathLike = field(
        metadata=_help("run folder: checkpoints/, final/, metrics.jsonl, validation/")
    )
    component: str = field(
        default="auto",
        metadata=_help(
            "which denoiser trains: auto (the pipeline's unet or transformer), unet, transformer, or "
            "controlnet (its converted layers against the original ControlNet, feeding the frozen "
            "softmax unet/transformer)"
        ),
    )
    method: str = field(default="linfusion", metadata=_help("attention method (see `lindiff methods`)"))
    method_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("a method option, KEY=VALUE (repeatable; e.g. mid_dim=64)", flag="--method-option"),
    )
    weights: str | None = field(default=None, metadata=_help("start from these lindiff/LinFusion weights"))
    trainable: str = field(
        default="new",
        metadata=_help(
            "what trains: new (parameters linearize added), attention (+ self-attention q/k/v/out), "
            "lora (+ LoRA adapters on those projections), lora_only (those LoRA adapters alone)",
            choices=TRAINABLE,
        ),
    )
    lora_rank: int = field(
        default=16, metadata=_help("LoRA rank when trainable=lora or lora_only, and of the recovery phase")
    )
    lora_alpha: float | None = field(default=None, metadata=_help("LoRA alpha (default: the rank)"))

    prompts: Any = field(
        default=None, metadata=_help("text file with one prompt per line (in Python also a list)")
    )
    image_folder: str | None = field(
        default=None, metadata=_help("folder of images with .txt captions or a metadata.jsonl")
    )
    control_folder: str | None = field(
        default=None,
        metadata=_help(
            "component=controlnet with image_folder: the control image of each training image, at the "
            "same relative path with any image extension (default: control_preprocessor of the image)"
        ),
    )
    control_preprocessor: Any = field(
        default="edges",
        metadata=_help(
            "component=controlnet: how control images are derived from training images (the teacher's "
            "samples with prompts): edges (Sobel edge map, for Canny-style ControlNets) or image (the "
            "image itself); in Python also a callable PIL image -> PIL image (e.g. a depth estimator)",
            choices=CONTROL_PREPROCESSORS,
        ),
    )
    cache_dir: str | None = field(
        default=None, metadata=_help("latent cache folder (default OUTPUT_DIR/cache)")
    )
    resolution: int = field(default=512, metadata=_help("training image size in pixels (square)"))
    num_frames: int | None = field(
        default=None,
        metadata=_help(
            "video pipelines: frames of each teacher sample (training clip) and validation video, as the "
            "family allows (Wan: 4k + 1, e.g. 17); leave unset for images"
        ),
    )
    latent_scales: list[int] = field(
        default_factory=lambda: [1],
        metadata=_help(
            "up-sampling factors of the training latents, taken by the micro-steps in turn (e.g. 1 2: "
            "every other step on a latent grid twice as wide, like the high-resolution chain's stages)"
        ),
    )
    samples_per_prompt: int = field(default=1, metadata=_help("teacher samples per prompt (prompts data)"))
    generation_steps: int = field(default=25, metadata=_help("teacher sampling steps (prompts data)"))
    guidance_scale: float | None = field(
        default=None,
        metadata=_help(
            "guidance scale of the teacher's samples and the validation grid, and FLUX's guidance "
            "embedding in training (default: the pipeline's own)"
        ),
    )
    generation_batch_size: int = field(default=4, metadata=_help("teacher sampling batch (prompts data)"))

    max_steps: int = field(default=1000, metadata=_help("optimizer steps in total"))
    batch_size: int = field(default=1, metadata=_help("samples per process and micro-step"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-steps per optimizer step"))
    learning_rate: float = field(default=1e-4, metadata=_help("AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    lr_scheduler: str = field(
        default="constant", metadata=_help("learning-rate schedule", choices=LR_SCHEDULERS)
    )
    lr_warmup_steps: int = field(default=0, metadata=_help("warm-up optimizer steps"))
    max_grad_norm: float | None = field(default=1.0, metadata=_help("gradient clipping norm (none: off)"))
    mixed_precision: str | None = field(
        default=None,
        metadata=_help(
            "no, fp16 or bf16 (default: accelerate's launch config, else no)", choices=MIXED_PRECISION
        ),
    )
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    timestep_sampling: str = field(
        default="uniform", metadata=_help("training timestep distribution", choices=TIMESTEP_SAMPLING)
    )
    logit_mean: float = field(default=0.0, metadata=_help("mean of logit_normal timestep sampling"))
    logit_std: float = field(default=1.0, metadata=_help("std of logit_normal timestep sampling"))

    diffusion_weight: float = field(default=1.0, metadata=_help("weight of the diffusion objective"))
    output_weight: float = field(default=0.5, metadata=_help("weight of student-vs-teacher output MSE"))
    attention_weight: float = field(default=0.5, metadata=_help("weight of per-layer attention output MSE"))
    variance_weight: float | None = field(
        default=None,
        metadata=_help(
            "weight of the learned-variance MSE (default: 0.5 if the model predicts variance, else 0)"
        ),
    )

    seed: int = field(default=0, metadata=_help("seed of initialisation, data order, noise and timesteps"))
    checkpoint_every: int = field(default=500, metadata=_help("save a checkpoint every this many steps"))
    keep_checkpoints: int = field(default=3, metadata=_help("how many checkpoints to keep"))
    resume: bool = field(default=False, metadata=_help("continue from the latest checkpoint in OUTPUT_DIR"))
    validation_every: int = field(
        default=500, metadata=_help("teacher-vs-student image grid every N steps (0: off)")
    )
    validation_prompts: list[str] = field(
        default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS), metadata=_help("prompts of the grid")
    )
    validation_steps: int = field(default=10, metadata=_help("sampling steps of the grid"))
    validation_size: int | None = field(default=None, metadata=_help("grid image size (default: resolution)"))
    log_with: str = field(
        default="auto",
        metadata=_help(
            "tracker: auto (tensorboard if installed), none, tensorboard, wandb", choices=LOG_WITH
        ),
    )
    export_format: str = field(
        default="lindiff",
        metadata=_help(
            "format of OUTPUT_DIR/final: lindiff, or clear (also CLEAR's released layout, "
            "clear_local_{r}[_down_{f}].safetensors; FLUX with method=clear only)",
            choices=EXPORT_FORMATS,
        ),
    )
    num_workers: int = field(default=0, metadata=_help("data-loading worker processes"))
    cpu: bool = field(default=False, metadata=_help("train on the CPU even if a GPU is present"))
    recovery_steps: int = field(
        default=0,
        metadata=_help(
            "0: one phase. N > 0: two LoLCATs-style phases; phase 1 (OUTPUT_DIR/phase1) trains the new "
            "parameters for max_steps on the attention loss alone, phase 2 (OUTPUT_DIR/phase2) trains "
            "LoRA adapters (lora_rank, lora_alpha) on the self-attention projections for N steps with the "
            "diffusion, output and variance losses; the merged student goes to OUTPUT_DIR/final"
        ),
    )
    recovery_learning_rate: float | None = field(
        default=None, metadata=_help("learning rate of phase 2 (default: learning_rate)")
    )

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self._check_choices()
        self._check_numbers()
        self._check_recovery()
        create_method(self.method, **self.method_options)  # unknown method/option -> ValueError
        if (self.prompts is None) == (self.image_folder is None):
            raise ValueError(
                "give exactly one data source: prompts (a text file or list of prompts) or image_folder; "
                f"got prompts={self.prompts!r}, image_folder={self.image_folder!r}"
            )
        if self.prompts is not None and not isinstance(self.prompts, (str, os.PathLike, list, tuple)):
            raise TypeError(
                f"prompts must be a file path or a list of strings, got {type(self.prompts).__name__}"
            )
        if isinstance(self.prompts, (str, os.PathLike)) and not Path(self.prompts).is_file():
            raise ValueError(f"prompts={str(self.prompts)!r}: no such file (expected one prompt per line)")
        if self.image_folder is not None and not Path(self.image_folder).is_dir():
            raise ValueError(f"image_folder={str(self.image_folder)!r} is not a folder")
        if self.num_frames is not None and self.image_folder is not None:
            raise ValueError(
                f"num_frames={self.num_frames!r} trains on video clips, which only the teacher's samples "
                "provide (prompts); image_folder data trains image families"
            )
        self._check_model()
        self._check_control()
        if self.export_format == "clear" and self.method != "clear":
            raise ValueError(
                f"export_format='clear' writes CLEAR's layout, which holds only method 'clear' weights; "
                f"got method={self.method!r}"
            )

    def _check_model(self) -> None:
        """A path that does not exist is an error here, unless it reads as a hub id ``owner/name``."""
        model = self.model
        if not isinstance(model, (str, os.PathLike)) or Path(model).is_dir():
            return
        text = str(model)
        parts = text.split("/")
        hub_id = isinstance(model, str) and len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
        if Path(model).exists():
            raise ValueError(
                f"model={text!r} is a file; give a diffusers pipeline folder or a hub id 'owner/name'"
            )
        if not hub_id:
            raise ValueError(
                f"model={text!r}: no such folder (give a diffusers pipeline folder or a hub id 'owner/name')"
            )

    def _check_control(self) -> None:
        if not isinstance(self.component, str) or not self.component:
            raise TypeError(f"component must be a string (auto or a pipeline role), got {self.component!r}")
        preprocessor = self.control_preprocessor
        if not callable(preprocessor) and preprocessor not in CONTROL_PREPROCESSORS:
            raise ValueError(
                f"control_preprocessor={preprocessor!r} is not one of {', '.join(CONTROL_PREPROCESSORS)} "
                "(or, in Python, a callable PIL image -> PIL image)"
            )
        if self.control_folder is not None:
            if self.component != "controlnet":
                raise ValueError(
                    f"control_folder is read when a ControlNet trains; set component='controlnet' "
                    f"(got component={self.component!r})"
                )
            if self.image_folder is None:
                raise ValueError(
                    "control_folder pairs control images with the images of image_folder; with prompts data "
                    "they are derived from the teacher's samples by control_preprocessor"
                )
            if not Path(self.control_folder).is_dir():
                raise ValueError(f"control_folder={str(self.control_folder)!r} is not a folder")

    def _check_choices(self) -> None:
        choices = {
            "trainable": (self.trainable, TRAINABLE),
            "timestep_sampling": (self.timestep_sampling, TIMESTEP_SAMPLING),
            "lr_scheduler": (self.lr_scheduler, LR_SCHEDULERS),
            "log_with": (self.log_with, LOG_WITH),
            "export_format": (self.export_format, EXPORT_FORMATS),
        }
        if self.mixed_precision is not None:
            choices["mixed_precision"] = (self.mixed_precision, MIXED_PRECISION)
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.method_options, dict):
            raise TypeError(f"method_options must be a dict, got {type(self.method_options).__name__}")

    def _check_numbers(self) -> None:
        positive = ("resolution", "samples_per_prompt", "generation_steps", "generation_batch_size")
        positive += ("max_steps", "batch_size", "gradient_accumulation_steps", "lora_rank")
        positive += ("checkpoint_every", "keep_checkpoints", "validation_steps")
        non_negative = ("lr_warmup_steps", "validation_every", "num_workers", "weight_decay", "logit_std")
        non_negative += ("diffusion_weight", "output_weight", "attention_weight")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in (*non_negative, "variance_weight", "max_grad_norm", "learning_rate"):
            value = getattr(self, name)
            if value is None and name in ("variance_weight", "max_grad_norm"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not (self.diffusion_weight or self.output_weight or self.attention_weight or self.variance_weight):
            raise ValueError(
                "all loss weights are 0: set diffusion_weight, output_weight or attention_weight > 0"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        scales = self.latent_scales
        if (
            not isinstance(scales, (list, tuple))
            or not scales
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in scales)
        ):
            raise ValueError(f"latent_scales must be a non-empty list of integers >= 1, got {scales!r}")
        frames = self.num_frames
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise ValueError(f"num_frames must be None (images) or an integer >= 1, got {frames!r}")
        if self.validation_size is not None and (
            not isinstance(self.validation_size, int) or self.validation_size < 1
        ):
            raise ValueError(f"validation_size must be None or an integer >= 1, got {self.validation_size!r}")

    def _check_recovery(self) -> None:
        steps, rate = self.recovery_steps, self.recovery_learning_rate
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"recovery_steps must be an integer >= 0, got {steps!r}")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0):
            raise ValueError(f"recovery_learning_rate must be None or a number > 0, got {rate!r}")
        if not steps:
            return
        if self.trainable != "new":
            raise ValueError(
                f"recovery_steps={steps} runs two phases, the first training the new parameters alone: "
                f"trainable must be 'new', got trainable={self.trainable!r}"
            )
        if not self.attention_weight:
            raise ValueError(
                f"recovery_steps={steps}: phase 1 trains on the attention loss alone, so attention_weight "
                f"must be > 0, got {self.attention_weight!r}"
            )
        if not (self.diffusion_weight or self.output_weight):
            raise ValueError(
                f"recovery_steps={steps}: phase 2 trains on the diffusion and output losses, so "
                "diffusion_weight or output_weight must be > 0, got "
                f"{self.diffusion_weight!r} and {self.output_weight!r}"
            )

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else Path(self.output_dir) / "cache"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (a pipeline object given as ``model`` is recorded by its class name)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not isinstance(values["model"], (str, os.PathLike)):
            values["model"] = f"<{type(values['model']).__name__} object>"
        if callable(values["control_preprocessor"]):
            values["control_preprocessor"] = preprocessor_name(values["control_preprocessor"])
        for key, value in values.items():
            if isinstance(value, os.PathLike):
                values[key] = str(value)
            elif isinstance(value, tuple):
                values[key] = list(value)
        return values


def preprocessor_name(preprocessor: Any) -> str:
    """A control preprocessor's name as recorded in configs and cache keys (a callable: its qualified name)."""
    if isinstance(preprocessor, str):
        return preprocessor
    return getattr(preprocessor, "__qualname__", None) or f"<{type(preprocessor).__qualname__} object>"
