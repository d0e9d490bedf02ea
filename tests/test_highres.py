"""HighResPipeline: stage planning, the SDEdit chain on tiny SD and DiT pipelines, ControlNet, LoRA, memory hooks."""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import tiny_dit_models
import tiny_models
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig

import lindiff
from lindiff.pipelines import HighResPipeline, HighResPipelineOutput, HighResProgress
from lindiff.pipelines.highres import plan_stages, sdedit_scheduler, stage_strengths
from lindiff.pipelines.sdedit import default_strengths
from lindiff.state import PROJECTIONS

PROMPT = "a red circle above a blue square"
# Tiny SD: native 16 px (sample_size 8, 2x VAE), sizes in multiples of 8 px. The chain to 48x64 px
# runs 3 stages (stages=3; "auto" would jump there in one SDEdit stage).
HEIGHT, WIDTH = 48, 64
STAGE_SIZES = [(16, 16), (24, 32), (48, 64)]
STEPS = 5
STRENGTHS = (0.4, 0.4)  # 2 steps in each SDEdit stage


def chain(hr: HighResPipeline, **kwargs) -> HighResPipelineOutput:
    """The 3-stage chain to HEIGHT x WIDTH with a fixed generator; images as tensors unless asked."""
    kwargs = {
        "height": HEIGHT,
        "width": WIDTH,
        "stages": 3,
        "num_inference_steps": STEPS,
        "strength_schedule": STRENGTHS,
        "guidance_scale": 2.0,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "pt",
        **kwargs,
    }
    return hr(PROMPT, **kwargs)


def control_chain(hr: HighResPipeline, condition: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    return chain(
        hr, image=tiny_dit_models.control_image(64, 64) if condition is None else condition, **kwargs
    ).images


# --- plan_stages / stage_strengths ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "native", "stages", "expected"),
    [
        # "auto": the first SDEdit stage at most 4x the native side, then 2x per stage
        (2048, 2048, 512, "auto", [(512, 512), (2048, 2048)]),
        (4096, 4096, 1024, "auto", [(1024, 1024), (4096, 4096)]),
        (8192, 8192, 1024, "auto", [(1024, 1024), (4096, 4096), (8192, 8192)]),
        (1536, 1536, 512, "auto", [(512, 512), (1536, 1536)]),
        (1024, 1024, 128, "auto", [(128, 128), (512, 512), (1024, 1024)]),
        (4096, 4096, 128, "auto", [(128, 128), (512, 512), (1024, 1024), (2048, 2048), (4096, 4096)]),
        (768, 768, 128, "auto", [(128, 128), (384, 384), (768, 768)]),
        (256, 256, 128, "auto", [(128, 128), (256, 256)]),
        (1024, 2048, 1024, "auto", [(728, 1448), (1024, 2048)]),
        (512, 768, 512, "auto", [(416, 624), (512, 768)]),
        (512, 512, 512, "auto", [(512, 512)]),
        (256, 384, 512, "auto", [(256, 384)]),
        # an int: that many stages, geometric from stage 1 to the target
        (2048, 2048, 512, 3, [(512, 512), (1024, 1024), (2048, 2048)]),
        (1536, 1536, 512, 3, [(512, 512), (888, 888), (1536, 1536)]),
        (2048, 2048, 512, 2, [(512, 512), (2048, 2048)]),
        (2048, 2048, 512, 1, [(2048, 2048)]),
        (1024, 1024, 512, 4, [(512, 512), (648, 648), (816, 816), (1024, 1024)]),
        (HEIGHT, WIDTH, 16, 3, STAGE_SIZES),
        (HEIGHT, WIDTH, 16, "auto", [(16, 16), (HEIGHT, WIDTH)]),
    ],
)
def test_plan_stages(height, width, native, stages, expected):
    assert plan_stages(height, width, native, stages) == expected


