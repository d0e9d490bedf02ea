"""The demo on a video pipeline (tiny Wan): a frames input and a video tab with the teacher and the
linear student side by side, driven in-process through ``gradio_client``."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import gradio_client
import imageio.v3 as iio
import pytest
import tiny_dit_models

from lindiff.app import launch
from lindiff.app.models import SOFTMAX, DemoModel, Request
from lindiff.pipelines.metadata import read_params

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

SIZE = 32
FRAMES = 5


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    folder = tmp_path_factory.mktemp("wan")
    tiny_dit_models.wan_pipeline().save_pretrained(folder)
    return DemoModel(str(folder), device="cpu", output_dir=tmp_path_factory.mktemp("demo-video"))


@pytest.fixture(scope="module")
def client(model: DemoModel) -> Iterator[gradio_client.Client]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(model, port=port, prevent_thread_lock=True)
    yield gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def inputs(**changes: object) -> list[object]:
    """The generate/compare endpoint's inputs: the image app's, then the frames."""
    values = {
        "prompt": "a red star",
        "negative_prompt": "",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "guidance": 2.0,
        "seed": 3,
        "method": "linfusion",
        "highres": False,
        "use_control": False,
        "condition": None,
        "control_scale": 1.0,
        "lora": "none",
        "lora_scale": 1.0,
        "frames": FRAMES,
    }
    values.update(changes)
    return list(values.values())


def video_of(update: dict, method: str) -> Path:
    """The MP4 of a video component's update, after checking its label names ``method`` and a time."""
    assert update["label"].startswith(method) and update["label"].endswith(" s")
    return Path(update["value"])


def test_compare_shows_teacher_and_student_videos_with_the_same_seed_and_frames(
    client: gradio_client.Client,
) -> None:
    status, _image, _slider, _diff, stats, files, _plot, _estimate, teacher, student = client.predict(
        *inputs(), api_name="/compare"
    )
    assert status.startswith("Teacher") and "speed-up" in status
    assert [row[:3] for row in stats["data"]] == [
        [SOFTMAX, f"{SIZE}x{SIZE}x{FRAMES}", 2],
        ["linfusion", f"{SIZE}x{SIZE}x{FRAMES}", 2],
    ]
    for update, method in ((teacher, SOFTMAX), (student, "linfusion")):
        assert iio.imread(video_of(update, method), plugin="FFMPEG").shape == (FRAMES, SIZE, SIZE, 3)
    mp4s = [Path(f) for f in files if f.endswith(".mp4")]
    params = [read_params(path) for path in mp4s]
    assert [p["method"] for p in params] == [SOFTMAX, "linfusion"]
    assert {(p["seed"], p["frames"], p["fps"]) for p in params} == {(3, FRAMES, 16.0)}
    assert len(files) == 4  # an MP4 and its poster PNG each


def test_generate_fills_its_side_and_bad_frames_are_refused(
    client: gradio_client.Client, model: DemoModel
) -> None:
    *_, teacher, _student = client.predict(*inputs(method=SOFTMAX, seed=5), api_name="/generate")
    assert read_params(video_of(teacher, SOFTMAX))["seed"] == 5
    with pytest.raises(Exception, match="4k \\+ 1 frames"):
        client.predict(*inputs(frames=4), api_name="/generate")
    with pytest.raises(ValueError, match="give the number of frames"):
        model.check(Request("x", SIZE, SIZE, steps=1, guidance=1.0, seed=0, method=SOFTMAX))
