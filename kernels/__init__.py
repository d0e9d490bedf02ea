"""Attention operators of lindiff (installed as ``lindiff.kernels``).

Each op lives in its own folder with a plain-PyTorch reference beside its fused kernels.
"""

from .linear_attention import linear_attention
from .local_attention import local_attention

__all__ = ["linear_attention", "local_attention"]
