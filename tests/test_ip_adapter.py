"""IP-Adapter on linearized pipelines: attn1 keeps linear attention, attn2 carries the IP-Adapter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import tiny_models
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from torch import nn

import lindiff
from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.state import get_state

IMAGE_EMBED_DIM = 12


def ip_adapter_state_dict(unet: UNet2DConditionModel, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter (the original, 4-token kind) in the layout diffusers loads.

    ``image_proj`` maps a CLIP image embedding to 4 text-width tokens; ``ip_adapter`` has
    ``{i}.to_k_ip.weight`` / ``{i}.to_v_ip.weight`` for each cross-attention layer, ``i`` being
    the layer's index in ``unet.attn_processors`` (so odd: attn1, attn2 alternate).
    """
    generator = torch.Generator().manual_seed(seed)
    cross_dim = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cross_dim, IMAGE_EMBED_DIM, generator=generator) * 0.3,
        "proj.bias": torch.zeros(4 * cross_dim),
        "norm.weight": torch.ones(cross_dim),
        "norm.bias": torch.zeros(cross_dim),
    }
    ip_adapter = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            for projection in ("to_k_ip", "to_v_ip"):
                ip_adapter[f"{index}.{projection}.weight"] = (
                    torch.randn(width, cross_dim, generator=generator) * 0.3
                )
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def load_ip_adapter(pipe: StableDiffusionPipeline) -> None:
    # A state dict has no image encoder to load; the tests pass image embeddings directly.
    pipe.load_ip_adapter(
        ip_adapter_state_dict(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None
    )


def run(pipe: StableDiffusionPipeline, with_image: bool = True) -> torch.Tensor:
    """Two steps with classifier-free guidance: the embeddings are (negative, positive)."""
    if not with_image:
        return tiny_models.run(pipe)
    embeds = torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(4))
    return tiny_models.run(pipe, ip_adapter_image_embeds=[embeds])


@contextmanager
def processors_used(unet: UNet2DConditionModel) -> Iterator[dict[str, set[type]]]:
    """Record the processor class each self (attn1) and cross (attn2) attention runs with."""
    used: dict[str, set[type]] = {"attn1": set(), "attn2": set()}

    def recorder(kind: str) -> Callable[[nn.Module, tuple], None]:
        return lambda module, args: used[kind].add(type(module.processor))

    handles = [
        module.register_forward_pre_hook(recorder(name.rsplit(".", 1)[-1]))
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.endswith(("attn1", "attn2"))
    ]
    try:
        yield used
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def softmax_outputs() -> dict[str, torch.Tensor]:
    """The unconverted pipeline's outputs without and with the IP-Adapter."""
    pipe = tiny_models.sd_pipeline()
    plain = run(pipe, with_image=False)
    load_ip_adapter(pipe)
    return {"plain": plain, "ip": run(pipe)}


def test_linear_self_attention_survives_load_ip_adapter(softmax_outputs):
    pipe = lindiff.linearize(tiny_models.sd_pipeline())
    converted = run(pipe, with_image=False)
    load_ip_adapter(pipe)

    with processors_used(pipe.unet) as used:
        out = run(pipe)
    assert used == {"attn1": {SelfAttnProcessor}, "attn2": {IPAdapterAttnProcessor2_0}}
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert (out - converted).abs().max() > 1e-3  # the IP-Adapter acts
    assert (out - softmax_outputs["ip"]).abs().max() > 1e-4  # self-attention is linear

    lindiff.restore(pipe)
    with processors_used(pipe.unet) as used:
        restored = run(pipe)
    assert used == {"attn1": {AttnProcessor2_0}, "attn2": {IPAdapterAttnProcessor2_0}}
    assert torch.equal(restored, softmax_outputs["ip"])


def test_ip_adapter_loaded_before_linearize():
    pipe = tiny_models.sd_pipeline()
    load_ip_adapter(pipe)
    lindiff.linearize(pipe)
    with processors_used(pipe.unet) as used:
        out = run(pipe)
    assert used == {"attn1": {SelfAttnProcessor}, "attn2": {IPAdapterAttnProcessor2_0}}

    after = lindiff.linearize(tiny_models.sd_pipeline())
    load_ip_adapter(after)
    torch.testing.assert_close(out, run(after), rtol=0, atol=1e-6)


def test_unload_ip_adapter_keeps_linear_attention(softmax_outputs):
    pipe = lindiff.linearize(tiny_models.sd_pipeline())
    converted = run(pipe, with_image=False)
    load_ip_adapter(pipe)
    pipe.unload_ip_adapter()
    assert pipe.unet.encoder_hid_proj is None

    with processors_used(pipe.unet) as used:
        out = run(pipe, with_image=False)
    assert used == {"attn1": {SelfAttnProcessor}, "attn2": {AttnProcessor2_0}}
    assert torch.equal(out, converted)

    lindiff.restore(pipe)
    assert get_state(pipe.unet) is None
    assert torch.equal(run(pipe, with_image=False), softmax_outputs["plain"])
