"""Test configuration: CPU by default, Triton kernels under the interpreter, `gpu` marker."""

import os

# The Triton interpreter does its tile matmuls in NumPy; multi-threaded OpenBLAS makes each tiny
# matmul orders of magnitude slower on a busy 2-core machine. Must be set before NumPy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so set it before anything imports
# lindiff.kernels. Without CUDA the kernels can only run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Tiny models gain nothing from intra-op threads, and a second thread slows every op down badly
# when the machine is shared.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
