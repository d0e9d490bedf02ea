"""lindiff attention under diffusers' context parallelism: 2 CPU processes (gloo), tiny FLUX.

One ``torch.multiprocessing.spawn`` of 2 processes runs every case (starting processes is what
costs time) and rank 0 records, per case, the largest difference between the sharded output and
the single-process output of the same model (or the error raised); the tests read that record.

CPU workaround (test code only): diffusers 0.42's ``_resolve_parallel_config`` places each rank
on ``torch.device(type, rank % torch.accelerator.device_count())``, which divides by zero where
there is no accelerator; the worker patches ``torch.accelerator.device_count`` to return 1. The
device type is then ``cpu`` and the mesh runs on the gloo process group. Softmax layers under
``ring_degree`` still fail on CPU (diffusers' native backend returns no LSE), so the ring case
runs a fully linearized FLUX, which has no softmax attention left.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from context_parallel_harness import WORLD, ok, run_cases
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from tiny_dit_models import flux_inputs, flux_transformer

import lindiff
import lindiff.parallel.exchange
from lindiff.adapters.processors import call_mixer
from lindiff.adapters.wan import apply_wan_rotary
from lindiff.attention.base import Tokens
from lindiff.attention.clear import ClearAttention
from lindiff.attention.sana import SanaLinearAttention
from lindiff.grid import TokenGrid
from lindiff.kernels import local_attention
from lindiff.kernels.linear_attention import (
    linear_attention,
    linear_attention_from_state,
    linear_attention_state,
)
from lindiff.parallel import SequenceShard, local_attention_sharded

TOLERANCE = 1e-5  # fp32, outputs of scale ~1: summation order only


def _inputs(height: int, width: int, text: int = 8) -> dict[str, Any]:
    """Tiny FLUX inputs at a ``height x width`` token grid with ``text`` text tokens (at most 8)."""
    inputs = flux_inputs(2 * height, 2 * width)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :text]
    inputs["txt_ids"] = inputs["txt_ids"][:text]
    return inputs


def _randomize_lit(model: torch.nn.Module) -> None:
    """Non-zero LiT convolutions, so that the halo rows change the output."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.groups > 1:
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.3)


def _model(method: str | None, **options: Any) -> torch.nn.Module:
    model = flux_transformer()
    if method is not None:
        lindiff.linearize(model, method, **options)
    if method == "lit":
        _randomize_lit(model)
    return model


