"""SANA-Video: its own linear attention (ReLU, 3D RoPE in the numerator only) under ``"sana"``, other
methods in its place, the (T, H, W) grid, pipelines, restore, weights.

Tiny models from :mod:`tiny_video_models_b`: a latent of ``f x h x w`` gives ``f x h/2 x w/2``
tokens; through ``SanaVideoPipeline``, ``n`` frames of ``h x w`` px give
``((n - 1)/4 + 1) x h/16 x w/16``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import tiny_video_models_b as tiny_b
import torch
import torch.nn.functional as F
from diffusers import SanaVideoTransformer3DModel
from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0
from torch import nn

import lindiff
from lindiff.adapters import adapter_for
from lindiff.adapters.sana_video import SanaVideoMixerAttnProcessor
from lindiff.adapters.wan import apply_wan_rotary
from lindiff.attention import METHODS as METHOD_REGISTRY
from lindiff.attention.base import Tokens
from lindiff.attention.sana import SanaLinearAttention
from lindiff.denoisers import pipeline_adapter
from lindiff.grid import GridShape
from lindiff.pipelines.loading import check_size
from lindiff.state import get_state

# The subpackage itself (``lindiff.kernels.linear_attention`` the attribute is the function).
la_pkg = importlib.import_module("lindiff.kernels.linear_attention")

LATENTS = [(3, 8, 12), (2, 12, 8)]
# (frames, height px, width px) of pipeline calls (multiples of 32 px), and their token grids.
VIDEOS = [(5, 32, 64), (9, 64, 32)]
VIDEO_GRIDS = {(2, 2, 4), (3, 4, 2)}
LAYERS = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]


def output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_sana_matches_diffusers_without_new_parameters_on_two_grids_in_turn():
    """``"sana"`` computes SANA-Video's attention (max difference to diffusers 5e-7 on outputs of
    size ~2) and adds no parameters; restore is bit-identical; attn2 stays diffusers'."""
    model = tiny_b.sana_video_transformer()
    calls = [tiny_b.sana_video_inputs(*latent, batch=2) for latent in LATENTS]
    references = [output(model, inputs) for inputs in calls]
    parameters = model.state_dict().keys()

    lindiff.linearize(model, "sana")
    state = get_state(model)
    assert adapter_for(model).name == "sana_video"
    assert sorted(state.layers) == LAYERS
    assert model.state_dict().keys() == parameters
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, SanaVideoMixerAttnProcessor)
        assert isinstance(block.attn1.lindiff, SanaLinearAttention)
        assert not hasattr(block.attn2, "lindiff")
    for inputs, reference in zip(calls, references, strict=True):
        torch.testing.assert_close(output(model, inputs), reference, rtol=0, atol=2e-6)

    lindiff.restore(model)
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, SanaLinearAttnProcessor3_0)
    for inputs, reference in zip(calls, references, strict=True):
        assert torch.equal(output(model, inputs), reference)


def test_sana_runs_the_fused_kernel(monkeypatch):
    """With the dispatch of CUDA tensors forced (``backend="auto"`` picks the Triton kernels, here
    under the interpreter), every ``attn1`` call runs the fused op once, unnormalised, and the
    model still equals diffusers'."""
    calls = []
    real_op = la_pkg.linear_attention_op
    use_triton = la_pkg._use_triton
    monkeypatch.setattr(la_pkg, "_use_triton", lambda q, backend: use_triton(q, "triton"))
    monkeypatch.setattr(
        la_pkg, "linear_attention_op", lambda *args: calls.append((args[3], *args[6:])) or real_op(*args)
    )
    model = tiny_b.sana_video_transformer()
    inputs = tiny_b.sana_video_inputs(*LATENTS[0], batch=2)
    reference = output(model, inputs)
    lindiff.linearize(model, "sana")
    torch.testing.assert_close(output(model, inputs), reference, rtol=0, atol=2e-6)
    # feature_map, kv_scale (None: 1 / N) and normalize, once per block.
    assert calls == [("identity", None, False)] * len(LAYERS)


