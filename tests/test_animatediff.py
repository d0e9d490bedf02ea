"""AnimateDiff (``UNetMotionModel`` in ``AnimateDiffPipeline``): the spatial ``attn1`` converted, the
motion modules left softmax; restore, weights (the image UNet's included), LoRA, frames, the render
path, the high-resolution chain and the demo.

The tiny AnimateDiff model is :mod:`tiny_models`' SD UNet with a tiny ``MotionAdapter`` (one
motion module per block, 32 frames at most); its VAE down-samples 2x, so ``h x w`` px frames give
a ``h/2 x w/2`` latent, and each spatial layer sees one frame's ``(1, h/2, w/2)`` grid at its level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr
import imageio.v3 as iio
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from diffusers import (
    AnimateDiffPipeline,
    AnimateDiffVideoToVideoPipeline,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
)
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

import lindiff
from lindiff import assets
from lindiff.adapters import adapter_for
from lindiff.adapters.processors import SelfAttnProcessor
from lindiff.app.models import DemoModel, Request
from lindiff.app.ui import build_app
from lindiff.attention import METHODS as METHOD_REGISTRY
from lindiff.attention.base import TokenMixer, Tokens
from lindiff.cli import main
from lindiff.denoisers import pipeline_adapter
from lindiff.grid import GridShape
from lindiff.pipelines import HighResPipeline
from lindiff.pipelines.manifest import MANIFEST_NAME
from lindiff.pipelines.metadata import read_params
from lindiff.state import PROJECTIONS, get_state

MAX_FRAMES = 32
NATIVE = 16  # px: the UNet's 8 latent pixels through the 2x VAE
SPATIAL = 7  # attn1 of the tiny UNet: one per down block, the mid block, two per up block
MOTION = 7  # one motion module after each spatial transformer, each with two frame self-attentions
# (frames, height px, width px) of pipeline calls, one after the other.
VIDEOS = [(4, 32, 32), (6, 24, 40)]

# Every registered method that applies to AnimateDiff's self-attention (from the registry, so a new
# method is tested here too), with its options for the tiny grids.
METHODS = [
    name
    for name, cls in ((name, METHOD_REGISTRY.get(name)) for name in lindiff.methods())
    if (cls.families is None or "animatediff" in cls.families) and "self" in cls.kinds
]
OPTIONS = {"clear": {"radius": 2.5}}


def motion_adapter(seed: int = 0, block_out_channels: tuple[int, ...] = (16, 32)) -> MotionAdapter:
    torch.manual_seed(seed)
    return MotionAdapter(
        block_out_channels=block_out_channels,
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=8,
        motion_max_seq_length=MAX_FRAMES,
    )


def animatediff_pipeline(seed: int = 0) -> AnimateDiffPipeline:
    """The tiny SD pipeline's components around ``UNetMotionModel.from_unet2d`` of its UNet."""
    image = tiny_models.sd_pipeline(seed)
    adapter = motion_adapter(seed)
    pipe = AnimateDiffPipeline(
        vae=image.vae,
        text_encoder=image.text_encoder,
        tokenizer=image.tokenizer,
        unet=UNetMotionModel.from_unet2d(image.unet, adapter),
        motion_adapter=adapter,
        scheduler=image.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: Any, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Two denoising steps; the frames ``(1, F, 3, H, W)`` in [0, 1]."""
    return pipe(
        prompt="a red circle above a blue square",
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames


def motion_inputs(frames: int, height: int, width: int, batch: int = 2) -> dict[str, Any]:
    """A bare ``UNetMotionModel`` call: ``sample`` ``(B, 4, F, h, w)``, the text repeated per frame."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randn(batch, 7, tiny_models.TEXT_DIM, generator=generator)
    return {
        "sample": torch.randn(batch, 4, frames, height, width, generator=generator),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": text.repeat_interleave(frames, dim=0),
    }


def output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def temporal_attention(unet: UNetMotionModel) -> dict[str, Attention]:
    """The motion modules' attention layers by name."""
    return {
        f"{name}.{inner}": module
        for name, motion in unet.named_modules()
        if isinstance(motion, AnimateDiffTransformer3D)
        for inner, module in motion.named_modules()
        if isinstance(module, Attention)
    }


def perturb_added(model: nn.Module, seed: int = 3) -> None:
    """Stand in for training: move every parameter `linearize` added away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lindiff." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


class RecordingSoftmax(TokenMixer):
    """Softmax attention (what diffusers computes), recording the batch and grid of each call."""

    method_name = "softmax"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, GridShape]] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        self.calls.append((q.shape[0], tokens.grid))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


# --- conversion ---------------------------------------------------------------------------------


def test_animatediff_methods_are_the_expected_ones():
    assert {"linfusion", "lit", "clear"} <= set(METHODS) and "sana" not in METHODS


@pytest.mark.parametrize("method", METHODS)
def test_spatial_attn1_is_converted_and_the_motion_modules_stay_softmax(method):
    pipe = animatediff_pipeline()
    unet = pipe.unet
    temporal = temporal_attention(unet)
    processors = {name: attn.processor for name, attn in temporal.items()}
    assert len(temporal) == 2 * MOTION

    lindiff.linearize(pipe, method, **OPTIONS.get(method, {}))
    state = get_state(unet)
    assert adapter_for(unet).name == pipeline_adapter(pipe).name == "animatediff"
    image_unet = lindiff.linearize(tiny_models.unet(), method, **OPTIONS.get(method, {}))
    assert sorted(state.layers) == sorted(get_state(image_unet).layers)  # the image UNet's paths
    assert len(state.layers) == SPATIAL
    assert all(".motion_modules." not in name and name.endswith("attn1") for name in state.layers)
    for attn in state.layers.values():
        assert isinstance(attn.processor, SelfAttnProcessor) and hasattr(attn, "lindiff")
    for name, attn in temporal.items():
        assert attn.processor is processors[name], name
        assert not hasattr(attn, "lindiff"), name


def test_processor_reproduces_diffusers_per_frame():
    """With softmax in place of the mixer, a converted UNetMotionModel gives diffusers' outputs, and
    each spatial layer sees the frames folded into the batch, on one frame's grid: two frame counts
    and latent sizes, one after the other."""
    unet = animatediff_pipeline().unet
    latents = [(3, 8, 8), (5, 6, 10)]
    calls = [motion_inputs(*latent) for latent in latents]
    references = [output(unet, inputs) for inputs in calls]

    lindiff.linearize(unet, "linfusion")
    state = get_state(unet)
    for attn in state.layers.values():
        attn.lindiff = RecordingSoftmax()
    for inputs, reference in zip(calls, references, strict=True):
        torch.testing.assert_close(output(unet, inputs), reference, rtol=0, atol=0)
    for name, attn in state.layers.items():
        level = 0 if name.startswith(("down_blocks.0", "up_blocks.1")) else 1
        expected = [(2 * f, (1, -(-h // 2**level), -(-w // 2**level))) for f, h, w in latents]
        assert attn.lindiff.calls == expected, name


def test_a_latent_of_the_wrong_rank_is_refused():
    unet = lindiff.linearize(animatediff_pipeline().unet, "linfusion")
    inputs = motion_inputs(2, 8, 8)
    inputs["sample"] = inputs["sample"][:, :, 0]
    with pytest.raises(ValueError, match=r"sample as \(B, C, F, H, W\), got shape \(2, 4, 8, 8\)"):
        output(unet, inputs)


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_frames_sizes_weights_and_restore(method, tmp_path):
    """AnimateDiffPipeline after `linearize` renders two frame counts and sizes in turn (the grid of
    each, finite frames of the right shape); trained weights round-trip through save/load; restore
    gives the original videos and state bit for bit."""
    pipe = animatediff_pipeline()
    references = [run(pipe, *video) for video in VIDEOS]
    state_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    lindiff.linearize(pipe, method, **OPTIONS.get(method, {}))
    grid = get_state(pipe.unet).grid
    seen: list[GridShape] = []
    probe = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(grid.latent))
    for (frames, height, width), reference in zip(VIDEOS, references, strict=True):
        out = run(pipe, frames, height, width)
        assert out.shape == reference.shape == (1, frames, 3, height, width)
        assert torch.isfinite(out).all()
        assert not torch.equal(out, reference)
    probe.remove()
    assert set(seen) == {(1, height // 2, width // 2) for _, height, width in VIDEOS}

    perturb_added(pipe.unet)
    trained = run(pipe, *VIDEOS[0])
    lindiff.save_weights(pipe, tmp_path)
    config = json.loads((tmp_path / "lindiff.json").read_text())
    assert config["components"]["unet"]["family"] == "animatediff"
    fresh = lindiff.linearize(animatediff_pipeline(), method, weights=tmp_path)
    assert torch.equal(run(fresh, *VIDEOS[0]), trained)

    lindiff.restore(pipe)
    assert get_state(pipe.unet) is None and not pipe.unet._forward_pre_hooks
    assert pipe.unet.state_dict().keys() == state_before.keys()
    assert all(torch.equal(v, state_before[k]) for k, v in pipe.unet.state_dict().items())
    for video, reference in zip(VIDEOS, references, strict=True):
        assert torch.equal(run(pipe, *video), reference)


# --- the image UNet's weights -------------------------------------------------------------------


def zero_motion(unet: UNetMotionModel) -> None:
    """Make every motion module the identity (its output projection zero; it adds a residual)."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, AnimateDiffTransformer3D):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()


def layer_calls(model: nn.Module, inputs: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The tokens ``(B * F, N, C)`` each converted layer of ``model`` receives in a call on
    ``inputs``, and its output."""
    calls = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            calls[name] = (args[0], out)

        return hook

    hooks = [attn.register_forward_hook(record(name)) for name, attn in get_state(model).layers.items()]
    output(model, inputs)
    for hook in hooks:
        hook.remove()
    return calls


def test_weights_of_the_image_pipeline_load_into_animatediff(tmp_path):
    """LinFusion weights saved from the linearized image pipeline load unchanged into the linearized
    AnimateDiffPipeline built from the same UNet: the same keys, bit-equal spatial layers, and with
    the motion modules made the identity, each frame denoised as the image UNet denoises it."""
    image = lindiff.linearize(tiny_models.sd_pipeline(), "linfusion")
    perturb_added(image.unet)
    lindiff.save_weights(image, tmp_path / "image")

    pipe = lindiff.linearize(animatediff_pipeline(), "linfusion", weights=tmp_path / "image")
    unet = pipe.unet
    saved = load_file(lindiff.save_weights(pipe, tmp_path / "video"))
    expected = load_file(tmp_path / "image" / "lindiff.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)

    inputs = motion_inputs(frames=3, height=8, width=8, batch=1)
    calls = layer_calls(unet, inputs)
    assert len(calls) == SPATIAL
    with torch.no_grad():
        image.unet(inputs["sample"][:, :, 0], 10, inputs["encoder_hidden_states"][:1])  # the same grid
        for name, (tokens, out) in calls.items():
            assert torch.equal(image.unet.get_submodule(name)(tokens), out), name

    zero_motion(unet)
    per_frame = inputs["sample"][0].transpose(0, 1)  # (F, 4, h, w): the frames as an image batch
    with torch.no_grad():
        expected_frames = image.unet(per_frame, 10, inputs["encoder_hidden_states"]).sample
    video = output(unet, inputs)[0].transpose(0, 1)
    torch.testing.assert_close(video, expected_frames, rtol=0, atol=1e-5)
    untrained = lindiff.linearize(animatediff_pipeline(), "linfusion").unet  # the check can fail
    zero_motion(untrained)
    assert (output(untrained, inputs)[0].transpose(0, 1) - expected_frames).abs().max() > 1e-3

    back = lindiff.linearize(tiny_models.sd_pipeline(), "linfusion")  # and the other way round
    lindiff.load_weights(back, tmp_path / "video")
    assert all(
        torch.equal(p, q) for p, q in zip(back.unet.parameters(), image.unet.parameters(), strict=True)
    )


def test_the_shipped_student_loads_into_an_animatediff_unet():
    """The shipped LinFusion student of the embedded image model (``tiny-shapes-linfusion``) loads
    into an AnimateDiff UNet built on that model, every converted layer bit-equal to the image one's."""
    image = UNet2DConditionModel.from_pretrained(Path(assets.path()) / "unet")
    video = UNetMotionModel.from_unet2d(
        image, motion_adapter(block_out_channels=image.config.block_out_channels)
    )
    weights = assets.path("tiny-shapes-linfusion")
    lindiff.linearize(image, "linfusion", weights=weights)
    lindiff.linearize(video, "linfusion", weights=weights)
    assert get_state(video).layers.keys() == get_state(image).layers.keys()
    for name, attn in get_state(image).layers.items():
        ours = get_state(video).layers[name]
        for (key, p), (_, q) in zip(attn.state_dict().items(), ours.state_dict().items(), strict=True):
            assert torch.equal(p, q), f"{name}.{key}"


# --- LoRA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA on every attention projection of the tiny image UNet, saved in diffusers' format."""
    torch.manual_seed(7)
    unet = tiny_models.unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(PROJECTIONS)))
    folder = tmp_path_factory.mktemp("lora")
    AnimateDiffPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def test_lora_after_linearize_scales_and_unloads(lora_folder):
    video = VIDEOS[0]
    converted = run(lindiff.linearize(animatediff_pipeline(), "linfusion"), *video)
    pipe = lindiff.linearize(animatediff_pipeline(), "linfusion")
    pipe.load_lora_weights(lora_folder, adapter_name="style")
    state = get_state(pipe.unet)
    for name, attn in state.layers.items():
        assert isinstance(attn.processor, SelfAttnProcessor), name
        assert all(isinstance(attn.get_submodule(p), BaseTunerLayer) for p in PROJECTIONS), name
        assert not any(isinstance(m, BaseTunerLayer) for m in attn.lindiff.modules()), name
    for name, attn in temporal_attention(pipe.unet).items():  # the image LoRA has no motion layers
        assert not any(isinstance(m, BaseTunerLayer) for m in attn.modules()), name
    full = run(pipe, *video)
    assert (full - converted).abs().max() > 1e-3

    pipe.set_adapters(["style"], adapter_weights=[0.0])
    torch.testing.assert_close(run(pipe, *video), converted, rtol=0, atol=1e-6)
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = run(pipe, *video)
    assert (half - converted).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4
    pipe.unload_lora_weights()
    assert all(isinstance(attn.processor, SelfAttnProcessor) for attn in state.layers.values())
    torch.testing.assert_close(run(pipe, *video), converted, rtol=0, atol=1e-6)


