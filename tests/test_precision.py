"""Precision: converted pipelines in fp32/bf16/fp16, fp16 linear attention on long sequences, dtypes of new parameters."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
from diffusers.models.attention_processor import Attention

import lindiff
from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.attention import LayerInfo, create_method
from lindiff.grid import TokenGrid
from lindiff.state import get_state

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Worst absolute deviation from the fp32 converted pipeline allowed per dtype (images are in [0, 1]).
TOLERANCE = {torch.float32: 0.0, torch.bfloat16: 0.05, torch.float16: 0.01}


def added_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    params = [p for name, p in model.named_parameters() if ".lindiff." in name]
    assert params
    return params


@pytest.fixture(scope="module")
def fp32_output() -> torch.Tensor:
    return tiny_models.run(lindiff.linearize(tiny_models.sd_pipeline()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_converted_pipeline_runs_in_dtype(dtype, fp32_output):
    pipe = lindiff.linearize(tiny_models.sd_pipeline().to(dtype=dtype))
    assert all(p.dtype == dtype for p in added_parameters(pipe.unet))
    out = tiny_models.run(pipe)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out.float() - fp32_output).abs().max() <= TOLERANCE[dtype]


def linfusion_attention(dtype: torch.dtype, dim: int = 64, heads: int = 4) -> Attention:
    """A diffusers self-attention converted to LinFusion, with random (non-zero) MLP outputs."""
    torch.manual_seed(0)
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads)
    method = create_method("linfusion")
    layer = LayerInfo(name="attn1", module=attn, kind="self", grid=TokenGrid())
    method.convert_layer(layer)
    attn.set_processor(SelfAttnProcessor())
    with torch.no_grad():
        for mlp in (attn.lindiff.q_mlp, attn.lindiff.k_mlp):
            mlp[3].weight.normal_(0, 0.05)
    return attn.to(dtype)


def test_fp16_linear_attention_on_16k_tokens_does_not_overflow():
    attn16 = linfusion_attention(torch.float16)
    attn32 = copy.deepcopy(attn16).float()
    x = (torch.randn(1, 16384, 64, generator=torch.Generator().manual_seed(1)) * 16).half()

    # Control: these inputs overflow an fp16 sum over the tokens (the un-normalised key state).
    with torch.no_grad():
        keys = attn16.to_k(attn16.lindiff.key_input(x))
        assert torch.isinf((torch.nn.functional.elu(keys) + 1).sum(dim=1)).any()

        out16 = attn16(x)
        out32 = attn32(x.float())
    assert out16.dtype == torch.float16
    assert torch.isfinite(out16).all()
    relative = (out16.float() - out32).norm() / out32.norm()
    assert relative < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_new_parameters_follow_model_dtype_and_device(dtype):
    unet = tiny_models.unet().to(dtype=dtype)
    lindiff.linearize(unet)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in added_parameters(unet))

    meta = lindiff.linearize(tiny_models.unet().to(device="meta", dtype=dtype))
    assert all(p.dtype == dtype and p.device.type == "meta" for p in added_parameters(meta))
    assert get_state(meta) is not None


@pytest.mark.gpu
def test_new_parameters_on_cuda_fp16():
    pipe = lindiff.linearize(tiny_models.sd_pipeline().to("cuda", torch.float16))
    assert all(p.dtype == torch.float16 and p.is_cuda for p in added_parameters(pipe.unet))
    assert torch.isfinite(tiny_models.run(pipe)).all()


@pytest.mark.gpu
def test_fp16_triton_linear_attention_on_16k_tokens_on_cuda():
    """The fused kernels in fp16: states beyond 65504 stay in float32 (TF32 products against them)."""
    attn16 = linfusion_attention(torch.float16).cuda()
    attn32 = copy.deepcopy(attn16).float()
    x = (torch.randn(1, 16384, 64, generator=torch.Generator().manual_seed(1)) * 16).half().cuda()
    with torch.no_grad():
        out16 = attn16(x)
        out32 = attn32(x.float())
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()
    assert (out16.float() - out32).norm() / out32.norm() < 2e-3
