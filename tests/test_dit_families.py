"""Diffusion transformers (PixArt, SD3/SD3.5, FLUX + ControlNet, SANA) x every registered method.

The pipeline tests are generated from ``lindiff.methods()`` x the DiT pipelines below, so a newly
registered method is tested on every family it declares it supports (``AttentionMethod.families``
and ``kinds``); the other combinations are skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import tiny_dit_models as tiny
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import lindiff
from lindiff.adapters import adapter_for
from lindiff.adapters.flux import grid_of_ids
from lindiff.attention import METHODS
from lindiff.attention.base import TokenMixer, Tokens
from lindiff.attention.sana import SanaLinearAttention
from lindiff.denoisers import denoisers, pipeline_adapter
from lindiff.grid import GridShape, TokenGrid
from lindiff.pipelines import HighResPipeline
from lindiff.pipelines.loading import check_size
from lindiff.state import get_state

SIZES = [(32, 64), (64, 32)]  # px; every tiny DiT gives (h/4, w/4) tokens
LATENT_SIZES = [(8, 12), (12, 8)]  # latent px of bare denoiser calls


@dataclass(frozen=True)
class Pipeline:
    family: str
    build: Callable[[], Any]
    roles: tuple[str, ...] = ("transformer",)


PIPELINES = {
    "pixart": Pipeline("pixart", tiny.pixart_pipeline),
    "sd3": Pipeline("sd3", tiny.sd3_pipeline),
    "sd3.5": Pipeline("sd3", lambda: tiny.sd3_pipeline(dual_attention=True)),
    "flux": Pipeline("flux", tiny.flux_pipeline),
    "flux_controlnet": Pipeline("flux", tiny.flux_controlnet_pipeline, ("transformer", "controlnet")),
    "sana": Pipeline("sana", tiny.sana_pipeline),
}

# Bare denoisers: builder, inputs at a latent size, text tokens the attention layers see.
DENOISERS: dict[str, tuple[Callable[[], nn.Module], Callable[..., dict[str, Any]]]] = {
    "pixart": (tiny.pixart_transformer, tiny.pixart_inputs),
    "sd3": (tiny.sd3_transformer, tiny.sd3_inputs),
    "sd3.5": (lambda: tiny.sd3_transformer(dual_attention=True), tiny.sd3_inputs),
    "sd3_controlnet": (tiny.sd3_controlnet, tiny.sd3_controlnet_inputs),
    "flux": (tiny.flux_transformer, tiny.flux_inputs),
    "flux_controlnet": (tiny.flux_controlnet, tiny.flux_controlnet_inputs),
    "sana": (tiny.sana_transformer, tiny.sana_inputs),
    "sana_controlnet": (tiny.sana_controlnet, tiny.sana_controlnet_inputs),
}


def unsupported(method: str, model: nn.Module) -> str | None:
    """Why ``method`` does not apply to ``model`` (declared by the method), or ``None``."""
    cls = METHODS.get(method)
    adapter = adapter_for(model)
    if cls.families is not None and adapter.name not in cls.families:
        return f"{method!r} supports the families {cls.families}, not {adapter.name!r}"
    kinds = {layer.kind for layer in adapter.layers(model, TokenGrid())}
    if not kinds & set(cls.kinds):
        return f"{method!r} converts {cls.kinds} layers; {adapter.name!r} has {sorted(kinds)}"
    return None


def expected_grid(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GridShape:
    """The token grid of a denoiser call, worked out here from its inputs."""
    if "img_ids" in kwargs:
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        return (1, ids[:, 1].unique().numel(), ids[:, 2].unique().numel())
    latent = kwargs.get("hidden_states", args[0] if args else None)
    patch = model.config.patch_size
    return (1, latent.shape[-2] // patch, latent.shape[-1] // patch)


class GridProbe:
    """Pre-forward hook registered after lindiff's: per call, the grid the inputs imply and the
    one lindiff resolves for that many image tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.grid = get_state(model).grid
        self.calls: list[tuple[GridShape, GridShape]] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        expected = expected_grid(module, args, kwargs)
        self.calls.append((expected, self.grid.resolve(expected[0] * expected[1] * expected[2])))


