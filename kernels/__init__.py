"""Attention operators of lindiff (installed as ``lindiff.kernels``).

Each op lives in its own folder with a plain-PyTorch reference beside its fused kernels.

Run from a checkout (``python -m ...`` in the repository root puts the root on ``sys.path``),
this folder also answers ``import kernels`` and shadows the PyPI package of that name, which
transformers 5.25 and later import. Imported under that name, it hands the import over to the
installed package when there is one.
"""

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_to_installed_namesake() -> bool:
    """Put the installed top-level ``kernels`` package in ``sys.modules`` in place of this folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, path)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # the import system removes it again if exec_module raises
    spec.loader.exec_module(module)
    return True


if __name__ != "kernels" or not _hand_over_to_installed_namesake():
    from .linear_attention import linear_attention
    from .local_attention import local_attention

    __all__ = ["linear_attention", "local_attention"]