# --- frames -------------------------------------------------------------------------------------


def test_frames_any_count_up_to_the_motion_modules_length():
    pipe = animatediff_pipeline()
    adapter = pipeline_adapter(pipe)
    assert adapter.frame_multiple(pipe) == 1 and adapter.frame_rate == 8
    assert adapter.resolve_frames(pipe, None) == 16  # the pipeline's default
    assert [adapter.resolve_frames(pipe, n) for n in (1, 2, 7, MAX_FRAMES)] == [1, 2, 7, MAX_FRAMES]
    with pytest.raises(
        ValueError, match=r"frames=33: the motion modules of AnimateDiffPipeline take at most 32"
    ):
        adapter.resolve_frames(pipe, MAX_FRAMES + 1)
    with pytest.raises(ValueError, match=r"frames=0: AnimateDiffPipeline renders 1k \+ 1 frames"):
        adapter.resolve_frames(pipe, 0)
    assert adapter.native_size(pipe) == 16 and adapter.size_multiple(pipe) == 8
    assert adapter.video_to_video(pipe) is AnimateDiffVideoToVideoPipeline
    pipe.enable_free_noise(context_length=16, context_stride=4)
    assert adapter.resolve_frames(pipe, 2 * MAX_FRAMES) == 2 * MAX_FRAMES  # windows of 16 frames


