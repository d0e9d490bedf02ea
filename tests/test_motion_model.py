"""The embedded video model: the shipped motion adapter on tiny-shapes, its student, render and demo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline

import lindiff
from lindiff import assets
from lindiff.cli import main
from lindiff.data import MotionConfig
from lindiff.pipelines.loading import load_pipeline
from lindiff.pipelines.metadata import read_params

PROMPT = "a red circle moving to the right"


@pytest.fixture(scope="module")
def video_pipe() -> AnimateDiffPipeline:
    pipe = assets.motion_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_motion_asset_loads_offline_and_knows_its_world(video_pipe: AnimateDiffPipeline) -> None:
    assert isinstance(video_pipe, AnimateDiffPipeline)
    assert isinstance(assets.world(assets.MOTION_MODEL), MotionConfig)
    ids = video_pipe.tokenizer(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split()) + 2  # every caption word is one token
    image = lindiff.assets.path()
    size = sum(f.stat().st_size for f in Path(assets.path(assets.MOTION_MODEL)).rglob("*") if f.is_file())
    assert size < 10 * 2**20 and Path(image).is_dir()


def test_the_image_students_weights_apply_unchanged(video_pipe: AnimateDiffPipeline) -> None:
    """The spatial layers are the image model's: its LinFusion file loads, and frames render with it."""
    generator = torch.Generator().manual_seed(0)
    options = dict(num_frames=4, num_inference_steps=2, output_type="np")
    teacher = video_pipe(PROMPT, generator=generator, **options).frames
    lindiff.linearize(video_pipe, weights=assets.path("tiny-shapes-linfusion"))
    try:
        student = video_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **options).frames
    finally:
        lindiff.restore(video_pipe)
    assert student.shape == teacher.shape == (1, 4, 128, 128, 3)
    assert np.isfinite(student).all() and not np.array_equal(student, teacher)
    again = video_pipe(PROMPT, generator=torch.Generator().manual_seed(0), **options).frames
    assert np.array_equal(again, teacher)


def test_load_pipeline_video_is_the_embedded_motion_model() -> None:
    pipe = load_pipeline(video=True, device="cpu")
    assert isinstance(pipe, AnimateDiffPipeline)
    assert type(pipe.unet).__name__ == "UNetMotionModel"


def test_render_frames_without_a_model_uses_the_motion_model(tmp_path: Path) -> None:
    args = ["render", "--prompt", PROMPT, "--frames", "4", "--steps", "2", "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (mp4,) = tmp_path.glob("*.mp4")
    assert iio.imread(mp4, plugin="FFMPEG").shape == (4, 128, 128, 3)
    params = read_params(mp4.with_suffix(".png"))
    assert params["frames"] == 4 and params["model"] is None and params["method"] == "linfusion"
    again = tmp_path / "again"
    assert (
        main(["render", "--reproduce", str(mp4), "--device", "cpu", "--no-progress", "--out", str(again)])
        == 0
    )
    (copy,) = again.glob("*.mp4")
    assert np.array_equal(iio.imread(copy, plugin="FFMPEG"), iio.imread(mp4, plugin="FFMPEG"))


def test_the_demo_offers_the_video_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lindiff.app import create_model

    model = create_model(video=True, device="cpu", output_dir=str(tmp_path), calibrate=False)
    assert model.frames is not None and isinstance(model.pipe, AnimateDiffPipeline)
    assert main(["demo", "--video", "--model", "x"]) == 2
    assert "--video selects the embedded video model" in capsys.readouterr().err


def test_video_quality_bench_scores_teacher_and_student(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/video_quality.py end to end on one caption (3 frames, 1x and through the 2x chain), then resumed."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("video_quality_bench", bench / "video_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "video.json"
    argv = [
        "--prompts",
        "1",
        "--frames",
        "3",
        "--highres-prompts",
        "1",
        "--highres-frames",
        "3",
        "--steps",
        "3",
    ]
    assert module.main([*argv, "--strip", "1", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"3f/1x", "3f/2x"}
    for setting in result["results"].values():
        assert setting["complete"] and setting["teacher"]["clips"] == setting["student"]["clips"] == 1
        assert 0.0 <= setting["student"]["direction_accuracy"] <= 1.0
    records = out.with_suffix(".jsonl").read_text().splitlines()
    assert len(records) == 4 and out.with_suffix(".png").is_file()
    assert module.main([*argv, "--report", "--device", "cpu", "--out", str(out)]) == 0
    assert out.with_suffix(".jsonl").read_text().splitlines() == records
