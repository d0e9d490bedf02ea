"""Attention methods, one file each, registered by name in :data:`METHODS`."""

from __future__ import annotations

from ..registry import Registry
from .base import ADDED_MODULE, GRID_ATTRIBUTE, AttentionMethod, LayerInfo
from .clear import Clear
from .linfusion import LinFusion
from .lit import LiT
from .sana import Sana

METHODS: Registry[type[AttentionMethod]] = Registry("method")
METHODS.register(LinFusion.name, LinFusion)
METHODS.register(Sana.name, Sana)
METHODS.register(Clear.name, Clear)
METHODS.register(LiT.name, LiT)


def methods() -> list[str]:
    """Names of the registered attention methods, sorted."""
    return METHODS.names()


def create_method(name: str, **options) -> AttentionMethod:
    """Instantiate the method registered as ``name`` with ``options`` (validated)."""
    return METHODS.get(name)(**options)


__all__ = [
    "ADDED_MODULE",
    "GRID_ATTRIBUTE",
    "METHODS",
    "AttentionMethod",
    "LayerInfo",
    "create_method",
    "methods",
]
