"""The linear-attention kernels fit an H100: cross-compiled for sm_90 on the CPU, no GPU needed.

``bench/kernel_resources.py --target sm_90`` runs the launchers on meta tensors and builds every
kernel they would start with Triton's bundled ptxas. The interpreter (which the other kernel
tests use) compiles nothing, so this is the CPU's one look at registers and shared memory.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# An H100's shared memory per block (227 KiB).
MAX_SHARED = 232448


def _bundled_tools() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    tools = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return (tools / "ptxas").exists() and (tools / "cuobjdump").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _bundled_tools(), reason="needs triton's bundled ptxas and cuobjdump")
def test_largest_head_dims_fit_an_h100(tmp_path):
    """D = 160 and (D, D_v) = (40, 160), the shapes issue 34 feared: within shared memory, no spills."""
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [
        sys.executable,
        "bench/kernel_resources.py",
        "--target",
        "sm_90",
        "--shapes",
        "160x160",
        "40x160",
    ]
    done = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["target"].startswith("sm_90")
    for record in result["records"]:
        assert record["error"] is None, record["error"]
        names = {kernel["kernel"] for kernel in record["kernels"]}
        assert names == {"_state_partials_kernel", "_output_kernel", "_query_grad_kernel", "_key_grad_kernel"}
        for kernel in record["kernels"]:
            assert kernel["shared_bytes"] <= MAX_SHARED, kernel
            assert kernel["local_bytes"] == 0 and 0 < kernel["n_regs"] <= 255, kernel
