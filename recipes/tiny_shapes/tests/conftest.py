"""Test settings of the recipe, as in tests/conftest.py: one torch thread, seed 0 before every test."""

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and a second thread slows every op down badly
# when the machine is shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
