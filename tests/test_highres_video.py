"""HighResPipeline on video: native-size frames first, then SDEdit stages through the family's
video-to-video pipeline; families without one are refused."""

from __future__ import annotations

import pytest
import tiny_dit_models
import tiny_models
import tiny_video_models
import torch

import lindiff
from lindiff.pipelines import HighResPipeline, HighResProgress
from lindiff.pipelines.request import ImageRenderer, ImageRequest

FRAMES = 5
NATIVE = 32
SIZE = 64


def run_chain(pipe, frames: int = FRAMES, **kwargs):
    seen: list[HighResProgress] = []
    output = HighResPipeline.from_pipe(pipe)(
        prompt="a red star",
        height=SIZE,
        width=SIZE,
        native_size=NATIVE,
        stages=2,
        num_frames=frames,
        num_inference_steps=4,
        guidance_scale=2.0,
        max_sequence_length=tiny_dit_models.TEXT_TOKENS,
        generator=torch.Generator().manual_seed(0),
        tile_vae=False,
        on_progress=seen.append,
        **kwargs,
    )
    return output, seen


@pytest.mark.parametrize(
    ("make", "frames"),
    # CogVideoX's VAE decodes 2 latent frames (5 frames) to 8; 3 (9 frames) decode to 9.
    [(tiny_dit_models.wan_pipeline, FRAMES), (tiny_video_models.cogvideox_pipeline, 9)],
    ids=["wan", "cogvideox"],
)
def test_two_stages_on_video(make, frames: int) -> None:
    pipe = lindiff.linearize(make(), method="linfusion")
    output, seen = run_chain(pipe, frames, output_type="pt", return_stages=True)
    first, last = output.stages
    assert first.shape == (1, frames, 3, NATIVE, NATIVE)
    assert last.shape == output.images.shape == (1, frames, 3, SIZE, SIZE)
    assert torch.isfinite(output.images).all() and 0 <= output.images.min() <= output.images.max() <= 1
    assert [(p.stage, p.height) for p in seen] == [(1, NATIVE)] * 4 + [(2, SIZE)]  # 2x: strength 0.4, 1 step


def test_the_render_path_returns_the_frames() -> None:
    """A video request through the high-resolution path (one stage: below Wan's native size)."""
    request = ImageRequest(
        "a red star", SIZE, SIZE, steps=2, guidance=2.0, seed=0, highres=True, tile=False, frames=FRAMES
    )
    frames = ImageRenderer(tiny_dit_models.wan_pipeline())(request)
    assert len(frames) == FRAMES and frames[0].size == (SIZE, SIZE)


def test_families_without_video_to_video_are_refused() -> None:
    with pytest.raises(ValueError, match=r"none for LTXPipeline \(the 'ltx' family\)"):
        HighResPipeline.from_pipe(tiny_video_models.ltx_pipeline())


def test_inputs_are_checked() -> None:
    chain = HighResPipeline.from_pipe(tiny_dit_models.wan_pipeline())
    with pytest.raises(ValueError, match=r"frames=4: WanPipeline renders 4k \+ 1 frames"):
        chain(prompt="x", height=SIZE, width=SIZE, native_size=NATIVE, num_frames=4)
    with pytest.raises(ValueError, match="skip_residual is supported on images only"):
        chain(prompt="x", height=SIZE, width=SIZE, native_size=NATIVE, num_frames=FRAMES, skip_residual=True)
    with pytest.raises(ValueError, match="renders images; leave frames unset"):
        HighResPipeline.from_pipe(tiny_models.sd_pipeline())(prompt="x", height=32, width=32, num_frames=5)
