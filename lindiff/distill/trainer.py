"""`Distiller`: teacher -> linear-attention student training on accelerate, and `distill(config)`.

One process on CPU, one GPU, or many with ``accelerate launch`` (DDP; FSDP and DeepSpeed through
accelerate's own config). Every source of randomness of a step (data order, noise, timesteps)
is a function of the seed and the step, and checkpoints hold the optimizer, LR scheduler and
RNG states, so a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader

from ..adapters.base import CONTROL
from ..clear_format import FAMILY as CLEAR_FAMILY
from ..clear_format import ROLE as CLEAR_ROLE
from ..state import get_state
from .checkpoint import CheckpointManager
from .components import SetupError, distillation_adapter, load_pipeline, select_component
from .config import DistillConfig
from .data import DataOrder, LatentCache, pipeline_identity
from .losses import AttentionCapture, LossWeights, distillation_losses
from .objective import DiffusionObjective, upsample_latents
from .runlog import RunLog, trackers
from .signals import GracefulStop
from .sources import generated_cache, guidance_scale, image_folder_cache
from .student import build_student, cast_for_training, export_student, select_trainable
from .validation import Validator, sampling_arguments

logger = logging.getLogger(__name__)

FINAL_DIR = "final"

Callback = Callable[["Distiller", int, dict[str, float]], None]


@dataclass
class DistillResult:
    """What a run ended with.

    Attributes:
        step: optimizer steps done in total.
        interrupted: stopped by SIGINT/SIGTERM (a checkpoint of ``step`` was saved).
        weights: the exported ``lindiff.safetensors`` (``None`` when interrupted).
        output_dir: the run folder.
    """

    step: int
    interrupted: bool
    weights: Path | None
    output_dir: Path


def _noise_seed(seed: int, micro_step: int, process_index: int) -> int:
    return ((seed * 1_000_003 + micro_step) * 1024 + process_index) % (2**63)


class Distiller:
    """Distils ``config.model``'s denoiser into its linear-attention student.

    Construction does all the setup: loads the pipeline, builds the student and its trainable
    set, builds (or reuses) the latent cache, and prepares model and optimizer with accelerate.
    :meth:`train` runs until ``config.max_steps`` (or a signal) and exports the weights.

    Args:
        config: the run's options.
        callbacks: called on every process after each optimizer step as
            ``callback(distiller, step, metrics)``.

    Attributes:
        pipe: the pipeline; its denoiser (``pipe.<role>``) is the frozen teacher.
        teacher, student: the denoisers (``student`` as prepared by accelerate; see
            :meth:`unwrapped_student`).
        dataset: the :class:`~lindiff.distill.data.LatentCache` trained on.
        trainable: names of the trainable parameters.
        step: optimizer steps done.
    """

    def __init__(self, config: DistillConfig, callbacks: Sequence[Callback] = ()) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=trackers(config.log_with),
            project_dir=str(self.output_dir),
            cpu=config.cpu,
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.accelerator.num_processes == 1:
            raise ValueError(
                f"launched as {launched} processes, but without GPUs accelerate runs each one alone; "
                "pass cpu=True (--cpu) or set ACCELERATE_USE_CPU=1 to train on CPUs with gloo"
            )
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        set_seed(config.seed)
        self.pipe = load_pipeline(config.model)
        self.role, self.teacher, self.base = select_component(self.pipe, config.component)
        self.controlnet = self.role == "controlnet"
        self.teacher.requires_grad_(False).eval()
        self.base.requires_grad_(False).eval()
        student = self._setup_student()
        self._setup_losses()
        self.dataset = self._build_dataset()
        self._setup_training(student)
        self.validator = Validator(
            self.pipe,
            self.role,
            list(config.validation_prompts),
            self.output_dir / "validation",
            config.seed,
            config.validation_steps,
            config.validation_size or config.resolution,
            guidance_scale(self.pipe, config),
            autocast=self.accelerator.autocast,
            arguments=self._validation_arguments(),
            adapter=self.adapter,
        )
        self.log = RunLog(self.accelerator, self.output_dir)
        self.stop = GracefulStop()
        self.step = 0

    def _setup_student(self) -> torch.nn.Module:
        """The linearized copy with its trainable set, and every model on the device in its dtype."""
        config = self.config
        try:
            student = build_student(self.teacher, config.method, config.method_options, config.weights)
        except ValueError as error:  # the method, its options or the weights do not fit this model
            raise SetupError(str(error)) from error
        self.adapter = distillation_adapter(self.teacher, controlnet=self.controlnet)
        self._check_options()
        self.trainable = select_trainable(student, config.trainable, config.lora_rank, config.lora_alpha)
        if config.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        student.train()
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.accelerator.device)
        for part in self.pipe.components.values():
            dtypes = {p.dtype for p in part.parameters()} if isinstance(part, torch.nn.Module) else set()
            if dtypes and dtypes != {self.weight_dtype}:
                part.to(self.weight_dtype)
        student.to(self.accelerator.device)
        cast_for_training(student, self.weight_dtype)
        return student

    def _check_options(self) -> None:
        """The options that need the pipeline: image sizes, frames, and a CLEAR export of a FLUX model."""
        try:
            self.adapter.check_distillation(self.pipe, self.config.num_frames)
        except ValueError as error:
            raise SetupError(str(error)) from error
        multiple = self.adapter.size_multiple(self.pipe)
        sizes = {"resolution": self.config.resolution, "validation_size": self.config.validation_size}
        for name, size in sizes.items():
            if size is not None and size % multiple:
                raise SetupError(
                    f"{name}={size} is not a multiple of {multiple} px, which {type(self.pipe).__name__} "
                    "needs (its VAE factor times the denoiser's latent multiple)"
                )
        if self.config.export_format == "clear" and (self.adapter.name, self.role) != (
            CLEAR_FAMILY,
            CLEAR_ROLE,
        ):
            raise SetupError(
                f"export_format='clear': CLEAR's layout holds a {CLEAR_FAMILY!r} {CLEAR_ROLE} only, got a "
                f"{self.adapter.name!r} {self.role}"
            )

    def _predict(
        self,
        model: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The prediction of the pipeline with ``model`` (teacher or student) in the trained role."""
        if self.controlnet:
            return self.adapter.predict_controlled(model, self.base, noisy, timesteps, cond)
        return self.adapter.predict(model, noisy, timesteps, cond)

    def _setup_losses(self) -> None:
        config = self.config
        self.objective = DiffusionObjective(
            self.pipe.scheduler, config.timestep_sampling, config.logit_mean, config.logit_std
        )
        in_channels = self.base.config.get("in_channels")
        self.predicts_variance = (self.base.config.get("out_channels") or in_channels) == 2 * in_channels
        variance = config.variance_weight
        self.weights = LossWeights(
            diffusion=config.diffusion_weight,
            output=config.output_weight,
            attention=config.attention_weight,
            variance=(0.5 if self.predicts_variance else 0.0) if variance is None else variance,
        )

    def _setup_training(self, student: torch.nn.Module) -> None:
        """Optimizer, LR schedule, accelerate preparation, checkpoints, hooks and data order."""
        config, accelerator = self.config, self.accelerator
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_steps,
        )
        # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step
        # it once per process) and checkpointed as a registered object.
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        self.checkpoints = CheckpointManager(accelerator, self.output_dir, config.keep_checkpoints)
        layers = list(get_state(student).layers)
        self._captures = None
        if self.weights.attention:
            self._captures = (AttentionCapture(self.teacher, layers), AttentionCapture(student, layers))
        self.order = DataOrder(
            len(self.dataset),
            config.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            config.seed,
        )

    def _build_dataset(self) -> LatentCache:
        identity = pipeline_identity(self.pipe)
        build = generated_cache if self.config.prompts is not None else image_folder_cache
        args = (self.pipe, self.base, self.adapter, self.config, self.accelerator, identity)
        return build(*args, control=self.controlnet)

    def _validation_arguments(self) -> list[dict[str, Any]]:
        controls = None
        count = len(self.config.validation_prompts)
        if self.controlnet:
            controls = [self.dataset[i % len(self.dataset)][CONTROL] for i in range(count)]
        size = self.config.validation_size or self.config.resolution
        return sampling_arguments(self.pipe, self.adapter, count, size, controls, self.config.num_frames)

    def unwrapped_student(self) -> torch.nn.Module:
        """The student denoiser without accelerate's wrappers (DDP, compile)."""
        return self.accelerator.unwrap_model(self.student)

    def _batch_to_device(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = self.accelerator.device
        latents = batch["latents"].to(device, torch.float32)
        cond = {
            k: v.to(device, self.weight_dtype) if v.is_floating_point() else v.to(device)
            for k, v in batch.items()
            if k != "latents"
        }
        return latents, cond

    def losses(self, batch: dict[str, torch.Tensor], micro_step: int) -> dict[str, torch.Tensor]:
        """Loss terms of one micro-batch (``{"loss": total, <term>: value}``)."""
        latents, cond = self._batch_to_device(batch)
        scale = self.config.latent_scales[micro_step % len(self.config.latent_scales)]
        latents, cond = upsample_latents(latents, scale), self.adapter.scale_conditions(cond, scale)
        if CONTROL in cond:
            cond[CONTROL] = upsample_latents(cond[CONTROL], scale)
        seed = _noise_seed(self.config.seed, micro_step, self.accelerator.process_index)
        noisy = self.objective(latents, torch.Generator().manual_seed(seed))
        inputs = noisy.noisy.to(self.weight_dtype)
        teacher_capture, student_capture = self._captures or (None, None)
        with self.accelerator.autocast():
            with torch.no_grad(), _capturing(teacher_capture) as teacher_attention:
                teacher_out = self._predict(self.teacher, inputs, noisy.timesteps, cond)
            with _capturing(student_capture) as student_attention:
                student_out = self._predict(self.student, inputs, noisy.timesteps, cond)
        return distillation_losses(
            student_out,
            teacher_out,
            noisy.target,
            self.weights,
            self.predicts_variance,
            student_attention,
            teacher_attention,
        )

    def _optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        accelerator = self.accelerator
        accumulation = self.config.gradient_accumulation_steps
        totals: dict[str, torch.Tensor] = {}
        for i in range(accumulation):
            batch = next(batches)
            with accelerator.accumulate(self.student):
                terms = self.losses(batch, self.step * accumulation + i)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and self.config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(self.student.parameters(), self.config.max_grad_norm)
                self.optimizer.step()
                if accelerator.sync_gradients:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            for name, value in terms.items():
                totals[name] = totals.get(name, 0) + value.detach().float() / accumulation
        names = sorted(totals)
        values = torch.stack([totals[name] for name in names])
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        return {name: float(v) for name, v in zip(names, values.tolist(), strict=True)}

    def _stop_requested(self) -> bool:
        """Whether a signal reached any process (all processes must stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return self.stop.requested
        flag = torch.tensor(float(self.stop.requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _progress(self) -> dict[str, Any]:
        return {
            "micro_step": self.step * self.config.gradient_accumulation_steps,
            "num_processes": self.accelerator.num_processes,
            "config": self.config.to_dict(),
        }

    def _resume(self) -> None:
        folder = self.checkpoints.latest()
        if not self.config.resume:
            if folder is not None:
                raise SetupError(
                    f"output_dir={str(self.output_dir)!r} already holds checkpoints ({folder.name}); "
                    "pass resume=True (--resume) to continue that run, or use another output_dir"
                )
            return
        if folder is None:
            logger.info("resume=True but %s holds no checkpoint; starting from step 0", self.output_dir)
            return
        current = {**self.config.to_dict(), "num_processes": self.accelerator.num_processes}
        self.step = self.checkpoints.load(folder, current)
        logger.info("resumed from %s at step %d", folder, self.step)

    def train(self) -> DistillResult:
        """Train to ``config.max_steps``, checkpointing and validating on the way, then export.

        SIGINT/SIGTERM stop the run at the next step boundary after saving a checkpoint (a
        second signal stops at once). The final weights go to ``OUTPUT_DIR/final`` through
        :func:`lindiff.save_weights`.
        """
        config, accelerator = self.config, self.accelerator
        self._resume()
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(
                json.dumps(config.to_dict(), indent=2, default=str) + "\n"
            )
        self.log.start(self.step, config.max_steps, config.to_dict())
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.order.batches(self.step * config.gradient_accumulation_steps),
            num_workers=config.num_workers,
        )
        batches = iter(loader)
        interrupted = False
        terms: dict[str, float] = {}
        with self.stop.installed(), self._hooks_removed_after():
            while self.step < config.max_steps and not interrupted:
                started = time.perf_counter()
                terms = self._run_step(batches)
                self.step += 1
                lr = self.lr_scheduler.get_last_lr()[0]
                metrics = {**terms, "lr": lr, "seconds": time.perf_counter() - started}
                self.log.write(self.step, metrics, shown=tuple(terms))
                for callback in self.callbacks:
                    callback(self, self.step, metrics)
                interrupted = self._stop_requested() and self.step < config.max_steps
                if interrupted or self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                    self.checkpoints.save(self.step, self._progress())
                if config.validation_every and (
                    self.step % config.validation_every == 0 or self.step == config.max_steps
                ):
                    self.validate()
        self.log.close()
        weights = None
        if not interrupted:
            if accelerator.is_main_process:
                weights = export_student(
                    self.unwrapped_student(),
                    self.output_dir / FINAL_DIR,
                    training=self.training_summary(terms),
                    clear=config.export_format == "clear",
                )
            accelerator.wait_for_everyone()
        return DistillResult(
            step=self.step, interrupted=interrupted, weights=weights, output_dir=self.output_dir
        )

    def training_summary(self, losses: dict[str, float]) -> dict[str, Any]:
        """What the exported weights' model card says about this run (``losses``: the last step's)."""
        config = self.config
        data: dict[str, Any] = {"source": self.dataset.index.get("source"), "samples": len(self.dataset)}
        data.update({"resolution": config.resolution, "latent_scales": list(config.latent_scales)})
        if config.num_frames is not None:
            data["num_frames"] = config.num_frames
        if config.prompts is not None:
            data.update(
                generation_steps=config.generation_steps, guidance_scale=guidance_scale(self.pipe, config)
            )
        essentials = ("learning_rate", "lr_scheduler", "batch_size", "gradient_accumulation_steps")
        essentials += ("timestep_sampling", "diffusion_weight", "output_weight", "attention_weight", "seed")
        model = config.model if isinstance(config.model, (str, os.PathLike)) else None
        return {
            "model": str(model or getattr(self.pipe, "name_or_path", None) or config.to_dict()["model"]),
            "component": self.role,
            "method": config.method,
            "method_options": dict(config.method_options),
            "trainable": config.trainable,
            "steps": self.step,
            "data": data,
            "final_losses": {k: round(v, 6) for k, v in losses.items()},
            "mixed_precision": self.accelerator.mixed_precision,
            "processes": self.accelerator.num_processes,
            "config": {name: getattr(config, name) for name in essentials},
        }

    @contextmanager
    def _hooks_removed_after(self) -> Iterator[None]:
        """Leave no attention-capture hooks on the pipeline's teacher once training ends."""
        try:
            yield
        finally:
            for capture in self._captures or ():
                capture.remove()
            self._captures = None

    def _run_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        try:
            return self._optimizer_step(batches)
        except torch.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(
                f"out of memory in distillation step {self.step + 1} (batch_size={self.config.batch_size}, "
                f"resolution={self.config.resolution}, mixed_precision={self.accelerator.mixed_precision!r}, "
                f"gradient_checkpointing={self.config.gradient_checkpointing}); try a smaller batch_size with "
                "gradient_accumulation_steps, gradient_checkpointing=True, or mixed_precision='bf16'/'fp16'. "
                f"Original error: {error}"
            ) from error

    def validate(self) -> Path | None:
        """Write the teacher-vs-student grid of the current step (main process); returns its path."""
        path = None
        if self.accelerator.is_main_process:
            path = self.validator.run(self.unwrapped_student(), self.step)
        self.accelerator.wait_for_everyone()
        return path


@contextmanager
def _capturing(capture: AttentionCapture | None) -> Iterator[dict[str, Any] | None]:
    if capture is None:
        yield None
        return
    with capture.active() as outputs:
        yield outputs


def distill(config: DistillConfig, callbacks: Sequence[Callback] = ()) -> DistillResult:
    """Run a distillation: ``Distiller(config, callbacks).train()``, or with ``config.recovery_steps > 0``
    the two phases of :func:`lindiff.distill.phases.distill_in_phases`.

    Example:
        >>> from lindiff.distill import DistillConfig, distill
        >>> result = distill(DistillConfig(model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...                                output_dir="runs/sd15", prompts="prompts.txt"))
        >>> result.weights  # runs/sd15/final/lindiff.safetensors, for lindiff.linearize(weights=...)
    """
    if config.recovery_steps:
        from .phases import distill_in_phases  # phases imports this module

        return distill_in_phases(config, callbacks)
    return Distiller(config, callbacks).train()
