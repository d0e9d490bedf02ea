"""The README's screenshot of the web demo: a headless Chromium renders with Generate, then Compare.

    python bench/demo_screenshot.py                      # embedded model -> bench/results/demo-screenshot.png
    python bench/demo_screenshot.py --out /tmp/demo.png

Playwright drives the system's Chromium (Debian: ``apt-get install chromium``) and never downloads a
browser; the demo runs in-process on the embedded tiny-shapes model. ``tests/test_demo_browser.py``
drives the page through :func:`screenshot` too, so the test checks what the README shows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from lindiff.app import DemoModel, create_model, launch

CHROMIUM_NAMES = ("chromium", "chromium-browser")
OUT = Path(__file__).resolve().parent / "results" / "demo-screenshot.png"
PROMPT = "a red circle above a blue square"
VIEWPORT = {"width": 1440, "height": 1200}
RUN_TIMEOUT_MS = 60_000
"""How long Generate and Compare each may take to finish."""


def find_chromium() -> str | None:
    """Path of a system Chromium on PATH, or ``None``."""
    return next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)


@contextmanager
def serve(model: DemoModel) -> Iterator[str]:
    """Run the demo of ``model`` on a free local port; yields its URL and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(model, port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def screenshot(url: str, chromium: str, out: Path) -> Path:
    """Generate, then Compare, in the demo at ``url``; save a full-page PNG to ``out``.

    Raises:
        AssertionError: a run did not finish (no "Done", no result image, no speed-up) in time.
    """
    with sync_playwright() as playwright:
        # Chromium's sandbox cannot start as root (containers); it only renders our local page.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#generate").click()
            expect(page.locator("#status")).to_contain_text("Done", timeout=RUN_TIMEOUT_MS)
            expect(page.locator("#result img")).to_be_visible()
            page.locator("#compare").click()
            expect(page.locator("#status")).to_contain_text("speed-up", timeout=RUN_TIMEOUT_MS)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=out, full_page=True)
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"PNG path (default {OUT})")
    parser.add_argument("--device", default="cpu", help="device of the demo's model (default cpu)")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        parser.error("no chromium on PATH; install it (Debian: apt-get install chromium)")
    with (
        tempfile.TemporaryDirectory(prefix="lindiff-demo-") as output_dir,
        serve(create_model(device=args.device, output_dir=output_dir)) as url,
    ):
        out = screenshot(url, chromium, args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
