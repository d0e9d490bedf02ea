"""Browser test of the Gradio demo: Playwright drives Debian's Chromium headless (never downloads one)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny_models
from playwright.sync_api import expect, sync_playwright

from lindiff.app import create_model, launch

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

CHROMIUM_NAMES = ("chromium", "chromium-browser")
APT_TIMEOUT_S = 900
SCREENSHOT = Path(__file__).resolve().parents[1] / "bench" / "results" / "demo-screenshot.png"
"""Overwritten by every run; the README shows it."""


def find_or_install_chromium() -> str:
    """Path of a system Chromium; installs Debian's package with apt-get when root, else skips."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("no chromium on PATH, and no apt-get as root to install it (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "chromium"]):
            subprocess.run(command, check=True, capture_output=True, timeout=APT_TIMEOUT_S, env=env)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"could not install chromium with apt-get: {error}")
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("apt-get installed chromium, but it is not on PATH")
    return found


@pytest.fixture(scope="session")
def chromium() -> str:
    return find_or_install_chromium()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo of the embedded model when it is installed (as users see it), else of a tiny pipeline."""
    try:
        model = create_model(device="cpu", output_dir=str(tmp_path_factory.mktemp("demo-out")))
    except FileNotFoundError:
        folder = tmp_path_factory.mktemp("demo-model")
        tiny_models.sd_pipeline().save_pretrained(folder)
        model = create_model(str(folder), device="cpu", output_dir=str(tmp_path_factory.mktemp("demo-out")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(model, port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_generate_and_compare_in_chromium(chromium: str, url: str) -> None:
    with sync_playwright() as playwright:
        # Chromium's sandbox cannot start as root (containers); it is only a browser for this test.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1200})
            page.goto(url)
            page.locator("#prompt textarea").fill("a red circle above a blue square")
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
            expect(page.locator("#result img")).to_be_visible()
            page.locator("#compare").click()
            expect(page.locator("#status")).to_contain_text("speed-up", timeout=60_000)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=SCREENSHOT, full_page=True)
        finally:
            browser.close()