def test_plan_stages_rounds_to_the_model_multiple():
    sizes = plan_stages(1024, 1536, 512, "auto", multiple=64)
    assert sizes[-1] == (1024, 1536)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in sizes)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"height": 1000},
            r"height must be a positive multiple of 16 px .*got 1000 \(nearest valid: 992 or 1008\)",
        ),
        ({"width": 8}, r"width must be a positive multiple of 16 px .*got 8 \(nearest valid: 16\)"),
        ({"width": 1024.0}, "width must be a positive multiple"),
        ({"native_size": 0}, "native_size must be a positive int"),
        ({"stages": 0}, "stages must be 'auto' or a positive int, got 0"),
        ({"stages": "two"}, "stages must be 'auto' or a positive int, got 'two'"),
        ({"stages": True}, "stages must be 'auto' or a positive int, got True"),
        ({"native_size": 2048, "stages": 2}, "stages must be 1 .* not larger than the native 2048x2048"),
    ],
)
def test_plan_stages_errors(kwargs, match):
    arguments = {
        "height": 1024,
        "width": 1024,
        "native_size": 512,
        "stages": "auto",
        "multiple": 16,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        plan_stages(**arguments)


def test_stage_strengths():
    three, one = plan_stages(2048, 2048, 512, 3), plan_stages(512, 512, 512)
    assert stage_strengths((0.4, 0.3, 0.2, 0.1), three) == [0.4, 0.3]
    assert stage_strengths((0.4, 0.3, 0.2, 0.1), one) == []
    with pytest.raises(
        ValueError,
        match=r"strength_schedule \(--strengths of lindiff render\) has 4 strengths but the 6-stage chain "
        "needs 5; give more strengths, fewer stages, or none for the default",
    ):
        stage_strengths((0.4, 0.3, 0.2, 0.1), plan_stages(2048, 2048, 512, 6))
    for bad in ((0.4, 0.0), (1.5,), "0.4", 0.4):
        with pytest.raises(ValueError, match="strength_schedule"):
            stage_strengths(bad, plan_stages(1024, 1024, 512))


@pytest.mark.parametrize(
    ("size", "native", "num_stages"),
    [(512, 512, 1), (4096, 512, 3), (8192, 512, 4), (16384, 512, 5), (4096, 128, 5), (8192, 128, 6)],
    ids=["sd-native", "sd-4k", "sd-8k", "sd-16k", "shapes-4k", "shapes-8k"],
)
def test_the_default_schedule_fits_every_chain(size, native, num_stages):
    """Up to 16384 px for SD-class models (native 512) and 8192 px for the embedded one (native
    128): the "auto" chain's stages at 4x, 8x, 16x, ... the native side get LinFusion's strengths
    for those scales, 0.3, 0.2, then 0.1 for each further doubling."""
    sizes = plan_stages(size, size, native, multiple=8)
    assert len(sizes) == num_stages and sizes[-1] == (size, size)
    strengths = stage_strengths(None, sizes)
    assert strengths == [0.3, 0.2, 0.1, 0.1, 0.1][: num_stages - 1]
    assert strengths == default_strengths(sizes)


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        # a chain of 2x stages (an int `stages`) runs LinFusion's own schedule
        (plan_stages(4096, 4096, 128, 6), [0.4, 0.3, 0.2, 0.1, 0.1]),
        (plan_stages(256, 256, 128), [0.4]),  # 2x: one stage
        (plan_stages(768, 768, 128), [0.3, 0.2]),  # 3x, 6x
        (plan_stages(1024, 1024, 128, 3), [0.3, 0.2]),  # 2.83x, 8x
        (plan_stages(1024, 2048, 1024), [0.4]),  # 1.41x: up to 2x
        (plan_stages(1000, 1000, 250, 2, multiple=8), [0.3]),  # 4.03x after rounding: still "4x"
    ],
)
def test_default_strengths_fall_with_the_stage_scale(sizes, expected):
    assert default_strengths(sizes) == expected


# --- the chain on tiny SD ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd() -> HighResPipeline:
    return HighResPipeline.from_pipe(tiny_models.sd_pipeline())


