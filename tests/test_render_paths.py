"""One render path: the demo and ``lindiff render`` render a request the same way, so a demo PNG
reproduces with ``lindiff render --reproduce``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

import lindiff
from lindiff.app.models import DemoModel, Request
from lindiff.cli import main
from lindiff.pipelines.request import ImageRenderer, ImageRequest

SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("render-paths")
    tiny_models.sd_pipeline().save_pretrained(root / "pipeline")
    lindiff.save_weights(lindiff.linearize(tiny_models.sd_pipeline()), root / "student")
    return {"pipeline": root / "pipeline", "student": root / "student", "root": root}


@pytest.mark.parametrize("highres", [False, True])
def test_a_demo_png_reproduces_with_render_reproduce(folders, tmp_path, highres):
    demo = DemoModel(
        str(folders["pipeline"]), weights=str(folders["student"]), device="cpu", output_dir=tmp_path / "demo"
    )
    request = Request(
        "a red circle",
        width=SIZE,
        height=2 * SIZE,
        steps=4,
        guidance=5.0,
        seed=17,
        method="linfusion",
        negative_prompt="blurry",
        highres=highres,
    )
    made = demo.run(request, owner="test").path
    again = tmp_path / "again"
    argv = ["render", "--reproduce", str(made), "--out", str(again), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    original = np.asarray(Image.open(made))
    reproduced = np.asarray(Image.open(again / made.name))
    assert np.array_equal(original, reproduced)


class _Recorder:
    """Stands in for a pipeline: records the arguments of its calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return type("Output", (), {"images": [Image.new("RGB", (8, 8))]})()


def test_noise_comes_from_a_cpu_generator_whatever_the_device():
    pipe = _Recorder()
    ImageRenderer(pipe)(ImageRequest("x", width=8, height=8, steps=2, guidance=1.0, seed=5))
    generator = pipe.calls[0]["generator"]
    assert generator.device == torch.device("cpu")
    assert generator.initial_seed() == 5


def test_a_unet_renders_any_multiple_of_8_px(tmp_path):
    """The embedded model's UNet has three levels and an 8x VAE: 136 px is a 17x17 latent, which
    its levels halve to 9x9 and 5x5. ``check_size`` (render and the demo) accepts it, and the
    high-resolution chain (136 px is above the native 128) renders it with the LinFusion student."""
    argv = ["render", "--prompt", "a red circle", "--size", "136", "--steps", "4", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    (png,) = tmp_path.glob("*.png")
    image = np.asarray(Image.open(png))
    assert image.shape == (136, 136, 3) and image.std() > 0
