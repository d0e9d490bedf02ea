"""lindiff.distill on LTX-Video text-to-video: packed latents, unpacked to ``(B, C, F, H, W)``.

The adapter calls the transformer as ``LTXPipeline`` does; the teacher samples clips of
``num_frames`` frames, the student trains 30 steps on them, and the exported weights, loaded into
a fresh linearized transformer, give the trained student's outputs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import tiny_video_models as tiny
import torch
from accelerate_state import fresh_accelerate  # noqa: F401 (autouse fixture)
from diffusers import LTXPipeline
from PIL import Image
from test_distill_families import PROMPTS, make_config, predictions

import lindiff
from lindiff.adapters import adapter_for
from lindiff.adapters.ltx import pack, unpack
from lindiff.distill import Distiller
from lindiff.distill.components import SetupError

# 5 frames at 32 px: 2 latent frames of 8 x 8 (the tiny LTX VAE: 4x in space and time), so
# 2 x 8 x 8 tokens. LinFusion's new parameters alone: seeds 0-5 end at 0.28-0.41 of the first
# step's attention loss (CLEAR's recipe with radius 1, as in the Wan test: 0.09-0.10, seeds 0-2).
FRAMES = 5


def test_predict_calls_the_transformer_as_the_pipeline_does():
    pipe = tiny.ltx_pipeline()
    calls = []

    def record(module, args, kwargs, out):
        calls.append((kwargs, out[0]))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    pipe(prompt=PROMPTS[:2], num_frames=9, height=32, width=64, num_inference_steps=1, guidance_scale=1.0)
    handle.remove()
    [(seen, expected)] = calls

    adapter = adapter_for(pipe.transformer)
    assert adapter.latent_shape(pipe, 32, 9) == (3, 8, 8)
    shape = (3, 8, 16)  # 9 frames of 32 x 64 px
    noisy = adapter.sampled_latents(SimpleNamespace(frames=seen["hidden_states"]), shape)
    assert noisy.shape == (2, tiny.LATENT_CHANNELS, *shape)
    with torch.no_grad():  # as the cache encodes prompts
        batch = adapter.encode_prompts(pipe, pipe.transformer, PROMPTS[:2], torch.device("cpu"), [])
        got = adapter.predict(pipe.transformer, noisy, seen["timestep"], batch)
    torch.testing.assert_close(
        got, adapter.sampled_latents(SimpleNamespace(frames=expected), shape), rtol=0, atol=0
    )


def test_ltx_distils_on_clips_and_its_export_reloads(tmp_path):
    attention = []
    config = make_config(
        tmp_path,
        tiny.ltx_pipeline(),
        num_frames=FRAMES,
        validation_every=30,
        validation_prompts=PROMPTS[:1],
        validation_steps=2,
    )
    distiller = Distiller(config, callbacks=[lambda d, step, metrics: attention.append(metrics["attention"])])
    assert [distiller.dataset[i]["latents"].shape for i in range(4)] == [(tiny.LATENT_CHANNELS, 2, 8, 8)] * 4
    result = distiller.train()

    assert len(attention) == 30 and attention[-1] < 0.5 * attention[0], attention
    trained = predictions(distiller, distiller.unwrapped_student())
    assert trained.shape == (2, tiny.LATENT_CHANNELS, 2, 8, 8)
    fresh = tiny.ltx_transformer()
    lindiff.linearize(fresh, method=config.method, **config.method_options)
    lindiff.load_weights(fresh, result.weights)
    torch.testing.assert_close(predictions(distiller, fresh), trained)
    with Image.open(tmp_path / "run" / "validation" / "step-00000030.png") as grid:
        assert grid.size == (32, 64)  # the first frame of the teacher's and the student's video


@pytest.mark.parametrize("frames", [None, 6])
def test_frame_counts_the_ltx_pipeline_cannot_render_are_refused(tmp_path, frames):
    # the tiny VAE's temporal factor is 4 (the released one's 8)
    with pytest.raises(SetupError, match=rf"num_frames={frames}: LTXPipeline renders videos, .* 4k \+ 1"):
        Distiller(make_config(tmp_path, tiny.ltx_pipeline(), num_frames=frames, max_steps=1))


@pytest.mark.parametrize("patch", [(1, 1, 1), (1, 2, 2), (2, 2, 2)])
def test_latents_pack_as_the_pipeline_packs_them(patch):
    latents = torch.randn(2, 3, 4, 6, 8)
    tokens = pack(latents, patch)
    p_t, p, _ = patch
    torch.testing.assert_close(tokens, LTXPipeline._pack_latents(latents, p, p_t), rtol=0, atol=0)
    torch.testing.assert_close(unpack(tokens, (4, 6, 8), patch), latents, rtol=0, atol=0)