def test_animatediff_is_not_distilled_itself():
    """The spatial layers are the image UNet's: distillation trains those on the image pipeline."""
    assert not adapter_for(animatediff_pipeline().unet).distillable()


# --- rendering: lindiff render, the high-resolution chain, the demo -----------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny AnimateDiff pipeline and a trained LinFusion student of its image UNet, as folders."""
    root = tmp_path_factory.mktemp("animatediff")
    animatediff_pipeline().save_pretrained(root / "pipeline")
    image = lindiff.linearize(tiny_models.sd_pipeline(), "linfusion")
    perturb_added(image.unet)
    lindiff.save_weights(image, root / "student")
    return {name: root / name for name in ("pipeline", "student")}


def render_args(folders: dict[str, Path], out: Path, frames: int) -> list[str]:
    common = ["--size", str(NATIVE), "--steps", "2", "--guidance", "2", "--device", "cpu", "--no-progress"]
    return ["render", "--model", str(folders["pipeline"]), "--method", "linfusion",
            "--weights", str(folders["student"]), *common, "--frames", str(frames), "--out", str(out),
            "--prompt", "a red star"]  # fmt: skip


def test_render_writes_an_mp4_and_a_poster(folders, tmp_path):
    assert main(render_args(folders, tmp_path, frames=4)) == 0
    name = "00000-a-red-star-s0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.mp4", f"{name}.png", MANIFEST_NAME]
    assert iio.imread(tmp_path / f"{name}.mp4", plugin="FFMPEG").shape == (4, NATIVE, NATIVE, 3)
    params = read_params(tmp_path / f"{name}.mp4")
    assert (params["frames"], params["fps"], params["method"]) == (4, 8, "linfusion")


