"""linearize / restore on whole diffusers pipelines: SD, SDXL, img2img and (multi-)ControlNet."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import pytest
import tiny_models
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor
from safetensors.torch import load_file

import lindiff
from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.denoisers import denoisers
from lindiff.state import get_state

PIPELINES: dict[str, Callable[[], Any]] = {
    "sd": tiny_models.sd_pipeline,
    "sdxl": tiny_models.sdxl_pipeline,
    "img2img": tiny_models.img2img_pipeline,
    "controlnet": lambda: tiny_models.sd_controlnet_pipeline(1),
    "multi_controlnet": lambda: tiny_models.sd_controlnet_pipeline(2),
}
# Roles `linearize` must convert in each pipeline.
ROLES = {
    "sd": ["unet"],
    "sdxl": ["unet"],
    "img2img": ["unet"],
    "controlnet": ["unet", "controlnet"],
    "multi_controlnet": ["unet", "controlnet.0", "controlnet.1"],
}


def images(count: int, height: int, width: int, seed: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, height, width, generator=generator) for _ in range(count)]


def generate(kind: str, pipe: Any, height: int, width: int) -> torch.Tensor:
    """Two denoising steps of ``pipe`` at ``height`` x ``width`` px, with the inputs its kind needs."""
    if kind == "img2img":
        # strength 0.5 of 4 steps runs the last 2 steps from the noised input image.
        return tiny_models.run(pipe, image=images(1, height, width)[0], strength=0.5, steps=4)
    if kind == "controlnet":
        return tiny_models.run(pipe, image=images(1, height, width)[0], height=height, width=width)
    if kind == "multi_controlnet":
        return tiny_models.run(pipe, image=images(2, height, width), height=height, width=width)
    return tiny_models.run(pipe, height=height, width=width)


def assert_converted(pipe: Any, roles: list[str], latent: tuple[int, int, int] | None) -> None:
    """Every expected denoiser is converted, runs LinFusion on all its attn1, and saw ``latent``."""
    converted = {role: model for role, model in denoisers(pipe) if get_state(model) is not None}
    assert sorted(converted) == sorted(roles)
    for role, model in converted.items():
        state = get_state(model)
        attn1 = {name for name, _ in model.named_modules() if name.endswith("attn1")}
        assert attn1 and set(state.layers) == attn1, role
        assert all(isinstance(m.processor, SelfAttnProcessor) for m in state.layers.values()), role
        assert state.grid.latent == latent, role


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_linearize_runs_and_restore_is_exact(kind):
    pipe = PIPELINES[kind]()
    reference = generate(kind, pipe, 32, 48)
    assert reference.shape == (1, 3, 32, 48)

    assert lindiff.linearize(pipe) is pipe
    assert_converted(pipe, ROLES[kind], latent=None)
    converted = generate(kind, pipe, 32, 48)
    assert converted.shape == (1, 3, 32, 48)
    assert torch.isfinite(converted).all()
    assert not torch.equal(converted, reference)
    # The VAE down-samples 2x, so each denoiser saw a 16x24 latent.
    assert_converted(pipe, ROLES[kind], latent=(1, 16, 24))

    assert lindiff.restore(pipe) is pipe
    assert all(get_state(model) is None for _, model in denoisers(pipe))
    assert torch.equal(generate(kind, pipe, 32, 48), reference)


@pytest.mark.parametrize("kind", ["sd", "multi_controlnet"])
def test_sizes_change_between_calls(kind):
    pipe = lindiff.linearize(PIPELINES[kind]())
    first = generate(kind, pipe, 32, 48)
    second = generate(kind, pipe, 48, 32)
    assert second.shape == (1, 3, 48, 32) and torch.isfinite(second).all()
    assert_converted(pipe, ROLES[kind], latent=(1, 24, 16))
    third = generate(kind, pipe, 32, 48)
    assert torch.equal(third, first)  # nothing from the 48x32 call lingers


def test_controlnet_pipeline_weights_round_trip(tmp_path):
    pipe = lindiff.linearize(tiny_models.sd_controlnet_pipeline(2), mid_dim=8)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, model in denoisers(pipe):
            for name, param in model.named_parameters():
                if ".lindiff." in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    expected = generate("multi_controlnet", pipe, 32, 48)
    saved = load_file(lindiff.save_weights(pipe, tmp_path))
    assert {re.match(r"unet|controlnet\.\d", key).group() for key in saved} == set(ROLES["multi_controlnet"])

    fresh = lindiff.linearize(tiny_models.sd_controlnet_pipeline(2), weights=tmp_path)
    assert_converted(fresh, ROLES["multi_controlnet"], latent=None)
    assert torch.equal(generate("multi_controlnet", fresh, 32, 48), expected)


def test_processors_replaced_after_linearize_are_put_back(caplog):
    """``enable_attention_slicing`` replaces every processor; converted layers keep LinFusion."""
    pipe = lindiff.linearize(tiny_models.sd_pipeline())
    expected = tiny_models.run(pipe)
    state = get_state(pipe.unet)
    pipe.enable_attention_slicing(1)
    assert all(isinstance(m.processor, SlicedAttnProcessor) for m in state.layers.values())

    with caplog.at_level(logging.INFO, logger="lindiff.convert"):
        sliced = tiny_models.run(pipe)
    assert all(isinstance(m.processor, SelfAttnProcessor) for m in state.layers.values())
    # Only the VAE's (sliced) softmax attention differs, by rounding.
    torch.testing.assert_close(sliced, expected, rtol=0, atol=1e-5)
    messages = [r.getMessage() for r in caplog.records if "processor back" in r.getMessage()]
    assert len(messages) == 1 and "7 converted layers" in messages[0] and "SlicedAttnProcessor" in messages[0]

    lindiff.restore(pipe)
    assert all(isinstance(m.processor, AttnProcessor2_0) for m in state.layers.values())
