"""Wan (video): conversion of ``attn1``, the (T, H, W) token grid, pipelines, LoRA, restore, weights.

Tiny Wan models from :mod:`tiny_dit_models`: a latent of ``f x h x w`` gives ``f x h/2 x w/2``
tokens; through ``WanPipeline``, ``n`` frames of ``h x w`` px give ``((n - 1)/4 + 1) x h/16 x w/16``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import tiny_dit_models as tiny
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import lindiff
from lindiff.adapters import adapter_for
from lindiff.adapters.wan import WanMixerAttnProcessor
from lindiff.attention import METHODS as METHOD_REGISTRY
from lindiff.attention.base import TokenMixer, Tokens
from lindiff.attention.lit import LiTAttention
from lindiff.denoisers import pipeline_adapter
from lindiff.grid import GridShape, TokenGrid
from lindiff.pipelines.loading import check_size
from lindiff.state import get_state

# (latent frames, height, width) of bare transformer calls, and their token grids.
LATENTS = [(3, 8, 12), (2, 12, 8)]
GRIDS = [(3, 4, 6), (2, 6, 4)]
# (frames, height px, width px) of pipeline calls, and their token grids.
VIDEOS = [(5, 32, 48), (9, 48, 32)]
VIDEO_GRIDS = {(2, 2, 3), (3, 3, 2)}
LIT_CONV_SCALE = 0.3


class RecordingSoftmax(TokenMixer):
    """Softmax attention (what diffusers computes), recording the image slice and grid of each call."""

    method_name = "softmax"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[slice, GridShape, int]] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        self.calls.append((tokens.image, tokens.grid, q.shape[1]))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


def output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def perturb_added(model: nn.Module, seed: int = 3) -> None:
    """Stand in for training: move every parameter `linearize` added away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lindiff." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def test_attn1_is_converted_and_attn2_stays_softmax():
    model = lindiff.linearize(tiny.wan_transformer(), "linfusion")
    state = get_state(model)
    assert adapter_for(model).name == "wan"
    assert sorted(state.layers) == ["blocks.0.attn1", "blocks.1.attn1"]
    for block in model.blocks:
        assert isinstance(block.attn1.processor, WanMixerAttnProcessor)
        assert isinstance(block.attn2.processor, WanAttnProcessor)
        assert not hasattr(block.attn2, "lindiff")


def test_processor_reproduces_diffusers_on_two_grids_in_turn():
    """With softmax in place of the mixer, a converted Wan gives diffusers' outputs exactly (same
    projections, q/k norms and 3D RoPE), and each call sees its own (T, H, W) grid: two frame
    counts and two sizes, one after the other, in one process."""
    model = tiny.wan_transformer()
    calls = [tiny.wan_inputs(*latent, batch=2) for latent in LATENTS]
    references = [output(model, inputs) for inputs in calls]

    lindiff.linearize(model, "linfusion")
    state = get_state(model)
    for attn in state.layers.values():
        attn.lindiff = RecordingSoftmax()
    for inputs, reference in zip(calls, references, strict=True):
        torch.testing.assert_close(output(model, inputs), reference, rtol=0, atol=0)
    for attn in state.layers.values():
        expected = [(slice(0, math.prod(grid)), grid, math.prod(grid)) for grid in GRIDS]
        assert attn.lindiff.calls == expected


def test_clear_with_a_window_over_the_whole_video_is_softmax():
    """``clear``'s window on video is a cylinder: strict (``d < radius``) in each frame, over every
    frame by default. A radius beyond a frame's diagonal is full attention (text global), the
    original model; the query's frame alone (``frames_radius=0``) or a small radius is not."""
    model = tiny.wan_transformer()
    inputs = tiny.wan_inputs(*LATENTS[0])
    reference = output(model, inputs)
    _, height, width = GRIDS[0]
    diagonal = math.dist((0, 0), (height - 1, width - 1))  # of a frame
    lindiff.linearize(model, "clear", radius=diagonal + 0.01)
    torch.testing.assert_close(output(model, inputs), reference, rtol=0, atol=1e-5)

    lindiff.restore(model)
    lindiff.linearize(model, "clear", radius=diagonal + 0.01, frames_radius=0)
    assert (output(model, inputs) - reference).abs().max() > 1e-3

    lindiff.restore(model)
    lindiff.linearize(model, "clear", radius=1.5)
    assert (output(model, inputs) - reference).abs().max() > 1e-3


# Every registered method that applies to Wan's self-attention (from the registry, so a new method
# is tested here too), with its options for the tiny grids.
METHODS = [
    name
    for name, cls in ((name, METHOD_REGISTRY.get(name)) for name in lindiff.methods())
    if (cls.families is None or "wan" in cls.families) and "self" in cls.kinds
]
OPTIONS = {"clear": {"radius": 1.5}}


