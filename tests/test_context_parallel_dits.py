"""PixArt, SD3 and SANA under context parallelism with the plans lindiff supplies: 2 CPU processes.

diffusers 0.42 has no ``_cp_plan`` for these classes; their adapters supply one
(:meth:`~lindiff.adapters.ModelAdapter.context_parallel_plan`), which
:func:`lindiff.parallel.enable_context_parallel` uses. As in ``test_context_parallel.py``, one
``torch.multiprocessing.spawn`` of 2 processes (gloo) runs every case and rank 0 records, per
case, the largest difference between the sharded output and the single-process one.

Controls: diffusers' processors of these classes (``AttnProcessor2_0``, ``JointAttnProcessor2_0``,
``SanaLinearAttnProcessor2_0``) know nothing of context parallelism, so the unconverted models
under the plan attend over each shard alone (``*_shard_local``: different, and
``enable_context_parallel`` refuses them). The harness and the plans are checked instead against
the unconverted model on one process by a converted model that computes the same attention:
CLEAR with a radius beyond the grid's diagonal (full softmax attention) for PixArt and SD3, and
the ``sana`` method (SANA's own ReLU linear attention) for SANA. PixArt's and SANA's softmax
cross-attention stays diffusers' and runs on each process's image queries against every text
token, which is exact.

Grids: PixArt and SD3 latents ``(12, 8)`` are ``(6, 4)`` tokens, SANA's ``(6, 4)`` latents too
(patch 1); each process holds 3 token rows. SD3's 8 text tokens are split 4 + 4.

CPU workaround (test code only): ``torch.accelerator.device_count`` is patched to return 1, as in
``test_context_parallel.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import tiny_dit_models as tiny
import torch
import torch.distributed as dist
from context_parallel_harness import WORLD, ok, run_cases
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

import lindiff
from lindiff.adapters import adapter_for
from lindiff.parallel import enable_context_parallel
from lindiff.state import get_state

TOLERANCE = 1e-5  # fp32, outputs of scale ~1: summation order only
FAMILIES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], dict[str, Any]]]] = {
    "pixart": (tiny.pixart_transformer, lambda: tiny.pixart_inputs(12, 8)),
    "sd3": (tiny.sd3_transformer, lambda: tiny.sd3_inputs(12, 8)),
    "sd3.5": (lambda: tiny.sd3_transformer(dual_attention=True), lambda: tiny.sd3_inputs(12, 8)),
    "sana": (tiny.sana_transformer, lambda: tiny.sana_inputs(6, 4)),
}
METHODS = {
    "pixart": ["linfusion", "lit", "clear"],
    "sd3": ["linfusion", "lit", "clear"],
    "sd3.5": ["linfusion"],
    "sana": ["sana", "linfusion", "lit", "clear"],
}
WHOLE_GRID = {"clear": {"radius": 12}}  # beyond the (6, 4) grid's diagonal: full softmax attention
CONTROL_METHOD = {"pixart": WHOLE_GRID, "sd3": WHOLE_GRID, "sd3.5": WHOLE_GRID, "sana": {"sana": {}}}


def _model(family: str, method: str | None = None, **options: Any) -> torch.nn.Module:
    """The tiny model of ``family`` with random depthwise convolutions (SANA's Mix-FFN, LiT's
    ``dwc``: so that rows from the other process change the output), linearized with ``method``."""
    model = FAMILIES[family][0]()
    if method is not None:
        lindiff.linearize(model, method, **options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3)
    return model


def _output(model: torch.nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**FAMILIES[family][1](), return_dict=False)[0]


def _differences(sharded: torch.Tensor, single: torch.Tensor) -> dict[str, float]:
    return {"output": (sharded - single).abs().max().item(), "scale": single.abs().max().item()}


def _case_method(family: str, method: str, mode: str = "ulysses") -> dict[str, float]:
    """``method``'s model split by ``enable_context_parallel`` (the adapter's plan) against the
    same model on one process."""
    model = _model(family, method)
    single = _output(model, family)
    enable_context_parallel(model, WORLD, mode)
    seen = []

    def count(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    first = model.transformer_blocks[0].register_forward_pre_hook(count, with_kwargs=True)
    result = _differences(_output(model, family), single)
    first.remove()
    return {
        **result,
        "tokens": seen[0],
        "total": single.shape[-2] * single.shape[-1] // model.config.patch_size**2,
    }


def _case_control(family: str) -> dict[str, float]:
    """A converted model that computes the unconverted model's attention, split, against the
    unconverted model on one process."""
    ((method, options),) = CONTROL_METHOD[family].items()
    softmax = _output(_model(family), family)
    model = _model(family, method, **options)
    enable_context_parallel(model, WORLD)
    return _differences(_output(model, family), softmax)


def _case_grads(family: str, method: str) -> dict[str, float]:
    """Every parameter gradient, summed over the processes (each holds its tokens' share), against
    the one-process gradient (SANA's plan gathers before its Mix-FFN, whose gradient it does not
    sum back, so SANA is not among these)."""
    model = _model(family, method)
    inputs = FAMILIES[family][1]()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model(**inputs, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    single = grads()
    enable_context_parallel(model, WORLD)
    differences = []
    for name, grad in grads().items():
        dist.all_reduce(grad)
        differences.append((grad - single[name]).abs().max().item())
    return {"grads": max(differences), "scale": max(g.abs().max().item() for g in single.values())}


def _case_shard_local(family: str) -> dict[str, float]:
    """The unconverted model under the adapter's plan (through diffusers, as
    ``enable_context_parallel`` refuses it): diffusers' processors attend over each shard alone."""
    model = _model(family)
    single = _output(model, family)
    plan = adapter_for(model).context_parallel_plan(model)
    model.enable_parallelism(
        config=ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=WORLD)),
        cp_plan=plan,
    )
    return _differences(_output(model, family), single)