def _sharded_vs_single(
    model: torch.nn.Module, inputs: dict[str, Any], config: ContextParallelConfig, grads: bool = False
) -> dict[str, float]:
    """Max |difference| of the output (and, with ``grads``, of every parameter gradient) between
    one process and ``config``'s split over the 2 processes.

    Uneven splits (``ulysses_anything``) run FLUX's plan without its output gather: diffusers
    gathers uneven shards with one ``dist.all_gather`` of different sizes, which gloo rejects
    (NCCL accepts it), so each process compares its own part of the output (image tokens split by
    ``torch.tensor_split``, as diffusers splits them) with the same part of the single-process one.
    """

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            out = model(**inputs, return_dict=False)[0]
            if grads:
                (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        found = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.detach(), found

    single, single_grads = run()
    plan = {"": type(model)._cp_plan[""]} if config.ulysses_anything else None
    model.enable_parallelism(config=ParallelConfig(context_parallel_config=config), cp_plan=plan)
    sharded, sharded_grads = run()
    if plan is not None:
        single = single.tensor_split(WORLD, dim=1)[dist.get_rank()]
    result = {"output": (sharded - single).abs().max().item(), "scale": single.abs().max().item()}
    if plan is not None:  # the other process's part
        result["output"] = max(_gather_floats(result["output"]))
    if grads:
        # Each process holds the gradient of its own tokens' share: their sum is the whole gradient.
        differences = []
        for name, grad in sharded_grads.items():
            dist.all_reduce(grad)
            differences.append((grad - single_grads[name]).abs().max().item())
        result["grads"] = max(differences)
        result["grad_scale"] = max(grad.abs().max().item() for grad in single_grads.values())
        result["num_grads"] = len(differences)
    return result


def _case_sana_mixer() -> dict[str, float]:
    """SANA's mixer on an uneven split of random tokens (SANA models have no context-parallel plan)."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=generator) for _ in range(3))
    mixer = SanaLinearAttention(eps=1e-15)
    single = mixer(q, k, v, Tokens(image=slice(0, 9)))
    group = dist.group.WORLD
    shard = SequenceShard(group=group, rank=dist.get_rank(group), world_size=WORLD, uneven=True)
    part = shard.part(9)
    sharded = mixer(
        q[:, part], k[:, part], v[:, part], Tokens(image=slice(0, part.stop - part.start), shard=shard)
    )
    return {"output": max(_gather_floats((sharded - single[:, part]).abs().max().item()))}


def _case_sana_rotary_mixer() -> dict[str, float]:
    """SANA-Video's form of SANA's mixer (RoPE in the numerator only) on an uneven split: the
    rotated state and the plain normaliser are summed over the processes; output and the
    gradients of q, k, v."""
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=generator, requires_grad=True) for _ in range(3))
    angles = torch.rand(1, 9, 1, 4, dtype=torch.float64, generator=generator) * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    mixer = SanaLinearAttention(eps=1e-15)
    grad = torch.randn(2, 9, 2, 8, generator=generator)

    def rotary(part: slice, shard: SequenceShard | None) -> tuple[torch.Tensor, ...]:
        rotate = lambda x: apply_wan_rotary(x, cos[:, part], sin[:, part])
        leaves = [t[:, part] for t in (q, k, v)]
        out = mixer.rotary(*leaves, Tokens(image=slice(0, part.stop - part.start), shard=shard), rotate)
        return out, *torch.autograd.grad(out, (q, k, v), grad[:, part])

    single, *single_grads = rotary(slice(0, 9), None)
    group = dist.group.WORLD
    shard = SequenceShard(group=group, rank=dist.get_rank(group), world_size=WORLD, uneven=True)
    part = shard.part(9)
    sharded, *sharded_grads = rotary(part, shard)
    differences = []
    for got, want in zip(sharded_grads, single_grads, strict=True):
        dist.all_reduce(got)  # each process's share of the whole gradient
        differences.append((got - want).abs().max().item())
    return {
        "output": max(_gather_floats((sharded - single[:, part]).abs().max().item())),
        "grads": max(differences),
        "grad_scale": max(g.abs().max().item() for g in single_grads),
        "num_grads": len(differences),
    }


def _case_clear_mixer_video(
    grid: tuple[int, int, int] = (3, 4, 5), frames_radius: float | None = None
) -> dict[str, float]:
    """CLEAR's mixer (float64) on a video grid split unevenly over the processes: its cylinder
    window (every frame by default) crosses frames and its part starts mid-frame; text after the
    image, pooled cells that pool repeated edge rows and columns (f = 3), length-aware scale;
    output and the gradients of q, k, v and the pooling weight."""
    generator = torch.Generator().manual_seed(5)
    text = 5
    num_image = math.prod(grid)
    q, k, v = (
        torch.randn(2, num_image + text, 2, 8, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    mixer = ClearAttention(radius=2, down_factor=3, train_tokens=16, frames_radius=frames_radius).double()
    with torch.no_grad():
        mixer.spatial_weight.copy_(torch.rand(3, 3, generator=generator))
    source = TokenGrid()
    source.set_tokens(*grid)
    weights = torch.randn(2, num_image + text, 2, 8, generator=generator, dtype=torch.float64)
    inputs = (q, k, v, mixer.spatial_weight)
    single = mixer(q, k, v, Tokens(image=slice(0, num_image), source=source))
    single_grads = torch.autograd.grad((single * weights).sum(), inputs)
    group = dist.group.WORLD
    shard = SequenceShard(group=group, rank=dist.get_rank(group), world_size=WORLD, uneven=True)
    image, own_text = shard.part(num_image), shard.part(text)
    index = torch.cat(
        [torch.arange(image.start, image.stop), num_image + torch.arange(own_text.start, own_text.stop)]
    )
    tokens = Tokens(image=slice(0, image.stop - image.start), source=source, shard=shard)
    sharded = mixer(q[:, index], k[:, index], v[:, index], tokens)
    sharded_grads = torch.autograd.grad((sharded * weights[:, index]).sum(), inputs)
    grads = []
    for grad, expected in zip(sharded_grads, single_grads, strict=True):
        dist.all_reduce(grad)
        grads.append((grad - expected).abs().max().item())
    return {
        "output": max(_gather_floats((sharded - single[:, index]).abs().max().item())),
        "grads": max(_gather_floats(max(grads))),
        "grad_scale": max(grad.abs().max().item() for grad in single_grads),
        "num_grads": len(grads),
    }


def _case_local_attention_sharded() -> dict[str, float]:
    """``local_attention_sharded`` on a (7, 4, 5) grid split mid-frame: a ball (reach 2 frames and
    rows) and a cylinder whose frame reach (2) differs from its row reach (1)."""
    generator = torch.Generator().manual_seed(6)
    grid = (7, 4, 5)
    q, k, v = (
        torch.randn(1, math.prod(grid), 2, 8, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    shard = SequenceShard(group=dist.group.WORLD, rank=dist.get_rank(), world_size=WORLD, uneven=True)
    part = shard.part(math.prod(grid))
    differences = []
    for radius, frames_radius in ((2.5, None), (1.5, 2)):
        window = {"radius": radius, "frames_radius": frames_radius, "scale": 0.3}
        single = local_attention(q, k, v, grid=grid, **window)[:, part]
        sharded = local_attention_sharded(q[:, part], k[:, part], v[:, part], shard, grid, **window)
        differences.append((sharded - single).abs().max().item())
    return {"output": max(_gather_floats(max(differences)))}


def _case_clear_whole_grid() -> dict[str, float]:
    """A CLEAR radius beyond the grid's diagonal is full attention: the sharded converted model
    equals the unconverted model on one process (each process's window reaches the other's rows)."""
    inputs = _inputs(8, 8)
    base = flux_transformer()
    softmax = base(**inputs, return_dict=False)[0]
    model = lindiff.linearize(copy.deepcopy(base), "clear", radius=12)
    model.enable_parallelism(config=ParallelConfig(context_parallel_config=ULYSSES))
    sharded = model(**inputs, return_dict=False)[0]
    return {"output": (sharded - softmax).abs().max().item(), "scale": softmax.abs().max().item()}


def _gather_floats(value: float) -> list[float]:
    found = [0.0] * WORLD
    dist.all_gather_object(found, value)
    return found


def _no_exchange(tensor: torch.Tensor, shard: Any) -> torch.Tensor:
    return tensor


def _case_linfusion_no_exchange() -> dict[str, float]:
    with mock.patch.object(lindiff.parallel.exchange, "all_reduce_sum", _no_exchange):
        return _sharded_vs_single(_model("linfusion"), _inputs(8, 8), ContextParallelConfig(ulysses_degree=2))


def _case_linearize_after_enable() -> dict[str, float]:
    """diffusers' ``enable_parallelism`` first, ``lindiff.linearize`` second, then ``restore``."""
    inputs = _inputs(8, 8)
    base = flux_transformer()
    model = copy.deepcopy(base)
    softmax = base(**inputs, return_dict=False)[0]
    single = lindiff.linearize(base, "linfusion")(**inputs, return_dict=False)[0]
    model.enable_parallelism(
        config=ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    )
    lindiff.linearize(model, "linfusion")
    model.load_state_dict(base.state_dict())
    sharded = model(**inputs, return_dict=False)[0]
    restored = lindiff.restore(model)(**inputs, return_dict=False)[0]
    return {
        "output": (sharded - single).abs().max().item(),
        "restored": (restored - softmax).abs().max().item(),
    }


ULYSSES = ContextParallelConfig(ulysses_degree=2)

CASES: dict[str, Callable[[], dict[str, float]]] = {
    "softmax": lambda: _sharded_vs_single(_model(None), _inputs(8, 8), ULYSSES),
    "linfusion_no_exchange": _case_linfusion_no_exchange,
    "linfusion": lambda: _sharded_vs_single(_model("linfusion"), _inputs(8, 8), ULYSSES, grads=True),
    "linfusion_ring": lambda: _sharded_vs_single(
        _model("linfusion"), _inputs(8, 8), ContextParallelConfig(ring_degree=2)
    ),
    "linfusion_uneven": lambda: _sharded_vs_single(
        _model("linfusion"),
        _inputs(3, 3, text=7),
        ContextParallelConfig(ulysses_degree=2, ulysses_anything=True),
    ),
    "linfusion_uneven_without_anything": lambda: _sharded_vs_single(
        _model("linfusion"), _inputs(3, 3, text=7), ULYSSES
    ),
    "lit": lambda: _sharded_vs_single(_model("lit"), _inputs(8, 8), ULYSSES, grads=True),
    "lit_mid_row": lambda: _sharded_vs_single(
        _model("lit", kernel_size=7),
        _inputs(5, 3),
        ContextParallelConfig(ulysses_degree=2, ulysses_anything=True),
    ),
    "sana_mixer": _case_sana_mixer,
    "sana_rotary_mixer": _case_sana_rotary_mixer,
    "clear": lambda: _sharded_vs_single(_model("clear", radius=2), _inputs(8, 8), ULYSSES, grads=True),
    "clear_pooled": lambda: _sharded_vs_single(
        _model("clear", radius=2, down_factor=2), _inputs(8, 8), ULYSSES
    ),
    "clear_ring_length_aware": lambda: _sharded_vs_single(
        _model("clear", radius=2, down_factor=2, train_tokens=16),
        _inputs(8, 8),
        ContextParallelConfig(ring_degree=2),
    ),
    "clear_uneven": lambda: _sharded_vs_single(
        _model("clear", radius=2, down_factor=2),
        _inputs(5, 3, text=7),
        ContextParallelConfig(ulysses_degree=2, ulysses_anything=True),
    ),
    "clear_whole_grid": _case_clear_whole_grid,
    "clear_mixer_video": _case_clear_mixer_video,
    "clear_mixer_video_frames": functools.partial(_case_clear_mixer_video, grid=(7, 4, 5), frames_radius=2),
    "local_attention_sharded": _case_local_attention_sharded,
    "linearize_after_enable": _case_linearize_after_enable,
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_cases(__name__, tmp_path_factory.mktemp("context_parallel"))


def test_softmax_control_matches_single_process(results):
    """The harness: diffusers' own Ulysses attention on the unconverted model is exact."""
    assert ok(results, "softmax")["output"] < TOLERANCE


def test_shard_local_linear_attention_is_wrong(results):
    """Without lindiff's exchange each process attends over its own tokens: a different result."""
    result = ok(results, "linfusion_no_exchange")
    assert result["output"] > 1e-3 * result["scale"]


@pytest.mark.parametrize(
    "case",
    [
        "linfusion",
        "linfusion_ring",
        "linfusion_uneven",
        "lit",
        "lit_mid_row",
        "sana_mixer",
        "sana_rotary_mixer",
    ],
)
def test_linear_methods_match_single_process(results, case):
    """Outputs (and, where recorded, every parameter gradient summed over the processes) equal
    the single-process ones; ``lit_mid_row`` splits the image mid-row, ``*_uneven`` 9 + 7 tokens."""
    result = ok(results, case)
    assert result["output"] < TOLERANCE
    if "grads" in result:
        assert result["num_grads"] > 0 and result["grads"] < TOLERANCE * max(1.0, result["grad_scale"])


def test_uneven_split_needs_anything_mode(results):
    """diffusers' equal split asserts that the sequence divides; ``ulysses_anything`` splits any length."""
    assert "divisible by mesh size" in results["linfusion_uneven_without_anything"]["error"]


@pytest.mark.parametrize(
    "case",
    [
        "clear",
        "clear_pooled",
        "clear_ring_length_aware",
        "clear_uneven",
        "clear_whole_grid",
        "clear_mixer_video",
        "clear_mixer_video_frames",
        "local_attention_sharded",
    ],
)
def test_clear_matches_single_process(results, case):
    """CLEAR's window (halo rows from the other process), text and pooled tokens, length-aware
    scale: outputs (and, where recorded, gradients) equal the single-process ones.
    ``clear_uneven`` splits a 5 x 3 grid mid-row with 7 text tokens; ``clear_whole_grid`` (radius
    beyond the diagonal) equals the unconverted softmax model; ``clear_mixer_video`` runs the mixer
    on a (3, 4, 5) video grid (every frame), ``clear_mixer_video_frames`` on a (7, 4, 5) one with
    ``frames_radius=2``; ``local_attention_sharded`` runs the kernel's ball and a cylinder."""
    result = ok(results, case)
    assert result["output"] < TOLERANCE
    if "grads" in result:
        assert result["num_grads"] > 0 and result["grads"] < TOLERANCE * max(1.0, result["grad_scale"])


def test_unsupported_method_raises():
    """A mixer without context-parallel support is refused on a shard, not run on it alone."""

    class ShardLocal(SanaLinearAttention):
        method_name = "shard_local"
        context_parallel = False

    shard = SequenceShard(group=None, rank=0, world_size=2)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match=r"'shard_local'.*issue 32"):
        call_mixer(ShardLocal(eps=1e-15), q, q, q, Tokens(image=slice(0, 4), shard=shard))


def test_linearize_and_restore_work_in_either_order_with_enable_parallelism(results):
    """diffusers configures the processors present when enable_parallelism runs; lindiff gives its
    own (and, on restore, the original ones) the same config."""
    result = ok(results, "linearize_after_enable")
    assert result["output"] < TOLERANCE and result["restored"] < TOLERANCE


@pytest.mark.parametrize("kv_scale", [1.0, "mean"])
def test_two_pass_linear_attention_sums_over_splits(kv_scale):
    """States of a sequence's parts, summed (and divided by the count for a mean), give the whole."""
    q, k, v = (torch.randn(2, 11, 3, 8, dtype=torch.float64) for _ in range(3))
    parts = [
        linear_attention_state(k[:, part], v[:, part], kv_scale=1.0) for part in (slice(0, 4), slice(4, 11))
    ]
    state = sum(parts) / (11 if kv_scale == "mean" else 1)
    assert state.shape == (2, 3, 8, 9)
    expected = linear_attention(q, k, v, kv_scale=kv_scale)
    torch.testing.assert_close(linear_attention_from_state(q, state), expected)
    whole = linear_attention_state(k.transpose(1, 2), v.transpose(1, 2), layout="bhnd", kv_scale=kv_scale)
    out = linear_attention_from_state(q.transpose(1, 2), whole, layout="bhnd")
    torch.testing.assert_close(out.transpose(1, 2), expected)


def test_two_pass_linear_attention_rejects_a_wrong_state():
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match=r"state must have shape \(B, H, D, D_v \+ 1\)"):
        linear_attention_from_state(q, torch.zeros(1, 2, 4, 9))
    with pytest.raises(TypeError, match="float32 or float64"):
        linear_attention_from_state(q, torch.zeros(1, 2, 8, 9, dtype=torch.float16))


def test_shard_sizes_follow_diffusers_split():
    """Equal chunks, or ``torch.tensor_split``'s sizes in the *_anything modes."""
    even = SequenceShard(group=None, rank=1, world_size=2)
    assert even.part(8) == slice(4, 8)
    with pytest.raises(ValueError, match="ulysses_anything=True"):
        even.sizes(9)
    uneven = SequenceShard(group=None, rank=1, world_size=3, uneven=True)
    assert uneven.sizes(10) == [len(t) for t in torch.arange(10).tensor_split(3)]
    assert uneven.part(10) == slice(4, 7)
