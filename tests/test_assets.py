"""The shipped tiny-shapes assets: where they are, the world they know, and that they load and work.

The code that trains them, and its tests, live in recipes/tiny_shapes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from transformers import CLIPTokenizer

import lindiff
from lindiff import assets
from lindiff.data import ShapesConfig, condition_image, make_example, render, to_tensor
from lindiff.evaluation import EVAL_SEEDS, ShapeClassifier, detect_objects, prompt_scores

SHIPPED_LIMIT_BYTES = 25 * 1024 * 1024


def test_asset_path_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name must be one of"):
        assets.path("not-an-asset")
    monkeypatch.setattr(assets, "ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="reinstall lindiff") as missing:
        assets.path("tiny-shapes")
    assert f"python -m recipes.tiny_shapes.build --out {tmp_path}" in str(missing.value)


def test_world_reads_the_shipped_world_json() -> None:
    world = assets.world()
    assert isinstance(world, ShapesConfig)
    shipped = json.loads((Path(assets.path()) / assets.WORLD_FILE).read_text())
    assert json.loads(json.dumps(dataclasses.asdict(world))) == shipped
    with pytest.raises(ValueError, match="model asset with a world"):
        assets.world("tiny-shapes-classifier")


def _generate(pipe, prompt: str, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=4, generator=generator, output_type="pt", **kwargs)
    return out.images


def test_shipped_assets_fit_the_budget() -> None:
    files = [p for name in assets.ASSETS for p in Path(assets.path(name)).rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total <= SHIPPED_LIMIT_BYTES, f"shipped assets take {total / 2**20:.1f} MiB"
    assert all(p.suffix in {".json", ".txt", ".safetensors", ".md"} for p in files), files


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


def test_shipped_classifier_reads_real_renders() -> None:
    """The benchmark's classifier finds exactly the captioned objects in clean renders of held-out scenes."""
    classifier = ShapeClassifier.from_pretrained(assets.path("tiny-shapes-classifier")).eval()
    examples = [make_example(EVAL_SEEDS + i, 128, assets.world()) for i in range(32)]
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
