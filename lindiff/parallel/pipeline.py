"""Context parallelism for a whole pipeline in one call: every image split over N processes.

Launched with ``torchrun --nproc-per-node N script.py`` (or ``accelerate launch --num_processes N``),
each process runs::

    pipe = lindiff.linearize(FluxPipeline.from_pretrained(...), "linfusion").to(device)
    lindiff.parallel.enable_context_parallel(pipe)     # degree: all N processes
    image = pipe(prompt, generator=torch.Generator("cpu").manual_seed(0)).images[0]

and every process gets the same image, each having held ``1/N`` of its tokens. The call is
diffusers' own ``model.enable_parallelism(config=ParallelConfig(context_parallel_config=...))`` on
the pipeline's denoiser, with the checks that make it safe for a lindiff model: the model has a
sequence plan (the class's ``_cp_plan``, else its family adapter's
:meth:`~lindiff.adapters.ModelAdapter.context_parallel_plan`: PixArt, SD3, SANA; UNets never),
every self-attention layer exchanges what it needs (diffusers' processors of the classes without a
``_cp_plan`` do not, so those models are linearized first), every converted layer can run
sharded, and the process group exists.

CPU processes (gloo): diffusers 0.42's ``ModelMixin._resolve_parallel_config`` places each rank on
``torch.device(accelerator, rank % torch.accelerator.device_count())``, which divides by zero where
there is no accelerator (``device_count() == 0``). That device only records where the rank sits:
context parallelism never uses it (diffusers' own CP tests run on accelerators only). For a model
on the CPU, :func:`enable_context_parallel` builds the ``("ring", "ulysses")`` mesh on the CPU
itself (``ContextParallelConfig(mesh=...)``, diffusers' documented way to bring a mesh) and, only
on a machine without any accelerator and only for the duration of that one
``enable_parallelism`` call, lets ``torch.accelerator.device_count()`` answer 1, so the rank's
device is ``cpu:0``, the CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from .shards import not_supported

if TYPE_CHECKING:
    from ..adapters import ModelAdapter

# lindiff's attention layers import this package (for SequenceShard), so the modules that know
# models and pipelines (adapters, attention, denoisers) are imported where they are used.

MODES = ("ulysses", "ring")
"""How diffusers exchanges the softmax layers' keys and values (lindiff's own layers exchange the
same few bytes either way): Ulysses all-to-all, or ring attention."""
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What ``torchrun`` and ``accelerate launch`` set, and the process group is built from."""


def _denoiser(pipe_or_model: Any) -> nn.Module:
    """The model to split: a bare denoiser itself, or a pipeline's main denoiser (no ControlNet).

    Raises:
        ValueError: the pipeline has a ControlNet, whose residuals would not be split.
    """
    from ..denoisers import main_denoiser, unwrap

    if isinstance(pipe_or_model, nn.Module):
        return unwrap(pipe_or_model)
    if isinstance(getattr(pipe_or_model, "controlnet", None), nn.Module):
        raise ValueError(
            f"{type(pipe_or_model).__name__} has a ControlNet, and ControlNets have no context-parallel "
            "plan in diffusers (their residuals would not be split with the tokens); render it on one process"
        )
    return unwrap(main_denoiser(pipe_or_model))


def _adapter(model: nn.Module) -> ModelAdapter | None:
    """``model``'s lindiff family adapter, or ``None`` for a model of no lindiff family."""
    from ..adapters import adapter_for

    try:
        return adapter_for(model)
    except TypeError:  # not a lindiff family; diffusers may still have a plan for it
        return None


def _families_with_plan() -> list[str]:
    """lindiff's families whose denoisers can be split: diffusers' plan, or the adapter's."""
    from ..adapters import FAMILIES, ModelAdapter

    return [
        name
        for name in FAMILIES
        if FAMILIES.get(name).context_parallel_plan is not ModelAdapter.context_parallel_plan
        or any(getattr(model, "_cp_plan", None) is not None for model in FAMILIES.get(name).models)
    ]


