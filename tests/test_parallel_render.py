"""Every image split over several processes: ``lindiff.parallel.enable_context_parallel`` and
``lindiff render --parallel-degree N`` (2 CPU processes on gloo, launched by torchrun)."""

import json
import os
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import tiny_dit_models
import tiny_models
import tiny_video_models
import torch
from accelerate import PartialState
from PIL import Image

import lindiff
import lindiff.pipelines.batch
import lindiff.pipelines.render
from lindiff.attention.linfusion import LinFusionModules
from lindiff.cli import main
from lindiff.parallel import context_parallel_degree, enable_context_parallel
from lindiff.pipelines.batch import Renderer, RenderItem, RenderOptions, render_batch
from lindiff.pipelines.manifest import MANIFEST_NAME

PROMPTS = ["a red circle above a blue square", "a green house"]


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory) -> str:
    """The tiny FLUX pipeline saved as a diffusers folder (16 px images: 4 x 4 image tokens)."""
    folder = tmp_path_factory.mktemp("flux")
    tiny_dit_models.flux_pipeline().save_pretrained(folder)
    return str(folder)


def render_args(model: str, out: Path, *extra: str) -> list[str]:
    common = ["--size", "16", "--steps", "2", "--no-progress", "--device", "cpu", "--out", str(out)]
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    return ["render", "--model", model, "--method", "linfusion", *common, *prompts, *extra]


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "lindiff.cli", *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_two_processes_render_each_image_together_as_one_process_does(flux_model, tmp_path):
    """Same seeds, same PNGs, byte for byte (observed: every pixel equal); one manifest, written by
    process 0, and a re-run renders only the images whose file is missing."""
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(render_args(flux_model, reference)) == 0
    done = torchrun(render_args(flux_model, out, "--parallel-degree", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("each image split over 2 processes:") == 1  # process 1 reports nothing
    assert "2 rendered, 0 already done" in done.stdout
    images, expected = pngs(out), pngs(reference)
    assert images.keys() == expected.keys() and len(images) == len(PROMPTS)
    for name in images:
        np.testing.assert_array_equal(images[name], expected[name], err_msg=name)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert (out / MANIFEST_NAME).read_text().count("\n") == len(PROMPTS)

    second = sorted(expected)[1]
    (out / second).unlink()
    again = torchrun(render_args(flux_model, out, "--parallel-degree", "2"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 rendered, 1 already done" in again.stdout
    np.testing.assert_array_equal(pngs(out)[second], expected[second])


class ThreadState:
    """A stand-in for accelerate's PartialState: ``num_processes`` threads meeting at a barrier."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, index: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self.barrier = index, barrier.parties, barrier
        self.is_main_process = index == 0

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=120)


def test_split_images_are_rendered_by_every_process_and_written_by_the_main_one(tmp_path, monkeypatch):
    """With the denoiser split over the processes, each renders every pending item (they compute
    together) and only process 0 saves PNGs and records them."""
    monkeypatch.setattr(lindiff.pipelines.batch, "context_parallel_degree", lambda pipe: 2)
    calls: dict[str, list[str]] = {"render": [], "save": []}
    save_png = lindiff.pipelines.batch.save_png

    def saving(image, path, params):
        calls["save"].append(threading.current_thread().name)
        return save_png(image, path, params)

    monkeypatch.setattr(lindiff.pipelines.batch, "save_png", saving)

    class CountingRenderer(Renderer):
        def __call__(self, item, progress=None):
            calls["render"].append(threading.current_thread().name)
            return super().__call__(item, progress)

    options = RenderOptions(model="tiny", method=None, steps=2)
    items = [RenderItem(i, prompt, "", i, 16, 16) for i, prompt in enumerate(PROMPTS)]
    renderers = [CountingRenderer(tiny_models.sd_pipeline(), options) for _ in range(2)]
    barrier = threading.Barrier(2)
    results = [None, None]

    def run(rank: int) -> None:
        results[rank] = render_batch(renderers[rank], items, tmp_path, ThreadState(rank, barrier), False)

    threads = [threading.Thread(target=run, args=(rank,), name=f"rank{rank}") for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(calls["render"]) == ["rank0", "rank0", "rank1", "rank1"]
    assert calls["save"] == ["rank0", "rank0"]
    assert [len(result.rendered) for result in results] == [2, 0]
    assert [result.split_over for result in results] == [2, 2]
    entries = [json.loads(line) for line in (tmp_path / MANIFEST_NAME).read_text().splitlines()]
    assert [entry["index"] for entry in entries] == [0, 1]
    assert not list(tmp_path.glob("manifest.rank*.jsonl"))


def test_parallel_degree_needs_that_many_processes(flux_model, tmp_path, capsys):
    assert main(render_args(flux_model, tmp_path / "out", "--parallel-degree", "2")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "but 1 was launched" in error and "torchrun --nproc-per-node 2" in error


def test_a_method_that_cannot_run_sharded_is_a_one_line_error(flux_model, tmp_path, monkeypatch, capsys):
    """Refused when parallelism is set up, before any image (no method lacks support today, so one
    is made to)."""
    monkeypatch.setattr(LinFusionModules, "context_parallel", False)
    two = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    monkeypatch.setattr(lindiff.pipelines.render, "_process_state", lambda device, degree: two)
    assert main(render_args(flux_model, tmp_path / "out", "--parallel-degree", "2")) == 2
    error = capsys.readouterr().err.strip()  # after diffusers' loading bars
    assert "Traceback" not in error
    assert error.splitlines()[-1].startswith(
        "lindiff render: error: method 'linfusion' cannot run under context parallelism"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (tiny_models.sd_pipeline, "UNets have no sequence plan in diffusers"),
        (tiny_video_models.cogvideox_pipeline, "has no context-parallel plan"),
        (tiny_dit_models.pixart_pipeline, "knows nothing of context parallelism"),
        (tiny_dit_models.flux_controlnet_pipeline, "ControlNets have no context-parallel plan"),
    ],
)
def test_models_without_a_sequence_plan_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        enable_context_parallel(make())


def test_enable_context_parallel_checks_its_arguments_and_the_launch(monkeypatch):
    pipe = tiny_dit_models.flux_pipeline()
    with pytest.raises(ValueError, match="mode must be one of ulysses, ring; got 'tree'"):
        enable_context_parallel(pipe, mode="tree")
    with pytest.raises(ValueError, match="degree must be an integer of at least 2"):
        enable_context_parallel(pipe, degree=1)
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="launch with `torchrun --nproc-per-node N"):
        enable_context_parallel(lindiff.linearize(pipe, "linfusion"))
    assert context_parallel_degree(pipe) == 1
