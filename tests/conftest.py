"""Test configuration: CPU by default, Triton kernels under the interpreter, `gpu` marker."""

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so set it before anything imports
# lindiff.kernels. Without CUDA the kernels can only run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


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
