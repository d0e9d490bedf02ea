"""bench/gpu_check.sh --smoke: every step runs at tiny sizes and leaves its JSON, or a note saying why not.

The script is what a GPU machine runs for issue 34; this checks, without one, that each step
starts, writes where ``--out`` says (never into the tree) and is summarised.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"tests-linear", "tests-gpu", "resources", "kernels", "unet", "dit", "video"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_gpu_check_smoke(tmp_path):
    command = ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(
        [*command, "--python", sys.executable], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    (summary_path,) = tmp_path.glob("gpu_check-*.json")
    summary = json.loads(summary_path.read_text())
    assert summary["smoke"] and summary["device"]
    steps = {step["step"]: step for step in summary["steps"]}
    assert set(steps) == STEPS
    for step in steps.values():
        assert step["status"] in ("ok", "skipped"), step
        if step["status"] == "ok":
            assert (tmp_path / step["json"]).is_file(), step
        else:
            assert step["note"], step
    # The device machine returns at most 8 files from one flat folder.
    assert len(list(tmp_path.iterdir())) <= 8 and all(p.is_file() for p in tmp_path.iterdir())

    tests = json.loads((tmp_path / steps["tests-linear"]["json"]).read_text())
    runs = {step["step"]: step["pytest"] for step in tests["steps"]}
    assert runs["tests-linear"]["tests"] >= 1 and runs["tests-linear"]["failures"] == 0
    resources = json.loads((tmp_path / steps["resources"]["json"]).read_text())
    if not torch.cuda.is_available():
        assert resources["note"].startswith("no compiled kernels") and resources["records"] == []
        assert runs["tests-gpu"]["skipped"] == runs["tests-gpu"]["tests"]
    kernels = json.loads((tmp_path / steps["kernels"]["json"]).read_text())
    assert kernels["complete"] and {r["section"] for r in kernels["records"]} == {"linear", "local_flux"}
    assert {"figure", "value", "goal"} <= set(summary["goals"][0])
    assert (tmp_path / summary_path.name.replace(".json", ".log")).stat().st_size > 0
