"""The model card (README.md) that save_weights writes: front matter the Hub reads, and the body."""

from __future__ import annotations

import pytest
import tiny_models
from huggingface_hub import ModelCard

import lindiff
from lindiff.model_card import base_model_of, render_model_card

TRAINING = {
    "steps": 1200,
    "data": "tiny-shapes | 512 captions",
    "resolutions": [128, 256],
    "losses": {"diffusion": 0.0123456789, "output": 0.5},
    "config": {"lr": 1e-4, "trainable": "new", "schedule": {"name": "cosine", "warmup": 100}},
}


def test_save_weights_writes_a_card_the_hub_reads(tmp_path):
    pipe = lindiff.linearize(tiny_models.sd_controlnet_pipeline(), mid_dim=8)
    lindiff.save_weights(pipe, tmp_path)
    text = (tmp_path / "README.md").read_text()

    data = ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    assert data == {"library_name": "lindiff", "tags": ["lindiff", "linfusion", "diffusers"]}  # no base model
    assert 'lindiff.linearize(pipe, "linfusion", weights="<this folder or its hub id>")' in text
    assert "| unet | UNet2DConditionModel | unet | 7 | 0 |" in text
    assert "| controlnet | ControlNetModel | unet | 3 | 0 |" in text
    assert "| mid_dim | 8 |" in text
    assert f"Saved with lindiff {lindiff.__version__}." in text
    assert "## Training" not in text


def test_training_summary_and_base_model(tmp_path):
    unet = lindiff.linearize(tiny_models.unet())
    unet.register_to_config(_name_or_path="someone/tiny-sd")
    lindiff.save_weights(unet, tmp_path, training=TRAINING)
    text = (tmp_path / "README.md").read_text()

    card = ModelCard(text, ignore_metadata_errors=False)
    assert card.data.base_model == "someone/tiny-sd"
    assert 'DiffusionPipeline.from_pretrained("someone/tiny-sd")' in text
    assert "| steps | 1200 |" in text
    assert "| data | tiny-shapes \\| 512 captions |" in text
    assert "| resolutions | 128, 256 |" in text
    assert "### losses\n\n|  | value |\n|---|---|\n| diffusion | 0.0123457 |\n| output | 0.5 |" in text
    assert '| schedule | `{"name": "cosine", "warmup": 100}` |' in text

    with pytest.raises(TypeError, match=r"training must be a dict .* got list"):
        lindiff.save_weights(unet, tmp_path / "bad", training=[("steps", 3)])
    assert not (tmp_path / "bad").exists()


def test_base_model_is_a_hub_id_or_nothing(tmp_path):
    unet = lindiff.linearize(tiny_models.unet())
    cached = "/cache/huggingface/hub/models--owner--sd-model/snapshots/0123abc/unet"
    for name_or_path, expected in [
        (cached, "owner/sd-model"),
        ("owner/sd-model", "owner/sd-model"),
        (str(tmp_path), None),  # a local folder
        ("not a repo id!", None),
        ("", None),
    ]:
        unet.register_to_config(_name_or_path=name_or_path)
        assert base_model_of(unet) == expected, name_or_path

    pipe = tiny_models.sd_pipeline()
    pipe.register_to_config(_name_or_path="someone/pipeline")
    pipe.unet.register_to_config(_name_or_path=cached)
    assert base_model_of(pipe) == "someone/pipeline"  # the pipeline's own id comes first


def test_render_without_options_or_base_model():
    config = {
        "method": "sana",
        "options": {},
        "lindiff_version": "9.9",
        "components": {"transformer": {"family": "pixart", "class": "PixArtTransformer2DModel", "layers": 2}},
    }
    text = render_model_card(config)
    assert ModelCard(text).data.tags == ["lindiff", "sana", "diffusers"]
    assert "The method has no options." in text
    assert "| transformer | PixArtTransformer2DModel | pixart | 2 | 0 |" in text
