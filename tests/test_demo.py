"""The Gradio demo, launched in-process on a tiny pipeline and driven through ``gradio_client``."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import gradio_client
import numpy as np
import pytest
import tiny_models
import torch
from gradio_client.utils import Status
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

import lindiff
from lindiff import assets, cli
from lindiff.app import create_model, launch
from lindiff.app.models import SOFTMAX, Cancelled, DemoModel, Progress, Request
from lindiff.app.ui import DIFF_MIN_SIDE, condition_image
from lindiff.pipelines.metadata import read_params
from lindiff.state import PROJECTIONS

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

SIZE = 32
LONG_RUN_STEPS = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs(**changes: object) -> list[object]:
    """The generate/compare endpoint's inputs, in the order of ``build_app``'s ``inputs``."""
    values = {
        "prompt": "a red circle above a blue square",
        "negative_prompt": "",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "guidance": 7.5,
        "seed": 3,
        "method": "linfusion",
        "highres": False,
        "use_control": False,
        "condition": None,
        "control_scale": 1.0,
        "lora": "none",
        "lora_scale": 1.0,
    }
    values.update(changes)
    return list(values.values())


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def step_of(job: gradio_client.client.Job) -> int:
    """The last denoising step that ``job`` reported (0 before its first)."""
    progress = job.status().progress_data
    return (progress[-1].index or 0) if progress else 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD pipeline, a LinFusion student of it, a ControlNet and a LoRA, saved as folders."""
    root = tmp_path_factory.mktemp("demo-models")
    pipe = tiny_models.sd_pipeline()
    pipe.save_pretrained(root / "pipeline")
    tiny_models.controlnet(pipe.unet).save_pretrained(root / "controlnet")
    lindiff.save_weights(lindiff.linearize(tiny_models.sd_pipeline()), root / "student")
    torch.manual_seed(7)
    unet = tiny_models.unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(PROJECTIONS)))
    pipe.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    return {name: root / name for name in ("pipeline", "controlnet", "student", "lora")}


@pytest.fixture(scope="module")
def model(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    return create_model(
        str(folders["pipeline"]),
        weights=str(folders["student"]),
        device="cpu",
        controlnet=str(folders["controlnet"]),
        loras={"style": str(folders["lora"])},
        output_dir=str(tmp_path_factory.mktemp("demo-out")),
    )


@pytest.fixture(scope="module")
def url(model: DemoModel) -> Iterator[str]:
    port = free_port()
    demo = launch(model, port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def client(url: str) -> gradio_client.Client:
    """A client with its own session."""
    return gradio_client.Client(url, verbose=False)


def test_generate_returns_a_png_with_its_parameters(client: gradio_client.Client) -> None:
    status, image, *_, stats, files, _plot, estimate = client.predict(*inputs(seed=11), api_name="/generate")
    assert status.startswith("Done")
    params = read_params(files[0])
    assert (params["seed"], params["width"], params["method"], params["steps"]) == (11, SIZE, "linfusion", 2)
    assert params["weights_sha256"] is not None
    assert Image.open(image).size == (SIZE, SIZE)
    (row,) = stats["data"]
    assert row[:3] == ["linfusion", f"{SIZE}x{SIZE}", 2]
    assert "Estimate" in estimate


def test_compare_renders_teacher_and_student_with_the_same_seed(client: gradio_client.Client) -> None:
    status, _image, (teacher, student), diff, stats, files, plot, _estimate = client.predict(
        *inputs(), api_name="/compare"
    )
    assert status.startswith("Teacher") and "speed-up" in status
    assert [read_params(f)["method"] for f in files] == [SOFTMAX, "linfusion"]
    assert {read_params(f)["seed"] for f in files} == {3}
    assert [row[0] for row in stats["data"]] == [SOFTMAX, "linfusion"]
    assert Image.open(teacher).size == Image.open(student).size == (SIZE, SIZE)
    assert Image.open(diff).size == (DIFF_MIN_SIDE, DIFF_MIN_SIDE)  # enlarged to be visible
    assert {SOFTMAX, "linfusion"} <= {row[0] for row in plot["data"]}


def test_compare_needs_a_linear_method(client: gradio_client.Client) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match="linear attention method"):
        client.predict(*inputs(method=SOFTMAX), api_name="/compare")


def test_cancel_stops_the_run_between_steps(client: gradio_client.Client, model: DemoModel) -> None:
    runs = len(model.records)
    job = client.submit(*inputs(steps=LONG_RUN_STEPS, method=SOFTMAX), api_name="/generate")
    wait_for(lambda: job.status().progress_data or job.done(), "the run reports progress", timeout_s=30)
    assert client.predict(api_name="/cancel").startswith("Cancelling")
    status = job.result(timeout=30)[0]
    assert status.startswith("**Cancelled**"), status
    executed = int(status.split("after step ")[1].split()[0])
    assert 1 <= executed < LONG_RUN_STEPS
    assert len(model.records) == runs  # a cancelled run is not measured
    assert client.predict(*inputs(), api_name="/generate")[0].startswith("Done")  # the model is free again


def test_cancel_only_stops_the_callers_own_run(
    client: gradio_client.Client, url: str, model: DemoModel
) -> None:
    other = gradio_client.Client(url, verbose=False)  # a second user, with a session of its own
    runs = len(model.records)
    # Twice the size, so the long run lasts seconds even on a fast machine; the short one queues behind it.
    long_run = client.submit(
        *inputs(steps=LONG_RUN_STEPS, method=SOFTMAX, width=2 * SIZE, height=2 * SIZE), api_name="/generate"
    )
    wait_for(lambda: step_of(long_run) > 0, "the long run reports progress")
    short_run = other.submit(*inputs(), api_name="/generate")
    wait_for(lambda: short_run.status().code == Status.IN_QUEUE, "the short run waits in the queue")
    assert other.predict(api_name="/cancel") == "Nothing of yours is running."
    step = step_of(long_run)
    wait_for(lambda: step_of(long_run) > step, "the long run goes on after the other user's cancel")
    assert not short_run.done()
    assert client.predict(api_name="/cancel").startswith("Cancelling")
    status = long_run.result(timeout=120)[0]
    assert status.startswith("**Cancelled**"), status
    assert short_run.result(timeout=120)[0].startswith("Done")
    assert len(model.records) == runs + 1  # the short run only; a cancelled run is not measured


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": SIZE + 2}, "width=34 is not a positive multiple of"),
        ({"height": 100_000}, "height=100000 px is outside"),
        ({"steps": 0}, "Value 0 is less than minimum value 1"),
        ({"prompt": "x" * 501}, "prompt has 501 characters"),
        ({"prompt": "  "}, "prompt is empty"),
        ({"use_control": True}, "no condition image"),
    ],
)
def test_invalid_input_shows_a_clear_error(client: gradio_client.Client, changes: dict, message: str) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(*inputs(**changes), api_name="/generate")


