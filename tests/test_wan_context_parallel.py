"""lindiff attention on a tiny Wan under diffusers' context parallelism: 2 CPU processes (gloo).

As in ``test_context_parallel.py`` (tiny FLUX), one ``torch.multiprocessing.spawn`` of 2
processes runs every case and rank 0 records, per case, the largest difference between the
sharded output and the single-process output of the same model (or the error raised).

Wan's ``_cp_plan`` splits the tokens entering ``blocks.0`` and the RoPE tables along the
sequence (frame-major video tokens; the text is not split) and gathers at ``proj_out``. The
grids below split the video mid-frame: ``(3, 4, 6)`` tokens (72, 36 a process: frame 0 and half
of frame 1) and ``(3, 2, 5)`` (30, 15 a process: frame 0 and one and a half rows of frame 1).

CPU workaround (test code only): ``torch.accelerator.device_count`` is patched to return 1, as
diffusers 0.42's ``_resolve_parallel_config`` divides by it (see ``test_context_parallel.py``).
Uneven splits (``ulysses_anything``) are not run here: Wan un-patchifies the gathered output
inside ``forward``, so the FLUX test's way around gloo's refusal of uneven ``all_gather`` (skip
the output gather, compare each process's part) does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from context_parallel_harness import ok, run_cases
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from tiny_dit_models import wan_inputs, wan_transformer

import lindiff
from lindiff.attention.clear import ClearAttention

TOLERANCE = 1e-5  # fp32, outputs of scale ~1: summation order only
ULYSSES = ContextParallelConfig(ulysses_degree=2)
MID_FRAME = (3, 8, 12)  # latent (F, H, W) -> tokens (3, 4, 6)
MID_ROW = (3, 4, 10)  # -> tokens (3, 2, 5)


def _model(method: str | None, **options: Any) -> torch.nn.Module:
    """The tiny Wan, linearized with ``method`` (LiT with non-zero convolutions, so that the rows
    from the other process change the output)."""
    model = wan_transformer()
    if method is not None:
        lindiff.linearize(model, method, **options)
    if method == "lit":
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lindiff.dwc." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def _sharded_vs_single(
    model: torch.nn.Module, latent: tuple[int, int, int], grads: bool = False
) -> dict[str, float]:
    """Max |difference| of the output (and, with ``grads``, of every parameter gradient summed over
    the processes) between one process and Wan's plan over the 2 processes (Ulysses)."""
    inputs = wan_inputs(*latent)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            out = model(**inputs, return_dict=False)[0]
            if grads:
                (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        found = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.detach(), found

    single, single_grads = run()
    model.enable_parallelism(config=ParallelConfig(context_parallel_config=ULYSSES))
    sharded, sharded_grads = run()
    result = {"output": (sharded - single).abs().max().item(), "scale": single.abs().max().item()}
    if grads:
        differences = []
        for name, grad in sharded_grads.items():
            dist.all_reduce(grad)
            differences.append((grad - single_grads[name]).abs().max().item())
        result["grads"] = max(differences)
        result["grad_scale"] = max(grad.abs().max().item() for grad in single_grads.values())
        result["num_grads"] = len(differences)
    return result


CASES: dict[str, Callable[[], dict[str, float]]] = {
    "softmax": lambda: _sharded_vs_single(_model(None), MID_FRAME),
    "linfusion": lambda: _sharded_vs_single(_model("linfusion"), MID_FRAME, grads=True),
    "lit": lambda: _sharded_vs_single(_model("lit"), MID_FRAME, grads=True),
    "lit_mid_row": lambda: _sharded_vs_single(_model("lit", kernel_size=5), MID_ROW),
    "clear": lambda: _sharded_vs_single(_model("clear", radius=2), MID_FRAME),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_cases(__name__, tmp_path_factory.mktemp("wan_context_parallel"))


def test_softmax_control_matches_single_process(results):
    """The harness: diffusers' own Ulysses attention on the unconverted Wan is exact."""
    assert ok(results, "softmax")["output"] < TOLERANCE


@pytest.mark.parametrize("case", ["linfusion", "lit", "lit_mid_row"])
def test_linear_methods_match_single_process(results, case):
    """Outputs (and, where recorded, every parameter gradient summed over the processes) equal the
    single-process ones; LiT's per-frame convolution gets its rows across the mid-frame split."""
    result = ok(results, case)
    assert result["output"] < TOLERANCE
    if "grads" in result:
        assert result["num_grads"] > 0 and result["grads"] < TOLERANCE * max(1.0, result["grad_scale"])


def test_clear_matches_single_process_or_refuses(results):
    """``clear`` is exact under context parallelism once it exchanges its halo frames and rows
    (``ClearAttention.context_parallel``); until then it refuses rather than attend over a shard."""
    if ClearAttention.context_parallel:
        assert ok(results, "clear")["output"] < TOLERANCE
    else:
        error = results["clear"]["error"]
        assert error.startswith("NotImplementedError") and "'clear'" in error
