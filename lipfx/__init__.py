"""lipfx: controlled and provable Lipschitz constants for PyTorch models."""

from .errors import ArgumentError, LipfxError, ShapeError, TraceError, UnsupportedModuleError
from . import ops
from .certify import Certificate, certificate
from .bake import bake
from .convert import convert
from .normalization import normalize, normalized_layers, set_constants
from .ops import layer_bound
from .saving import load, save
from . import invertible, robust

__version__ = "0.1.0"

__all__ = ["convert", "normalize", "normalized_layers", "set_constants", "bake", "save", "load", "robust",
           "invertible", "ops", "certificate", "Certificate", "layer_bound", "ArgumentError", "LipfxError",
           "ShapeError", "TraceError", "UnsupportedModuleError"]
