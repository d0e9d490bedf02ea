"""CogVideoX and CogVideoX 1.5 (video): conversion of the joint ``attn1``, the (T, H, W) token grid,
pipelines, restore, weights.

Tiny models from :mod:`tiny_video_models`: a latent of ``f x h x w`` gives ``f x h/2 x w/2`` tokens
(1.5: ``f/2 x h/2 x w/2``) after the :data:`TEXT_TOKENS` text tokens; through ``CogVideoXPipeline``,
``n`` frames of ``h x w`` px give ``((n - 1)/4 + 1) x h/16 x w/16`` tokens (1.5: the latent frames
padded to even, then halved).
"""

from __future__ import annotations

import math

import pytest
import tiny_video_models as tiny
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from tiny_dit_models import TEXT_TOKENS

import lindiff
from lindiff.adapters import adapter_for
from lindiff.adapters.cogvideox import CogVideoXMixerAttnProcessor
from lindiff.attention import METHODS as METHOD_REGISTRY
from lindiff.denoisers import pipeline_adapter
from lindiff.grid import GridShape
from lindiff.pipelines.loading import check_size
from lindiff.state import get_state

# name -> transformer options: the 2B kind (no RoPE), the 5B kind (3D RoPE), CogVideoX 1.5.
VARIANTS = {
    "2b": {"rotary": False},
    "5b": {"rotary": True},
    "1.5": {"patch_size_t": 2},
}
# (latent frames, height, width) of bare transformer calls per variant, and their token grids.
LATENTS = {"2b": [(3, 8, 12), (2, 12, 8)], "5b": [(3, 8, 12), (2, 12, 8)], "1.5": [(4, 8, 12), (2, 12, 8)]}
GRIDS = {"2b": [(3, 4, 6), (2, 6, 4)], "5b": [(3, 4, 6), (2, 6, 4)], "1.5": [(2, 4, 6), (1, 6, 4)]}
# (frames, height px, width px) of pipeline calls, and their token grids per variant.
VIDEOS = [(9, 32, 48), (17, 48, 32)]
VIDEO_GRIDS = {"5b": {(3, 2, 3), (5, 3, 2)}, "1.5": {(2, 2, 3), (3, 3, 2)}}


def test_attn1_is_converted_as_joint_attention():
    model = lindiff.linearize(tiny.cogvideox_transformer(), "linfusion")
    state = get_state(model)
    assert adapter_for(model).name == "cogvideox"
    assert sorted(state.layers) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert {layer.kind for layer in adapter_for(model).layers(model, state.grid)} == {"joint"}
    for block in model.transformer_blocks:
        assert isinstance(block.attn1.processor, CogVideoXMixerAttnProcessor)


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_reproduces_diffusers_on_two_grids_in_turn(variant):
    """With softmax in place of the mixer, a converted CogVideoX gives diffusers' outputs exactly
    (same joint projections, per-head LayerNorms, RoPE on the video tokens only), the video tokens
    sit after the text, and each call sees its own (T, H, W) grid: two frame counts and two sizes,
    one after the other, in one process."""
    model = tiny.cogvideox_transformer(**VARIANTS[variant])
    calls = [tiny.cogvideox_inputs(model, *latent, batch=2) for latent in LATENTS[variant]]
    references = [tiny.output(model, inputs) for inputs in calls]

    lindiff.linearize(model, "linfusion")
    state = get_state(model)
    for attn in state.layers.values():
        attn.lindiff = tiny.RecordingSoftmax()
    for inputs, reference in zip(calls, references, strict=True):
        torch.testing.assert_close(tiny.output(model, inputs), reference, rtol=0, atol=0)
    expected = [(slice(TEXT_TOKENS, TEXT_TOKENS + math.prod(grid)), grid) for grid in GRIDS[variant]]
    for attn in state.layers.values():
        assert attn.lindiff.calls == expected