def test_three_stage_chain_gives_the_requested_non_square_size(sd):
    assert sd.native_size == 16 and sd.size_multiple == 8
    out = chain(sd, output_type="pil", return_stages=True)
    assert [image.size for image in out.images] == [(WIDTH, HEIGHT)]
    assert [[image.size for image in stage] for stage in out.stages] == [[(w, h)] for h, w in STAGE_SIZES]
    assert out.stages[-1] is out.images
    assert chain(sd, output_type="np").images.shape == (1, HEIGHT, WIDTH, 3)


def test_a_shorter_default_chain_is_the_first_stages_of_a_longer_one(sd):
    """The default chain to 4x the native side (16 -> 64 px) renders exactly the first two stages of
    the one to 8x (16 -> 64 -> 128 px): same plan, strengths and noise draws (bench/quality.py reads
    the 4x and 8x chains from the 32x chain's stages)."""

    def run(size: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        kwargs = {"num_inference_steps": STEPS, "generator": generator, "output_type": "pt"}
        return sd(PROMPT, height=size, width=size, return_stages=True, **kwargs).stages

    short, long = run(64), run(128)
    assert [stage.shape[-1] for stage in short] == [16, 64] and [stage.shape[-1] for stage in long] == [
        16,
        64,
        128,
    ]
    for ours, theirs in zip(short, long, strict=False):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_helper_pipelines_share_the_components(sd):
    assert type(sd.img2img).__name__ == "StableDiffusionImg2ImgPipeline"
    for helper in (sd.text2img, sd.img2img):
        for name, component in sd.components.items():
            assert getattr(helper, name, None) is component, name


def test_from_pipe_replaces_components_like_diffusers():
    base = tiny_models.sd_pipeline()
    hr = HighResPipeline.from_pipe(base, controlnet=tiny_models.controlnet(base.unet))
    assert type(hr.text2img).__name__ == "StableDiffusionControlNetPipeline"
    assert type(hr.img2img).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    assert hr.img2img.unet is base.unet
    with pytest.raises(TypeError, match="pipe must be a diffusers DiffusionPipeline"):
        HighResPipeline.from_pipe(base.unet)


def test_on_progress_counts_every_step_and_its_exception_stops_the_run(sd):
    events: list[HighResProgress] = []
    chain(sd, on_progress=events.append)
    expected = [(1, step, STEPS, 16, 16) for step in range(1, STEPS + 1)]
    expected += [
        (stage, step, 2, h, w)
        for stage, (h, w) in ((2, STAGE_SIZES[1]), (3, STAGE_SIZES[2]))
        for step in (1, 2)
    ]
    assert [(e.stage, e.step, e.num_steps, e.height, e.width) for e in events] == expected
    assert {e.num_stages for e in events} == {3}

    class Cancelled(Exception):
        pass

    def cancel(event: HighResProgress) -> None:
        if event.stage == 2:
            raise Cancelled

    with (
        mock.patch.object(sd.text2img.vae, "decode", wraps=sd.text2img.vae.decode) as decode,
        pytest.raises(Cancelled),
    ):
        chain(sd, on_progress=cancel, sequential_cfg_above=0, feed_forward_chunk_size=4)
    assert decode.call_count == 1  # stage 1 only
    # Nothing of the call is left behind: tiling back off, no hooks.
    assert sd.pipe.vae.use_tiling is False
    assert not any(
        getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in sd.pipe.unet.modules()
    )


def test_vae_tiling_is_used_and_restored(sd):
    vae = sd.pipe.vae
    assert vae.tile_sample_min_size == 16  # the tiny VAE tiles anything above 16 px
    with (
        mock.patch.object(vae, "_tiled_encode", wraps=vae._tiled_encode) as encode,
        mock.patch.object(vae, "tiled_decode", wraps=vae.tiled_decode) as decode,
    ):
        tiled = chain(sd, tile_vae=True).images
        assert (encode.call_count, decode.call_count) == (2, 2)  # stages 2 and 3 (stage 1 is one tile)
        untiled = chain(sd, tile_vae=False).images
        assert (encode.call_count, decode.call_count) == (2, 2)
    assert vae.use_tiling is False
    assert tiled.shape == untiled.shape and (tiled - untiled).abs().max() > 1e-3


def test_auto_vae_tiling_tiles_only_when_memory_is_short(sd, monkeypatch):
    from lindiff.pipelines import memory

    vae = sd.pipe.vae
    needed = memory.untiled_vae_bytes(vae, 1, HEIGHT, WIDTH)
    assert needed == memory.VAE_ACTIVATIONS * max(vae.config.block_out_channels[:2]) * HEIGHT * WIDTH * 4
    assert memory.untiled_vae_bytes(vae, 3, HEIGHT, WIDTH) == 3 * needed
    with mock.patch.object(vae, "tiled_decode", wraps=vae.tiled_decode) as decode:
        untiled = chain(sd).images  # the default, "auto": a few MB fit
        assert decode.call_count == 0
        monkeypatch.setattr(memory, "free_memory", lambda device: 2 * needed - 1)
        assert chain(sd).images.shape == untiled.shape
        # Tiles as large as half the free memory allows: just below the final size, so only the
        # last stage's decode is tiled.
        assert decode.call_count == 1
        monkeypatch.setattr(memory, "free_memory", lambda device: None)  # unknown: tile, to be safe
        assert chain(sd).images.shape == untiled.shape
        assert decode.call_count == 3  # in the VAE's own 16 px tiles: stages 2 and 3
    assert vae.use_tiling is False


def test_auto_tiling_takes_at_most_half_the_free_memory_with_or_without_psutil(sd, monkeypatch):
    import psutil

    from lindiff.pipelines import memory

    vae = sd.pipe.vae
    needed = memory.untiled_vae_bytes(vae, 1, HEIGHT, WIDTH)
    available = psutil.virtual_memory().available
    monkeypatch.setitem(sys.modules, "psutil", None)  # the host's memory from /proc/meminfo instead
    assert abs(memory.free_memory("cpu") - available) < 2**28
    assert memory.free_memory("meta") is None
    monkeypatch.setattr(memory, "free_memory", lambda device: 2 * needed)
    assert not memory.vae_needs_tiling(vae, 1, HEIGHT, WIDTH, "cpu")  # exactly half the free memory
    assert memory.vae_needs_tiling(vae, 2, HEIGHT, WIDTH, "cpu")  # a batch of two needs all of it


def test_tile_vae_must_be_a_bool_or_auto(sd):
    with pytest.raises(ValueError, match="tile_vae must be True, False or 'auto', got 'yes'"):
        chain(sd, tile_vae="yes")


def test_sequential_cfg_halves_and_chunked_feed_forward_keep_the_output(sd):
    batches: list[int] = []
    handle = sd.pipe.unet.conv_in.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0])
    )
    try:  # guidance in the SDEdit stages too (sdedit_guidance_scale=None): halves to split there
        reference = chain(sd, sdedit_guidance_scale=None).images
        assert set(batches) == {2}
        batches.clear()
        threshold = 16 * 16  # stages 2 and 3 only
        halves = chain(
            sd, sdedit_guidance_scale=None, sequential_cfg_above=threshold, feed_forward_chunk_size=5
        ).images
    finally:
        handle.remove()
    assert batches == [2] * STEPS + [1] * 8  # 2 halves x 2 steps x 2 stages
    torch.testing.assert_close(halves, reference, rtol=0, atol=1e-5)


