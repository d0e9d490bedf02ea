"""Packaging: the wheel maps kernels/, pipelines/ and app/ into ``lindiff``, ships the assets but not
the recipes that train them, and a checkout root on ``sys.path`` does not shadow packages of those names."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


BUILD_LEFTOVERS = (
    "build",
    "dist",
    "*.egg-info",
    ".build",
    ".venv",
    ".git",
    "__pycache__",
    "*_cache",
    "outputs",
)
"""What a clean checkout lacks: setuptools copies a stale ``build/lib`` (modules since moved away) into
the wheel, so the wheel is built from a copy of the source without these."""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "lindiff"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("lindiff-*.whl")
    return path


def test_wheel_installs_subpackages_inside_lindiff_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("lindiff-")}
    assert tops == {"lindiff"}
    for module in (
        "lindiff/kernels/linear_attention/reference.py",
        "lindiff/kernels/local_attention/__init__.py",
        "lindiff/pipelines/__init__.py",
        "lindiff/app/__init__.py",
        "lindiff/cli.py",
    ):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt")))
    assert b"lindiff = lindiff.cli:main" in entry_points


def test_wheel_ships_the_assets_but_not_the_recipe_that_trains_them(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lindiff/assets/__init__.py" in names
    assert "lindiff/assets/tiny-shapes/world.json" in names
    assert "lindiff/assets/tiny-shapes/unet/diffusion_pytorch_model.safetensors" in names
    assets_code = [n for n in names if n.startswith("lindiff/assets/") and n.endswith(".py")]
    assert assets_code == ["lindiff/assets/__init__.py"], assets_code
    for recipe in ("lindiff/evaluation/training.py", "lindiff/data/styles.py", "lindiff/data/dataset.py"):
        assert recipe not in names
    assert not [n for n in names if n.startswith("recipes/") or "/recipes/" in n]


def test_installed_wheel_imports_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import lindiff, lindiff.kernels, lindiff.pipelines, lindiff.app; "
        "from lindiff.kernels import linear_attention; "
        "print(lindiff.__file__); print(lindiff.kernels.__file__)"
    )
    # -S skips site-packages' .pth files (the editable install's finder); the interpreter then sees
    # the installed wheel first and the dependencies, never the source tree.
    paths = [
        str(target),
        *(p for p in sys.path if p and (not p.startswith(str(ROOT)) or "site-packages" in p)),
    ]
    done = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path[:] = {paths!r}; {code}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.split()
    assert all(line.startswith(str(target)) for line in lines), lines


def _run_in_checkout_root(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_checkout_root_on_sys_path_does_not_shadow_an_installed_kernels_package(tmp_path):
    """``python -m`` in the repository root: ``import kernels`` must still give the PyPI package
    (transformers >= 5.25 imports it), while ``lindiff.kernels`` stays lindiff's."""
    namesake = tmp_path / "site" / "kernels"
    namesake.mkdir(parents=True)
    (namesake / "__init__.py").write_text("MARKER = 'installed kernels'\n")
    printed = _run_in_checkout_root(
        "import kernels; print(kernels.MARKER)", PYTHONPATH=str(tmp_path / "site")
    )
    assert printed.strip() == "installed kernels"
    # With whatever this environment installs (the real package comes with transformers >= 5.25).
    code = "import kernels, lindiff.kernels as ours; print(ours.linear_attention.__name__)"
    assert _run_in_checkout_root(code).strip() == "linear_attention"