def perturb_added(pipe: Any, seed: int = 3) -> None:
    """Stand in for training: move every parameter `linearize` added away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, model in denoisers(pipe):
            for name, param in model.named_parameters():
                if ".lindiff." in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("method", lindiff.methods())
@pytest.mark.parametrize("kind", list(PIPELINES))
def test_pipeline_sizes_weights_and_restore(kind, method, tmp_path):
    spec = PIPELINES[kind]
    pipe = spec.build()
    reason = unsupported(method, pipe.transformer)
    if reason:
        pytest.skip(reason)
    references = [tiny.run_dit(pipe, h, w) for h, w in SIZES]

    lindiff.linearize(pipe, method=method)
    converted = {role: model for role, model in denoisers(pipe) if get_state(model) is not None}
    assert sorted(converted) == sorted(spec.roles)
    probes = [GridProbe(model) for model in converted.values()]
    for (h, w), reference in zip(SIZES, references, strict=True):
        out = tiny.run_dit(pipe, h, w)
        assert out.shape == reference.shape == (1, 3, h, w)
        assert torch.isfinite(out).all()
    for probe in probes:
        probe.handle.remove()
        assert probe.calls and all(expected == found for expected, found in probe.calls), probe.calls
        assert {expected for expected, _ in probe.calls} == {(1, h // 4, w // 4) for h, w in SIZES}

    perturb_added(pipe)
    trained = tiny.run_dit(pipe, *SIZES[0])
    lindiff.save_weights(pipe, tmp_path)
    fresh = lindiff.linearize(spec.build(), method=method, weights=tmp_path)
    assert torch.equal(tiny.run_dit(fresh, *SIZES[0]), trained)

    lindiff.restore(pipe)
    assert all(get_state(model) is None for _, model in denoisers(pipe))
    for (h, w), reference in zip(SIZES, references, strict=True):
        assert torch.equal(tiny.run_dit(pipe, h, w), reference)


class RecordingSoftmax(TokenMixer):
    """Softmax attention (what diffusers computes), recording what the processor hands over."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[int] = []
        self.tokens: list[tuple[slice, GridShape, int]] = []

    def query_input(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.shape[1])
        return x

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        self.tokens.append((tokens.image, tokens.grid, q.shape[1]))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