CASES: dict[str, Callable[[], dict[str, float]]] = {
    **{
        f"{family}_{method}": (lambda f=family, m=method: _case_method(f, m))
        for family in METHODS
        for method in METHODS[family]
    },
    "pixart_linfusion_ring": lambda: _case_method("pixart", "linfusion", "ring"),
    "pixart_linfusion_grads": lambda: _case_grads("pixart", "linfusion"),
    "sd3_lit_grads": lambda: _case_grads("sd3", "lit"),
    **{f"{family}_control": (lambda f=family: _case_control(f)) for family in FAMILIES},
    **{
        f"{family}_shard_local": (lambda f=family: _case_shard_local(f))
        for family in ("pixart", "sd3", "sana")
    },
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_cases(__name__, tmp_path_factory.mktemp("context_parallel_dits"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_control_matches_unconverted_single_process(results, family):
    """The plan and the harness: split, a converted model computing the original attention
    equals the unconverted model on one process (text split for SD3, cross-attention for PixArt
    and SANA on split queries)."""
    assert ok(results, f"{family}_control")["output"] < TOLERANCE


@pytest.mark.parametrize(
    "case",
    [*(f"{family}_{method}" for family in METHODS for method in METHODS[family]), "pixart_linfusion_ring"],
)
def test_methods_match_single_process(results, case):
    """Each process's first block holds half of the image tokens, and the output is the one-process one."""
    result = ok(results, case)
    assert result["tokens"] * WORLD == result["total"]
    assert result["output"] < TOLERANCE


@pytest.mark.parametrize("case", ["pixart_linfusion_grads", "sd3_lit_grads"])
def test_gradients_match_single_process(results, case):
    result = ok(results, case)
    assert result["grads"] < TOLERANCE * result["scale"]


@pytest.mark.parametrize("family", ["pixart", "sd3", "sana"])
def test_unconverted_model_attends_over_its_shard_alone(results, family):
    """Why unconverted models are refused: diffusers' processors of these classes ignore the split."""
    result = ok(results, f"{family}_shard_local")
    assert result["output"] > 1e-3 * result["scale"]


@pytest.mark.parametrize("family", ["pixart", "sd3", "sana"])
def test_unconverted_model_is_refused(family):
    with pytest.raises(
        ValueError, match=r"knows nothing of context parallelism.*linearize\(\) the model first"
    ):
        enable_context_parallel(_model(family), WORLD)


def test_restore_refuses_processors_that_know_nothing_of_context_parallelism():
    """Under context parallelism, diffusers' older processors (PixArt's AttnProcessor2_0) would
    attend over one process's shard alone: restore refuses before changing anything; FLUX's own
    processors take the config and restore."""
    configured = SimpleNamespace(context_parallel_config=SimpleNamespace())
    pixart = lindiff.linearize(tiny.pixart_transformer(), "linfusion")
    pixart._parallel_config = configured
    with pytest.raises(ValueError, match=r"cannot restore transformer .* under context parallelism"):
        lindiff.restore(pixart)
    assert get_state(pixart) is not None
    flux = lindiff.linearize(tiny.flux_transformer(), "linfusion")
    flux._parallel_config = configured
    lindiff.restore(flux)
    assert all(p._parallel_config is configured for p in flux.attn_processors.values())
