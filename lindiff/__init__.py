"""lindiff: linear-time attention for pretrained diffusion models, as ordinary diffusers pipelines.

pipe = lindiff.linearize(pipe, method="linfusion", weights=None)
lindiff.restore(pipe)
lindiff.save_weights(pipe, "out_dir")
lindiff.load_weights(pipe, "out_dir")
lindiff.methods()
lindiff.assets.path("tiny-shapes")   # the embedded models, offline
"""

from . import assets
from .attention import methods
from .convert import linearize, restore
from .version import __version__
from .weights import load_weights, save_weights

__all__ = ["__version__", "assets", "linearize", "load_weights", "methods", "restore", "save_weights"]