def stage_guidance(sd: HighResPipeline, **kwargs) -> tuple[list, list[int]]:
    """The guidance_scale each stage's pipeline got, and the UNet's batch at every step, in a chain."""
    scales, batches = [], []
    stage_call = HighResPipeline._stage_call

    def spy(self, request, stage, pipe):
        call = stage_call(self, request, stage, pipe)
        scales.append(call.get("guidance_scale"))
        return call

    handle = sd.pipe.unet.conv_in.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0])
    )
    try:
        with mock.patch.object(HighResPipeline, "_stage_call", spy):
            chain(sd, **kwargs)
    finally:
        handle.remove()
    return scales, batches


def test_sdedit_stages_run_without_classifier_free_guidance_by_default(sd):
    """Stage 1 at the call's guidance (CFG: batch 2); the SDEdit stages at 1.0, one pass a step."""
    assert sd.classifier_free_guidance
    sdedit_steps = 2 * 2  # 2 stages of 2 steps
    assert stage_guidance(sd) == ([2.0, 1.0, 1.0], [2] * STEPS + [1] * sdedit_steps)
    assert stage_guidance(sd, sdedit_guidance_scale=None) == ([2.0, 2.0, 2.0], [2] * (STEPS + sdedit_steps))
    assert stage_guidance(sd, sdedit_guidance_scale=3.5) == ([2.0, 3.5, 3.5], [2] * (STEPS + sdedit_steps))
    # A denoiser that embeds the guidance scale (FLUX's guidance embedding) keeps it in every stage.
    with mock.patch.object(type(sd.adapter), "guidance_conditions", return_value={"guidance": 1}):
        assert not sd.classifier_free_guidance
        assert stage_guidance(sd)[0] == [2.0, 2.0, 2.0]
    default = chain(sd).images
    assert (chain(sd, sdedit_guidance_scale=None).images - default).abs().max() > 1e-4
    for bad in ("on", True, [1.0]):
        with pytest.raises(ValueError, match="sdedit_guidance_scale must be 'auto', None or a number, got"):
            chain(sd, sdedit_guidance_scale=bad)


