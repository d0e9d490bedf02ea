"""LoRA (diffusers' PEFT backend) on linearized pipelines: loading, scaling, unloading, order, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

import lindiff
from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.state import PROJECTIONS, base_linear, get_state

ADAPTER = "style"


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on every attention projection of the tiny UNet, saved in diffusers' format.

    ``init_lora_weights=False`` makes ``lora_B`` random (PEFT's default is zero), so the LoRA
    changes outputs.
    """
    torch.manual_seed(7)
    unet = tiny_models.unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(PROJECTIONS)))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


@pytest.fixture(scope="module")
def outputs(lora_folder: Path) -> dict[str, torch.Tensor]:
    """Reference outputs: softmax with the LoRA, and converted without and with it."""
    pipe = tiny_models.sd_pipeline()
    pipe.load_lora_weights(lora_folder, adapter_name=ADAPTER)
    softmax_lora = tiny_models.run(pipe)
    converted = tiny_models.run(lindiff.linearize(tiny_models.sd_pipeline()))
    pipe = lindiff.linearize(tiny_models.sd_pipeline())
    pipe.load_lora_weights(lora_folder, adapter_name=ADAPTER)
    converted_lora = tiny_models.run(pipe)
    assert (converted_lora - converted).abs().max() > 1e-3
    return {"softmax_lora": softmax_lora, "converted": converted, "converted_lora": converted_lora}


def assert_lora_on_converted_layers(pipe: StableDiffusionPipeline) -> None:
    """Each converted layer runs LinFusion, its four projections are PEFT-wrapped, its MLPs are not."""
    state = get_state(pipe.unet)
    for name, attn in state.layers.items():
        assert isinstance(attn.processor, SelfAttnProcessor), name
        for projection in PROJECTIONS:
            assert isinstance(attn.get_submodule(projection), BaseTunerLayer), f"{name}.{projection}"
        assert not any(isinstance(m, BaseTunerLayer) for m in attn.lindiff.modules()), name


def test_lora_after_linearize_scales_and_unloads(lora_folder, outputs):
    pipe = lindiff.linearize(tiny_models.sd_pipeline())
    pipe.load_lora_weights(lora_folder, adapter_name=ADAPTER)
    assert_lora_on_converted_layers(pipe)
    full = tiny_models.run(pipe)
    torch.testing.assert_close(full, outputs["converted_lora"], rtol=0, atol=1e-6)

    pipe.set_adapters([ADAPTER], adapter_weights=[0.0])
    torch.testing.assert_close(tiny_models.run(pipe), outputs["converted"], rtol=0, atol=1e-6)
    pipe.set_adapters([ADAPTER], adapter_weights=[0.5])
    half = tiny_models.run(pipe)
    assert (half - outputs["converted"]).abs().max() > 1e-4
    assert (half - full).abs().max() > 1e-4

    pipe.unload_lora_weights()
    attn = next(iter(get_state(pipe.unet).layers.values()))
    assert all(type(attn.get_submodule(p)) is nn.Linear for p in PROJECTIONS)
    assert isinstance(attn.processor, SelfAttnProcessor)
    torch.testing.assert_close(tiny_models.run(pipe), outputs["converted"], rtol=0, atol=1e-6)


def test_lora_before_linearize_stays_active_and_survives_restore(lora_folder, outputs):
    pipe = tiny_models.sd_pipeline()
    pipe.load_lora_weights(lora_folder, adapter_name=ADAPTER)
    lindiff.linearize(pipe)
    assert_lora_on_converted_layers(pipe)
    converted = tiny_models.run(pipe)
    assert (converted - outputs["converted"]).abs().max() > 1e-3
    torch.testing.assert_close(converted, outputs["converted_lora"], rtol=0, atol=1e-6)

    lindiff.restore(pipe)
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert all(isinstance(attn.get_submodule(p), BaseTunerLayer) for p in PROJECTIONS)
    assert torch.equal(tiny_models.run(pipe), outputs["softmax_lora"])


def train(pipe: StableDiffusionPipeline, seed: int = 3) -> None:
    """Stand in for distillation: perturb the added MLPs and the self-attention projections."""
    generator = torch.Generator().manual_seed(seed)
    state = get_state(pipe.unet)
    state.backup_projections()
    with torch.no_grad():
        for attn in state.layers.values():
            params = [*attn.lindiff.parameters()]
            params += [base_linear(attn, p).weight for p in PROJECTIONS]
            for param in params:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_weights_of_a_lora_model_hold_base_weights_only(lora_folder, outputs, tmp_path):
    pipe = lindiff.linearize(tiny_models.sd_pipeline(), mid_dim=8)
    pipe.load_lora_weights(lora_folder, adapter_name=ADAPTER)
    saved = load_file(lindiff.save_weights(pipe, tmp_path / "fresh"))
    assert saved and all(".lindiff." in key for key in saved)  # untouched projections are not saved

    train(pipe)
    expected = tiny_models.run(pipe)
    saved = load_file(lindiff.save_weights(pipe, tmp_path / "trained"))
    assert not any("lora" in key or "base_layer" in key for key in saved)
    attn_name, attn = next(iter(get_state(pipe.unet).layers.items()))
    for projection in PROJECTIONS:
        key = f"unet.{attn_name}.{projection}.weight"
        assert torch.equal(saved[key], base_linear(attn, projection).weight)

    for lora_first in (False, True):
        fresh = tiny_models.sd_pipeline()
        if lora_first:
            fresh.load_lora_weights(lora_folder, adapter_name=ADAPTER)
        lindiff.linearize(fresh, weights=tmp_path / "trained")
        if not lora_first:
            fresh.load_lora_weights(lora_folder, adapter_name=ADAPTER)
        torch.testing.assert_close(tiny_models.run(fresh), expected, rtol=0, atol=1e-6)
        if lora_first:
            lindiff.restore(fresh)  # puts back the teacher's projections under the LoRA
            assert torch.equal(tiny_models.run(fresh), outputs["softmax_lora"])
