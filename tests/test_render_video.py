"""`lindiff render --frames`: MP4s and poster PNGs from a tiny Wan pipeline saved to a folder."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tiny_dit_models
import tiny_models
from PIL import Image

from lindiff.cli import main
from lindiff.pipelines.manifest import MANIFEST_NAME
from lindiff.pipelines.metadata import generation_params, read_params
from lindiff.pipelines.video import INSTALL_HINT, MissingVideoWriter, read_video_params, save_video

SIZE = 32
FRAMES = 5
FPS = 12


@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Wan text-to-video pipeline saved as a diffusers folder (4k + 1 frames, 16 px multiples)."""
    folder = tmp_path_factory.mktemp("wan")
    tiny_dit_models.wan_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def rendered(wan: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One video rendered by the CLI with the linear student."""
    out = tmp_path_factory.mktemp("renders")
    assert main(video_args(wan, out, "--prompt", "a red star")) == 0
    return out


def video_args(model: str, out: Path, *extra: str, frames: int | None = FRAMES) -> list[str]:
    common = ["--size", str(SIZE), "--steps", "2", "--guidance", "2", "--fps", str(FPS), "--device", "cpu"]
    frame_flags = [] if frames is None else ["--frames", str(frames)]
    return ["render", "--model", model, "--method", "linfusion", *common, *frame_flags, "--no-progress",
            "--out", str(out), *extra]  # fmt: skip


def decoded(path: Path) -> np.ndarray:
    return iio.imread(path, plugin="FFMPEG")


def test_render_writes_an_mp4_a_poster_and_the_manifest(rendered: Path) -> None:
    name = "00000-a-red-star-s0"
    assert sorted(p.name for p in rendered.iterdir()) == [f"{name}.mp4", f"{name}.png", MANIFEST_NAME]
    frames = decoded(rendered / f"{name}.mp4")
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    poster = np.asarray(Image.open(rendered / f"{name}.png"))
    assert poster.shape == (SIZE, SIZE, 3)
    assert np.abs(frames[0].astype(int) - poster).mean() < 8  # H.264 is lossy; the poster is exact
    video_params, poster_params = read_params(rendered / f"{name}.mp4"), read_params(rendered / f"{name}.png")
    assert video_params == poster_params
    assert (video_params["frames"], video_params["fps"], video_params["method"]) == (FRAMES, FPS, "linfusion")
    (entry,) = map(json.loads, (rendered / MANIFEST_NAME).read_text().splitlines())
    assert (entry["file"], entry["poster"], entry["frames"], entry["fps"]) == (
        f"{name}.mp4",
        f"{name}.png",
        FRAMES,
        FPS,
    )
    assert math.isclose(iio.immeta(rendered / f"{name}.mp4", plugin="FFMPEG")["fps"], FPS)


def test_a_rerun_skips_the_video(wan: str, rendered: Path, capsys: pytest.CaptureFixture) -> None:
    def written() -> dict[str, int]:  # the manifest is merged again on every run
        return {p.name: p.stat().st_mtime_ns for p in rendered.iterdir() if p.name != MANIFEST_NAME}

    before = written()
    assert main(video_args(wan, rendered, "--prompt", "a red star")) == 0
    assert "0 rendered, 1 already done" in capsys.readouterr().out
    assert written() == before


@pytest.mark.parametrize("source", ["00000-a-red-star-s0.mp4", "00000-a-red-star-s0.png"])
def test_reproduce_from_the_mp4_or_the_poster(rendered: Path, tmp_path: Path, source: str) -> None:
    args = ["render", "--reproduce", str(rendered / source), "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    name = "00000-a-red-star-s0"
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / f"{name}.png")), np.asarray(Image.open(rendered / f"{name}.png"))
    )
    again, first = decoded(tmp_path / f"{name}.mp4"), decoded(rendered / f"{name}.mp4")
    assert np.abs(again.astype(int) - first).max() <= 1
    assert read_params(tmp_path / f"{name}.mp4")["fps"] == FPS


@pytest.mark.parametrize(
    ("frames", "message"),
    [(4, "renders 4k + 1 frames"), (0, "nearest valid: 1 or 5")],
)
def test_frames_the_family_cannot_render_exit_2(
    wan: str, tmp_path: Path, capsys: pytest.CaptureFixture, frames: int, message: str
) -> None:
    assert main(video_args(wan, tmp_path, "--prompt", "x", frames=frames)) == 2
    err = capsys.readouterr().err
    assert f"frames={frames}" in err and message in err
    assert not list(tmp_path.glob("*.mp4"))


def test_frames_on_an_image_pipeline_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_models.sd_pipeline().save_pretrained(tmp_path / "sd")
    args = ["render", "--model", str(tmp_path / "sd"), "--method", "softmax", "--size", "16", "--frames", "5"]
    assert main([*args, "--prompt", "x", "--no-progress", "--out", str(tmp_path / "out")]) == 2
    assert "renders images; leave frames unset" in capsys.readouterr().err


def test_frames_with_reproduce_exit_2(rendered: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = rendered / "00000-a-red-star-s0.mp4"
    assert main(["render", "--reproduce", str(source), "--frames", "9", "--out", str(tmp_path)]) == 2
    assert "--frames cannot be used with --reproduce" in capsys.readouterr().err


def test_a_missing_writer_names_the_extra(
    wan: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_import = builtins.__import__

    def without_ffmpeg(name: str, *args, **kwargs):
        if name.startswith("imageio_ffmpeg"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_ffmpeg)
    assert main(video_args(wan, tmp_path, "--prompt", "x")) == 2
    assert INSTALL_HINT in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))  # refused before rendering
    with pytest.raises(MissingVideoWriter, match=r"lindiff\[video\]"):
        save_video([np.zeros((8, 8, 3), np.uint8)], tmp_path / "v.mp4", {}, fps=8)


def test_video_metadata_round_trips_awkward_prompts(tmp_path: Path) -> None:
    prompt = 'a = b; #c \\ "d"\nnew line, ünïcode ☆'
    params = generation_params(
        prompt=prompt, seed=1, steps=2, guidance=1.0, width=8, height=8, model=None, method="lit",
        weights=None, frames=3, fps=8,
    )  # fmt: skip
    frames = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(3)]
    path = save_video(frames, tmp_path / "v.mp4", params, fps=8)
    assert read_video_params(path) == params
    assert decoded(path).shape == (3, 8, 8, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    with pytest.raises(ValueError, match="even sides"):
        save_video([np.zeros((7, 8, 3), np.uint8)], tmp_path / "odd.mp4", params, fps=8)