def test_wan_methods_are_the_expected_ones():
    assert {"linfusion", "lit", "clear"} <= set(METHODS) and "sana" not in METHODS


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_frames_sizes_weights_and_restore(method, tmp_path):
    """WanPipeline after `linearize` renders two frame counts and sizes in turn (right grid each
    time, finite frames of the right shape); trained weights round-trip through save/load; restore
    gives the original videos bit for bit."""
    pipe = tiny.wan_pipeline()
    references = [tiny.run_wan(pipe, *video) for video in VIDEOS]

    lindiff.linearize(pipe, method, **OPTIONS.get(method, {}))
    grid = get_state(pipe.transformer).grid
    seen: set[GridShape] = set()
    probe = pipe.transformer.register_forward_pre_hook(lambda *_: seen.add(grid.latent))
    for (frames, height, width), reference in zip(VIDEOS, references, strict=True):
        out = tiny.run_wan(pipe, frames, height, width)
        assert out.shape == reference.shape == (1, frames, 3, height, width)
        assert torch.isfinite(out).all()
    probe.remove()
    assert seen == VIDEO_GRIDS

    perturb_added(pipe.transformer)
    trained = tiny.run_wan(pipe, *VIDEOS[0])
    lindiff.save_weights(pipe, tmp_path)
    fresh = lindiff.linearize(tiny.wan_pipeline(), method, weights=tmp_path)  # options travel with them
    assert torch.equal(tiny.run_wan(fresh, *VIDEOS[0]), trained)

    lindiff.restore(pipe)
    assert get_state(pipe.transformer) is None
    for video, reference in zip(VIDEOS, references, strict=True):
        assert torch.equal(tiny.run_wan(pipe, *video), reference)


def test_lit_convolution_runs_frame_by_frame():
    """LiT's depthwise convolution is 2-D, applied to each frame of the (T, H, W) grid on its own
    (frames folded into the batch): no value crosses frames, as LiT's image-trained kernel does
    for each still frame. With zero queries the linear-attention term is zero and the mixer's
    output is the convolution alone."""
    frames, height, width, heads, dim = 3, 4, 5, 2, 6
    mixer = LiTAttention(channels=heads * dim, heads=2, kernel_size=3, eps=1e-4)
    with torch.no_grad():
        mixer.dwc.weight.normal_(0, LIT_CONV_SCALE, generator=torch.Generator().manual_seed(0))
    source = TokenGrid()
    source.set_tokens(frames, height, width)
    tokens = Tokens(image=slice(0, frames * height * width), source=source)
    q = torch.zeros(1, frames * height * width, heads, dim)
    k, v = torch.randn(2, 1, frames * height * width, heads, dim).unbind(0)

    out = mixer(q, k, v, tokens)
    planes = v.view(frames, height, width, heads * dim).permute(0, 3, 1, 2)
    expected = mixer.dwc(planes).permute(0, 2, 3, 1).reshape(out.shape)
    torch.testing.assert_close(out, expected)

    changed = v.clone()
    changed[:, : height * width] += 1.0  # every value of frame 0
    other_frames = slice(height * width, None)
    assert torch.equal(mixer(q, k, changed, tokens)[:, other_frames], out[:, other_frames])


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def test_lora_loads_after_linearize():
    """``WanPipeline.load_lora_weights`` (diffusers' Wan LoRA loader) after `linearize`: the LoRA
    wraps the teacher projections of ``attn1`` and ``attn2``, not lindiff's modules, changes the
    video, unloads, and `restore` still gives the original video."""
    donor = tiny.wan_transformer()
    torch.manual_seed(3)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS))
    lora = {f"transformer.{key}": value for key, value in get_peft_model_state_dict(donor).items()}

    pipe = tiny.wan_pipeline()
    original = tiny.run_wan(pipe, *VIDEOS[0])
    lindiff.linearize(pipe, "linfusion")
    plain = tiny.run_wan(pipe, *VIDEOS[0])
    pipe.load_lora_weights(lora, adapter_name="style")
    state = get_state(pipe.transformer)
    for name, attn in state.layers.items():
        assert isinstance(attn.processor, WanMixerAttnProcessor), name
        assert isinstance(attn.to_q, BaseTunerLayer), name
        assert not any(isinstance(m, BaseTunerLayer) for m in attn.lindiff.modules()), name
    with_lora = tiny.run_wan(pipe, *VIDEOS[0])
    assert torch.isfinite(with_lora).all() and (with_lora - plain).abs().max() > 1e-3

    pipe.unload_lora_weights()
    torch.testing.assert_close(tiny.run_wan(pipe, *VIDEOS[0]), plain, rtol=0, atol=1e-6)
    lindiff.restore(pipe)
    torch.testing.assert_close(tiny.run_wan(pipe, *VIDEOS[0]), original, rtol=0, atol=1e-6)


def test_sizes_come_from_the_wan_adapter():
    """16 px (the VAE's 8x times the 2x2 patch); native: the area of WanPipeline's 832 x 480."""
    pipe = tiny.wan_pipeline()
    adapter = pipeline_adapter(pipe)
    assert adapter.name == "wan"
    assert adapter.size_multiple(pipe) == 16
    assert adapter.native_size(pipe) == round(math.sqrt(832 * 480))
    check_size(pipe, 48, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_size(pipe, 40, 32)


def test_image_shaped_input_is_rejected():
    model = lindiff.linearize(tiny.wan_transformer(), "linfusion")
    inputs = tiny.wan_inputs(*LATENTS[0])
    inputs["hidden_states"] = inputs["hidden_states"][:, :, 0]
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\), got shape \(1, 4, 8, 12\)"):
        model(**inputs)


def test_both_experts_of_a_two_expert_pipeline_are_converted():
    """Wan 2.2 denoises the low-noise steps with ``transformer_2``: it must not stay softmax."""
    pipe = tiny.wan_pipeline()
    pipe.register_modules(transformer_2=tiny.wan_transformer(seed=1))
    pipe.register_to_config(boundary_ratio=0.5)
    lindiff.linearize(pipe, "linfusion")
    assert get_state(pipe.transformer) is not None and get_state(pipe.transformer_2) is not None
    video = tiny.run_wan(pipe, frames=5, height=32, width=32)
    assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()
    lindiff.restore(pipe)
    assert get_state(pipe.transformer_2) is None
