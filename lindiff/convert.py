"""`linearize` and `restore`: swap a denoiser's self-attention for a linear/local method and back."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for
from .adapters.base import ModelAdapter
from .attention import GRID_ATTRIBUTE, AttentionMethod, create_method
from .attention.base import ADDED_MODULE, AttentionModule
from .denoisers import denoisers
from .state import FINGERPRINT_DTYPES, STATE_ATTRIBUTE, LinearizedState, base_linear, get_state
from .weights import apply_checkpoint, read_checkpoint

logger = logging.getLogger(__name__)


class GridRecorder:
    """Pre-forward hook of a converted denoiser (deep-copies with the model).

    Records each call's token grid, and puts the method's processor back on converted layers
    whose processor was replaced since the last call (see
    :meth:`LinearizedState.reinstall_processors`), logging that once at INFO.
    """

    def __init__(self, state: LinearizedState) -> None:
        self.state = state
        self.reinstall_logged = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.state.adapter.record_grid(self.state.grid, args, kwargs)
        replaced = self.state.reinstall_processors()
        if replaced and not self.reinstall_logged:
            self.reinstall_logged = True
            found = sorted({cls.__name__ for cls in replaced.values()})
            logger.info(
                "%d converted layers of %s had their processor replaced (by %s); lindiff put its %r "
                "processor back. Call lindiff.restore() to go back to softmax attention",
                len(replaced),
                type(module).__name__,
                ", ".join(found),
                self.state.method.name,
            )


def check_family(method: AttentionMethod, model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``, after checking that ``method`` supports its family.

    Raises:
        TypeError: if ``model`` belongs to no supported family.
        ValueError: if ``method`` declares ``families`` and ``model``'s is not among them.
    """
    adapter = adapter_for(model)
    if method.families is not None and adapter.name not in method.families:
        raise ValueError(
            f"method {method.name!r} supports only the model families {list(method.families)}; "
            f"got {type(model).__name__} (family {adapter.name!r})"
        )
    return adapter


def share_parallel_config(model: nn.Module, processor: Any) -> None:
    """Give ``processor`` the context-parallel config of ``model``, as diffusers'
    ``enable_parallelism`` does for the processors present when it runs.

    So ``linearize`` and ``restore`` work in either order with ``enable_parallelism``: a processor
    installed afterwards would otherwise compute on its process's shard of the tokens alone.
    """
    config = getattr(model, "_parallel_config", None)
    if getattr(config, "context_parallel_config", None) is not None and hasattr(
        processor, "_parallel_config"
    ):
        processor._parallel_config = config


def linearize_model(model: nn.Module, method: AttentionMethod) -> LinearizedState:
    """Convert one denoiser in place; returns the recorded state."""
    existing = get_state(model)
    if existing is not None:
        raise ValueError(
            f"{type(model).__name__} is already linearized with method {existing.method.name!r}; "
            "call lindiff.restore() first to convert it again"
        )
    adapter = check_family(method, model)
    grid = adapter.new_grid(model)
    layers = [layer for layer in adapter.layers(model, grid) if layer.kind in method.kinds]
    if not layers:
        raise ValueError(
            f"method {method.name!r} found no layers to convert in {type(model).__name__} "
            f"(it converts layer kinds {method.kinds})"
        )
    state = LinearizedState(
        method=method,
        adapter=adapter,
        grid=grid,
        layers={layer.name: layer.module for layer in layers},
        original_processors={layer.name: layer.module.processor for layer in layers},
        hook_id=-1,
    )
    state.record_teacher()
    for layer in layers:
        method.convert_layer(layer)
        setattr(layer.module, GRID_ATTRIBUTE, grid)
        state.processors[layer.name] = adapter.processor(layer)
        layer.module.set_processor(state.processors[layer.name])
        share_parallel_config(model, state.processors[layer.name])
    handle = model.register_forward_pre_hook(GridRecorder(state), with_kwargs=True)
    state.hook_id = handle.id
    setattr(model, STATE_ATTRIBUTE, state)
    logger.info("linearized %d layers of %s with %r", len(layers), type(model).__name__, method.name)
    return state


