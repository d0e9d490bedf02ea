"""torch.compile and converted UNets: compiling a converted UNet, converting a compiled one."""

from __future__ import annotations

import pytest
import tiny_models
import torch

import lindiff
from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.state import get_state


def unet_inputs(height: int = 16, width: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, height, width, generator=generator)
    text = torch.randn(2, 7, tiny_models.TEXT_DIM, generator=generator)
    return sample, torch.tensor([10, 10]), text


@pytest.mark.slow
def test_compiled_converted_unet_matches_eager():
    """Inductor, one graph (``fullgraph=True``: no graph breaks in the converted UNet)."""
    unet = lindiff.linearize(tiny_models.unet())
    inputs = unet_inputs(16, 12)
    with torch.no_grad():
        eager = unet(*inputs).sample
        get_state(unet).grid.latent = None
        compiled = torch.compile(unet, fullgraph=True)(*inputs).sample
    assert get_state(unet).grid.latent == (1, 16, 12)  # the grid hook ran inside the compiled graph
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_linearize_a_pipeline_whose_unet_is_compiled():
    pipe = tiny_models.sd_pipeline()
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    lindiff.linearize(pipe)
    original = pipe.unet._orig_mod
    assert get_state(original) is not None
    attn = original.mid_block.attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.processor, SelfAttnProcessor)

    compiled = tiny_models.run(pipe)
    pipe.unet = original
    torch.testing.assert_close(compiled, tiny_models.run(pipe), rtol=0, atol=1e-5)
    lindiff.restore(pipe)
    assert get_state(original) is None
