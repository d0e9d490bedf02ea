"""The embedded tiny-shapes assets: tokenizer, build code path, and the shipped files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from transformers import CLIPTokenizer

import lindiff
from lindiff import assets
from lindiff.assets.architectures import BETAS, HEAD_DIM, TRAINING_WORLD
from lindiff.assets.autoencoder import _add_latent_noise
from lindiff.assets.build import Build, BuildPlan
from lindiff.assets.build import main as build_main
from lindiff.assets.denoiser import _Batches, min_snr_weights
from lindiff.assets.loop import train
from lindiff.assets.tokenizer import word_merges, write_tokenizer
from lindiff.data import VOCABULARY, condition_image, label_map, make_example, render, to_tensor
from lindiff.data.styles import stripes
from lindiff.evaluation import EVAL_SEEDS, ShapeClassifier, detect_objects, prompt_scores

SHIPPED_LIMIT_BYTES = 25 * 1024 * 1024


def test_tokenizer_keeps_every_word_whole(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    for word in VOCABULARY:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))
    tokens = tokenizer.tokenize("two blue stars to the left of a red circle")
    assert tokens == [
        w + "</w>" for w in ["two", "blue", "stars", "to", "the", "left", "of", "a", "red", "circle"]
    ]
    assert tokenizer.tokenize("a purple dragon")[:2] == ["a</w>", "purple</w>"]
    ids = tokenizer("a purple dragon!").input_ids  # unknown words become pieces, never <unk>
    assert ids.count(tokenizer.unk_token_id) == 1 and ids[-1] == tokenizer.eos_token_id


def test_word_merges_later_words_do_not_change_earlier_ones() -> None:
    first = word_merges(["red", "green"])
    both = word_merges(["red", "green", "reddish", "greener"])
    assert both[: len(first)] == first


def test_stripes_change_only_objects() -> None:
    scene = make_example(3).scene
    from lindiff.data import render

    image = np.asarray(render(scene))
    labels = label_map(scene)
    striped = stripes(image, labels)
    assert np.array_equal(striped[labels == 0], image[labels == 0])
    changed = (striped != image).any(axis=-1)
    assert 0.3 < changed[labels > 0].mean() < 0.7
    with pytest.raises(ValueError, match="image must be"):
        stripes(image[:10], labels)


def test_latent_noise_is_relative_to_the_latents_scale() -> None:
    """Scaling the latents scales the noise with them: the encoder cannot outgrow it."""
    latents = torch.randn(64, 4, 8, 8)
    torch.manual_seed(0)
    small = _add_latent_noise(latents, 0.5) - latents
    torch.manual_seed(0)
    large = _add_latent_noise(100 * latents, 0.5) - 100 * latents
    torch.testing.assert_close(large, 100 * small, rtol=1e-4, atol=1e-4)
    assert 0.1 < small.std() < 0.5
    assert torch.equal(_add_latent_noise(latents, 0.0), latents)


def _learning_rates(work_dir: Path, steps: int, interrupt_at: int | None = None) -> dict[int, float]:
    """The learning rate each step of a ``train`` run sees, and its checkpoint; SIGINT at step ``interrupt_at``."""
    module = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    seen = {}

    def step(i: int) -> torch.Tensor:
        seen[i] = optimizer.param_groups[0]["lr"]
        if i == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return module(torch.ones(1, 2)).square().sum()

    with contextlib.suppress(KeyboardInterrupt):
        train("test", work_dir, module, optimizer, step, steps, warmup=8, cooldown=5, checkpoint_every=100)
    return seen


def test_training_schedule_survives_resume_and_the_last_step_is_saved(tmp_path: Path) -> None:
    whole = _learning_rates(tmp_path / "whole", 20)
    warm_up = [0.0125 * (i + 1) for i in range(8)]
    cool_down = [0.1 * k / 6 for k in range(5, 0, -1)]
    assert [whole[i] for i in range(20)] == pytest.approx(warm_up + [0.1] * 7 + cool_down)
    assert torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["step"] == 20
    first = _learning_rates(tmp_path / "resumed", 20, interrupt_at=4)  # during the warm-up
    assert sorted(first) == list(range(5))
    second = _learning_rates(tmp_path / "resumed", 20)
    assert sorted(second) == list(range(5, 20))
    assert {**first, **second} == pytest.approx(whole)
    with pytest.raises(ValueError, match="cooldown <= steps"):
        _learning_rates(tmp_path / "short", 4)


def test_training_batches_depend_only_on_the_step() -> None:
    """A resumed stage draws the batches an uninterrupted one would have: no replay from step 0."""
    latents, ids = torch.randn(50, 4, 2, 2), torch.arange(1, 51).unsqueeze(1).repeat(1, 3)
    empty = torch.zeros(3, dtype=torch.long)
    first = _Batches(latents, ids, empty, seed=3, drop=0.5)
    again = _Batches(latents, ids, empty, seed=3, drop=0.5)
    for step in (0, 7):
        for a, b in zip(first(step, 6), again(step, 6), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not torch.equal(first(7, 6)[4], first(8, 6)[4])
    dropped = []
    for step in range(40):
        index, batch_ids, *_ = first(step, 6)
        kept = batch_ids[:, 0] != 0
        assert torch.equal(batch_ids[kept, 0], torch.from_numpy(index + 1)[kept])
        dropped.append(1 - kept.float().mean().item())
    assert 0.35 < np.mean(dropped) < 0.65


def test_training_batches_draw_examples_in_proportion_to_their_weights() -> None:
    latents, ids = torch.randn(4, 4, 2, 2), torch.zeros(4, 3, dtype=torch.long)
    batches = _Batches(latents, ids, ids[0], seed=0, drop=0.0, weights=np.array([0.0, 1.0, 3.0, 0.0]))
    drawn = np.concatenate([batches(step, 50)[0] for step in range(40)])
    assert set(drawn) == {1, 2}
    assert 0.7 < np.mean(drawn == 2) < 0.8
    for bad in (np.ones(3), np.array([1.0, -1.0, 1.0, 1.0]), np.zeros(4)):
        with pytest.raises(ValueError, match="weights must be 4 non-negative numbers"):
            _Batches(latents, ids, ids[0], seed=0, drop=0.0, weights=bad)


def test_build_weights_scenes_by_their_object_count(tmp_path: Path) -> None:
    plan = dataclasses.replace(BuildPlan.smoke(), unet_object_weights=(1.0, 3.0))
    build = Build(tmp_path, tmp_path / "work", plan, seed=0, device=torch.device("cpu"))
    counts = build.corpus.object_counts()
    truth = [make_example(i, 128, TRAINING_WORLD).spec.num_objects for i in range(len(build.corpus))]
    assert counts.tolist() == truth and set(truth) == {1, 2}
    assert np.array_equal(build.object_weights(), np.where(counts == 2, 3.0, 1.0))
    build.plan = dataclasses.replace(plan, unet_object_weights=(1.0,))
    with pytest.raises(ValueError, match="unet_object_weights has 1 entries"):
        build.object_weights()


def test_min_snr_weights_damp_only_the_low_noise_steps() -> None:
    noise_scheduler = DDPMScheduler(**BETAS)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = min_snr_weights(noise_scheduler, gamma=5.0)
    assert weights.shape == (1000,)
    noisy = snr <= 5.0
    assert 0 < noisy.sum() < 1000
    assert torch.equal(weights[noisy], torch.ones(int(noisy.sum())))
    assert weights[~noisy] == pytest.approx(5.0 / snr[~noisy])
    assert torch.all(weights[1:] >= weights[:-1])  # less noise, less weight
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        min_snr_weights(noise_scheduler, gamma=0.0)


def test_asset_path_errors() -> None:
    with pytest.raises(ValueError, match="name must be one of"):
        assets.path("not-an-asset")


@pytest.mark.slow
def test_build_smoke_writes_loadable_assets(tmp_path: Path) -> None:
    """Every stage of the build runs (tiny sizes) and its outputs load the standard diffusers way."""
    out = tmp_path / "assets"
    assert build_main(["--out", str(out), "--smoke", "--device", "cpu"]) == 0
    summary = json.loads((out / "tiny-shapes" / "build.json").read_text())
    assert set(summary["stage_seconds"]) == {
        "vae",
        "latents",
        "decoder",
        "text-to-image",
        "classifier",
        "student",
        "controlnet",
        "lora",
    }
    for name in ("vae", "unet"):  # no trace of the build's work folder in what ships
        assert "_name_or_path" not in json.loads((out / "tiny-shapes" / name / "config.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(out / "tiny-shapes")
    lindiff.linearize(pipe, weights=str(out / "tiny-shapes-linfusion"))
    pipe.load_lora_weights(str(out / "tiny-shapes-lora-stripes"))
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 128, 128, 3)
    # Running again is a no-op: every stage is recorded as done.
    assert build_main(["--out", str(out), "--smoke", "--device", "cpu"]) == 0


def _generate(pipe, prompt: str, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=4, generator=generator, output_type="pt", **kwargs)
    return out.images


def test_shipped_assets_fit_the_budget() -> None:
    files = [p for name in assets.ASSETS for p in Path(assets.path(name)).rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= SHIPPED_LIMIT_BYTES, f"shipped assets take {total / 2**20:.1f} MiB"
    assert all(p.suffix in {".json", ".txt", ".safetensors"} for p in files), files


def test_shipped_pipeline_student_lora_and_controlnet() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(assets.path("tiny-shapes"))
    prompt = "a red star above a blue circle"
    teacher = _generate(pipe, prompt)
    assert teacher.shape == (1, 3, 128, 128)
    lindiff.linearize(pipe, weights=assets.path("tiny-shapes-linfusion"))
    student = _generate(pipe, prompt)
    assert not torch.equal(student, teacher)
    pipe.load_lora_weights(assets.path("tiny-shapes-lora-stripes"))
    assert not torch.equal(_generate(pipe, prompt), student)
    pipe.unload_lora_weights()
    controlnet = ControlNetModel.from_pretrained(assets.path("tiny-shapes-controlnet"))
    control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    scene = make_example(10_000_000).scene
    images = _generate(control, "a green square", image=condition_image(scene, "mask"))
    assert images.shape == (1, 3, 128, 128)


def test_shipped_unet_attention_heads_are_head_dim_wide() -> None:
    """diffusers reads UNet2DConditionModel's ``attention_head_dim`` as a head count; the build must not slip."""
    unet = UNet2DConditionModel.from_pretrained(assets.path("tiny-shapes"), subfolder="unet")
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert layers
    assert {layer.inner_dim // layer.heads for layer in layers} == {HEAD_DIM}


def test_shipped_classifier_reads_real_renders() -> None:
    """The benchmark's classifier finds exactly the captioned objects in clean renders of held-out scenes."""
    classifier = ShapeClassifier.from_pretrained(assets.path("tiny-shapes-classifier")).eval()
    examples = [make_example(EVAL_SEEDS + i, 128, TRAINING_WORLD) for i in range(32)]
    renders = torch.stack([to_tensor(render(example.scene)) for example in examples])
    scores = prompt_scores([example.spec for example in examples], detect_objects(classifier, renders))
    assert scores["prompt_accuracy"] >= 0.9, scores


def test_shipped_tokenizer_has_its_vocab_files() -> None:
    """vocab.json and merges.txt ship beside tokenizer.json: transformers 4.x builds CLIPTokenizer from them."""
    folder = Path(assets.path("tiny-shapes")) / "tokenizer"
    from_files = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    shipped = CLIPTokenizer.from_pretrained(folder)
    text = "two blue stars to the left of a red circle"
    assert from_files(text).input_ids == shipped(text).input_ids
