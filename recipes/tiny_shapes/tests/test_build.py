"""The build: its plan, a smoke run of every stage, and the shipped assets agreeing with the recipe."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextModel, CLIPTokenizer

import lindiff
from lindiff import assets
from lindiff.data import make_example
from recipes.tiny_shapes.architectures import HEAD_DIM, MOTION_WORLD, TRAINING_WORLD
from recipes.tiny_shapes.build import STAGES, Build, BuildPlan
from recipes.tiny_shapes.build import main as build_main


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


@pytest.mark.slow
def test_build_smoke_writes_loadable_assets(tmp_path: Path) -> None:
    """Every stage of the build runs (tiny sizes) and its outputs load the standard diffusers way."""
    out = tmp_path / "assets"
    assert build_main(["--out", str(out), "--smoke", "--device", "cpu"]) == 0
    summary = json.loads((out / "tiny-shapes" / "build.json").read_text())
    assert set(summary["stage_seconds"]) == set(STAGES)
    for name in ("vae", "unet"):  # no trace of the build's work folder in what ships
        assert "_name_or_path" not in json.loads((out / "tiny-shapes" / name / "config.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(out / "tiny-shapes")
    lindiff.linearize(pipe, weights=str(out / "tiny-shapes-linfusion"))
    pipe.load_lora_weights(str(out / "tiny-shapes-lora-stripes"))
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 128, 128, 3)
    motion = out / "tiny-shapes-motion"
    video = AnimateDiffPipeline.from_pretrained(
        out / "tiny-shapes",
        motion_adapter=MotionAdapter.from_pretrained(motion / "motion_adapter"),
        text_encoder=CLIPTextModel.from_pretrained(motion / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(motion / "tokenizer"),
    )
    frames = video("a red circle moving up", num_frames=4, num_inference_steps=2, output_type="np").frames
    assert frames.shape == (1, 4, 128, 128, 3) and np.isfinite(frames).all()
    # Running again is a no-op: every stage is recorded as done.
    assert build_main(["--out", str(out), "--smoke", "--device", "cpu"]) == 0


def test_shipped_world_is_the_recipes_training_world() -> None:
    """What the benchmarks read from the shipped world.json is the world the recipe trains on."""
    assert assets.world() == TRAINING_WORLD
    summary = json.loads((Path(assets.path()) / "build.json").read_text())
    assert summary["world"] == json.loads((Path(assets.path()) / assets.WORLD_FILE).read_text())
    assert set(summary["stage_seconds"]) == set(STAGES)
    assert assets.world(assets.MOTION_MODEL) == MOTION_WORLD


def test_shipped_unet_attention_heads_are_head_dim_wide() -> None:
    """diffusers reads UNet2DConditionModel's ``attention_head_dim`` as a head count; the build must not slip."""
    unet = UNet2DConditionModel.from_pretrained(assets.path("tiny-shapes"), subfolder="unet")
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    assert layers
    assert {layer.inner_dim // layer.heads for layer in layers} == {HEAD_DIM}
