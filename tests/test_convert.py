"""linearize / restore on bare denoisers: what is converted, what is kept, and the errors."""

import copy

import pytest
import tiny_models
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import lindiff
from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.state import get_state


def unet_inputs(height=16, width=16, batch=2):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, height, width, generator=generator)
    text = torch.randn(batch, 7, tiny_models.TEXT_DIM, generator=generator)
    return sample, torch.tensor([10] * batch), text


def forward(unet, *inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def attention_layers(unet, suffix):
    return {name: m for name, m in unet.named_modules() if name.endswith(suffix)}


def test_methods_registry():
    assert "linfusion" in lindiff.methods()
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: .*linfusion"):
        lindiff.linearize(tiny_models.unet(), method="nope")


def test_linearize_converts_self_attention_only_and_keeps_projections():
    unet = tiny_models.unet()
    projections = {
        name: (m.to_q, m.to_k, m.to_v, m.to_out[0]) for name, m in attention_layers(unet, "attn1").items()
    }
    cross = {name: m.processor for name, m in attention_layers(unet, "attn2").items()}

    assert lindiff.linearize(unet) is unet

    self_layers = attention_layers(unet, "attn1")
    assert len(self_layers) == 7  # one per down block, the mid block, two per up block
    for name, module in self_layers.items():
        assert isinstance(module.processor, SelfAttnProcessor)
        assert (module.to_q, module.to_k, module.to_v, module.to_out[0]) == projections[name]
    for name, module in attention_layers(unet, "attn2").items():
        assert module.processor is cross[name]


def test_restore_is_bit_identical():
    unet = tiny_models.unet()
    inputs = unet_inputs()
    before = forward(unet, *inputs)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}

    lindiff.linearize(unet)
    converted = forward(unet, *inputs)
    assert not torch.equal(converted, before)
    lindiff.restore(unet)

    assert torch.equal(forward(unet, *inputs), before)
    assert unet.state_dict().keys() == state_before.keys()
    assert all(torch.equal(v, state_before[k]) for k, v in unet.state_dict().items())
    assert not hasattr(unet, "_lindiff_state")
    assert not unet._forward_pre_hooks
    for module in attention_layers(unet, "attn1").values():
        assert isinstance(module.processor, AttnProcessor2_0)
        assert not hasattr(module, "lindiff") and not hasattr(module, "lindiff_grid")


def test_converted_outputs_are_close_to_teacher_at_init():
    """Zero-initialised MLPs: the student starts from the teacher's q/k, so outputs stay close."""
    unet = tiny_models.unet()
    inputs = unet_inputs()
    teacher = forward(unet, *inputs)
    student = forward(lindiff.linearize(unet), *inputs)
    assert torch.isfinite(student).all()
    assert (student - teacher).norm() / teacher.norm() < 0.2


def test_token_grid_follows_each_call():
    unet = lindiff.linearize(tiny_models.unet())
    grid = get_state(unet).grid
    for height, width, levels in [(16, 12, [(1, 16, 12), (1, 8, 6)]), (15, 9, [(1, 15, 9), (1, 8, 5)])]:
        forward(unet, *unet_inputs(height, width))
        assert grid.latent == (1, height, width)
        assert [grid.resolve(t * h * w) for t, h, w in levels] == levels
    with pytest.raises(RuntimeError, match="cannot place 7 tokens"):
        grid.resolve(7)


def test_deepcopy_gives_an_independent_student():
    teacher = tiny_models.unet()
    student = lindiff.linearize(copy.deepcopy(teacher))
    twin = copy.deepcopy(student)
    forward(twin, *unet_inputs(12, 8))
    assert get_state(twin).grid.latent == (1, 12, 8)
    assert get_state(student).grid.latent is None
    lindiff.restore(twin)
    assert get_state(student) is not None
    assert isinstance(
        student.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor, SelfAttnProcessor
    )


def test_errors():
    unet = tiny_models.unet()
    with pytest.raises(ValueError, match="was not linearized"):
        lindiff.restore(unet)
    lindiff.linearize(unet)
    with pytest.raises(ValueError, match="already linearized"):
        lindiff.linearize(unet)
    with pytest.raises(TypeError, match="not a supported denoiser"):
        lindiff.linearize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pipe_or_model must be"):
        lindiff.linearize(object())
    with pytest.raises(ValueError, match="unknown option"):
        lindiff.linearize(tiny_models.unet(), radius=4)
