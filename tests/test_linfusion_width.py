"""bench/linfusion_width.py: students of several q/k MLP widths distilled, timed and scored (smoke run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("linfusion_width_bench", BENCH / "linfusion_width.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_widths_are_distilled_timed_and_scored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load(monkeypatch)
    out = tmp_path / "width.json"
    result = module.main(
        ["--quick", "--widths", "layer", "0", "--work", str(tmp_path / "work"), "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["config"]["widths"] == ["layer", "0"]
    assert set(saved["step_seconds"]) == {"softmax", "layer", "0"}
    assert all(seconds > 0 for seconds in saved["step_seconds"].values())
    assert set(result["accuracy"]["scores"]) == {"layer", "0"}
    assert 0.0 <= saved["accuracy"]["scores"]["0"]["prompt_accuracy"] <= 1.0
    assert set(saved["accuracy"]["paired_with_layer"]) == {"0"}
    card = Path(saved["config"]["weights"]["0"]).parent / "lindiff.json"
    assert json.loads(card.read_text())["options"]["mid_dim"] == 0
    assert "| 0 |" in module.markdown(saved)


def test_widths_must_name_the_layer_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _load(monkeypatch)
    with pytest.raises(SystemExit):
        module.parse_args(["--widths", "16", "--work", str(tmp_path)])
    with pytest.raises(SystemExit):
        module.parse_args(["--widths", "layer", "-2", "--work", str(tmp_path)])
