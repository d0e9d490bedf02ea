"""HunyuanVideo: dual- and single-stream joint attention over [video, text], the text padding mask,
the (T, H, W) grid, pipelines, restore, weights.

Tiny models from :mod:`tiny_video_models_b`: a latent of ``f x h x w`` gives ``f x h/2 x w/2``
video tokens; through ``HunyuanVideoPipeline``, ``n`` frames of ``h x w`` px give
``((n - 1)/4 + 1) x h/16 x w/16``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import tiny_dit_models as tiny
import tiny_video_models_b as tiny_b
import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from torch import nn

import lindiff
from lindiff.adapters import adapter_for
from lindiff.adapters.hunyuan_video import HunyuanVideoMixerAttnProcessor, kept_lengths
from lindiff.attention import METHODS as METHOD_REGISTRY
from lindiff.attention.base import TokenMixer, Tokens
from lindiff.denoisers import pipeline_adapter
from lindiff.grid import GridShape
from lindiff.pipelines.loading import check_size
from lindiff.state import get_state

# (latent frames, height, width) of bare transformer calls, their token grids, and the text tokens
# each batch item keeps (the rest of its TEXT_TOKENS are padding).
LATENTS = [(3, 8, 12), (2, 12, 8)]
GRIDS = [(3, 4, 6), (2, 6, 4)]
KEPT = [(8, 5, 5), (8,)]
# (frames, height px, width px) of pipeline calls, and their token grids.
VIDEOS = [(5, 32, 48), (9, 48, 32)]
VIDEO_GRIDS = {(2, 2, 3), (3, 3, 2)}
LAYERS = {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "single"}


class RecordingSoftmax(TokenMixer):
    """Softmax attention (what diffusers computes), recording the image slice, grid, batch size and
    sequence length of each call."""

    method_name = "softmax"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[slice, GridShape, int, int]] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        self.calls.append((tokens.image, tokens.grid, q.shape[0], q.shape[1]))
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


def test_dual_and_single_stream_attention_is_converted_and_the_refiner_is_not():
    model = lindiff.linearize(tiny_b.hunyuan_video_transformer(), "linfusion")
    state = get_state(model)
    assert adapter_for(model).name == "hunyuan_video"
    assert sorted(state.layers) == sorted(LAYERS)
    for attn in state.layers.values():
        assert isinstance(attn.processor, HunyuanVideoMixerAttnProcessor)
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn
    assert not hasattr(refiner, "lindiff")


def test_processor_reproduces_diffusers_with_padded_text_on_two_grids_in_turn():
    """With softmax in place of the mixer, a converted HunyuanVideo gives diffusers' outputs (same
    projections, q/k norms, RoPE on the video part, text padding mask), and each call sees its own
    grid with the video tokens first. Batch items keeping 8, 5 and 5 text tokens go to the mixer
    in two calls of their kept tokens; a batch without padding in one call of all tokens."""
    model = tiny_b.hunyuan_video_transformer()
    calls = [
        tiny_b.hunyuan_video_inputs(*latent, kept=kept) for latent, kept in zip(LATENTS, KEPT, strict=True)
    ]
    references = [output(model, inputs) for inputs in calls]

    lindiff.linearize(model, "linfusion")
    state = get_state(model)
    for attn in state.layers.values():
        attn.lindiff = RecordingSoftmax()
    for inputs, reference in zip(calls, references, strict=True):
        # The padded path attends over fewer keys than diffusers' masked one: summation order only.
        torch.testing.assert_close(output(model, inputs), reference, rtol=0, atol=1e-6)
    for attn in state.layers.values():
        (first, second), text = GRIDS, tiny.TEXT_TOKENS
        video = [math.prod(first), math.prod(second)]
        assert attn.lindiff.calls == [
            (slice(0, video[0]), first, 2, video[0] + 5),
            (slice(0, video[0]), first, 1, video[0] + text),
            (slice(0, video[1]), second, 1, video[1] + text),
        ]
    unpadded = calls[1]
    torch.testing.assert_close(output(model, unpadded), references[1], rtol=0, atol=0)


@pytest.mark.parametrize("image_condition_type", ["token_replace", "latent_concat"])
def test_image_to_video_variants_reproduce_diffusers(image_condition_type):
    """The image-to-video blocks (first-frame token replacement) call attention the same way."""
    model = tiny_b.hunyuan_video_transformer(image_condition_type=image_condition_type)
    inputs = tiny_b.hunyuan_video_inputs(*LATENTS[0], kept=KEPT[0])
    reference = output(model, inputs)
    lindiff.linearize(model, "linfusion")
    state = get_state(model)
    assert sorted(state.layers) == sorted(LAYERS)
    for attn in state.layers.values():
        attn.lindiff = RecordingSoftmax()
    torch.testing.assert_close(output(model, inputs), reference, rtol=0, atol=1e-6)


def test_padded_text_takes_no_part():
    """Whatever the padded text embeddings hold, a linearized model's output is the same."""
    model = lindiff.linearize(tiny_b.hunyuan_video_transformer(), "linfusion")
    inputs = tiny_b.hunyuan_video_inputs(*LATENTS[0], kept=KEPT[0])
    reference = output(model, inputs)
    inputs["encoder_hidden_states"][1:, 5:] = 1e3
    assert torch.equal(output(model, inputs), reference)