def _rope(tokens: int, dim: int, generator: torch.Generator, device: str = "cpu"):
    """Random RoPE tables as ``WanRotaryPosEmbed`` gives them: ``(1, N, 1, D)`` float64, pairs repeated."""
    angles = torch.rand(1, tokens, 1, dim // 2, dtype=torch.float64, generator=generator) * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    return cos.to(device), sin.to(device)


def _sana_video_formula(q, k, v, cos, sin, eps=1e-15):
    """diffusers' ``SanaLinearAttnProcessor3_0`` in float64, in its linear form:
    ``o_i = R_i f(q_i) S_R / (f(q_i) . sum_j f(k_j) + eps)``, ``S_R = sum_j (R_j f(k_j))^T v_j``."""
    q, k, v = (t.double() for t in (q, k, v))
    rq, rk = apply_wan_rotary(F.relu(q), cos, sin), apply_wan_rotary(F.relu(k), cos, sin)
    state = torch.einsum("bjhd,bjhe->bhde", rk, v)
    normaliser = torch.einsum("bihd,bhd->bih", F.relu(q), F.relu(k).sum(1)) + eps
    return torch.einsum("bihd,bhde->bihe", rq, state) / normaliser[..., None]


def test_rotary_form_is_the_numerator_rotated_over_the_plain_normaliser():
    """:meth:`SanaLinearAttention.rotary` against the formula in float64, written quadratically:
    ``o_i = sum_j (R_i f(q_i) . R_j f(k_j)) v_j / (f(q_i) . sum_j f(k_j) + eps)``, ``f = relu``;
    gradients of q, k, v too."""
    batch, tokens, heads, dim = 2, 10, 2, 6
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, batch, tokens, heads, dim, dtype=torch.float64, generator=generator).unbind(0)
    cos, sin = _rope(tokens, dim, generator)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return apply_wan_rotary(x, cos, sin)

    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = SanaLinearAttention(eps=1e-15).rotary(*leaves, Tokens(image=slice(0, tokens)), rotate)
    scores = torch.einsum("bihd,bjhd->bhij", rotate(F.relu(q)), rotate(F.relu(k)))
    normaliser = torch.einsum("bihd,bhd->bhi", F.relu(q), F.relu(k).sum(1)) + 1e-15
    expected = torch.einsum("bhij,bjhd->bihd", scores / normaliser[..., None], v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, _sana_video_formula(q, k, v, cos, sin), rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=generator)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"d{name}")
    with torch.no_grad():
        plain = SanaLinearAttention(eps=1e-15)(q, k, v, Tokens(image=slice(0, tokens)))
    assert (plain - expected).abs().max() > 1e-2  # the rotation matters


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_rotary_half_precision(dtype, tol):
    """16-bit q, k, v (the reference path here): the float32 normaliser and a mean-scaled
    numerator keep the output within the operator's half-precision tolerance of float64."""
    batch, tokens, heads, dim = 2, 300, 2, 16
    generator = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, batch, tokens, heads, dim, generator=generator).unbind(0)
    cos, sin = _rope(tokens, dim, generator)
    out = SanaLinearAttention(eps=1e-15).rotary(
        *(t.to(dtype) for t in (q, k, v)),
        Tokens(image=slice(0, tokens)),
        lambda x: apply_wan_rotary(x, cos, sin),
    )
    want = _sana_video_formula(*(t.to(dtype) for t in (q, k, v)), cos, sin)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert ((out.double() - want).norm() / want.norm()).item() < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_gpu_rotary_on_the_fused_kernel_at_sana_video_size(monkeypatch, dtype, tol):
    """One SANA-Video 2B attention call at 81 frames of 480 x 832 (2 x 32760 tokens, 20 heads x 112)
    on CUDA: the fused op runs, and the output is the float64 formula's within the kernels'
    tolerance for the dtype."""
    calls = []
    real_op = la_pkg.linear_attention_op
    monkeypatch.setattr(la_pkg, "linear_attention_op", lambda *args: calls.append(args[-1]) or real_op(*args))
    batch, tokens, heads, dim = 2, 32760, 20, 112
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(batch, tokens, heads, dim, generator=generator).cuda().to(dtype) for _ in range(3))
    cos, sin = _rope(tokens, dim, generator, "cuda")
    with torch.no_grad():
        out = SanaLinearAttention(eps=1e-15).rotary(
            q, k, v, Tokens(image=slice(0, tokens)), lambda x: apply_wan_rotary(x, cos, sin)
        )
        want = _sana_video_formula(q, k, v, cos, sin)
    assert calls == [False] and out.dtype == dtype
    err = ((out.double() - want).norm() / want.norm()).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.gpu