def _plan(model: nn.Module, cp_plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The plan to split ``model`` by: ``cp_plan``, else ``None`` where the class has its own
    ``_cp_plan`` (diffusers uses it), else the family adapter's.

    Raises:
        ValueError: none of these exists (every UNet, and families without a plan).
    """
    if cp_plan is not None or getattr(type(model), "_cp_plan", None) is not None:
        return cp_plan
    adapter = _adapter(model)
    plan = None if adapter is None else adapter.context_parallel_plan(model)
    if plan is not None:
        return plan
    if adapter is not None and adapter.role == "unet":
        raise ValueError(
            f"{type(model).__name__}: UNets have no sequence plan in diffusers (their convolutions, down- "
            "and up-sampling need the whole latent), so a UNet pipeline cannot split an image over "
            "processes; render it on one process"
        )
    import diffusers

    raise ValueError(
        f"{type(model).__name__} has no context-parallel plan (`_cp_plan`) in diffusers {diffusers.__version__} "
        f"nor in lindiff; lindiff's families with one: {', '.join(_families_with_plan())}. Pass cp_plan= "
        "(diffusers' ContextParallelInput/Output per module) to split another model"
    )


def _check_attention(model: nn.Module) -> None:
    """Raise ``ValueError`` when a self-attention layer would attend over its shard alone: its
    processor does not take diffusers' context-parallel config (diffusers' processors of the
    classes without a ``_cp_plan``, such as PixArt's, SD3's and SANA's ``attn1``). Cross-attention
    is exact on a shard: its keys are the text, which those plans do not split."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    for name, module in model.named_modules():
        if not isinstance(module, (Attention, AttentionModuleMixin)):
            continue
        processor = getattr(module, "processor", None)
        cross = getattr(module, "is_cross_attention", False)
        if processor is not None and not cross and not hasattr(processor, "_parallel_config"):
            raise ValueError(
                f"{type(model).__name__}.{name} runs {type(processor).__name__}, which knows nothing of context "
                "parallelism and would attend over this process's tokens alone; lindiff.linearize() the "
                "model first (its converted layers exchange what they need), then enable context parallelism"
            )


def _check_mixers(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` before any work when a converted layer cannot run sharded."""
    from ..attention.base import TokenMixer

    for module in model.modules():
        if isinstance(module, TokenMixer) and not module.context_parallel:
            raise not_supported(module.method_name)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _init_process_group(device: torch.device) -> None:
    """The default process group from the launcher's environment (NCCL for CUDA models, else gloo).

    Raises:
        ValueError: the process was not started by a launcher (no ``WORLD_SIZE``, ...).
    """
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"context parallelism needs several processes, but {', '.join(missing)} is not set: launch with "
            "`torchrun --nproc-per-node N script.py` or `accelerate launch --num_processes N script.py`"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


@contextlib.contextmanager
def _device_count_without_accelerator() -> Iterator[None]:
    """Let ``torch.accelerator.device_count()`` answer 1 instead of 0 on a machine without an
    accelerator, for this block only (see the module docstring: diffusers 0.42 divides by it)."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _parallel_config(degree: int, mode: str, uneven: bool, device: torch.device) -> Any:
    """diffusers' ``ParallelConfig`` of ``degree`` processes in ``mode``; on the CPU, with a mesh
    built on the CPU (diffusers would build it on the machine's accelerator, if it has one)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    ring = mode == "ring"
    mesh = None
    if device.type == "cpu":
        shape = (degree, 1) if ring else (1, degree)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))
    context = ContextParallelConfig(
        ring_degree=degree if ring else 1,
        ulysses_degree=1 if ring else degree,
        ulysses_anything=uneven and not ring,
        ring_anything=uneven and ring,
        mesh=mesh,
    )
    return ParallelConfig(context_parallel_config=context)


def enable_context_parallel(
    pipe_or_model: Any,
    degree: int | None = None,
    mode: Literal["ulysses", "ring"] = "ulysses",
    *,
    uneven: bool = False,
    cp_plan: dict[str, Any] | None = None,
) -> Any:
    """Split every call of ``pipe_or_model``'s denoiser over ``degree`` processes by tokens.

    Call it in every process of the launch, after moving the pipeline to this process's device
    (``cuda:LOCAL_RANK``, or the CPU) and before or after :func:`lindiff.linearize` (either order
    works where diffusers has a plan; families whose plan lindiff supplies, such as PixArt, SD3 and
    SANA, are linearized first, as diffusers' processors of their self-attention cannot run
    sharded). The processes must then make the same calls (same prompts, sizes and seeds): each
    holds ``1/degree`` of the tokens, lindiff's layers exchange their state so the result is the
    one-process result, and diffusers gathers the output, so every process ends with the image.

    Args:
        pipe_or_model: a diffusers pipeline (its ``transformer`` is split; pipelines with a
            ControlNet are refused) or a bare denoiser.
        degree: processes each call is split over; ``None``: all of them. It must equal the number
            of processes (a mix of batch and context parallelism is not offered).
        mode: ``"ulysses"`` or ``"ring"``: how diffusers splits the layers lindiff did not convert.
            On the CPU, diffusers' ring attention fails for softmax layers (its native backend returns
            no log-sum-exp); a fully converted model runs either.
        uneven: allow token counts that ``degree`` does not divide (diffusers' ``ulysses_anything`` /
            ``ring_anything``); diffusers then gathers the output with one all-gather of unequal
            sizes, which NCCL accepts and gloo (CPU) rejects.
        cp_plan: diffusers' context-parallel plan; default: the model class's ``_cp_plan``, else
            the family adapter's.

    Returns:
        ``pipe_or_model``, changed in place.

    Raises:
        ValueError: a bad ``degree`` or ``mode``, a model without a sequence plan (every UNet), a
            self-attention layer that would attend over its shard alone, a ControlNet pipeline,
            parallelism already enabled, or not launched as several processes.
        NotImplementedError: a converted layer's method cannot run on a shard of the tokens.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if degree is not None and (not isinstance(degree, int) or degree < 2):
        raise ValueError(f"degree must be an integer of at least 2 (or None: every process); got {degree!r}")
    model = _denoiser(pipe_or_model)
    cp_plan = _plan(model, cp_plan)
    _check_attention(model)
    _check_mixers(model)
    if getattr(model, "_parallel_config", None) is not None:
        raise ValueError(f"parallelism is already enabled on this {type(model).__name__}")
    device = _device_of(model)
    if not dist.is_initialized():
        _init_process_group(device)
    world = dist.get_world_size()
    degree = world if degree is None else degree
    if degree != world or world < 2:
        raise ValueError(
            f"degree={degree} must equal the number of processes, {world}, and be at least 2: launch "
            f"`torchrun --nproc-per-node {max(degree, 2)} ...`"
        )
    config = _parallel_config(degree, mode, uneven, device)
    with _device_count_without_accelerator() if device.type == "cpu" else contextlib.nullcontext():
        model.enable_parallelism(config=config, cp_plan=cp_plan)
    return pipe_or_model


def context_parallel_degree(pipe_or_model: Any) -> int:
    """Processes each call of ``pipe_or_model``'s denoiser is split over (1: no context parallelism)."""
    from ..denoisers import main_denoiser, unwrap

    model = unwrap(pipe_or_model if isinstance(pipe_or_model, nn.Module) else main_denoiser(pipe_or_model))
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    return 1 if config is None else config.ring_degree * config.ulysses_degree
