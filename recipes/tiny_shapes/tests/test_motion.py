"""The motion stage's parts: the extended tokenizer and text encoder, the identity start, reversed clips."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextModel, CLIPTokenizer

from lindiff import assets
from lindiff.data import parse_motion_caption, sample_clip
from lindiff.data.motion import MOTION_WORDS
from recipes.tiny_shapes import architectures
from recipes.tiny_shapes.motion import (
    _ClipBatches,
    encode_clips,
    extend_text_encoder,
    reversed_caption,
    zero_motion_outputs,
)
from recipes.tiny_shapes.tokenizer import extend_tokenizer

IMAGE_CAPTIONS = ["a red circle to the left of a blue star on a white background", "two green squares", ""]


def test_extended_tokenizer_keeps_every_image_caption_and_adds_motion_words(tmp_path: Path) -> None:
    base = Path(assets.path()) / "tokenizer"
    old = CLIPTokenizer.from_pretrained(base)
    new = extend_tokenizer(base, tmp_path / "tokenizer", MOTION_WORDS)
    assert all(new.get_vocab()[token] == index for token, index in old.get_vocab().items())
    for text in IMAGE_CAPTIONS:
        assert new(text).input_ids == old(text).input_ids
    for word in MOTION_WORDS:
        assert len(new(word).input_ids) == 3, word  # BOS, the word, EOS
    longest = "a purple triangle standing still and a yellow square moving to the right on a white background"
    assert len(new(longest).input_ids) <= new.model_max_length
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert reloaded(longest).input_ids == new(longest).input_ids


def test_extended_text_encoder_encodes_image_captions_exactly_as_before(tmp_path: Path) -> None:
    base = Path(assets.path())
    old = CLIPTokenizer.from_pretrained(base / "tokenizer")
    new = extend_tokenizer(base / "tokenizer", tmp_path / "tokenizer", MOTION_WORDS)
    reference = CLIPTextModel.from_pretrained(base / "text_encoder")
    extended = extend_text_encoder(CLIPTextModel.from_pretrained(base / "text_encoder"), old, new)
    assert extended.get_input_embeddings().weight.shape[0] == len(new) > len(old)
    ids = old(IMAGE_CAPTIONS, padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(extended(ids).last_hidden_state, reference(ids).last_hidden_state)
    table = extended.get_input_embeddings().weight
    assert torch.equal(table[new.get_vocab()["up</w>"]], table[old.get_vocab()["above</w>"]])


def test_zeroed_adapter_leaves_the_image_model_on_every_frame() -> None:
    unet = UNet2DConditionModel.from_pretrained(assets.path(), subfolder="unet", torch_dtype=torch.float32)
    adapter = architectures.motion_adapter()
    zero_motion_outputs(adapter)
    model = UNetMotionModel.from_unet2d(unet, adapter)
    latents, text = torch.randn(1, 4, 3, 16, 16), torch.randn(1, 24, 128)
    with torch.no_grad():
        video = model(latents, 500, text.repeat_interleave(3, dim=0)).sample[0].transpose(0, 1)
        frames = unet(latents[0].transpose(0, 1), 500, text.expand(3, -1, -1)).sample
    torch.testing.assert_close(video, frames, atol=1e-5, rtol=0)
    fresh = UNetMotionModel.from_unet2d(unet, architectures.motion_adapter())  # not zeroed: not the identity
    with torch.no_grad():
        moved = fresh(latents, 500, text.repeat_interleave(3, dim=0)).sample[0].transpose(0, 1)
    assert (moved - frames).abs().max() > 1e-3


def test_reversed_clips_swap_their_motions() -> None:
    assert reversed_caption("a red circle moving to the right") == "a red circle moving to the left"
    assert (
        reversed_caption("a blue square moving up and a green star standing still on a black background")
        == "a blue square moving down and a green star standing still on a black background"
    )
    for seed in range(20):
        caption = sample_clip(seed).caption
        assert reversed_caption(reversed_caption(caption)) == caption


def test_clip_batches_reverse_latents_with_their_captions() -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(assets.path(), subfolder="vae", torch_dtype=torch.float32)
    data = encode_clips(vae, 3, 0, 4, architectures.MOTION_WORLD, torch.device("cpu"), clips_per_batch=2)
    assert data["latents"].shape == (3, 4, 4, 16, 16)
    assert data["captions"] == [
        sample_clip(i, 4, config=architectures.MOTION_WORLD).caption for i in range(3)
    ]
    ids = torch.arange(3)[:, None].repeat(1, 5)
    batches = _ClipBatches(data["latents"], ids, ids + 100, torch.full((5,), -1), seed=0)
    for step in range(8):
        rng_ids, noisy, t, noise = batches(step, 4)
        assert noisy.shape == (4, 4, 4, 16, 16)
        for row in range(4):
            if rng_ids[row, 0] < 0:
                continue  # caption dropped
            clip = int(rng_ids[row, 0]) % 100
            clean = data["latents"][clip] if rng_ids[row, 0] < 100 else data["latents"][clip].flip(1)
            expected = batches.noise_scheduler.add_noise(clean[None], noise[row : row + 1], t[row : row + 1])
            torch.testing.assert_close(noisy[row : row + 1], expected)
    assert parse_motion_caption(data["captions"][0])