def test_skip_residual_changes_the_sdedit_stages(sd):
    plain = chain(sd, return_stages=True)
    residual = chain(sd, return_stages=True, skip_residual=True)
    torch.testing.assert_close(residual.stages[0], plain.stages[0], rtol=0, atol=0)
    assert (residual.images - plain.images).abs().max() > 1e-4
    assert torch.isfinite(residual.images).all()


def test_call_errors(sd):
    cases = [
        (
            {"image": torch.rand(1, 3, 16, 16)},
            "image is a ControlNet condition but StableDiffusionPipeline has no controlnet",
        ),
        ({"output_type": "latent"}, "output_type must be one of"),
        ({"num_inference_steps": 2}, "num_inference_steps=2 gives no step at strength 0.4"),
        ({"latents": torch.zeros(1)}, "latents are set by HighResPipeline"),
        ({"max_sequence_length": 8}, "StableDiffusionPipeline takes no argument"),
        ({"sequential_cfg_above": -1}, "sequential_cfg_above must be None or a pixel count"),
        ({"feed_forward_chunk_size": 0}, "feed_forward_chunk_size must be None or a positive int"),
        (
            {"height": 50},
            r"height must be a positive multiple of 8 px for this model, got 50 \(nearest valid: 48 or 56\)",
        ),
        (
            {"stages": 5},
            r"strength_schedule \(--strengths of lindiff render\) has 2 strengths but the 5-stage",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            chain(sd, **kwargs)
    with pytest.raises(TypeError, match="pipe must be a text-to-image pipeline"):
        HighResPipeline.from_pipe(tiny_models.img2img_pipeline())


# --- ControlNet + LoRA + linearize ---------------------------------------------------------------


def test_controlnet_and_lora_through_the_chain():
    pipe = tiny_models.sd_controlnet_pipeline()
    with torch.no_grad():  # zero-initialised in diffusers: without this the condition changes nothing
        pipe.controlnet.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.1)
    hr = HighResPipeline.from_pipe(pipe)
    assert type(hr.img2img).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    conditions: list[tuple[int, ...]] = []
    pipe.controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: conditions.append(tuple(kwargs["controlnet_cond"].shape[-2:])),
        with_kwargs=True,
    )
    plain = control_chain(hr)
    assert plain.shape == (1, 3, HEIGHT, WIDTH)
    assert sorted(set(conditions)) == sorted(STAGE_SIZES)  # the condition at every stage's size
    other = control_chain(hr, condition=tiny_dit_models.control_image(64, 64, seed=9))
    assert (other - plain).abs().max() > 1e-3
    unscaled = control_chain(hr, controlnet_conditioning_scale=0.0)
    assert (unscaled - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="has a ControlNet: pass its condition as image"):
        chain(hr)

    torch.manual_seed(7)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(PROJECTIONS))
    )
    lora = control_chain(hr)
    assert (lora - plain).abs().max() > 1e-3
    half = control_chain(hr, cross_attention_kwargs={"scale": 0.5})
    assert (half - lora).abs().max() > 1e-4 and (half - plain).abs().max() > 1e-4

    lindiff.linearize(pipe)  # after from_pipe: the helpers share the converted modules
    converted = control_chain(hr, sequential_cfg_above=0)
    assert converted.shape == (1, 3, HEIGHT, WIDTH) and (converted - lora).abs().max() > 1e-4
    lindiff.restore(pipe)
    torch.testing.assert_close(control_chain(hr), lora, rtol=0, atol=0)


