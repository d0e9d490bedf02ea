"""PNG generation parameters: round trip, atomic writes, weights hashes and bad files."""

import json

import pytest
from PIL import Image, PngImagePlugin

import lindiff
from lindiff.pipelines.metadata import format_params, generation_params, read_params, save_png, weights_sha256


def params(**overrides):
    values = dict(
        prompt="a red star above a blue circle",
        negative_prompt="blurry",
        seed=42,
        steps=2,
        guidance=3.5,
        width=32,
        height=24,
        model="some/model",
        method="linfusion",
        weights=None,
    )
    return generation_params(**{**values, **overrides})


def test_round_trip_keeps_every_parameter(tmp_path):
    image = Image.new("RGB", (32, 24), (200, 10, 10))
    recorded = params(prompt="ünïcode ☆ prompt", highres=True, stages=3)
    path = save_png(image, tmp_path / "a.png", recorded)
    assert read_params(path) == recorded
    assert recorded["lindiff_version"] == lindiff.__version__
    assert recorded["stages"] == 3
    with Image.open(path) as saved:
        assert saved.size == (32, 24)
        assert saved.getpixel((0, 0)) == (200, 10, 10)
        text = saved.text["parameters"]
    assert text.startswith("ünïcode ☆ prompt\nNegative prompt: blurry\n")
    assert "Seed: 42" in text and "Size: 32x24" in text and "High-res stages: 3" in text
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_stages_are_recorded_only_for_highres():
    assert params(stages="auto")["stages"] is None
    assert params(highres=True, stages="auto")["stages"] == "auto"
    assert params(method=None)["method"] == "softmax"


def test_failed_write_leaves_neither_temporary_nor_partial_file(tmp_path):
    class Broken:
        def save(self, f, **kwargs):
            f.write(b"\x89PNG half")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png(Broken(), tmp_path / "a.png", params())
    assert list(tmp_path.iterdir()) == []


def test_weights_hash_follows_the_file_contents(tmp_path):
    weights = tmp_path / "lindiff.safetensors"
    weights.write_bytes(b"one")
    first = weights_sha256(weights)
    assert len(first) == 12
    assert weights_sha256(tmp_path) != first  # a folder hashes its file names too
    weights.write_bytes(b"two!")
    assert weights_sha256(weights) != first
    assert params(weights=str(weights))["weights_sha256"] == weights_sha256(weights)
    assert weights_sha256(None) is None
    assert weights_sha256("owner/hub-id") is None


def test_format_params_names_the_embedded_model():
    assert "Model: embedded tiny-shapes" in format_params(params(model=None, method=None))


def test_read_params_rejects_files_without_metadata(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(ValueError, match="no lindiff metadata"):
        read_params(plain)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        read_params(text)
    broken = tmp_path / "broken.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("lindiff", json.dumps([1, 2]))
    Image.new("RGB", (4, 4)).save(broken, pnginfo=info)
    with pytest.raises(ValueError, match="not a JSON object"):
        read_params(broken)
    with pytest.raises(FileNotFoundError):
        read_params(tmp_path / "missing.png")
