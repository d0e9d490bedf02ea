"""Browser test of the Gradio demo: the README screenshot's script drives a system Chromium headless.

The test never installs a browser nor writes into the tree: without Chromium on PATH it skips, and
its screenshot goes to a temporary folder (``python bench/demo_screenshot.py`` updates the README's).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import tiny_models
from PIL import Image

from lindiff.app import create_model

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "demo_screenshot.py"


def load_script() -> ModuleType:
    """Import ``bench/demo_screenshot.py`` (bench scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("demo_screenshot_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_screenshot = load_script()


@pytest.fixture(scope="session")
def chromium() -> str:
    found = demo_screenshot.find_chromium()
    if found is None:
        pytest.skip(
            "no system Chromium on PATH (chromium, chromium-browser); install it: apt-get install chromium"
        )
    return found


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo of the embedded model when it is installed (as users see it), else of a tiny pipeline."""
    output_dir = str(tmp_path_factory.mktemp("demo-out"))
    try:
        model = create_model(device="cpu", output_dir=output_dir)
    except FileNotFoundError:
        folder = tmp_path_factory.mktemp("demo-model")
        tiny_models.sd_pipeline().save_pretrained(folder)
        model = create_model(str(folder), device="cpu", output_dir=output_dir)
    with demo_screenshot.serve(model) as address:
        yield address


def test_generate_and_compare_in_chromium(chromium: str, url: str, tmp_path: Path) -> None:
    out = demo_screenshot.screenshot(url, chromium, tmp_path / "demo.png")
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out) as image:  # the whole page: the viewport's width, at least its height
        assert image.width == demo_screenshot.VIEWPORT["width"]
        assert image.height >= demo_screenshot.VIEWPORT["height"]