def outputs(model: nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("name", [name for name in DENOISERS if not name.startswith("sana")])
def test_processors_reproduce_diffusers(name):
    """With softmax in place of the method's mixer, a converted model gives the original outputs:
    the processors do diffusers' projections, norms, RoPE, text placement and output split."""
    build, make_inputs = DENOISERS[name]
    model = build()
    calls = [make_inputs(h, w, batch=2) for h, w in LATENT_SIZES]
    references = [outputs(model, inputs) for inputs in calls]

    lindiff.linearize(model, method="linfusion")
    state = get_state(model)
    kinds = {layer.name: layer.kind for layer in adapter_for(model).layers(model, state.grid)}
    for attn in state.layers.values():
        attn.lindiff = RecordingSoftmax()
    for inputs, reference in zip(calls, references, strict=True):
        for out, ref in zip(outputs(model, inputs), reference, strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)

    flux = adapter_for(model).name == "flux"
    text = tiny.TEXT_TOKENS
    for layer, attn in state.layers.items():
        records = zip(LATENT_SIZES, attn.lindiff.tokens, attn.lindiff.inputs, strict=True)
        for (h, w), recorded, query_inputs in records:
            grid = (1, h // 2, w // 2)  # 2x2 patches (FLUX: 2x2 latent pixels per token)
            image = grid[1] * grid[2]
            total = image if kinds[layer] == "self" else image + text
            start = text if flux else 0  # FLUX puts text first, SD3 after the image
            assert recorded == (slice(start, start + image), grid, total), (layer, recorded)
            # to_q sees the image tokens; in FLUX single-stream blocks, text and image together
            assert query_inputs == (total if kinds[layer] == "single" else image), layer


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_sana_method_matches_diffusers_without_new_parameters(qk_norm):
    model = tiny.sana_transformer(qk_norm)
    calls = [tiny.sana_inputs(h, w, batch=2) for h, w in LATENT_SIZES]
    references = [outputs(model, inputs)[0] for inputs in calls]
    parameters = {name: param.clone() for name, param in model.state_dict().items()}

    lindiff.linearize(model, method="sana")
    state = get_state(model)
    assert sorted(state.layers) == [f"transformer_blocks.{i}.attn1" for i in range(2)]
    assert all(isinstance(attn.lindiff, SanaLinearAttention) for attn in state.layers.values())
    assert model.state_dict().keys() == parameters.keys()
    for inputs, reference in zip(calls, references, strict=True):
        torch.testing.assert_close(outputs(model, inputs)[0], reference, rtol=1e-5, atol=1e-5)
    lindiff.restore(model)
    assert torch.equal(outputs(model, calls[0])[0], references[0])


@pytest.mark.parametrize("name", ["pixart", "sd3", "flux"])
def test_sana_method_rejects_other_families(name):
    model = DENOISERS[name][0]()
    with pytest.raises(
        ValueError, match=r"method 'sana' supports only the model families \['sana', 'sana_video'\]"
    ):
        lindiff.linearize(model, method="sana")
    assert get_state(model) is None


def test_sana_method_on_sana_controlnet():
    model = tiny.sana_controlnet()
    inputs = tiny.sana_controlnet_inputs(*LATENT_SIZES[0])
    references = outputs(model, inputs)
    lindiff.linearize(model, method="sana")
    for out, ref in zip(outputs(model, inputs), references, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sd3_controlnet_with_patched_input_reads_the_grid_from_controlnet_cond():
    net = lindiff.linearize(tiny.sd3_controlnet(use_pos_embed=False))
    inputs = tiny.sd3_controlnet_inputs(8, 12)
    inputs["hidden_states"] = torch.randn(1, 4 * 6, tiny.WIDTH)
    assert all(torch.isfinite(out).all() for out in outputs(net, inputs))
    assert get_state(net).grid.latent == (1, 8, 12)


def test_flux_img_ids_forms():
    model = lindiff.linearize(tiny.flux_transformer())
    inputs = tiny.flux_inputs(8, 12, batch=2)
    expected = outputs(model, inputs)[0]
    assert get_state(model).grid.latent == (1, 4, 6)

    deprecated = {
        **inputs,
        "img_ids": inputs["img_ids"].expand(2, -1, -1),
        "txt_ids": inputs["txt_ids"][None],
    }
    model(**tiny.flux_inputs(12, 8))  # another grid in between
    assert torch.equal(outputs(model, deprecated)[0], expected)
    assert get_state(model).grid.latent == (1, 4, 6)

    # bfloat16 ids (as FLUX pipelines make them) round rows above 256; the grid stays exact.
    assert grid_of_ids(tiny.flux_image_ids(300, 2).to(torch.bfloat16)) == (1, 300, 2)
    shuffled = inputs["img_ids"][torch.randperm(24, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="img_ids of 23 tokens do not form"):
        model(**{**inputs, "img_ids": shuffled[:23], "hidden_states": inputs["hidden_states"][:, :23]})


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_loads_after_linearize(kind):
    donor = DENOISERS[kind][0]()
    torch.manual_seed(3)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS))
    lora = {f"transformer.{key}": value for key, value in get_peft_model_state_dict(donor).items()}

    pipe = lindiff.linearize(PIPELINES[kind].build())
    plain = tiny.run_dit(pipe, *SIZES[0])
    pipe.load_lora_weights(lora, adapter_name="style")
    state = get_state(pipe.transformer)
    processors = {name: type(processor) for name, processor in state.processors.items()}
    assert {name: type(attn.processor) for name, attn in state.layers.items()} == processors
    for name, attn in state.layers.items():
        assert isinstance(attn.to_q, BaseTunerLayer), name
        assert not any(isinstance(m, BaseTunerLayer) for m in attn.lindiff.modules()), name
    with_lora = tiny.run_dit(pipe, *SIZES[0])
    assert torch.isfinite(with_lora).all() and (with_lora - plain).abs().max() > 1e-3

    pipe.unload_lora_weights()
    torch.testing.assert_close(tiny.run_dit(pipe, *SIZES[0]), plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(PIPELINES))
def test_the_family_adapter_gives_every_path_one_size_multiple_and_native_size(kind):
    """``lindiff render``/the demo (``check_size``) and HighResPipeline read the sizes from the
    family adapter; the pipeline renders at a size that is only a multiple of that once."""
    pipe = PIPELINES[kind].build()
    adapter = pipeline_adapter(pipe)
    assert adapter.name == PIPELINES[kind].family
    hr = HighResPipeline.from_pipe(pipe)
    multiple = adapter.size_multiple(pipe)
    assert (hr.size_multiple, hr.native_size) == (multiple, adapter.native_size(pipe))
    height, width = 3 * multiple, multiple
    check_size(pipe, height, width)
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        check_size(pipe, height + multiple // 2, width)
    out = tiny.run_dit(pipe, height, width)
    assert out.shape == (1, 3, height, width) and torch.isfinite(out).all()