def test_render_refuses_more_frames_than_the_motion_modules_take(folders, tmp_path, capsys):
    assert main(render_args(folders, tmp_path, frames=MAX_FRAMES + 1)) == 2
    assert "take at most 32 frames" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))


def test_highres_chain_at_2x():
    """Native-size frames first, then an SDEdit stage through AnimateDiffVideoToVideoPipeline."""
    pipe = lindiff.linearize(animatediff_pipeline(), "linfusion")
    chain = HighResPipeline.from_pipe(pipe)
    assert isinstance(chain.img2img, AnimateDiffVideoToVideoPipeline)
    seen = []
    output_ = chain(
        prompt="a red star",
        height=2 * NATIVE,
        width=2 * NATIVE,
        stages=2,
        num_frames=4,
        num_inference_steps=4,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        tile_vae=False,
        output_type="pt",
        return_stages=True,
        on_progress=seen.append,
    )
    first, last = output_.stages
    native, full = (1, 4, 3, NATIVE, NATIVE), (1, 4, 3, 2 * NATIVE, 2 * NATIVE)
    assert first.shape == native and last.shape == output_.images.shape == full
    assert torch.isfinite(output_.images).all() and 0 <= output_.images.min() <= output_.images.max() <= 1
    # Stage 1 runs all 4 steps; stage 2, at strength 0.4, one.
    assert [(p.stage, p.height) for p in seen] == [(1, NATIVE)] * 4 + [(2, 2 * NATIVE)]


def test_the_demo_shows_the_video_tab(folders, tmp_path):
    model = DemoModel(
        str(folders["pipeline"]), weights=str(folders["student"]), device="cpu", output_dir=tmp_path
    )
    assert (model.frames, model.frame_multiple, model.fps) == (16, 1, 8)
    assert "linfusion" in model.linear_methods
    demo = build_app(model)
    assert sum(isinstance(block, gr.Video) for block in demo.blocks.values()) == 2  # teacher, student
    request = Request(
        "a red star", NATIVE, NATIVE, steps=1, guidance=2.0, seed=0, method="linfusion", frames=2
    )
    generation = model.run(request, owner="test")
    assert iio.imread(generation.video, plugin="FFMPEG").shape == (2, NATIVE, NATIVE, 3)
    with pytest.raises(ValueError, match="take at most 32 frames"):
        model.check(
            Request("x", NATIVE, NATIVE, steps=1, guidance=2.0, seed=0, method="linfusion", frames=40)
        )