@pytest.mark.parametrize("variant", ["5b", "1.5"])
def test_clear_with_a_window_over_the_whole_video_is_softmax(variant):
    """``clear``'s window on video is a cylinder: strict (``d < radius``) in each frame, over every
    frame by default. A radius beyond a frame's diagonal is full attention (text global), the
    original model; the query's frame alone (``frames_radius=0``) or a small radius is not."""
    model = tiny.cogvideox_transformer(**VARIANTS[variant])
    inputs = tiny.cogvideox_inputs(model, *LATENTS[variant][0])
    reference = tiny.output(model, inputs)
    _, height, width = GRIDS[variant][0]
    diagonal = math.dist((0, 0), (height - 1, width - 1))  # of a frame
    lindiff.linearize(model, "clear", radius=diagonal + 0.01)
    torch.testing.assert_close(tiny.output(model, inputs), reference, rtol=0, atol=1e-5)

    lindiff.restore(model)
    lindiff.linearize(model, "clear", radius=diagonal + 0.01, frames_radius=0)
    assert (tiny.output(model, inputs) - reference).abs().max() > 1e-3

    lindiff.restore(model)
    lindiff.linearize(model, "clear", radius=1)
    assert (tiny.output(model, inputs) - reference).abs().max() > 1e-3


# Every registered method that applies to CogVideoX's joint attention (from the registry, so a
# new method is tested here too), with its options for the tiny grids.
METHODS = [
    name
    for name, cls in ((name, METHOD_REGISTRY.get(name)) for name in lindiff.methods())
    if (cls.families is None or "cogvideox" in cls.families) and "joint" in cls.kinds
]
OPTIONS = {"clear": {"radius": 1.5}}


def test_cogvideox_methods_are_the_expected_ones():
    assert {"linfusion", "lit", "clear"} <= set(METHODS) and "sana" not in METHODS


@pytest.mark.parametrize("variant", ["5b", "1.5"])
@pytest.mark.parametrize("method", METHODS)
def test_pipeline_frames_sizes_weights_and_restore(method, variant, tmp_path):
    """CogVideoXPipeline after `linearize` renders two frame counts and sizes in turn (right grid
    each time, finite frames of the right shape); trained weights round-trip through save/load;
    restore gives the original videos bit for bit."""
    pipe = tiny.cogvideox_pipeline(**VARIANTS[variant])
    references = [tiny.run_cogvideox(pipe, *video) for video in VIDEOS]

    lindiff.linearize(pipe, method, **OPTIONS.get(method, {}))
    grid = get_state(pipe.transformer).grid
    seen: set[GridShape] = set()
    probe = pipe.transformer.register_forward_pre_hook(lambda *_: seen.add(grid.latent))
    for (frames, height, width), reference in zip(VIDEOS, references, strict=True):
        out = tiny.run_cogvideox(pipe, frames, height, width)
        assert out.shape == reference.shape == (1, frames, 3, height, width)
        assert torch.isfinite(out).all()
    probe.remove()
    assert seen == VIDEO_GRIDS[variant]

    tiny.perturb_added(pipe.transformer)
    trained = tiny.run_cogvideox(pipe, *VIDEOS[0])
    lindiff.save_weights(pipe, tmp_path)
    fresh = lindiff.linearize(tiny.cogvideox_pipeline(**VARIANTS[variant]), method, weights=tmp_path)
    assert torch.equal(tiny.run_cogvideox(fresh, *VIDEOS[0]), trained)

    lindiff.restore(pipe)
    assert get_state(pipe.transformer) is None
    for block in pipe.transformer.transformer_blocks:
        assert isinstance(block.attn1.processor, CogVideoXAttnProcessor2_0)
    for video, reference in zip(VIDEOS, references, strict=True):
        assert torch.equal(tiny.run_cogvideox(pipe, *video), reference)


@pytest.mark.parametrize("variant", ["5b", "1.5"])
def test_sizes_come_from_the_cogvideox_adapter(variant):
    """16 px (the VAE's 8x times the 2x2 patch); native: the area of the pipeline's default size,
    the transformer's sample size in pixels (480 x 720 for CogVideoX)."""
    pipe = tiny.cogvideox_pipeline(**VARIANTS[variant])
    adapter = pipeline_adapter(pipe)
    config = pipe.transformer.config
    assert adapter.name == "cogvideox"
    assert adapter.size_multiple(pipe) == 16
    assert adapter.native_size(pipe) == round(math.sqrt(config.sample_height * config.sample_width) * 8)
    check_size(pipe, 48, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_size(pipe, 40, 32)


def test_image_shaped_input_is_rejected():
    model = lindiff.linearize(tiny.cogvideox_transformer(), "linfusion")
    inputs = tiny.cogvideox_inputs(model, *LATENTS["5b"][0])
    inputs["hidden_states"] = inputs["hidden_states"][:, 0]
    with pytest.raises(ValueError, match=r"\(B, F, C, H, W\), got shape \(1, 4, 8, 12\)"):
        model(**inputs)