def test_linearized_before_from_pipe_with_lora_from_a_folder(tmp_path):
    from peft import get_peft_model_state_dict

    torch.manual_seed(7)
    unet = tiny_models.unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(PROJECTIONS)))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet))
    pipe = lindiff.linearize(tiny_models.sd_pipeline())
    hr = HighResPipeline.from_pipe(pipe)
    plain = chain(hr).images
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    lora = chain(hr).images
    assert lora.shape == (1, 3, HEIGHT, WIDTH) and (lora - plain).abs().max() > 1e-3


# --- the SDEdit stage of families without an image-to-image pipeline ------------------------------


@pytest.mark.parametrize("family", ["sd-ddim", "sd-dpm", "sd3-flow"])
def test_sdedit_schedule_matches_diffusers_img2img(family):
    """Text-to-image with the truncated schedule and pre-noised latents is diffusers' img2img, exactly."""
    if family == "sd3-flow":
        pipe, extra = tiny_dit_models.sd3_pipeline(), {"max_sequence_length": 8}
    else:
        pipe, extra = tiny_models.sd_pipeline(), {}
        if family == "sd-dpm":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    clean = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(1))
    strength, steps = 0.6, 5
    common = {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "guidance_scale": 2.0,
        "output_type": "latent",
        **extra,
    }
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    reference = img2img(
        image=clean, strength=strength, generator=torch.Generator().manual_seed(3), **common
    ).images

    scheduler = sdedit_scheduler(pipe.scheduler)
    scheduler.strength = strength
    scheduler.set_timesteps(steps)
    assert len(scheduler.timesteps) == int(steps * strength)
    noise = randn_tensor(clean.shape, generator=torch.Generator().manual_seed(3))
    start = scheduler.timesteps[:1]
    noised = (
        scheduler.add_noise(clean, noise, start)
        if family != "sd3-flow"
        else scheduler.scale_noise(clean, start, noise)
    )
    text2img = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    text2img.set_progress_bar_config(disable=True)
    ours = text2img(
        height=24, width=32, latents=noised / getattr(scheduler, "init_noise_sigma", 1.0), **common
    ).images
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_sdedit_schedulers_keep_their_own_set_timesteps_signature():
    import inspect

    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    flow = sdedit_scheduler(FlowMatchEulerDiscreteScheduler())
    ddim = sdedit_scheduler(DDIMScheduler())
    assert "sigmas" in inspect.signature(flow.set_timesteps).parameters
    assert "sigmas" not in inspect.signature(ddim.set_timesteps).parameters
    assert isinstance(ddim, DDIMScheduler) and isinstance(flow, FlowMatchEulerDiscreteScheduler)


# --- diffusion transformers -----------------------------------------------------------------------

DIT_FAMILIES = {
    # family: (pipeline, extra arguments, size, skip_residual, image-to-image pipeline or None)
    "pixart": (tiny_dit_models.pixart_pipeline, {"clean_caption": False}, (32, 48), False, None),
    "sd3": (tiny_dit_models.sd3_pipeline, {}, (32, 48), True, "StableDiffusion3Img2ImgPipeline"),
    "flux": (tiny_dit_models.flux_pipeline, {}, (32, 48), True, "FluxImg2ImgPipeline"),
    "sana": (tiny_dit_models.sana_pipeline, {"complex_human_instruction": None}, (64, 96), True, None),
}


