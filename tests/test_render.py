"""`lindiff render`: batches, resume after a kill, multi-process splitting, reproduction and bad input."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from accelerate import PartialState
from PIL import Image

import lindiff
from lindiff import assets
from lindiff.cli import main
from lindiff.denoisers import pipeline_adapter
from lindiff.pipelines.batch import Renderer, RenderItem, RenderOptions, render_batch, slugify
from lindiff.pipelines.loading import check_size, load_pipeline, valid_sizes
from lindiff.pipelines.manifest import MANIFEST_NAME
from lindiff.pipelines.metadata import format_params, read_params, save_png
from lindiff.pipelines.prompts import PromptFileError, parse_size, read_prompts
from lindiff.state import get_state

PROMPTS = ["a red star above a blue circle", "a green square", "a yellow triangle", "a purple disc", "a cat"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """The tiny SD pipeline saved as a diffusers folder (native size 16 px, sizes in steps of 4)."""
    folder = tmp_path_factory.mktemp("model")
    tiny_models.sd_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# shapes\n" + "\n".join(PROMPTS) + "\n\n")
    return path


def render_args(model, out, *extra, method="softmax"):
    common = ["--size", "16", "--steps", "2", "--no-progress", "--out", str(out)]
    return ["render", "--model", model, "--method", method, *common, *extra]


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def manifest_keys(folder: Path) -> list[tuple[str, str]]:
    lines = (folder / MANIFEST_NAME).read_text().splitlines()
    return [(entry["key"], entry["file"]) for entry in map(json.loads, lines)]


def assert_same_batch(folder: Path, reference: Path) -> None:
    images, expected = pngs(folder), pngs(reference)
    assert images.keys() == expected.keys()
    for name in images:
        np.testing.assert_array_equal(images[name], expected[name], err_msg=name)
    assert manifest_keys(folder) == manifest_keys(reference)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())


# Items, prompt files and sizes


def test_file_names_are_sanitised_stable_and_capped():
    item = RenderItem(3, "A red star, above a blue circle!", "", 42, 16, 16)
    assert item.filename == "00003-a-red-star-above-a-blue-circle-s42.png"
    assert item.key == RenderItem(3, "A red star, above a blue circle!", "", 42, 16, 16).key
    assert item.key != RenderItem(3, "A red star, above a blue circle!", "", 43, 16, 16).key
    assert slugify("Ünïcode ☆ / ../etc") == "unicode-etc"
    assert slugify("☆☆☆") == "image"
    assert len(slugify("word " * 40)) <= 48


def test_prompt_files_text_and_jsonl(tmp_path, prompt_file):
    rows, problems = read_prompts(prompt_file)
    assert [r.prompt for r in rows] == PROMPTS and not problems
    assert [r.index for r in rows] == list(range(5)) and rows[0].line == 2

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(
        '{"prompt": "a", "negative": "b", "seed": 7, "size": "24x20"}\n'
        "\n"
        '{"prompt": "c", "size": [8, 12], "height": 16}\n'
        '{"prompt": "d", "size": 20}\n'
    )
    a, c, d = read_prompts(jsonl)[0]
    assert (a.negative_prompt, a.seed, a.width, a.height, a.line) == ("b", 7, 24, 20, 1)
    assert (c.index, c.width, c.height, c.line) == (1, 8, 16, 3)
    assert (d.width, d.height) == (20, 20)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x"', "not valid JSON"),
        ('["x"]', "expected a JSON object"),
        ('{"prompt": ""}', "prompt must be a non-empty string"),
        ('{"prompt": "x", "colour": 1}', "unknown key"),
        ('{"prompt": "x", "seed": -1}', "seed must be a non-negative integer"),
        ('{"prompt": "x", "size": "big"}', "size must be N or WxH"),
        ('{"prompt": "x", "width": 0}', "width must be a positive integer"),
    ],
)
def test_malformed_jsonl_lines_are_reported_by_line_number(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(f'{{"prompt": "fine"}}\n{line}\n{{"prompt": "also fine"}}\n')
    with pytest.raises(PromptFileError, match=rf"rows.jsonl:2: {message}.*--on-error skip"):
        read_prompts(path)
    rows, problems = read_prompts(path, on_error="skip")
    assert [(r.prompt, r.index) for r in rows] == [("fine", 0), ("also fine", 2)]
    assert [p.line for p in problems] == [2]


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no usable prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="on_error must be one of abort, skip"):
        read_prompts(tmp_path / "empty.txt", on_error="ignore")
    assert parse_size("32") == (32, 32)
    assert parse_size("24x16") == (24, 16)
    with pytest.raises(ValueError, match=r"\[width, height\]"):
        parse_size([1, 2, 3])


def test_sizes_follow_the_model_and_errors_name_the_nearest():
    pipe = tiny_models.sd_pipeline()
    # A UNet takes any latent size; diffusers' SD pipeline checks for multiples of 8 px.
    adapter = pipeline_adapter(pipe)
    assert adapter.size_multiple(pipe) == 8
    assert adapter.native_size(pipe) == 16
    assert valid_sizes(pipe, 30) == (24, 32)
    assert valid_sizes(pipe, 32) == (32,)
    check_size(pipe, 32, 24)
    with pytest.raises(
        ValueError, match=r"width=30 is not a positive multiple of 8.*nearest valid sizes: 24 or 32"
    ):
        check_size(pipe, 32, 30)
    with pytest.raises(ValueError, match=r"height=2 .* nearest valid sizes: 8$"):
        check_size(pipe, 2, 32)


def test_load_pipeline_converts_and_validates(model):
    pipe = load_pipeline(model, method="linfusion", device="cpu")
    assert get_state(pipe.unet).method.name == "linfusion"
    assert load_pipeline(model, method=None, dtype="bf16").unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"method must be one of softmax, .*linfusion.*; got 'nope'"):
        load_pipeline(model, method="nope")
    with pytest.raises(ValueError, match="need a linear attention method"):
        load_pipeline(model, method="softmax", weights="w.safetensors")
    with pytest.raises(ValueError, match="dtype must be one of fp32, float32, fp16"):
        load_pipeline(model, dtype="half")
    with pytest.raises(ValueError, match="model='/no/such/model': no such folder"):
        load_pipeline("/no/such/model")
    with pytest.raises(ValueError, match="is a file"):
        load_pipeline(str(Path(model) / "model_index.json"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_pipeline(model, device="cuda")


def test_load_pipeline_with_a_controlnet_switches_to_its_pipeline(model, tmp_path):
    base = load_pipeline(model, method=None)
    tiny_models.controlnet(base.unet).save_pretrained(tmp_path / "controlnet")
    pipe = load_pipeline(model, method="linfusion", controlnet=str(tmp_path / "controlnet"))
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert get_state(pipe.controlnet).method.name == "linfusion"


def test_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(assets, "ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match="rebuild it"):
        load_pipeline()
    assert main(["render", "--prompt", "x", "--no-progress", "--out", str(tmp_path / "out")]) == 2
    assert "rebuild it with `python -m recipes.tiny_shapes.build" in capsys.readouterr().err


# Rendering, metadata and resume


def test_render_writes_pngs_with_parameters_and_skips_done_items(model, tmp_path, prompt_file, capsys):
    out = tmp_path / "out"
    assert main(render_args(model, out, "--prompts", str(prompt_file), "--seed", "40")) == 0
    summary = capsys.readouterr().out
    assert "5 rendered, 0 already done, 5 in the batch" in summary and "peak memory" in summary
    names = sorted(p.name for p in out.glob("*.png"))
    assert names[0] == "00000-a-red-star-above-a-blue-circle-s40.png" and names[4] == "00004-a-cat-s44.png"
    params = read_params(out / names[1])
    assert params == {**params, "prompt": "a green square", "seed": 41, "steps": 2, "width": 16, "height": 16}
    assert (params["model"], params["method"], params["highres"]) == (model, "softmax", False)
    assert params["lindiff_version"] == lindiff.__version__
    assert [file for _, file in manifest_keys(out)] == names

    assert main(render_args(model, out, "--prompts", str(prompt_file), "--seed", "40")) == 0
    assert "0 rendered, 5 already done" in capsys.readouterr().out
    (out / names[2]).unlink()  # a deleted image is rendered again
    assert main(render_args(model, out, "--prompts", str(prompt_file), "--seed", "40")) == 0
    assert "1 rendered, 4 already done" in capsys.readouterr().out
    assert [file for _, file in manifest_keys(out)] == names


def test_jsonl_rows_set_their_own_seed_size_and_negative_prompt(model, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red star", "seed": 7, "size": "16x8", "negative": "blue"}\n')
    assert (
        main(render_args(model, tmp_path / "out", "--prompts", str(rows), "--tile", method="linfusion")) == 0
    )
    (path,) = (tmp_path / "out").glob("*.png")
    assert path.name == "00000-a-red-star-s7.png" and Image.open(path).size == (16, 8)
    params = read_params(path)
    assert (params["negative_prompt"], params["method"], params["weights"]) == ("blue", "linfusion", None)


def test_info_prints_the_parameters_of_a_png(model, tmp_path, capsys):
    assert main(render_args(model, tmp_path, "--prompt", "a red star", "--seed", "3")) == 0
    capsys.readouterr()
    image = str(tmp_path / "00000-a-red-star-s3.png")
    assert main(["info", image]) == 0
    out = capsys.readouterr().out
    assert "prompt           a red star" in out and "seed             3" in out
    assert main(["info", image, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 3
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert main(["info", str(tmp_path / "plain.png")]) == 2
    assert "lindiff info: error: " in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.png")]) == 2


def test_reproduce_renders_the_same_image(model, tmp_path, capsys):
    assert main(render_args(model, tmp_path / "a", "--prompt", "a blue circle", "--seed", "5")) == 0
    original = tmp_path / "a" / "00000-a-blue-circle-s5.png"
    argv = ["render", "--reproduce", str(original), "--out", str(tmp_path / "b"), "--no-progress"]
    assert main(argv) == 0
    copy = tmp_path / "b" / original.name
    np.testing.assert_array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(original)))
    assert read_params(copy) == read_params(original)
    capsys.readouterr()
    assert main([*argv[:3], "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "would overwrite it" in capsys.readouterr().err
    assert main([*argv, "--steps", "3", "--seed", "1"]) == 2
    assert "--steps, --seed cannot be used with --reproduce" in capsys.readouterr().err
    params = read_params(original)
    del params["steps"]
    save_png(Image.open(original), tmp_path / "partial.png", params)
    assert main(["render", "--reproduce", str(tmp_path / "partial.png"), "--out", str(tmp_path / "c")]) == 2
    assert "cannot be reproduced: its parameters lack steps" in capsys.readouterr().err


def test_resume_after_a_kill_mid_write_matches_an_uninterrupted_run(model, tmp_path, prompt_file):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(render_args(model, reference, "--prompts", str(prompt_file))) == 0

    worker = Path(__file__).with_name("render_worker.py")
    command = [sys.executable, str(worker), "3", *render_args(model, resumed, "--prompts", str(prompt_file))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(list(resumed.glob("*.png"))) == 2
    assert len(list(resumed.glob(".*.tmp"))) == 1  # the image being written when killed
    assert len(manifest_keys(resumed)) == 2

    assert main(render_args(model, resumed, "--prompts", str(prompt_file))) == 0
    assert_same_batch(resumed, reference)


def test_ctrl_c_keeps_finished_images_and_resumes(model, tmp_path, prompt_file, monkeypatch, capsys):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(render_args(model, reference, "--prompts", str(prompt_file))) == 0
    render = Renderer.__call__
    calls = []

    def interrupt_third(self, item, progress=None):
        calls.append(item.index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(self, item, progress)

    monkeypatch.setattr(Renderer, "__call__", interrupt_third)
    assert main(render_args(model, out, "--prompts", str(prompt_file))) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert len(manifest_keys(out)) == 2 and not list(out.glob(".*"))
    monkeypatch.setattr(Renderer, "__call__", render)
    assert main(render_args(model, out, "--prompts", str(prompt_file))) == 0
    assert_same_batch(out, reference)


class ThreadState:
    """A stand-in for accelerate's PartialState: ``num_processes`` threads meeting at a barrier."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, index: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self.barrier = index, barrier.parties, barrier
        self.is_main_process = index == 0

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=120)