def test_gpu_sana_matches_diffusers_at_full_width():
    """A one-block SANA-Video 2B transformer (2240 wide, 20 heads x 112) in bfloat16 on CUDA at 17
    frames of 480 x 832 (5 x 30 x 52 tokens): ``"sana"`` against diffusers' processor."""
    torch.manual_seed(0)
    model = SanaVideoTransformer3DModel(num_layers=1).cuda().to(torch.bfloat16)
    generator = torch.Generator().manual_seed(3)
    inputs = {
        "hidden_states": torch.randn(1, 16, 5, 60, 104, generator=generator),
        "encoder_hidden_states": torch.randn(1, 32, 2304, generator=generator),
        "timestep": torch.full((1,), 500.0),
    }
    inputs = {
        name: t.cuda().to(torch.bfloat16 if t.is_floating_point() else t.dtype) for name, t in inputs.items()
    }
    reference = output(model, inputs).double()
    lindiff.linearize(model, "sana")
    err = ((output(model, inputs).double() - reference).norm() / reference.norm()).item()
    assert err < 2e-2, f"relative error {err:.2e}"


METHODS = [
    name
    for name, cls in ((name, METHOD_REGISTRY.get(name)) for name in lindiff.methods())
    if (cls.families is None or "sana_video" in cls.families) and "self" in cls.kinds
]
OPTIONS = {"clear": {"radius": 1.5}}


def test_sana_video_methods_are_the_expected_ones():
    assert {"sana", "linfusion", "lit", "clear"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_frames_sizes_weights_and_restore(method, tmp_path):
    """SanaVideoPipeline after `linearize` renders two frame counts and sizes in turn (right grid
    each time, finite frames of the right shape); ``"sana"`` gives the original videos; trained
    weights round-trip through save/load; restore gives the original videos bit for bit."""
    pipe = tiny_b.sana_video_pipeline()
    references = [tiny_b.run_sana_video(pipe, *video) for video in VIDEOS]

    lindiff.linearize(pipe, method, **OPTIONS.get(method, {}))
    grid = get_state(pipe.transformer).grid
    seen: set[GridShape] = set()
    probe = pipe.transformer.register_forward_pre_hook(lambda *_: seen.add(grid.latent))
    for (frames, height, width), reference in zip(VIDEOS, references, strict=True):
        out = tiny_b.run_sana_video(pipe, frames, height, width)
        assert out.shape == reference.shape == (1, frames, 3, height, width)
        assert torch.isfinite(out).all()
        if method == "sana":
            torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    probe.remove()
    assert seen == VIDEO_GRIDS

    if any(".lindiff." in name for name, _ in pipe.transformer.named_parameters()):
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in pipe.transformer.named_parameters():
                if ".lindiff." in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        trained = tiny_b.run_sana_video(pipe, *VIDEOS[0])
        lindiff.save_weights(pipe, tmp_path)
        fresh = lindiff.linearize(tiny_b.sana_video_pipeline(), method, weights=tmp_path)
        assert torch.equal(tiny_b.run_sana_video(fresh, *VIDEOS[0]), trained)

    lindiff.restore(pipe)
    assert get_state(pipe.transformer) is None
    for video, reference in zip(VIDEOS, references, strict=True):
        assert torch.equal(tiny_b.run_sana_video(pipe, *video), reference)


def test_sizes_come_from_the_sana_video_adapter():
    """32 px (SanaVideoPipeline's rule; the VAE's 8x times the 2x2 patch is 16); native: the area
    of the pipeline's 832 x 480."""
    pipe = tiny_b.sana_video_pipeline()
    adapter = pipeline_adapter(pipe)
    assert adapter.name == "sana_video"
    assert adapter.size_multiple(pipe) == 32
    assert adapter.native_size(pipe) == round(math.sqrt(832 * 480))
    check_size(pipe, 64, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_size(pipe, 48, 32)


def test_image_shaped_input_is_rejected():
    model = lindiff.linearize(tiny_b.sana_video_transformer(), "sana")
    inputs = tiny_b.sana_video_inputs(*LATENTS[0])
    inputs["hidden_states"] = inputs["hidden_states"][:, :, 0]
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\), got shape \(1, 4, 8, 12\)"):
        model(**inputs)