@pytest.mark.parametrize("family", list(DIT_FAMILIES))
def test_dit_chain(family):
    make, extra, (height, width), skip_residual, img2img = DIT_FAMILIES[family]
    hr = HighResPipeline.from_pipe(make())
    assert (type(hr.img2img).__name__ if hr.img2img is not None else None) == img2img
    native = 32 if family == "sana" else 16  # FLUX has no sample_size in its config: pass it
    events: list[HighResProgress] = []
    out = hr(
        tiny_dit_models.PROMPT,
        height=height,
        width=width,
        native_size=native,
        stages=3,
        num_inference_steps=STEPS,
        strength_schedule=STRENGTHS,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
        skip_residual=skip_residual,
        sequential_cfg_above=0,
        feed_forward_chunk_size=8,
        output_type="pt",
        return_stages=True,
        on_progress=events.append,
        max_sequence_length=tiny_dit_models.TEXT_TOKENS,
        **extra,
    )
    assert len(out.stages) == 3 and out.images.shape == (1, 3, height, width)
    assert out.stages[0].shape[-2:] == (native, native)
    assert [(e.stage, e.num_steps) for e in events] == [(1, STEPS)] * STEPS + [(2, 2), (2, 2), (3, 2), (3, 2)]
    assert torch.isfinite(out.images).all()


def test_pixart_rejects_skip_residual():
    hr = HighResPipeline.from_pipe(tiny_dit_models.pixart_pipeline())
    with pytest.raises(
        ValueError, match="skip_residual needs callback_on_step_end, which PixArtAlphaPipeline lacks"
    ):
        hr(tiny_dit_models.PROMPT, height=32, width=48, num_inference_steps=STEPS, skip_residual=True)


def test_auto_local_vae_attention_above_the_token_threshold(sd, monkeypatch):
    """Above VAE_ATTENTION_TOKENS latent pixels the chain's VAE attention turns local, in the stages
    of that size only (exact below the threshold), and its processors come back afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from lindiff.pipelines import vae_attention

    vae = sd.pipe.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    tokens = vae_attention.vae_attention_tokens(vae, HEIGHT, WIDTH)
    assert tokens == (HEIGHT // factor) * (WIDTH // factor)
    assert vae_attention.vae_attention_radius(vae) == vae.config.sample_size // factor
    reference = chain(sd).images  # far below the threshold: untouched
    assert chain(sd, local_vae_attention=True).images.shape == reference.shape
    seen = []
    calls = vae_attention.LocalVAEAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kwargs):
        seen.append(hidden_states.shape[-2] * hidden_states.shape[-1])
        return calls(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(vae_attention.LocalVAEAttnProcessor, "__call__", spy)
    monkeypatch.setattr(vae_attention, "VAE_ATTENTION_TOKENS", tokens - 1)
    local = chain(sd).images
    assert seen and set(seen) == {tokens}  # the last stage's encode and decode, not the earlier ones
    assert (local - reference).abs().max() > 0  # the last stage's VAE passes saw a window
    assert all(isinstance(p, AttnProcessor2_0) for p in vae.attn_processors.values())
    seen.clear()
    chain(sd, local_vae_attention=False)
    assert not seen
    with pytest.raises(ValueError, match="local_vae_attention must be True, False or 'auto', got 'on'"):
        chain(sd, local_vae_attention="on")


def test_bf16_vae_runs_the_encoder_and_decoder_in_bfloat16_and_restores_them(sd):
    """Autocast to bfloat16 with channels-last weights inside the block: float32 out, close to the
    float32 VAE; afterwards the class's forward and contiguous weights again."""
    from lindiff.pipelines.vae_precision import bf16_vae

    vae = sd.pipe.vae
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        reference = vae.decode(vae.encode(images).latent_dist.mode()).sample
        dtypes = []
        handle = vae.decoder.conv_in.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
        with bf16_vae(vae, True):
            assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            fast = vae.decode(vae.encode(images).latent_dist.mode()).sample
        handle.remove()
        with bf16_vae(vae, False):
            again = vae.decode(vae.encode(images).latent_dist.mode()).sample
    assert dtypes == [torch.bfloat16] and fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, rtol=0, atol=0.1)
    assert (fast - reference).abs().max() > 0
    assert "forward" not in vae.encoder.__dict__ and "forward" not in vae.decoder.__dict__
    assert vae.decoder.conv_in.weight.is_contiguous()
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    with (
        pytest.raises(ValueError, match="bf16_vae=True needs a VAE with encoder and decoder modules"),
        bf16_vae(torch.nn.Linear(2, 2), True),
    ):
        pass