def check_restorable(role: str, model: nn.Module) -> None:
    """Raise unless `restore_model` can give ``model`` its teacher projections back exactly.

    Raises:
        ValueError: projections changed since `linearize` (outside lindiff, or cast to a dtype not
            in :data:`lindiff.state.FINGERPRINT_DTYPES`) with no backup of the teacher's values; or,
            under context parallelism, an original processor that cannot run on a shard of the
            tokens (diffusers' older processors call SDPA on the shard alone).
    """
    state = get_state(model)
    config = getattr(model, "_parallel_config", None)
    if state is not None and getattr(config, "context_parallel_config", None) is not None:
        unaware = [n for n, p in state.original_processors.items() if not hasattr(p, "_parallel_config")]
        if unaware:
            processor = type(state.original_processors[unaware[0]]).__name__
            raise ValueError(
                f"cannot restore {role} ({type(model).__name__}) under context parallelism: its original "
                f"processor {processor} ({len(unaware)} layers, e.g. {unaware[0]}) would attend over this "
                "process's shard of the tokens alone. Nothing was restored; restore before "
                "enable_parallelism, or load the model again"
            )
    lost = [] if state is None else state.unrestorable_projections()
    if not lost:
        return
    layers = [name for name in state.layers if any(key.startswith(name + ".") for key in lost)]
    named = ", ".join(lost[:2]) + (f" and {len(lost) - 2} more" if len(lost) > 2 else "")
    dtypes = ", ".join(str(dtype).removeprefix("torch.") for dtype in FINGERPRINT_DTYPES)
    raise ValueError(
        f"cannot restore {role} ({type(model).__name__}): the teacher's q/k/v/out projections of "
        f"{len(layers)} converted layer(s) ({named}) were changed outside lindiff after linearize "
        f"(or cast to a dtype other than {dtypes}), and lindiff holds no copy of them to give back. "
        "Nothing was restored. To change projections yourself and restore afterwards, linearize "
        "with keep_teacher=True (keeps a CPU copy of them); otherwise reload the original model."
    )


def restore_model(model: nn.Module) -> None:
    """Undo `linearize_model`: original processors, projections and no added modules or hooks.

    Call :func:`check_restorable` first: this puts back only the projections it has a backup of.
    """
    state = get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} was not linearized by lindiff; nothing to restore")
    with torch.no_grad():
        for name, attn in state.layers.items():
            attn.set_processor(state.original_processors[name])
            share_parallel_config(model, state.original_processors[name])
            for attribute in (ADDED_MODULE, GRID_ATTRIBUTE):
                if hasattr(attn, attribute):
                    delattr(attn, attribute)
            if state.projection_backup is not None:
                _restore_projections(attn, name, state.projection_backup)
    for hooks in (model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs):
        hooks.pop(state.hook_id, None)
    delattr(model, STATE_ATTRIBUTE)


def _restore_projections(attn: AttentionModule, name: str, backup: dict[str, torch.Tensor]) -> None:
    for key, saved in backup.items():
        if not key.startswith(name + "."):
            continue
        projection, param_name = key[len(name) + 1 :].rsplit(".", 1)
        getattr(base_linear(attn, projection), param_name).copy_(saved)


def linearize(
    pipe_or_model: Any,
    method: str = "linfusion",
    weights: Any = None,
    *,
    keep_teacher: bool = False,
    **options: Any,
) -> Any:
    """Replace the self-attention of a pipeline's denoiser(s) with a linear or local method, in place.

    Args:
        pipe_or_model: a diffusers pipeline (its ``unet``/``transformer`` and ControlNets are
            converted) or a bare denoiser model.
        method: a name from :func:`lindiff.methods`.
        weights: trained weights for the new layers: a folder or file written by
            :func:`lindiff.save_weights`, a released LinFusion checkpoint folder, or a hub id.
            ``None`` keeps the fresh initialisation (which reproduces the teacher's q/k).
        keep_teacher: keep a CPU copy of the converted layers' q/k/v/out projections now, so
            :func:`restore` gives the teacher back even after your own training changed them
            (costs their size in CPU memory). Without it, `restore` refuses once they were
            changed outside lindiff; :func:`lindiff.save_weights` saves changed ones either way.
        **options: method options (see the method's options dataclass, e.g.
            :class:`lindiff.attention.linfusion.LinFusionOptions`).

    Returns:
        ``pipe_or_model``, converted.
    """
    targets = denoisers(pipe_or_model)
    checkpoint = None
    if weights is not None:
        checkpoint = read_checkpoint(weights)
        options = checkpoint.merged_options(method, options)
    method_instance = create_method(method, **options)
    if not isinstance(keep_teacher, bool):
        raise TypeError(f"keep_teacher must be True or False, got {keep_teacher!r}")
    already = [role for role, model in targets if get_state(model) is not None]
    if already:
        raise ValueError(f"already linearized: {', '.join(already)}; call lindiff.restore() first")
    for _, model in targets:
        check_family(method_instance, model)
    for _, model in targets:
        state = linearize_model(model, method_instance)
        if keep_teacher:
            state.backup_projections()
    if checkpoint is not None:
        apply_checkpoint(targets, checkpoint)
    return pipe_or_model


def restore(pipe_or_model: Any) -> Any:
    """Put back the original softmax attention of everything `linearize` converted; in place.

    Outputs afterwards are bit-identical to those before `linearize`, also after lindiff loaded or
    trained projections (it keeps the teacher's), and after your own changes to them if
    ``linearize(..., keep_teacher=True)``. Returns ``pipe_or_model``.

    Raises:
        ValueError: the projections were changed outside lindiff with no copy of the teacher's
            kept (see :func:`check_restorable`); checked for every component before any is restored.
    """
    targets = [(role, model) for role, model in denoisers(pipe_or_model) if get_state(model) is not None]
    if not targets:
        raise ValueError(f"{type(pipe_or_model).__name__} was not linearized by lindiff; nothing to restore")
    for role, model in targets:
        check_restorable(role, model)
    for _, model in targets:
        restore_model(model)
    return pipe_or_model
