"""LTX-Video: conversion of ``attn1``, the (T, H, W) grid from ``num_frames``/``height``/``width``,
pipelines, restore, weights.

Tiny models from :mod:`tiny_video_models`: a latent of ``f x h x w`` is ``f * h * w`` packed tokens;
through ``LTXPipeline``, ``n`` frames of ``h x w`` px give ``((n - 1)/4 + 1) x h/4 x w/4`` tokens.
"""

from __future__ import annotations

import math

import pytest
import tiny_video_models as tiny
import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

import lindiff
from lindiff.adapters import adapter_for
from lindiff.adapters.ltx import LTXMixerAttnProcessor
from lindiff.attention import METHODS as METHOD_REGISTRY
from lindiff.denoisers import pipeline_adapter
from lindiff.grid import GridShape
from lindiff.pipelines.loading import check_size
from lindiff.state import get_state

# (latent frames, height, width) of bare transformer calls: with 1x1x1 patches, the token grids.
LATENTS = [(3, 4, 6), (2, 6, 4)]
# (frames, height px, width px) of pipeline calls, and their token grids.
VIDEOS = [(5, 32, 64), (9, 64, 32)]
VIDEO_GRIDS = {(2, 8, 16), (3, 16, 8)}


def test_attn1_is_converted_and_attn2_stays_softmax():
    model = lindiff.linearize(tiny.ltx_transformer(), "linfusion")
    state = get_state(model)
    assert adapter_for(model).name == "ltx"
    assert sorted(state.layers) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, LTXMixerAttnProcessor)
        assert isinstance(block.attn2.processor, LTXVideoAttnProcessor)
        assert not hasattr(block.attn2, "lindiff")


def test_processor_reproduces_diffusers_on_two_grids_in_turn():
    """With softmax in place of the mixer, a converted LTX gives diffusers' outputs exactly (same
    projections, RMS norms across heads, RoPE before the head split), and each call sees the grid
    of its ``num_frames x height x width``: two frame counts and two sizes, one after the other."""
    model = tiny.ltx_transformer()
    calls = [tiny.ltx_inputs(*latent, batch=2) for latent in LATENTS]
    references = [tiny.output(model, inputs) for inputs in calls]

    lindiff.linearize(model, "linfusion")
    state = get_state(model)
    for attn in state.layers.values():
        attn.lindiff = tiny.RecordingSoftmax()
    for inputs, reference in zip(calls, references, strict=True):
        torch.testing.assert_close(tiny.output(model, inputs), reference, rtol=0, atol=0)
    for attn in state.layers.values():
        assert attn.lindiff.calls == [(slice(0, math.prod(grid)), grid) for grid in LATENTS]


def test_clear_with_a_window_over_the_whole_video_is_softmax():
    """``clear``'s window on video is a cylinder: strict (``d < radius``) in each frame, over every
    frame by default. A radius beyond a frame's diagonal is full attention (text global), the
    original model; the query's frame alone (``frames_radius=0``) or a small radius is not."""
    model = tiny.ltx_transformer()
    inputs = tiny.ltx_inputs(*LATENTS[0])
    reference = tiny.output(model, inputs)
    _, height, width = LATENTS[0]
    diagonal = math.dist((0, 0), (height - 1, width - 1))  # of a frame
    lindiff.linearize(model, "clear", radius=diagonal + 0.01)
    torch.testing.assert_close(tiny.output(model, inputs), reference, rtol=0, atol=1e-5)

    lindiff.restore(model)
    lindiff.linearize(model, "clear", radius=diagonal + 0.01, frames_radius=0)
    assert (tiny.output(model, inputs) - reference).abs().max() > 1e-3

    lindiff.restore(model)
    lindiff.linearize(model, "clear", radius=1.5)
    assert (tiny.output(model, inputs) - reference).abs().max() > 1e-3


# Every registered method that applies to LTX's self-attention (from the registry, so a new method
# is tested here too), with its options for the tiny grids.
METHODS = [
    name
    for name, cls in ((name, METHOD_REGISTRY.get(name)) for name in lindiff.methods())
    if (cls.families is None or "ltx" in cls.families) and "self" in cls.kinds
]
OPTIONS = {"clear": {"radius": 2.5}}


def test_ltx_methods_are_the_expected_ones():
    assert {"linfusion", "lit", "clear"} <= set(METHODS) and "sana" not in METHODS


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_frames_sizes_weights_and_restore(method, tmp_path):
    """LTXPipeline after `linearize` renders two frame counts and sizes in turn (right grid each
    time, finite frames of the right shape); trained weights round-trip through save/load; restore
    gives the original videos bit for bit."""
    pipe = tiny.ltx_pipeline()
    references = [tiny.run_ltx(pipe, *video) for video in VIDEOS]

    lindiff.linearize(pipe, method, **OPTIONS.get(method, {}))
    grid = get_state(pipe.transformer).grid
    seen: set[GridShape] = set()
    probe = pipe.transformer.register_forward_pre_hook(lambda *_: seen.add(grid.latent))
    for (frames, height, width), reference in zip(VIDEOS, references, strict=True):
        out = tiny.run_ltx(pipe, frames, height, width)
        assert out.shape == reference.shape == (1, frames, 3, height, width)
        assert torch.isfinite(out).all()
    probe.remove()
    assert seen == VIDEO_GRIDS

    tiny.perturb_added(pipe.transformer)
    trained = tiny.run_ltx(pipe, *VIDEOS[0])
    lindiff.save_weights(pipe, tmp_path)
    fresh = lindiff.linearize(tiny.ltx_pipeline(), method, weights=tmp_path)
    assert torch.equal(tiny.run_ltx(fresh, *VIDEOS[0]), trained)

    lindiff.restore(pipe)
    assert get_state(pipe.transformer) is None
    for video, reference in zip(VIDEOS, references, strict=True):
        assert torch.equal(tiny.run_ltx(pipe, *video), reference)


def test_sizes_come_from_the_ltx_adapter():
    """32 px (LTXPipeline's rule; the tiny VAE's 4x is finer); native: the area of 512 x 704."""
    pipe = tiny.ltx_pipeline()
    adapter = pipeline_adapter(pipe)
    assert adapter.name == "ltx"
    assert adapter.size_multiple(pipe) == 32
    assert adapter.native_size(pipe) == round(math.sqrt(512 * 704))
    check_size(pipe, 64, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_size(pipe, 48, 32)


def test_grid_arguments_positional_missing_or_inconsistent():
    """The grid arguments work positionally too; a call without them (``video_coords`` only, as
    LTXConditionPipeline makes) or with a token count they do not give is refused by name."""
    model = lindiff.linearize(tiny.ltx_transformer(), "linfusion")
    inputs = tiny.ltx_inputs(*LATENTS[0])
    reference = tiny.output(model, inputs)
    names = ["hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask"]
    names += ["num_frames", "height", "width"]
    positional = [inputs.pop(name) for name in names]
    with torch.no_grad():
        assert torch.equal(model(*positional, **inputs, return_dict=False)[0], reference)

    missing = tiny.ltx_inputs(*LATENTS[0])
    del missing["num_frames"], missing["height"], missing["width"]
    missing["video_coords"] = torch.zeros(1, 3, math.prod(LATENTS[0]))
    with pytest.raises(ValueError, match="num_frames=None, height=None, width=None"):
        model(**missing)

    wrong = tiny.ltx_inputs(*LATENTS[0])
    wrong["height"] = 5
    with pytest.raises(ValueError, match=r"\(B, 90, C\).*got shape \(1, 72, 4\)"):
        model(**wrong)