def test_processes_split_the_pending_items_into_one_manifest(tmp_path):
    options = RenderOptions(model="tiny", method=None, steps=2)
    items = [RenderItem(i, prompt, "", i, 16, 16) for i, prompt in enumerate(PROMPTS)]
    renderers = [Renderer(tiny_models.sd_pipeline(), options) for _ in range(2)]
    render_batch(
        renderers[0], items[1:2], tmp_path, ThreadState(0, threading.Barrier(1)), show_progress=False
    )

    barrier = threading.Barrier(2)
    results = [None, None]

    def run(rank: int) -> None:
        results[rank] = render_batch(renderers[rank], items, tmp_path, ThreadState(rank, barrier), False)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    rendered = [[r.item.index for r in result.rendered] for result in results]
    assert rendered == [[0, 2], [3, 4]]
    assert [result.skipped for result in results] == [1, 1]
    entries = [json.loads(line) for line in (tmp_path / MANIFEST_NAME).read_text().splitlines()]
    assert [entry["index"] for entry in entries] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_NAME] + [i.filename for i in items])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_splits_the_batch_between_two_cpu_processes(model, tmp_path, prompt_file):
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(render_args(model, reference, "--prompts", str(prompt_file))) == 0
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    command += ["-m", "lindiff.cli", *render_args(model, out, "--prompts", str(prompt_file))]
    env = {**os.environ, "ACCELERATE_USE_CPU": "yes", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 1 of 2:" in done.stdout and "process 2 of 2:" in done.stdout
    assert done.stdout.count("3 rendered") == 1 and done.stdout.count("2 rendered") == 1
    assert_same_batch(out, reference)


# Bad input and failures: a message, an exit code, no traceback


def test_user_errors_exit_2_with_a_message(model, tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "nope")], "no such folder"),
        (["--prompts", str(tmp_path / "missing.txt")], "prompt file"),
        (
            ["--width", "30"],
            "width=30 is not a positive multiple of 8, which this model needs; nearest valid sizes: 24 or 32",
        ),
        (["--method", "nope"], "method must be one of softmax, "),
        (["--steps", "0"], "steps must be at least 1"),
    ]
    for extra, message in cases:
        argv = render_args(model, tmp_path / "out", *extra)
        if "--prompts" not in extra:
            argv += ["--prompt", "x"]
        if "--method" in extra:
            argv.remove("softmax")
            argv.remove("--method")
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("lindiff render: error: ") and message in err, err