def test_clear_with_a_window_over_the_whole_video_is_softmax():
    """``clear``'s window on video is a cylinder: strict (``d < radius``) in each frame, over every
    frame by default. A radius beyond a frame's diagonal is full attention (text global, padding
    masked), the original model; the query's frame alone (``frames_radius=0``) or a small radius is not."""
    model = tiny_b.hunyuan_video_transformer()
    inputs = tiny_b.hunyuan_video_inputs(*LATENTS[0], kept=KEPT[0])
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


# Every registered method that applies to HunyuanVideo's joint and single layers (from the
# registry, so a new method is tested here too), with its options for the tiny grids.
METHODS = [
    name
    for name, cls in ((name, METHOD_REGISTRY.get(name)) for name in lindiff.methods())
    if (cls.families is None or "hunyuan_video" in cls.families) and set(LAYERS.values()) <= set(cls.kinds)
]
OPTIONS = {"clear": {"radius": 1.5}}


def test_hunyuan_video_methods_are_the_expected_ones():
    assert {"linfusion", "lit", "clear"} <= set(METHODS) and "sana" not in METHODS


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_frames_sizes_weights_and_restore(method, tmp_path):
    """HunyuanVideoPipeline (padded Llama text) after `linearize` renders two frame counts and sizes
    in turn (right grid each time, finite frames of the right shape); trained weights round-trip
    through save/load; restore gives the original videos bit for bit."""
    pipe = tiny_b.hunyuan_video_pipeline()
    references = [tiny_b.run_hunyuan_video(pipe, *video) for video in VIDEOS]

    lindiff.linearize(pipe, method, **OPTIONS.get(method, {}))
    grid = get_state(pipe.transformer).grid
    seen: set[GridShape] = set()
    probe = pipe.transformer.register_forward_pre_hook(lambda *_: seen.add(grid.latent))
    for (frames, height, width), reference in zip(VIDEOS, references, strict=True):
        out = tiny_b.run_hunyuan_video(pipe, frames, height, width)
        assert out.shape == reference.shape == (1, frames, 3, height, width)
        assert torch.isfinite(out).all()
    probe.remove()
    assert seen == VIDEO_GRIDS

    perturb_added(pipe.transformer)
    trained = tiny_b.run_hunyuan_video(pipe, *VIDEOS[0])
    lindiff.save_weights(pipe, tmp_path)
    fresh = lindiff.linearize(tiny_b.hunyuan_video_pipeline(), method, weights=tmp_path)
    assert torch.equal(tiny_b.run_hunyuan_video(fresh, *VIDEOS[0]), trained)

    lindiff.restore(pipe)
    assert get_state(pipe.transformer) is None
    for video, reference in zip(VIDEOS, references, strict=True):
        assert torch.equal(tiny_b.run_hunyuan_video(pipe, *video), reference)


def test_sizes_come_from_the_hunyuan_video_adapter():
    """16 px (the VAE's 8x times the 2x2 patch); native: the area of the pipeline's 1280 x 720."""
    pipe = tiny_b.hunyuan_video_pipeline()
    adapter = pipeline_adapter(pipe)
    assert adapter.name == "hunyuan_video"
    assert adapter.size_multiple(pipe) == 16
    assert adapter.native_size(pipe) == round(math.sqrt(1280 * 720))
    check_size(pipe, 48, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_size(pipe, 40, 32)


def test_key_masks_other_than_padded_text_are_rejected():
    keep = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])
    assert kept_lengths(keep[:, None, None], batch=2, total=8, num_video=4) == [6, 8]
    assert kept_lengths(torch.ones(2, 1, 1, 8, dtype=torch.bool), batch=2, total=8, num_video=4) is None
    holes = keep.clone()
    holes[1, 5] = False
    with pytest.raises(ValueError, match=r"kept-key counts \[6, 7\] of 8 tokens \(4 video\)"):
        kept_lengths(holes[:, None, None], batch=2, total=8, num_video=4)
    with pytest.raises(ValueError, match=r"kept-key counts \[6, 8\] of 8 tokens \(7 video\)"):
        kept_lengths(keep, batch=2, total=8, num_video=7)
    with pytest.raises(ValueError, match="boolean key mask of shape"):
        kept_lengths(keep.float(), batch=2, total=8, num_video=4)


def test_image_shaped_input_is_rejected():
    model = lindiff.linearize(tiny_b.hunyuan_video_transformer(), "linfusion")
    inputs = tiny_b.hunyuan_video_inputs(*LATENTS[0])
    inputs["hidden_states"] = inputs["hidden_states"][:, :, 0]
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\), got shape \(1, 4, 8, 12\)"):
        model(**inputs)


def test_restore_puts_diffusers_processors_back():
    model = tiny_b.hunyuan_video_transformer()
    inputs = tiny_b.hunyuan_video_inputs(*LATENTS[0], kept=KEPT[0])
    reference = output(model, inputs)
    lindiff.linearize(model, "lit")
    lindiff.restore(model)
    for name in LAYERS:
        assert isinstance(model.get_submodule(name).processor, HunyuanVideoAttnProcessor2_0)
    assert torch.equal(output(model, inputs), reference)