def test_teacher_is_exact_after_switching_methods(model: DemoModel, folders: dict[str, Path]) -> None:
    request = Request("a blue star", width=SIZE, height=SIZE, steps=2, guidance=5.0, seed=1, method=SOFTMAX)
    first = model.run(request, owner="test").image
    model.run(replace(request, method="lit"), owner="test")
    again = model.run(request, owner="test").image
    reference = tiny_models.sd_pipeline()(
        "a blue star",
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert np.array_equal(np.asarray(first), np.asarray(reference))


def test_controlnet_and_lora_change_the_image(model: DemoModel) -> None:
    mask = Image.new("RGB", (SIZE, SIZE))
    mask.paste((255, 255, 255), (8, 8, 24, 24))
    request = Request(
        "a red square", width=SIZE, height=SIZE, steps=2, guidance=5.0, seed=2, method="linfusion"
    )
    plain = np.asarray(model.run(request, owner="test").image, dtype=float)
    for variant in (replace(request, condition=mask), replace(request, lora="style", lora_scale=1.0)):
        assert np.abs(np.asarray(model.run(variant, owner="test").image, dtype=float) - plain).max() > 1
    assert np.array_equal(np.asarray(model.run(request, owner="test").image, dtype=float), plain)


def test_highres_chain_reports_every_stage(model: DemoModel) -> None:
    seen: list[Progress] = []
    request = Request("a circle", width=SIZE, height=SIZE, steps=5, guidance=5.0, seed=0, method="linfusion")
    result = model.run(replace(request, highres=True), owner="test", on_progress=seen.append)
    assert result.image.size == (SIZE, SIZE)
    assert seen[0].stages == seen[-1].stage > 1
    assert read_params(result.path)["highres"]


def test_cancel_stops_the_pipeline_mid_run(model: DemoModel) -> None:
    request = Request(
        "a shape", width=SIZE, height=SIZE, steps=LONG_RUN_STEPS, guidance=5.0, seed=0, method=SOFTMAX
    )
    seen: list[int] = []

    def cancel_at_third_step(progress) -> None:
        seen.append(progress.step)
        if progress.step == 3:
            assert model.cancel("me")

    with pytest.raises(Cancelled) as stop:
        model.run(request, owner="me", on_progress=cancel_at_third_step)
    assert stop.value.steps == 3 and seen == [1, 2, 3]
    assert not model.cancel("me")


def test_condition_image_is_the_white_drawing_on_black() -> None:
    drawing = Image.new("RGBA", (8, 8))
    drawing.paste((255, 255, 255, 255), (2, 2, 4, 4))
    image = condition_image({"background": None, "layers": [], "composite": drawing})
    assert image.mode == "RGB" and image.getbbox() == (2, 2, 4, 4)
    with pytest.raises(ValueError, match="all black"):
        condition_image({"composite": Image.new("RGB", (8, 8))})


def test_cli_demo_flags() -> None:
    args = cli.build_parser().parse_args(
        ["demo", "--model", "m", "--weights", "w", "--lora", "a=path/a", "--port", "8000", "--share"]
    )
    assert (args.model, args.weights, args.loras, args.port, args.share, args.host) == (
        "m",
        "w",
        [("a", "path/a")],
        8000,
        True,
        "127.0.0.1",
    )


def test_cli_demo_without_the_embedded_model_says_how_to_build_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(assets, "ROOT", tmp_path)
    assert cli.main(["demo"]) == 2
    assert "python -m recipes.tiny_shapes.build" in capsys.readouterr().err