def test_malformed_prompt_lines_abort_or_are_skipped(model, tmp_path, capsys, caplog):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red star"}\n{"prompt": 3}\n{"prompt": "a cat", "size": 30}\n')
    assert main(render_args(model, tmp_path / "out", "--prompts", str(rows))) == 2
    err = capsys.readouterr().err
    assert "rows.jsonl:2: prompt must be a non-empty string" in err and "--on-error skip" in err
    assert main(render_args(model, tmp_path / "out", "--prompts", str(rows), "--on-error", "skip")) == 0
    assert "1 rendered" in capsys.readouterr().out
    assert "rows.jsonl:2:" in caplog.text and "rows.jsonl:3: height=30" in caplog.text
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["00000-a-red-star-s0.png"]


def test_out_of_memory_exits_3_with_advice(model, tmp_path, monkeypatch, capsys):
    def out_of_memory(self, item, progress=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(Renderer, "__call__", out_of_memory)
    assert main(render_args(model, tmp_path / "out", "--prompt", "x")) == 3
    err = capsys.readouterr().err
    assert "out of memory (CUDA out of memory. Tried to allocate 80.00 GiB)" in err
    assert "--tile" in err and "--offload" in err and "smaller --size" in err


def test_command_line_errors_print_no_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.txt")
    command = [sys.executable, "-m", "lindiff.cli", "render", "--prompts", missing, "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == f"lindiff render: error: prompt file {missing!r} does not exist"
    with pytest.raises(SystemExit) as exit_info:
        main(["render", "--prompt", "x", "--dtype", "fp64"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp64'" in capsys.readouterr().err


def test_sizes_above_the_native_size_render_in_stages(model, tmp_path, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("lindiff.pipelines.batch._ImageBar.__call__", lambda self, p: seen.append(p))
    assert (
        main(render_args(model, tmp_path, "--prompt", "a red star", "--size", "32x64", "--steps", "4")) == 0
    )
    assert "yes" in capsys.readouterr().out  # the high-res column
    (path,) = tmp_path.glob("*.png")
    assert Image.open(path).size == (32, 64)
    params = read_params(path)
    assert (params["highres"], params["stages"], params["width"], params["height"]) == (True, "auto", 32, 64)
    stages = sorted({(p.stage, p.num_stages, p.width, p.height) for p in seen})
    # 2.8x the native 16 px side: one SDEdit stage ("auto" jumps up to 4x in the first)
    assert stages[0][:2] == (1, 2) and stages[-1] == (2, 2, 32, 64)
    assert seen[-1].step == seen[-1].num_steps


def test_every_number_of_stages_works_by_default_and_strengths_travel_with_the_png(
    model, tmp_path, capsys, monkeypatch
):
    """Six stages need five strengths, one more than LinFusion's published four: the default
    schedule extends itself. ``--strengths`` chooses them, is recorded, and ``--reproduce`` reuses it."""
    seen = []
    monkeypatch.setattr("lindiff.pipelines.batch._ImageBar.__call__", lambda self, p: seen.append(p))
    extra = ["--prompt", "a red star", "--size", "64", "--steps", "10", "--stages", "6"]
    assert main(render_args(model, tmp_path / "default", *extra)) == 0
    assert max(p.num_stages for p in seen) == 6
    (path,) = (tmp_path / "default").glob("*.png")
    assert read_params(path)["strengths"] is None
    capsys.readouterr()

    assert main(render_args(model, tmp_path / "short", *extra, "--strengths", "0.5", "0.2")) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert (
        err.startswith("lindiff render: error: ") and "--strengths of lindiff render) has 2 strengths" in err
    )

    chosen = ["--strengths", "0.5", "0.4", "0.3", "0.2", "0.1"]
    assert main(render_args(model, tmp_path / "chosen", *extra, *chosen)) == 0
    (path,) = (tmp_path / "chosen").glob("*.png")
    assert read_params(path)["strengths"] == [0.5, 0.4, 0.3, 0.2, 0.1]
    assert "High-res strengths: 0.5 0.4 0.3 0.2 0.1" in format_params(read_params(path))
    again = tmp_path / "again"
    argv = ["render", "--reproduce", str(path), "--out", str(again), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again / path.name)))
    assert main([*argv[:-3], "--strengths", "0.3", "--no-progress"]) == 2
    assert "--strengths cannot be used with --reproduce" in capsys.readouterr().err


def test_highres_is_chosen_above_the_native_size():
    renderer = Renderer(tiny_models.sd_pipeline(), RenderOptions(model="tiny", method=None))
    assert not renderer.uses_highres(RenderItem(0, "x", "", 0, 16, 16))
    assert renderer.uses_highres(RenderItem(0, "x", "", 0, 32, 16))
    forced = Renderer(tiny_models.sd_pipeline(), RenderOptions(model="tiny", method=None, highres=False))
    assert not forced.uses_highres(RenderItem(0, "x", "", 0, 64, 64))
    assert forced.params(RenderItem(0, "x", "", 0, 64, 64))["stages"] is None


@pytest.mark.parametrize(("flag", "tile_vae"), [([], "auto"), (["--no-tile"], False), (["--tile"], True)])
def test_the_high_resolution_chain_tiles_the_vae_as_tile_says(model, tmp_path, monkeypatch, flag, tile_vae):
    from lindiff.pipelines.highres import HighResPipeline

    seen = []
    call = HighResPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["tile_vae"])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(HighResPipeline, "__call__", spy)
    extra = ["--prompt", "a red star", "--size", "32", "--steps", "3", "--highres", *flag]
    assert main(render_args(model, tmp_path / "out", *extra)) == 0
    assert seen == [tile_vae]