def test_auto_bf16_vae_is_per_stage_and_only_on_a_cpu_with_bfloat16(sd, monkeypatch):
    """``bf16_vae="auto"``: the stages above BF16_VAE_TOKENS latent pixels of a float32 VAE on a CPU
    with bfloat16 arithmetic; ``True``/``False`` force it in every stage or none."""
    from lindiff.pipelines import vae_precision

    vae = sd.pipe.vae
    tokens = vae_precision.vae_attention_tokens(vae, HEIGHT, WIDTH)
    monkeypatch.setattr(vae_precision, "BF16_VAE_TOKENS", tokens - 1)
    entered = []
    context = vae_precision.bf16_vae

    def spy(module, enabled):
        entered.append(enabled)
        return context(module, enabled)

    monkeypatch.setattr(vae_precision, "bf16_vae", spy)
    for computes, expected in ((True, [False, False, True]), (False, [False, False, False])):
        monkeypatch.setattr(vae_precision, "cpu_computes_bf16", lambda computes=computes: computes)
        entered.clear()
        chain(sd)
        assert entered == expected
    for forced in (True, False):
        entered.clear()
        chain(sd, bf16_vae=forced)
        assert entered == [forced] * 3
    device = torch.device("cpu")
    monkeypatch.setattr(vae_precision, "cpu_computes_bf16", lambda: True)
    assert vae_precision.wants_bf16_vae(vae, HEIGHT, WIDTH, device)
    assert not vae_precision.wants_bf16_vae(vae, HEIGHT, WIDTH, torch.device("cuda"))
    assert not vae_precision.wants_bf16_vae(vae, 16, 16, device)
    with pytest.raises(ValueError, match="bf16_vae must be True, False or 'auto', got 'on'"):
        chain(sd, bf16_vae="on")


def test_local_vae_attention_is_full_attention_when_the_window_covers_the_grid():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from lindiff.pipelines.vae_attention import LocalVAEAttnProcessor

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, bias=True)
    attn.eval()
    x = torch.randn(2, 16, 6, 7)
    with torch.no_grad():
        full = AttnProcessor2_0()(attn, x)
        covering = LocalVAEAttnProcessor(radius=10.0, full_below=0)(attn, x)
        exact_below = LocalVAEAttnProcessor(radius=1.0, full_below=42)(attn, x)
        window = LocalVAEAttnProcessor(radius=1.0, full_below=0)(attn, x)
    torch.testing.assert_close(covering, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact_below, full, rtol=1e-5, atol=1e-5)
    assert (window - full).abs().max() > 1e-3
    with pytest.raises(ValueError, match="takes a VAE block's"):
        LocalVAEAttnProcessor()(attn, x.flatten(2).transpose(1, 2))


def test_memory_bound_tiles_are_as_large_as_the_share_allows(sd, monkeypatch):
    from lindiff.pipelines import memory

    vae = sd.pipe.vae
    needed = memory.untiled_vae_bytes(vae, 1, 8 * HEIGHT, 8 * WIDTH)
    monkeypatch.setattr(memory, "free_memory", lambda device: needed // 2)  # a quarter of the area fits
    side = memory.vae_tile_size(vae, 1, 8 * HEIGHT, 8 * WIDTH, "cpu")
    factor = vae.tile_sample_min_size // vae.tile_latent_min_size
    assert side % (4 * factor) == 0 and side <= 4 * max(HEIGHT, WIDTH) and side >= vae.config.sample_size
    monkeypatch.setattr(memory, "free_memory", lambda device: None)
    assert memory.vae_tile_size(vae, 1, HEIGHT, WIDTH, "cpu") == vae.config.sample_size  # unknown: smallest
